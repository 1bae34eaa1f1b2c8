"""Writing a latent cache: :func:`write_latent_cache` (the ``vugen cache-latents`` command is
:mod:`vugen.commands.cache_latents`).

Encodes a dataset split once into ``reducer.encode(adapter.encode_images(images))`` and writes sharded safetensors
files plus ``index.json`` atomically, one process or one DDP rank's part at a time. The cache layout is described in
:mod:`vugen.data.latent_cache`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from rich.progress import track
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from vugen.adapter import VLMAdapter
from vugen.atomic import atomic_directory
from vugen.data.batches import batch_images
from vugen.data.image_io import collate_skipping_none
from vugen.data.latent_index import FORMAT, INDEX_FILE, VERSION, fingerprint
from vugen.errors import check_positive
from vugen.nn.reducer import DimensionReducer


class _ShardWriter:
    """Buffers latents and captions and writes them as ``{prefix}-{i:05d}.safetensors`` of ``shard_size`` each."""

    def __init__(self, directory: Path, prefix: str, shard_size: int, dtype: torch.dtype) -> None:
        self.directory, self.prefix, self.shard_size, self.dtype = directory, prefix, shard_size, dtype
        self.latents: list[Tensor] = []
        self.captions: list[str] = []
        self.shards: list[dict[str, Any]] = []
        self.empty_captions = 0  # empty or whitespace-only captions added

    def add(self, latents: Tensor, captions: list[str]) -> None:
        """Buffer a batch; write every full shard."""
        self.latents.extend(latents.detach().to("cpu", self.dtype).unbind(0))
        self.captions.extend(captions)
        self.empty_captions += sum(not caption.strip() for caption in captions)
        while len(self.captions) >= self.shard_size:
            self._write(self.shard_size)

    def finish(self) -> list[dict[str, Any]]:
        """Write the last, partial shard; the ``{"file", "count"}`` record of every shard."""
        if self.captions:
            self._write(len(self.captions))
        return self.shards

    def _write(self, count: int) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        captions = json.dumps(self.captions[:count])
        try:
            save_file({"latents": torch.stack(self.latents[:count])}, self.directory / name, {"captions": captions})
        except SafetensorError as error:
            raise ValueError(
                f"cannot write shard {name}: its {count} captions take {len(captions)} bytes of safetensors "
                f"header (at most 100 MB); lower shard_size ({error})"
            ) from error
        del self.latents[:count], self.captions[:count]
        self.shards.append({"file": name, "count": count})


def write_latent_cache(
    data: LightningDataModule | Iterable[dict[str, Any]],
    adapter: VLMAdapter,
    reducer: DimensionReducer,
    out_dir: str | Path,
    split: str = "train",
    shard_size: int = 4096,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Path:
    """Encode a dataset split into reducer latents and write them as a sharded cache, atomically.

    Latents are ``reducer.encode(adapter.encode_images(images))`` with the reducer in eval mode (no noise; its mode
    is restored afterwards), under ``no_grad``; features are cast to the reducer's dtype as the stages do. An
    error midway (or an interrupt) leaves no cache and no staging folder behind. Samples with empty (or
    whitespace-only) captions are cached as they are, and counted in a warning at the end.

    Args:
        data: A datamodule with ``dataset(split)`` (``ShapesDataModule``, ``ImageTextDataModule``), read in
            order, without shuffling or dropping, by a loader built here (rank ``r`` of several takes every
            ``world_size``-th sample from ``r``; an iterable dataset, ``ImageTextShards``, splits itself by rank and
            must do so for this ``rank`` and ``world_size``); or any iterable of batches
            ``{"images": [B, 3, H, W] in [0, 1], "captions": list[str]}`` (a DataLoader), used as it is (for
            several ranks it must already be this rank's share).
        adapter: The frozen VLM; images are moved to its device.
        reducer: The trained reducer (stage 1 or 3), on the device the features should be reduced on.
        out_dir: The cache folder, replaced whole if it exists. With ``world_size > 1``: the folder shared by all
            ranks, of which this call writes (and replaces) ``rank-{rank}/``.
        split: The datamodule split to encode (``train``, ``val``, ...); recorded in the index.
        shard_size: Samples per shard file (the last shard holds the rest).
        batch_size: Images per encoder batch; None: the datamodule's ``batch_size``. Only with a datamodule.
        dtype: Storage dtype of the latents; None: the reducer's.
        rank: This process's rank among ``world_size`` writers.
        world_size: Number of processes writing parts of the cache (1: a single-process cache).
        progress: Show a rich progress bar over batches (on rank 0 only).

    Returns:
        The folder written: ``out_dir``, or ``out_dir/rank-{rank}`` for one rank's part.

    Raises:
        ValueError: Bad arguments, a reducer whose ``feature_dim`` is not the adapter's, an iterable dataset
            split for another rank or world size, malformed batches, images of more than one size, or no samples
            at all.
    """
    for name, value in (("shard_size", shard_size), ("world_size", world_size)):
        check_positive(name, value)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if reducer.feature_dim != adapter.feature_dim:
        raise ValueError(
            f"reducer feature_dim {reducer.feature_dim} != adapter feature_dim {adapter.feature_dim} "
            f"({adapter.describe()}): the reducer was trained on another VLM or feature_source"
        )
    out_dir = Path(out_dir)
    if world_size > 1 and (out_dir / INDEX_FILE).exists():
        raise ValueError(f"{out_dir} holds a single-process latent cache: remove it or write the ranks elsewhere")
    target, prefix = (out_dir, "latents") if world_size == 1 else (out_dir / f"rank-{rank}", f"latents-r{rank}")
    dtype = dtype or next(reducer.parameters()).dtype
    batches = _batches(data, split, batch_size, rank, world_size)
    made_by = fingerprint(adapter, reducer)  # the VLM's files as the adapter loaded them, before a long encode
    was_training = reducer.training
    reducer.eval()
    try:
        with atomic_directory(target) as staging:
            writer = _ShardWriter(staging, prefix, shard_size, dtype)
            bar = {"description": f"caching {split} latents", "disable": not progress or rank != 0}
            image_size = _encode_batches(track(batches, **bar), adapter, reducer, writer)
            shards = writer.finish()
            if not shards:
                raise ValueError(f"no samples to cache: the {split} data of rank {rank} is empty")
            index = {
                "format": FORMAT,
                "version": VERSION,
                "split": split,
                "num_samples": sum(shard["count"] for shard in shards),
                "shards": shards,
                "token_grid": list(adapter.token_grid(*image_size)),
                "latent_dim": reducer.latent_dim,
                "image_size": image_size,
                "dtype": str(dtype).removeprefix("torch."),
                "rank": rank,
                "world_size": world_size,
                "fingerprint": made_by,
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
    finally:
        reducer.train(was_training)
    if writer.empty_captions:
        warnings.warn(
            f"{target}: {writer.empty_captions} of {index['num_samples']} cached samples have empty captions; "
            "SamplerStage trains them unconditioned and refuses a first batch of only empty captions (unless "
            "allow_empty_captions). If unintended, check the data's caption key (caption_key) and captions",
            stacklevel=2,
        )
    return target


def _encode_batches(
    batches: Iterable[Any], adapter: VLMAdapter, reducer: DimensionReducer, writer: _ShardWriter
) -> list[int] | None:
    """Encode every batch into ``writer``; the ``[H, W]`` all images share (None without batches)."""
    weight = next(reducer.parameters())  # features go to the reducer's device and dtype, as in the stages
    image_size = None
    for step, batch in enumerate(batches):
        images, captions = _checked_batch(batch, step)
        if image_size is not None and list(images.shape[-2:]) != image_size:
            raise ValueError(
                f"batch {step} has {list(images.shape[-2:])} images, the first had {image_size}: "
                "a latent cache holds one image size (one token grid)"
            )
        image_size = list(images.shape[-2:])
        with torch.no_grad():
            features = adapter.encode_images(images.to(adapter.device))
            writer.add(reducer.encode(features.to(weight.device, weight.dtype)), captions)
    return image_size


def _batches(
    data: LightningDataModule | Iterable[dict[str, Any]], split: str, batch_size: int | None, rank: int, world: int
) -> Iterable[dict[str, Any]]:
    """This rank's batches of ``split``: an in-order loader over every ``world``-th sample of the dataset."""
    if not isinstance(data, LightningDataModule):
        if batch_size is not None:
            raise ValueError("batch_size applies to a datamodule; a DataLoader has its own")
        return data
    if not callable(getattr(data, "dataset", None)):
        raise ValueError(
            f"{type(data).__name__} has no dataset(split) method (ShapesDataModule and ImageTextDataModule have "
            "one): pass a DataLoader over the split instead"
        )
    dataset = data.dataset(split)
    if isinstance(dataset, IterableDataset):  # splits itself by rank: its split must be this call's
        own = (getattr(dataset, "rank", rank), getattr(dataset, "world_size", world))
        if own != (rank, world):
            raise ValueError(
                f"the {split} data of {type(data).__name__} reads the share of rank {own[0]} of {own[1]} (from "
                f"RANK / WORLD_SIZE or torch.distributed), not of rank {rank} of {world}: launch one process per "
                "rank with torchrun (or set RANK and WORLD_SIZE) rather than passing rank / world_size alone"
            )
    elif world > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(
        dataset,
        batch_size=batch_size or data.batch_size,
        shuffle=False,
        num_workers=getattr(data, "num_workers", 0),
        collate_fn=collate_skipping_none,
    )


def _checked_batch(batch: Any, step: int) -> tuple[Tensor, list[str]]:
    images = batch_images(batch, "write_latent_cache")
    captions = batch.get("captions")
    if (
        not isinstance(captions, (list, tuple))
        or len(captions) != len(images)
        or not all(isinstance(caption, str) for caption in captions)
    ):
        raise ValueError(
            f"batch {step}: expected 'captions' as a list of {len(images)} strings (one per image), got {captions!r}"
        )
    return images, list(captions)
