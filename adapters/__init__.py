"""Built-in VLM adapters for vugen (installed as `vugen_adapters`)."""
