"""Random checkpoints at the released models' geometry, for running the shipped family configs offline.

Each family's entry in `RELEASED` (`vugen_adapters.tiny.released_checkpoints`) copies, as data, the geometry of the
checkpoint that `configs/<family>/*.yaml` names: the `config.json` fields that size the vision tower, the projector /
merger and the language model (widths, heads, kv heads, head_dim, intermediate sizes, patch / merge / pixel-shuffle
factors, image size, rope settings) and the `preprocessor_config.json` settings of its image processor (size, mean /
std, pixel budget, tile size, resampling), under the names those files use. `build_released_geometry` builds a random
model from them with two changes, both to fit a CPU:

- depth: tower and language model cut to `layers` blocks (raised to the few a family needs to keep its layer
  structure: LLaVA reads the second-to-last tower layer, Qwen2.5-VL mixes windowed and full attention); the
  per-layer lists of the released config are cut to match (`Released.cut`);
- vocabulary: the tiny tokenizer of `vugen_adapters.tiny.common` (a few hundred tokens) and its special-token ids.
  vugen depends on no vocabulary size or token id of a checkpoint (it reads them from the tokenizer), so the
  embedding and LM-head rows are no geometry the configs rely on.

Nothing is downloaded: the values were copied from the released files (their keys as published), checked against
transformers' default configs where those are the released model's (installed `configuration_*.py`); where a
value is not certain, its comment says so.

    path = build_released_geometry("qwen2_vl", "/tmp/qwen2-vl-2b-geometry")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GotOcr2ImageProcessor,
    Idefics3ImageProcessor,
    Idefics3Processor,
    InternVLProcessor,
    InternVLVideoProcessor,
    LlavaProcessor,
    PaliGemmaProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipImageProcessor,
)

from vugen_adapters.tiny import gemma3, idefics3, internvl
from vugen_adapters.tiny.common import tiny_tokenizer, token_id
from vugen_adapters.tiny.released_checkpoints import QWEN_TOKENS, RELEASED, Released

__all__ = ["build_released_geometry", "released_config"]


def _llava(released: Released, config: dict[str, Any]) -> ProcessorMixin:
    tokenizer = tiny_tokenizer(["<image>"], image_placeholder="<image>")
    config["image_token_index"] = token_id(tokenizer, "<image>")
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(**released.image_processor),
        tokenizer=tokenizer,
        image_token="<image>",
        chat_template=tokenizer.chat_template,
        **released.processor,
    )


def _qwen(processor_class: type, video_processor_class: type) -> Callable[[Released, dict[str, Any]], ProcessorMixin]:
    def parts(released: Released, config: dict[str, Any]) -> ProcessorMixin:
        tokenizer = tiny_tokenizer(QWEN_TOKENS, image_placeholder="<|vision_start|><|image_pad|><|vision_end|>")
        names = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
        names |= {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
        config |= {f"{name}_token_id": token_id(tokenizer, token) for name, token in names.items()}
        # the Qwen text configs default to the released vocabulary's special-token ids: point them into the tiny one
        config["text_config"] |= {f"{n}_token_id": getattr(tokenizer, f"{n}_token_id") for n in ("bos", "eos", "pad")}
        settings = released.image_processor  # the video processor (vugen reads no video) takes the image settings
        return processor_class(
            image_processor=Qwen2VLImageProcessor(**settings),
            tokenizer=tokenizer,
            video_processor=video_processor_class(**settings),
            chat_template=tokenizer.chat_template,
        )

    return parts


def _idefics3(released: Released, config: dict[str, Any]) -> ProcessorMixin:
    tokenizer = tiny_tokenizer(idefics3.IMAGE_TOKENS, image_placeholder="<image>")
    config["image_token_id"] = token_id(tokenizer, "<image>")
    image_processor = Idefics3ImageProcessor(**released.image_processor)
    return Idefics3Processor(image_processor, tokenizer, chat_template=tokenizer.chat_template, **released.processor)


def _paligemma(released: Released, config: dict[str, Any]) -> ProcessorMixin:
    tokenizer = tiny_tokenizer([], image_placeholder="<image>")
    tokenizer.chat_template = None  # PaliGemma has none: prefix prompts
    processor = PaliGemmaProcessor(
        image_processor=SiglipImageProcessor(**released.image_processor), tokenizer=tokenizer
    )
    # the processor adds <image>, <locXXXX> and <segXXX>: PaliGemma keeps the grown vocabulary on the top level too
    config |= {"image_token_index": processor.image_token_id, "vocab_size": len(tokenizer)}
    return processor


def _internvl(released: Released, config: dict[str, Any]) -> ProcessorMixin:
    tokens = internvl.IMAGE_TOKENS
    tokenizer = tiny_tokenizer(list(tokens.values()), image_placeholder="<IMG_CONTEXT>", **tokens)
    config["image_token_id"] = token_id(tokenizer, "<IMG_CONTEXT>")
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(**released.image_processor),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=released.image_processor["size"]),
        chat_template=tokenizer.chat_template,
        **released.processor,
    )


def _gemma3(released: Released, config: dict[str, Any]) -> ProcessorMixin:
    tokens = gemma3.IMAGE_TOKENS
    tokenizer = tiny_tokenizer(list(tokens.values()), image_placeholder=tokens["boi_token"], **tokens)
    config |= {f"{name}_index": token_id(tokenizer, token) for name, token in tokens.items()}
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(**released.image_processor),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        **released.processor,
    )


# family -> (its RELEASED entry, config being built) -> the processor (tiny tokenizer), token ids written into config
_PROCESSORS: dict[str, Callable[[Released, dict[str, Any]], ProcessorMixin]] = {
    "llava": _llava,
    "qwen2_vl": _qwen(Qwen2VLProcessor, Qwen2VLVideoProcessor),
    "qwen2_5_vl": _qwen(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
    "qwen3_vl": _qwen(Qwen3VLProcessor, Qwen3VLVideoProcessor),
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "paligemma": _paligemma,
    "internvl": _internvl,
    "gemma3": _gemma3,
}


def released_config(family: str, layers: int = 1) -> dict[str, Any]:
    """The family's released `config.json` geometry with tower and LM cut to `layers` blocks (see `Released`)."""
    released = RELEASED[family]
    config = copy.deepcopy(released.config)
    vision, text = config["vision_config"], config["text_config"]
    vision_layers, text_layers = max(layers, released.min_layers[0]), max(layers, released.min_layers[1])
    vision["depth" if "depth" in vision else "num_hidden_layers"] = vision_layers
    text["num_hidden_layers"] = text_layers
    for section, values in released.cut(vision_layers, text_layers).items():
        config[section] |= values
    return config


def build_released_geometry(family: str, directory: str | Path, layers: int = 1, seed: int = 0) -> Path:
    """Write a random checkpoint of `family` at its released geometry, depth cut, to `directory`.

    Args:
        family: a key of `RELEASED` (the families with configs in `configs/`).
        directory: output folder (created).
        layers: blocks of the vision tower and of the language model (raised to the family's `min_layers`).
        seed: torch seed for the random weights, so two builds are identical.

    Returns:
        The folder, ready for `from_pretrained` (weights, config, processor, tokenizer).
    """
    if family not in RELEASED:
        raise KeyError(f"no released geometry for family {family!r}; known: {', '.join(sorted(RELEASED))}")
    config = released_config(family, layers)
    processor = _PROCESSORS[family](RELEASED[family], config)
    config["text_config"]["vocab_size"] = len(processor.tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
