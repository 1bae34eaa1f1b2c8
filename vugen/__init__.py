"""vugen: give any Hugging Face vision-language model the ability to generate images.

The VUGEN / VGT recipe in three Lightning stages: a dimension reducer over the VLM's own vision features, a
LoRA latent sampler in the VLM's language model, and a VAE-free pixel diffusion decoder.
"""

from vugen.registry import build_adapter, get_adapter_class, list_adapters, register_adapter

__version__ = "0.1.0"
__all__ = ["__version__", "build_adapter", "get_adapter_class", "list_adapters", "register_adapter"]
