"""Image-text data from files: a folder of images (captions in JSONL/CSV metadata) or WebDataset tar shards.

Batches are those of :class:`~vugen.data.shapes_datamodule.ShapesDataModule`: ``{"images": float32 [B, 3, S, S]
in [0, 1], "captions": list[str]}``. Every image is converted to RGB (palette, L, RGBA: alpha is dropped), its
shorter side resized to ``S`` (antialiased) and centre-cropped to ``S x S``.

Two sources:

* **Folder** (:class:`ImageTextFolder`, map-style): a metadata file in the Hugging Face ``imagefolder`` convention,
  JSONL (one object per line) or CSV (header row), naming each image relative to the folder and its caption:
  ``{"file_name": "a/b.jpg", "text": "a red car"}``. Without one, every image under the folder (recursive,
  :data:`IMAGE_EXTENSIONS`) with an empty caption.
* **WebDataset shards** (:class:`ImageTextShards`, iterable): tar files where the files of one sample share a key,
  ``000017.jpg`` + ``000017.txt`` (or ``000017.json`` with the caption under ``caption_key``).

Unreadable samples (a missing or corrupt image, a shard sample without image or caption) are skipped: each is
warned about once with :class:`UnreadableImageWarning` naming it, and counted in :class:`SkipLog`, which lives in
shared memory so that the count read in the main process includes every DataLoader worker. ``strict=True`` raises
instead (``ValueError`` naming the file).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info
from torchvision.transforms import v2

from vugen.data.shapes_datamodule import check_positive

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")
METADATA_NAMES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv")

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

    A map-style dataset must return something for every index, so :class:`ImageTextFolder` returns None for an
    unreadable image and this collate drops it. A batch of only unreadable images is an error (an empty batch
    would break the loss), which needs an unlucky small ``batch_size`` or a mostly broken dataset.
    """
    kept = [item for item in items if item is not None]
    if not kept:
        raise ValueError(
            f"all {len(items)} images of a batch were unreadable (see the UnreadableImageWarning above); "
            "check the data or use a larger batch_size"
        )
    return default_collate(kept)


# ---------------------------------------------------------------------------------------------------- folders
def _metadata_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a JSONL or CSV file; ``where`` is ``file:line`` for error messages."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON ({error})") from error
                yield f"{path}:{number}", row
    elif path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as stream:
            reader = csv.DictReader(stream)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    else:
        raise ValueError(f"metadata must be a .jsonl or .csv file, got {path}")


def _row_value(row: Any, key: str, where: str) -> str:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get(key), str):
        found = repr(row[key]) if key in row else f"no {key!r} (keys: {sorted(row)})"
        raise ValueError(f"{where}: expected a string under {key!r}, got {found}")
    return row[key]


def read_metadata(
    path: str | Path, image_key: str = "file_name", caption_key: str | None = "text"
) -> list[tuple[str, str]]:
    """``(file name, caption)`` pairs of a JSONL or CSV metadata file, in file order.

    Args:
        path: The ``.jsonl`` (one JSON object per line) or ``.csv`` (header row) file.
        image_key: Key (column) of the image path, relative to the image folder.
        caption_key: Key (column) of the caption; None: no captions (all ``""``).

    Raises:
        ValueError: Naming the file and line of a row that is not an object or lacks a string under a key.
    """
    return [
        (_row_value(row, image_key, where), "" if caption_key is None else _row_value(row, caption_key, where))
        for where, row in _metadata_rows(Path(path))
    ]


def folder_items(
    root: str | Path,
    metadata: str | Path | None = None,
    image_key: str = "file_name",
    caption_key: str | None = "text",
) -> list[tuple[str, str]]:
    """``(image path, caption)`` pairs of an image folder.

    Args:
        root: The folder; image names in the metadata are relative to it.
        metadata: JSONL or CSV file; None: ``root/metadata.jsonl`` or ``root/metadata.csv`` if one exists
            (the first of :data:`METADATA_NAMES`), else every image under ``root`` (recursive, sorted) with an
            empty caption.
        image_key: See :func:`read_metadata`.
        caption_key: See :func:`read_metadata`.

    Raises:
        ValueError: ``root`` is not a folder, or no image is found (naming the folder or metadata file).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    if metadata is None:
        metadata = next((root / name for name in METADATA_NAMES if (root / name).is_file()), None)
    if metadata is None:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower()[1:] in IMAGE_EXTENSIONS and p.is_file())
        items = [(str(path), "") for path in files]
        where = f"{root} (no {' or '.join(METADATA_NAMES)}, no {'/'.join(IMAGE_EXTENSIONS)} files)"
    else:
        items = [(str(root / name), caption) for name, caption in read_metadata(metadata, image_key, caption_key)]
        where = f"metadata file {metadata}"
    if not items:
        raise ValueError(f"no images found in {where}")
    return items


def split_items(items: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic ``(train, val)`` split: ``round(val_fraction * len(items))`` random items go to val."""
    num_val = round(val_fraction * len(items))
    if not 0 < num_val < len(items):
        raise ValueError(f"val_fraction={val_fraction} of {len(items)} images leaves train or val empty")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in sorted(order[num_val:])], [items[i] for i in sorted(order[:num_val])]


class ImageTextFolder(Dataset):
    """Map-style dataset over ``(image path, caption)`` pairs, e.g. from :func:`folder_items`.

    An unreadable image gives None (see :func:`collate_skipping_none`), counted in ``skips``.
    """

    def __init__(self, items: Sequence[tuple[str, str]], image_size: int = 256, strict: bool = False) -> None:
        """Index the items; images are read on access.

        Args:
            items: ``(image path, caption)`` pairs.
            image_size: Side of the square output images; >= 8.
            strict: Raise on an unreadable image instead of skipping it.
        """
        self.paths = [path for path, _ in items]
        self.captions = [caption for _, caption in items]
        self.transform = image_transform(check_side(image_size))
        self.skips = SkipLog(len(self.paths), strict)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample | None:
        """``{"images": float32 [3, S, S] in [0, 1], "captions": str}``, or None if the image is unreadable."""
        try:
            image = load_rgb(self.paths[index])
        except Exception as error:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError, ...)
            self.skips.record(index, self.paths[index], error)
            return None
        return {"images": self.transform(image), "captions": self.captions[index]}


# ---------------------------------------------------------------------------------------------------- shards
def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard paths of brace patterns (``shard-{000000..000127}.tar``) and globs, in order, without duplicates.

    Each glob's matches are sorted. URLs (``scheme://...``, ``pipe:...``) are passed through unchecked.

    Raises:
        ValueError: No pattern, or a path that does not exist or a glob without match (naming it).
    """
    shards: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for item in wds.shardlists.expand_urls(pattern):
            if "://" in item or item.startswith("pipe:"):
                shards.append(item)
                continue
            if glob.has_magic(item):
                matches = sorted(glob.glob(item, recursive=True))
            else:
                matches = [item] if Path(item).is_file() else []
            if not matches:
                raise ValueError(f"no shard matches {item!r} (from the pattern {pattern!r})")
            shards.extend(matches)
    if not shards:
        raise ValueError(f"no shard patterns given: {patterns!r}")
    return list(dict.fromkeys(shards))


def shards_for(shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one DataLoader worker of one rank reads: shard ``i`` goes to rank ``i % world_size``, and the
    ``j``-th shard of a rank to its worker ``j % num_workers`` (webdataset's ``split_by_node`` then
    ``split_by_worker``). Every shard is read by exactly one worker of one rank."""
    return list(shards)[rank::world_size][worker::num_workers]


def _caption(sample: Sample, caption_key: str | None) -> str:
    if caption_key is None:
        return ""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        caption = json.loads(sample["json"]).get(caption_key)
        if isinstance(caption, str):
            return caption
    raise ValueError(f"no caption: neither a .txt file nor a string under {caption_key!r} in a .json file")


class ImageTextShards(IterableDataset):
    """Iterable dataset over WebDataset tar shards, split by rank and DataLoader worker without duplicates.

    Splitting (:func:`shards_for`): each rank reads ``1/world_size`` of the shards and each of its workers a part
    of those. With fewer shards than ranks a rank would have nothing: that is an error. With fewer shards on a rank
    than workers the extra workers idle (warned). A rank's epoch ends when its shards are exhausted, so under DDP
    give every rank the same number of samples (equal shards, a shard count divisible by the world size: other
    counts are warned about) or bound the epoch with ``Trainer(limit_train_batches=...)``.

    Shuffling (``shuffle_buffer > 0``): each worker shuffles its shard order and then samples through a buffer
    of that many samples, seeded from ``seed``, the DataLoader's worker seed and the pass number, so every epoch
    differs and a run is reproducible.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        image_size: int = 256,
        caption_key: str | None = "text",
        strict: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Expand the shard patterns and check them against the number of ranks; shards are read on iteration.

        Args:
            shards: Brace patterns and/or globs of tar files (see :func:`expand_shards`).
            image_size: Side of the square output images; >= 8.
            caption_key: Key of the caption in a sample's ``.json`` (a ``.txt`` file wins); None: captions ``""``.
            strict: Raise on an unreadable sample or shard instead of skipping it.
            shuffle_buffer: Samples in the shuffle buffer; 0 reads shards and samples in order.
            seed: Base seed of the shuffling.
            rank: This process's rank; None: from ``RANK``/``WORLD_SIZE`` or ``torch.distributed``, read here in
                the main process (spawned DataLoader workers do not see ``torch.distributed``).
            world_size: Number of ranks; None: as for ``rank``.
        """
        self.shards = expand_shards(shards)
        if rank is None or world_size is None:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards for {world_size} ranks: every rank needs one ({shards!r})")
        if len(self.shards) % world_size:
            warnings.warn(
                f"{len(self.shards)} shards over {world_size} ranks: ranks get unequal numbers of samples, which "
                "stalls DDP at the end of an epoch unless Trainer(limit_train_batches=...) bounds it",
                stacklevel=2,
            )
        self.rank, self.world_size = rank, world_size
        self.caption_key = caption_key
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.transform = image_transform(check_side(image_size))
        self.skips = SkipLog(len(self.shards), strict)
        self._slot = {url: slot for slot, url in enumerate(self.shards)}
        self._passes = 0  # per process: persistent workers keep counting across epochs

    def __iter__(self) -> Iterator[Sample]:
        """``{"images": float32 [3, S, S] in [0, 1], "captions": str}`` of this worker's readable samples."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        urls = shards_for(self.shards, self.rank, self.world_size, worker, num_workers)
        if not urls:
            warnings.warn(
                f"DataLoader worker {worker} of rank {self.rank} has no shard and idles "
                f"({len(self.shards)} shards, {self.world_size} ranks, {num_workers} workers)",
                stacklevel=2,
            )
            return
        rng = random.Random(f"{self.seed}/{info.seed if info else 0}/{self._passes}")
        self._passes += 1
        if self.shuffle_buffer > 0:
            rng.shuffle(urls)
        handler = wds.reraise_exception if self.skips.strict else wds.warn_and_continue
        samples: Iterator[Sample] = wds.tarfile_samples([{"url": url} for url in urls], handler=handler)
        if self.shuffle_buffer > 0:
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            decoded = self._decode(sample)
            if decoded is not None:
                yield decoded

    def _decode(self, sample: Sample) -> Sample | None:
        ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        name = f"{sample['__url__']}:{sample['__key__']}.{ext or '*'}"
        try:
            if ext is None:
                found = sorted(key for key in sample if not key.startswith("__"))
                raise ValueError(f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in the sample, only {found}")
            image = load_rgb(io.BytesIO(sample[ext]))
            caption = _caption(sample, self.caption_key)
        except Exception as error:  # PIL's decoders raise many types; a bad caption file counts as unreadable too
            self.skips.record(self._slot[sample["__url__"]], name, error)
            return None
        return {"images": self.transform(image), "captions": caption}


# ---------------------------------------------------------------------------------------------------- datamodule
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

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.dataset(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and not isinstance(dataset, IterableDataset),
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=collate_skipping_none,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and self.num_workers > 0,
            # Seeds the shuffle order and the workers' seeds (hence the shard shuffling) from ``seed`` alone.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch (of each worker, for shards) is dropped."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order; no loader (validation skipped) without validation data."""
        has_val = self._sources["val"].given or self.hparams.val_fraction
        return self._loader("val", train=False) if has_val else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader("test", train=False)
