"""Image-text data from files: :class:`ImageTextDataModule` over image folders or WebDataset tar shards.

Batches are those of :class:`~vugen.data.shapes_datamodule.ShapesDataModule`: ``{"images": float32 [B, 3, S, S]
in [0, 1], "captions": list[str]}``. Every image is converted to RGB (palette, L, RGBA: alpha is dropped), its
shorter side resized to ``S`` (antialiased) and centre-cropped to ``S x S``.

Two sources, one module each:

* **Folder** (:class:`~vugen.data.image_folder.ImageTextFolder`, map-style): a metadata file in the Hugging Face
  ``imagefolder`` convention, JSONL (one object per line) or CSV (header row), naming each image relative to the
  folder and its caption: ``{"file_name": "a/b.jpg", "text": "a red car"}``. Without one, every image under the
  folder (recursive, :data:`~vugen.data.image_io.IMAGE_EXTENSIONS`) with an empty caption.
* **WebDataset shards** (:class:`~vugen.data.image_shards.ImageTextShards`, iterable): tar files where the files of
  one sample share a key, ``000017.jpg`` + ``000017.txt`` (or ``000017.json`` with the caption under
  ``caption_key``).

Unreadable samples (a missing or corrupt image, a shard sample without image or caption) are skipped: each is
warned about once with :class:`~vugen.data.image_io.UnreadableImageWarning` naming it, and counted in
:class:`~vugen.data.image_io.SkipLog`, which lives in shared memory so that the count read in the main process
includes every DataLoader worker. ``strict=True`` raises instead (``ValueError`` naming the file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from vugen.data.image_folder import ImageTextFolder, folder_items, split_items
from vugen.data.image_io import (
    check_side,
    collate_skipping_none,
)
from vugen.data.image_shards import ImageTextShards
from vugen.data.resumable import ResumableDataLoader
from vugen.errors import check_positive

__all__ = ["ImageTextDataModule"]


@dataclass(frozen=True)
class _Source:
    """One split's data: an image folder (``root``, optional ``metadata``) or WebDataset ``shards``."""

    root: str | None
    metadata: str | None
    shards: str | list[str] | None

    def check(self, prefix: str) -> _Source:
        """Self if it names exactly one kind of source; ``prefix`` names the arguments in the error."""
        if self.root is not None and self.shards is not None:
            raise ValueError(f"give {prefix}root (an image folder) or {prefix}shards (tar files), not both")
        if self.metadata is not None and self.root is None:
            raise ValueError(f"{prefix}metadata={self.metadata!r} needs {prefix}root, the folder its images are in")
        return self

    @property
    def given(self) -> bool:
        return self.root is not None or self.shards is not None


class ImageTextDataModule(LightningDataModule):
    """Captioned images from image folders or WebDataset shards, for every stage.

    ``fit`` uses the ``train`` and ``val`` splits, ``test`` the ``test`` split. Each split is an image folder
    (``root`` + optional ``metadata``) or tar ``shards``; val may instead be a deterministic ``val_fraction`` of a
    folder train split. Batches are those of ``ShapesDataModule``: ``{"images": float32 [B, 3, S, S] in [0, 1],
    "captions": list[str]}``, with ``""`` captions where the data has none.

    Unreadable images are skipped, warned about once each and counted per split in :attr:`skipped` (over all
    DataLoader workers of this process); a folder batch with a skipped image is smaller than ``batch_size``.
    ``strict=True`` makes them errors. Shards are split by rank and DataLoader worker without duplicates (see
    :class:`ImageTextShards` for fewer shards than ranks x workers, and for DDP's need of equal shares).
    """

    def __init__(
        self,
        root: str | None = None,
        metadata: str | None = None,
        shards: str | list[str] | None = None,
        val_root: str | None = None,
        val_metadata: str | None = None,
        val_shards: str | list[str] | None = None,
        test_root: str | None = None,
        test_metadata: str | None = None,
        test_shards: str | list[str] | None = None,
        val_fraction: float = 0.0,
        image_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        image_key: str = "file_name",
        caption_key: str | None = "text",
        strict: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ) -> None:
        """Configure the splits and loaders; files are only read in ``setup``.

        Args:
            root: Training image folder. Image names in its metadata are relative to it.
            metadata: Training metadata, JSONL (one object per line) or CSV (header row), with the image name
                under ``image_key`` and the caption under ``caption_key``. None: ``root/metadata.jsonl`` or
                ``root/metadata.csv`` if present, else every jpg/jpeg/png/webp/bmp under ``root`` (recursive)
                with an empty caption.
            shards: Training WebDataset tar shards instead of ``root``: brace patterns and/or globs, e.g.
                ``data/shard-{000000..000127}.tar``. A sample is an image (jpg/jpeg/png/webp/bmp) plus a ``.txt``
                caption or a ``.json`` with the caption under ``caption_key``.
            val_root: Validation image folder (as ``root``).
            val_metadata: Validation metadata (as ``metadata``).
            val_shards: Validation shards (as ``shards``).
            test_root: Test image folder (as ``root``).
            test_metadata: Test metadata (as ``metadata``).
            test_shards: Test shards (as ``shards``).
            val_fraction: Fraction of a folder training set held out as validation, chosen by ``seed`` (0: none);
                excludes ``val_*``.
            image_size: Side of the square images: shorter side resized to it, then centre-cropped; >= 8 (use the
                adapter's input size).
            batch_size: Images per batch.
            num_workers: DataLoader worker processes (0 loads in the main process).
            image_key: Metadata key (column) of the image path.
            caption_key: Metadata key (column), and key in a shard sample's ``.json``, of the caption; null for
                image-only data (captions ``""``), as for stages 1 and 3.
            strict: Raise on the first unreadable image (naming it) instead of skipping it.
            seed: Seed of ``val_fraction``, of the training shuffle order and of the shard shuffling.
            shuffle_buffer: Training samples in each worker's WebDataset shuffle buffer (0: read shards in order).
            pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies.
            persistent_workers: Keep the worker processes between epochs (with ``num_workers > 0``).
        """
        super().__init__()
        check_side(image_size)
        check_positive("batch_size", batch_size)
        for name, value in (("num_workers", num_workers), ("seed", seed), ("shuffle_buffer", shuffle_buffer)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self._sources = {
            "train": _Source(root, metadata, shards).check(""),
            "val": _Source(val_root, val_metadata, val_shards).check("val_"),
            "test": _Source(test_root, test_metadata, test_shards).check("test_"),
        }
        if not self._sources["train"].given:
            raise ValueError("the training data is required: set root (an image folder) or shards (tar files)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if val_fraction and (self._sources["val"].given or shards is not None):
            raise ValueError("val_fraction splits a folder training set: it excludes val_root/val_shards and shards")
        self.save_hyperparameters()
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._datasets: dict[str, ImageTextFolder | ImageTextShards] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Unreadable samples found so far in each split that has been loaded."""
        return {split: dataset.skips.total for split, dataset in self._datasets.items()}

    def setup(self, stage: str) -> None:
        """Index the splits ``stage`` needs (folders are listed, shard patterns expanded); errors surface here."""
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ()):
            if self._sources[split].given or (split == "val" and self.hparams.val_fraction):
                self.dataset(split)

    def dataset(self, split: str) -> ImageTextFolder | ImageTextShards:
        """The dataset of ``split`` (``train``, ``val`` or ``test``), built on first use."""
        if split not in self._sources:
            raise ValueError(f"split must be one of {tuple(self._sources)}, got {split!r}")
        if split not in self._datasets:
            self._datasets.update(self._build(split))
        return self._datasets[split]

    def _build(self, split: str) -> dict[str, ImageTextFolder | ImageTextShards]:
        hp = self.hparams
        if hp.val_fraction and split in ("train", "val"):
            train, val = split_items(self._folder_items(self._sources["train"]), hp.val_fraction, self.seed)
            return {"train": self._folder(train), "val": self._folder(val)}
        source = self._sources[split]
        if not source.given:
            raise ValueError(f"no {split} data: set {split}_root or {split}_shards")
        if source.shards is None:
            return {split: self._folder(self._folder_items(source))}
        buffer = hp.shuffle_buffer if split == "train" else 0
        return {split: ImageTextShards(source.shards, self.image_size, hp.caption_key, hp.strict, buffer, self.seed)}

    def _folder_items(self, source: _Source) -> list[tuple[str, str]]:
        return folder_items(source.root, source.metadata, self.hparams.image_key, self.hparams.caption_key)

    def _folder(self, items: list[tuple[str, str]]) -> ImageTextFolder:
        return ImageTextFolder(items, self.image_size, self.hparams.strict)

    def _loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate_skipping_none,
            "pin_memory": self.hparams.pin_memory,
            "persistent_workers": self.hparams.persistent_workers and self.num_workers > 0,
        }

    def _loader(self, split: str) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)  # seeds the workers from ``seed``, not the global RNG
        return DataLoader(self.dataset(split), generator=generator, **self._loader_options())

    def train_dataloader(self) -> ResumableDataLoader:
        """Training batches in an order fixed by ``seed`` and the epoch (a folder shuffled, shards shuffled per
        worker), resumable mid-epoch; the last incomplete batch (of each worker, for shards) is dropped."""
        dataset = self.dataset("train")
        shuffle = not isinstance(dataset, IterableDataset)
        return ResumableDataLoader(dataset, shuffle=shuffle, seed=self.seed, drop_last=True, **self._loader_options())

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order; no loader (validation skipped) without validation data."""
        has_val = self._sources["val"].given or self.hparams.val_fraction
        return self._loader("val") if has_val else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader("test")
