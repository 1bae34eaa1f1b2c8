"""vugen: give any Hugging Face vision-language model the ability to generate images.

The VUGEN / VGT recipe in three Lightning stages: a dimension reducer over the VLM's own vision features, a
LoRA latent sampler in the VLM's language model, and a VAE-free pixel diffusion decoder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vugen.registry import build_adapter, get_adapter_class, list_adapters, register_adapter

__version__ = "0.1.0"
__all__ = ["__version__", "build_adapter", "get_adapter_class", "list_adapters", "register_adapter"]

# Every `import vugen.x` runs this file first: the registry's functions are resolved on first use (PEP 562), so a
# light module (the CLI, `vugen adapters`) imports nothing it does not need.
_REGISTRY_NAMES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module("vugen.registry"), name)
    raise AttributeError(f"module 'vugen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
