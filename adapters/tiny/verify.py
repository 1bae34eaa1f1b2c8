"""Check a saved tiny checkpoint the way a user's code meets it: loaded back with the Auto classes, the chat template
applied to a message with an image, the processor run on image and text, the full model forward with labels (which
fails unless the processor expands the image placeholder into as many image tokens as the vision path emits), and
`get_image_features` on the processor's image inputs. An encoder-decoder whose processor reads the image alone
(Pix2Struct, PP-FormulaNet) gets the chat as its decoder input and target.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
)

__all__ = ["TinyCheck", "image_tokens_per_image", "observed_image_token", "verify_tiny_checkpoint"]

# Inputs of the language side: never passed to `get_image_features`.
_TEXT_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "position_ids", "labels"}
_VIDEO_FRAMES = 4  # InstructBLIP-Video reads clips of exactly 4 frames
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a red circle on the left"}]},
]


@dataclass(frozen=True)
class TinyCheck:
    """What `verify_tiny_checkpoint` measured."""

    loss: float  # full forward with labels on the processor's output
    parameters: int  # model parameter count
    sequence_length: int  # tokens of the processed prompt, image tokens included
    image_features: tuple[int, ...]  # shape of the first tensor `get_image_features` returns; () without one


def verify_tiny_checkpoint(directory: str | Path, image_size: tuple[int, int] = (32, 32)) -> TinyCheck:
    """Load `directory` with the Auto classes and run processor, full forward with labels and image features.

    Args:
        directory: a folder written by `build_tiny_architecture` (or any image-text-to-text checkpoint).
        image_size: (height, width) of the random test image.

    Raises:
        AssertionError: the forward computes no loss, or a non-finite one.
        Exception: whatever transformers raises on a mismatch (image-token count, missing inputs, ...).
    """
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    if hasattr(processor, "image_processor"):  # InstructBLIP-Video has a video processor only
        AutoImageProcessor.from_pretrained(directory)  # what vugen's AutoAdapter loads besides the processor
    AutoTokenizer.from_pretrained(directory)
    # A processor class that takes no chat template (BLIP, GIT, ...) leaves it to its tokenizer.
    templater = processor if processor.chat_template else processor.tokenizer
    text = templater.apply_chat_template(CONVERSATION, tokenize=False)
    # Floating inputs in the model's dtype, as a user's code does: Llama 4's image processor emits bfloat16 pixels.
    inputs = _process(processor, text, _random_image(image_size)).to(model.dtype)
    if "input_ids" not in inputs:  # an encoder of the image alone (Pix2Struct, PP-FormulaNet): the text is the target
        if "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = processor.tokenizer(text, return_tensors="pt").input_ids
        inputs["labels"] = inputs["decoder_input_ids"]
    elif "labels" not in inputs or bool((inputs["labels"] == -100).all()):  # PaliGemma's mask a prompt wholly
        padding = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])) == 0
        inputs["labels"] = inputs["input_ids"].masked_fill(padding, -100)
    with torch.no_grad():
        output = model(**inputs)
        features = _image_features(model, inputs)
    if getattr(output, "loss", None) is None:  # DiffusionGemma's block-diffusion forward takes no labels
        raise AssertionError(f"{type(model).__name__}.forward computes no loss from labels")
    loss = float(output.loss)
    assert np.isfinite(loss), f"non-finite loss {loss}"
    shape = tuple(features.shape) if features is not None else ()
    tokens = inputs["input_ids"] if "input_ids" in inputs else inputs["labels"]  # TrOCR's processor: labels only
    return TinyCheck(loss, model.num_parameters(), tokens.shape[-1], shape)


def _random_image(size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _process(processor: Any, text: str, image: Image.Image) -> BatchFeature:
    """The processor's output for one prompt and one image (nested per prompt when the flat form is refused; a clip
    of the image repeated for a processor of videos only)."""
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if "mm_token_type_ids" in processor.model_input_names:  # Cosmos3 Edge's M-RoPE needs them but returns them on ask
        kwargs["return_mm_token_type_ids"] = True
    if not hasattr(processor, "image_processor") and hasattr(processor, "video_processor"):
        return processor(images=[[image] * _VIDEO_FRAMES], text=[text], **kwargs)
    try:
        return processor(images=[image], text=[text], **kwargs)
    except (ValueError, TypeError, IndexError):
        return processor(images=[[image]], text=[text], **kwargs)


def _image_features(model: Any, inputs: BatchFeature) -> torch.Tensor | None:
    """The first tensor of `get_image_features` on the processor's image inputs; None for a model without one
    (GIT, BLIP, IDEFICS read the image inside their forward only)."""
    owner = model.model if hasattr(getattr(model, "model", None), "get_image_features") else model
    if not hasattr(owner, "get_image_features"):
        return None
    parameters = inspect.signature(owner.get_image_features).parameters
    image_inputs = {k: v for k, v in inputs.items() if k not in _TEXT_INPUTS and k in parameters}
    features = owner.get_image_features(**image_inputs)
    return _first_tensor(features)


def image_tokens_per_image(model: Any, image_processor: Any, size: tuple[int, int] = (32, 32)) -> int | None:
    """How many language-model tokens the vision path makes of one image (of one tile, for tiling processors); None
    when the model has no `get_image_features` that takes the image processor's output alone."""
    inputs = image_processor(images=[_random_image(size)], return_tensors="pt")
    if isinstance(inputs, torch.Tensor):  # IDEFICS' image processor returns bare pixels, for its cross-attention
        return None
    inputs = inputs.to(model.dtype)
    try:
        with torch.no_grad():
            features = _image_features(model, inputs)
    except Exception:  # a vision path that needs more than the image inputs: the verification reports what fails
        return None
    pixels = inputs.get("pixel_values")
    if features is None or pixels is None:
        return None
    tiles = pixels.numel() // math.prod(pixels.shape[-3:]) if pixels.dim() >= 4 else 1
    return features.numel() // features.shape[-1] // tiles


def observed_image_token(processor: Any) -> int | None:
    """The special token the processor adds most copies of for one image in the test chat: counted against the
    chat's plain tokenization, so that the template's own repeated tokens (`<|im_end|>`) never count (None: none, or
    the processor fails)."""
    templater = processor if processor.chat_template else processor.tokenizer
    try:
        text = templater.apply_chat_template(CONVERSATION, tokenize=False)
        ids = _process(processor, text, _random_image((32, 32)))["input_ids"][0].tolist()
    except Exception:  # a processor that cannot run yet: the verification reports it
        return None
    special = set(processor.tokenizer.all_special_ids) | set(processor.tokenizer.added_tokens_decoder)
    added = Counter(index for index in ids if index in special)
    added.subtract(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    repeated = [(count, index) for index, count in added.items() if count > 1]
    return max(repeated)[1] if repeated else None


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The pooled features, else the first tensor met depth first (Granite 4 Vision returns its features only as
    `deepstack_features`, (layer, [tensor]) pairs); None without any."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "pooler_output") and isinstance(value.pooler_output, (torch.Tensor, list, tuple)):
        return _first_tensor(value.pooler_output)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((tensor for tensor in map(_first_tensor, items) if tensor is not None), None)
