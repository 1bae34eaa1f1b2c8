"""The batch format every image stage reads: a dict whose ``images`` are float ``[B, 3, H, W]`` in ``[0, 1]``.

The datamodules write it, the stages, the latent cache writer and the image-grid callback read it through
:func:`batch_images`, so the check and its message live in the data layer that defines the format.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["batch_images"]


def batch_images(batch: Any, reader: str) -> Tensor:
    """The ``images`` of a batch dict, checked: float ``[B, 3, H, W]`` in ``[0, 1]``.

    Args:
        batch: A batch from a datamodule.
        reader: Who reads it, for the message (e.g. ``"ReducerStage"``).

    Raises:
        ValueError: The batch is not a dict with a 4-D ``images`` tensor, naming ``reader`` and what it got.
    """
    images = batch.get("images") if isinstance(batch, dict) else None
    if not isinstance(images, Tensor) or images.ndim != 4:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{reader} expects batches as dicts with 'images': float [B, 3, H, W] in [0, 1] "
            f"(e.g. ShapesDataModule), got {found}"
        )
    return images
