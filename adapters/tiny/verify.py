"""Check a saved tiny checkpoint the way a user's code meets it: loaded back with the Auto classes, the chat template
applied to a message with an image, the processor run on image and text, the full model forward with labels (which
fails unless the processor expands the image placeholder into as many image tokens as the vision path emits), and
`get_image_features` on the processor's image inputs.
"""

from __future__ import annotations

import inspect
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

__all__ = ["TinyCheck", "verify_tiny_checkpoint"]

# Inputs of the language side: never passed to `get_image_features`.
_TEXT_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "position_ids", "labels"}
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
    image_features: tuple[int, ...]  # shape of the first tensor `get_image_features` returns


def verify_tiny_checkpoint(directory: str | Path, image_size: tuple[int, int] = (32, 32)) -> TinyCheck:
    """Load `directory` with the Auto classes and run processor, full forward with labels and image features.

    Args:
        directory: a folder written by `build_tiny_architecture` (or any image-text-to-text checkpoint).
        image_size: (height, width) of the random test image.

    Raises:
        AssertionError: the loss is not finite.
        Exception: whatever transformers raises on a mismatch (image-token count, missing inputs, ...).
    """
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    AutoImageProcessor.from_pretrained(directory)  # what vugen's AutoAdapter loads besides the processor
    AutoTokenizer.from_pretrained(directory)
    text = processor.apply_chat_template(CONVERSATION, tokenize=False)
    inputs = _process(processor, text, _random_image(image_size))
    labels = inputs["input_ids"].masked_fill(inputs.get("attention_mask", inputs["input_ids"] * 0 + 1) == 0, -100)
    with torch.no_grad():
        output = model(**inputs, labels=labels)
        features = _image_features(model, inputs)
    loss = float(output.loss)
    assert np.isfinite(loss), f"non-finite loss {loss}"
    return TinyCheck(loss, model.num_parameters(), inputs["input_ids"].shape[-1], tuple(features.shape))


def _random_image(size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _process(processor: Any, text: str, image: Image.Image) -> BatchFeature:
    """The processor's output for one prompt and one image (nested per prompt when the flat form is refused)."""
    try:
        return processor(images=[image], text=[text], return_tensors="pt")
    except (ValueError, TypeError, IndexError):
        return processor(images=[[image]], text=[text], return_tensors="pt")


def _image_features(model: Any, inputs: BatchFeature) -> torch.Tensor:
    """The first tensor of `get_image_features` on the processor's image inputs."""
    owner = model.model if hasattr(getattr(model, "model", None), "get_image_features") else model
    parameters = inspect.signature(owner.get_image_features).parameters
    image_inputs = {k: v for k, v in inputs.items() if k not in _TEXT_INPUTS and k in parameters}
    features = owner.get_image_features(**image_inputs)
    return _first_tensor(features)


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "pooler_output") and isinstance(value.pooler_output, (torch.Tensor, list, tuple)):
        return _first_tensor(value.pooler_output)
    if isinstance(value, dict):
        value = list(value.values())
    return _first_tensor(value[0])
