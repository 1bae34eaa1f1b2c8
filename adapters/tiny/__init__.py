"""Tiny offline VLM checkpoints for tests and the demo: random weights, built from configs in well under a
second, written with `save_pretrained` so adapters load them through the same `from_pretrained` path a hub
id takes. No network, no files from anywhere.

    path = build_tiny_vlm("llava", "/tmp/tiny-llava")
    adapter = LlavaAdapter(path)

Two kinds of names: the hand-tuned recipes of `TINY_FAMILIES` (the tests' fixtures), and any model_type of
transformers' image-text-to-text mapping (`ARCHITECTURES`: the architecture's own config class shrunk, its own
processor built offline; `vugen_adapters.tiny.architecture`). `python -m vugen_adapters.tiny.survey` builds and
checks every architecture.

The debug recipes live here, apart from the production adapters: one module per family
(`vugen_adapters.tiny.llava`, ...) on the shared tokenizer and widths of `vugen_adapters.tiny.common`. Imports point
one way: a recipe may import from the family adapters, a production adapter never imports anything tiny.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, ProcessorMixin

from vugen_adapters.tiny.architecture import ARCHITECTURES, TinyBuildError, build_tiny_architecture
from vugen_adapters.tiny.common import CHAT_TEMPLATE, TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id
from vugen_adapters.tiny.gemma3 import tiny_gemma3
from vugen_adapters.tiny.idefics3 import tiny_idefics3, tiny_smolvlm
from vugen_adapters.tiny.internvl import tiny_internvl
from vugen_adapters.tiny.llava import tiny_llava_clip, tiny_llava_siglip, tiny_llava_wide_tower
from vugen_adapters.tiny.paligemma import tiny_paligemma
from vugen_adapters.tiny.qwen2_vl import tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "TINY_FAMILIES",
    "TINY_TEXT",
    "TINY_VISION",
    "TinyBuildError",
    "TinyFamily",
    "build_tiny_architecture",
    "build_tiny_vlm",
    "tiny_tokenizer",
    "token_id",
]


class TinyFamily(NamedTuple):
    """A family's tiny recipe and the registered adapter that loads what it builds."""

    recipe: Callable[[], tuple[PreTrainedModel, ProcessorMixin]]  # random model and its processor
    adapter: str  # name in vugen's adapter registry


TINY_FAMILIES = {
    "llava": TinyFamily(tiny_llava_siglip, "llava"),
    "llava_clip": TinyFamily(tiny_llava_clip, "llava"),
    "llava_wide_tower": TinyFamily(tiny_llava_wide_tower, "llava"),
    "qwen2_vl": TinyFamily(tiny_qwen2_vl, "qwen2_vl"),
    "qwen2_5_vl": TinyFamily(tiny_qwen2_5_vl, "qwen2_5_vl"),
    "qwen3_vl": TinyFamily(tiny_qwen3_vl, "qwen3_vl"),
    "idefics3": TinyFamily(tiny_idefics3, "idefics3"),
    "smolvlm": TinyFamily(tiny_smolvlm, "smolvlm"),
    "paligemma": TinyFamily(tiny_paligemma, "paligemma"),
    "internvl": TinyFamily(tiny_internvl, "internvl"),
    "gemma3": TinyFamily(tiny_gemma3, "gemma3"),
}


def build_tiny_vlm(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint (weights, config, processor) to `directory`.

    Args:
        name: a recipe of `TINY_FAMILIES` (hand-tuned for the tests), else a model_type of `ARCHITECTURES`.
        directory: output folder (created).
        seed: torch seed for the random weights, so two builds are identical.

    Returns:
        The folder, ready for `from_pretrained`.

    Raises:
        TinyBuildError: an unknown name, or an architecture that cannot be built offline (one line saying why).
    """
    if name not in TINY_FAMILIES:
        if name not in ARCHITECTURES:
            raise TinyBuildError(
                f"no tiny checkpoint named {name!r}: expected a recipe ({', '.join(sorted(TINY_FAMILIES))}) or a "
                f"model_type of transformers' image-text-to-text mapping ({', '.join(ARCHITECTURES)})"
            )
        return build_tiny_architecture(name, directory, seed=seed)
    torch.manual_seed(seed)
    model, processor = TINY_FAMILIES[name].recipe()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
