"""Built-in VLM adapters for vugen (installed as `vugen_adapters`).

`auto` wraps any image-text-to-text checkpoint by introspection; each family module (`llava`, `qwen2_vl`, ...)
subclasses it and declares only what differs for that family. `tiny` holds the tiny debug recipes of tests and the
demo, apart from the production adapters, which never import it.
"""
