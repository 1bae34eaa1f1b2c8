"""Reading captioned images: decoding, the square transform, and skipping unreadable samples; and :func:`to_pil`, the
float -> 8-bit conversion of every image vugen writes.

Shared by the two image-text sources (:mod:`vugen.data.image_folder`, :mod:`vugen.data.image_shards`). Samples are
``{"images": float32 [3, S, S] in [0, 1], "captions": str}``: every image is converted to RGB (palette, L, RGBA:
alpha is dropped), its shorter side resized to ``S`` (antialiased) and centre-cropped to ``S x S``.

Unreadable samples (a missing or corrupt image, a shard sample without image or caption) are skipped: each is
warned about once with :class:`UnreadableImageWarning` naming it, and counted in :class:`SkipLog`, which lives in
shared memory so that the count read in the main process includes every DataLoader worker. ``strict=True`` raises
instead (``ValueError`` naming the file).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import to_dtype, to_pil_image

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")

Sample = dict[str, Any]


class UnreadableImageWarning(UserWarning):
    """A sample that could not be read was skipped (``strict=False``)."""


def check_side(image_size: int) -> int:
    """Any side from 8 px up: the adapter resizes to its vision tower's input, so no multiple is imposed here."""
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 (pixels per side), got {image_size!r}")
    return image_size


def image_transform(image_size: int) -> v2.Compose:
    """RGB PIL image -> float32 ``[3, S, S]`` in [0, 1]: shorter side resized to ``S`` (antialiased), centre crop."""
    return v2.Compose(
        [v2.Resize(image_size), v2.CenterCrop(image_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    )


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> RGB images (torchvision's float -> uint8 scaling)."""
    return [to_pil_image(to_dtype(image.detach().cpu(), torch.uint8, scale=True)) for image in images]


def load_rgb(source: str | Path | BinaryIO) -> Image.Image:
    """Decode an image file (path or open binary stream) fully and convert it to RGB."""
    with Image.open(source) as image:
        return image.convert("RGB")  # decodes every byte, so a truncated file fails here and not later


class SkipLog:
    """Unreadable samples: warned once each, counted across DataLoader workers, or fatal when ``strict``.

    ``counts`` is a shared-memory tensor (forked and spawned workers write into the parent's copy) with one slot
    per image (folder) or per shard (WebDataset), holding the number of distinct unreadable samples found in it.
    A slot is written by one process at a time (an image is loaded once per epoch, a shard read by one worker)
    and only grows, so no lock is needed. Warnings are once per sample (per worker process for shards).
    """

    def __init__(self, slots: int, strict: bool) -> None:
        """Start with every count at zero.

        Args:
            slots: Number of counters (images or shards).
            strict: Raise instead of skipping.
        """
        self.counts = torch.zeros(slots, dtype=torch.int32).share_memory_()
        self.strict = strict
        self._seen: dict[int, set[str]] = {}  # per process: which names of each slot it already recorded

    @property
    def total(self) -> int:
        """Number of distinct unreadable samples found so far, over all workers."""
        return int(self.counts.sum())

    def record(self, slot: int, name: str, error: Exception) -> None:
        """Count ``name`` (in ``slot``) as unreadable and warn the first time; raise ValueError when strict."""
        if self.strict:
            raise ValueError(f"cannot read image {name}: {error}") from error
        seen = self._seen.setdefault(slot, set())
        if name in seen:
            return
        seen.add(name)
        if len(seen) > self.counts[slot]:  # new to every process (a worker may read a slot another one counted)
            self.counts[slot] = len(seen)
            warnings.warn(f"skipped unreadable image {name}: {error}", UnreadableImageWarning, stacklevel=2)


def collate_skipping_none(items: Sequence[Sample | None]) -> Sample:
    """``default_collate`` of the readable items: a batch with a skipped image is smaller than ``batch_size``.

    A map-style dataset must return something for every index, so
    :class:`~vugen.data.image_folder.ImageTextFolder` returns None for an unreadable image and this collate drops
    it. A batch of only unreadable images is an error (an empty batch would break the loss), which needs an unlucky
    small ``batch_size`` or a mostly broken dataset.
    """
    kept = [item for item in items if item is not None]
    if not kept:
        raise ValueError(
            f"all {len(items)} images of a batch were unreadable (see the UnreadableImageWarning above); "
            "check the data or use a larger batch_size"
        )
    return default_collate(kept)
