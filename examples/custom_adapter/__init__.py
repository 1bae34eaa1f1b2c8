"""A vision-language model that is not a transformers model, plugged into vugen through a custom adapter."""
