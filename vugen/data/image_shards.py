"""Captioned images from WebDataset tar shards: :class:`ImageTextShards` (iterable), split by rank and worker.

The files of one sample share a key: ``000017.jpg`` + ``000017.txt`` (or ``000017.json`` with the caption under
``caption_key``).
"""

from __future__ import annotations

import glob
import io
import json
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from vugen.data.image_io import IMAGE_EXTENSIONS, Sample, SkipLog, check_side, image_transform, load_rgb


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
    of that many samples, seeded from ``seed``, the epoch, the rank and the worker: an epoch's order depends on
    nothing else, so a run is reproducible and a resumed one (which skips the batches already used) continues it.
    Set the epoch with :meth:`set_epoch` before iterating it, as for a ``DistributedSampler``
    (:class:`~vugen.data.resumable.ResumableDataLoader` does); it reaches persistent DataLoader workers too.
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
        # In shared memory, so that persistent DataLoader workers (copies made at their start) see later epochs.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration follows."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Iterate in the order of epoch ``epoch`` from the next iteration on (in every DataLoader worker)."""
        self._epoch.fill_(epoch)

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
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
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
