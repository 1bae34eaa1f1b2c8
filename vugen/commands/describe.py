"""`vugen describe`: what a bundle's VLM answers about images (:meth:`~vugen.pipeline.VugenPipeline.describe`).

The bundle that generates images also understands them: its VLM answers through its own processor, chat template and
greedy ``generate``, with the latent sampler's LoRA inactive (``lora_scope: image_tokens``), so the answers are the
base VLM's.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from PIL import Image

from vugen.data.image_io import load_rgb
from vugen.errors import check_positive
from vugen.pipeline import VugenPipeline

__all__ = ["describe"]


def describe(
    *,
    bundle: str,
    image: list[str],
    prompt: str,
    max_new_tokens: int = 64,
    device: str = "auto",
    trust_remote_code: bool = False,
) -> str:
    """`vugen describe --bundle DIR --image PNG [--image PNG ...] --prompt TEXT`: the VLM's answers, one per image.

    Prints ``PATH: answer`` for each image, in the order given. All images are asked in one batch, each with the same
    prompt. The answers are the VLM's greedy ones; with the bundle's ``lora_scope: image_tokens`` (the default) they
    are exactly the base VLM's.

    Args:
        bundle: A bundle folder (``VugenPipeline.save_pretrained``, ``vugen export``) or a Hub repo id (``org/name``).
        image: An image file; give ``--image`` once per image.
        prompt: What to ask about each image, e.g. ``"Describe the image."``.
        max_new_tokens: Most tokens per answer.
        device: Where the VLM runs: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``, ...
        trust_remote_code: Let the VLM checkpoint run its own modelling code (pin its revision). Never taken from the
            bundle.

    Returns:
        ``PATH: answer`` lines, one per image in the order given (line breaks inside an answer become spaces).
    """
    check_positive("max_new_tokens", max_new_tokens)
    if not image:
        raise ValueError("give at least one --image")
    images = [_read_image(path) for path in image]  # before the bundle: a bad path fails at once
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # huggingface_hub's from_pretrained prints "Loading weights from local directory": stdout holds answers only
    with contextlib.redirect_stdout(sys.stderr):
        pipe = VugenPipeline.from_pretrained(bundle, trust_remote_code=trust_remote_code).to(device)
    answers = pipe.describe(images, prompt, max_new_tokens)
    lines = "\n".join(f"{path}: {' '.join(answer.splitlines())}" for path, answer in zip(image, answers, strict=True))
    print(lines)
    return lines


def _read_image(path: str) -> Image.Image:
    """The RGB image in ``path``; a missing or unreadable file is one error naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        return load_rgb(path)
    except (OSError, ValueError) as error:  # not an image, or a truncated one
        raise ValueError(f"--image {path}: not a readable image ({error})") from error
