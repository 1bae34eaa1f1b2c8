"""Latent cache for stage 2: encode a dataset once into reducer latents, then train the latent sampler from disk.

The latent sampler's targets are ``z = reducer.encode(adapter.encode_images(images))`` with the reducer in eval mode
(no training noise): a fixed function of each image, so running the vision tower at every training step only
repeats work. :func:`write_latent_cache` (the ``vugen cache-latents`` command is :func:`cache_latents`) writes them
once; :class:`LatentCacheDataModule` serves ``{"latents": [B, N, d], "captions": list[str]}`` batches from them.

This module holds the reading side (dataset, datamodule) and is the public entry point: it re-exports the writer
(:mod:`vugen.data.latent_writer`) and the index format and fingerprint (:mod:`vugen.data.latent_index`).

Layout of a cache folder (written atomically: complete, or absent)::

    index.json                   what the cache holds and the fingerprint of what made it (see below)
    latents-00000.safetensors    tensor "latents" [n, N, d]; metadata "captions": JSON list of the n captions
    latents-00001.safetensors    ...

Captions live in each shard's safetensors metadata rather than in a ``captions-*.json`` beside it: a shard is then
one self-contained file, so latents and captions are written, replaced and read together and can never drift
apart, and the reader parses them from the header it reads anyway. The cost is safetensors' 100 MB header limit,
far above ``shard_size`` captions of any real length (4096 captions of 20 KB each).

``index.json`` holds the number of samples, the shards and their counts, the token grid ``(gh, gw)``, the latent
dim, the image size, the storage dtype and the **fingerprint**: the adapter's ``describe()`` record, the VLM's
content fingerprint (:func:`vugen.fingerprint.vlm_fingerprint`) and the reducer's class, config and sha256 of its
weights. :func:`check_fingerprint` compares it with the adapter and reducer at hand (the VLM by content: a copy at
another path is accepted, other weights at the same path are not) and refuses a stale cache with a
:class:`StaleCacheError` naming what differs.

Several processes (DDP ranks; ``vugen cache-latents`` under torchrun, rank and world size from ``RANK`` /
``WORLD_SIZE``) write one cache together: rank ``r`` of ``W`` encodes every ``W``-th sample (an iterable dataset
must split itself by rank, as ``ImageTextShards`` does) into its own folder
``out_dir/rank-{r}/`` (shards ``latents-r{r}-{i}.safetensors`` and the rank's ``index.json``), each written
atomically. Nothing needs merging: the reader of ``out_dir`` reads every rank's part, once all ``W`` parts exist
and agree (same world size, fingerprint, grid), and refuses the folder otherwise, naming the missing or
disagreeing part.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vugen.adapter import VLMAdapter
from vugen.data.latent_index import (
    check_fingerprint,
    read_index,
)
from vugen.data.resumable import ResumableDataLoader
from vugen.errors import check_positive
from vugen.nn.reducer import DimensionReducer

__all__ = ["LatentCacheDataModule", "LatentCacheDataset"]


class LatentCacheDataset(Dataset):
    """Map-style dataset over a latent cache: ``{"latents": float [N, d], "captions": str}`` per sample.

    Memory-light: only the index is read up front; a shard is opened (memory-mapped by ``safe_open``, its captions
    parsed from the header) on first use, and each item reads just its own ``[N, d]`` slice. Open shards are per
    process: DataLoader workers open their own.

    Args:
        cache_dir: A folder written by :func:`write_latent_cache` (one process or every rank's part).
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.index = read_index(self.cache_dir)
        counts = [shard["count"] for shard in self.index["shards"]]
        self._ends = torch.tensor(counts).cumsum(0).tolist()
        self._open: dict[int, tuple[Any, list[str]]] = {}

    def __len__(self) -> int:
        """Number of cached samples."""
        return self.index["num_samples"]

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        """The latents ``[N, d]`` and caption of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a latent cache of {len(self)} samples")
        shard = bisect.bisect_right(self._ends, index)
        offset = index - (self._ends[shard - 1] if shard else 0)
        latents, captions = self._shard(shard)
        return {"latents": latents[offset], "captions": captions[offset]}

    def _shard(self, shard: int) -> tuple[Any, list[str]]:
        if shard not in self._open:
            record = self.index["shards"][shard]
            path = self.cache_dir / record["file"]
            handle = safe_open(path, framework="pt")
            latents = handle.get_slice("latents")
            captions = json.loads(handle.metadata()["captions"])
            expected = [record["count"], self.index["token_grid"][0] * self.index["token_grid"][1]]
            if latents.get_shape()[:2] != expected or len(captions) != record["count"]:
                raise ValueError(
                    f"{path}: expected {expected[0]} samples of {expected[1]} tokens (index.json), found latents "
                    f"{latents.get_shape()} and {len(captions)} captions"
                )
            self._open[shard] = (latents, captions)
        return self._open[shard]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for spawned DataLoader workers) without the open shards, which cannot be pickled."""
        return self.__dict__ | {"_open": {}}


class LatentCacheDataModule(LightningDataModule):
    """Batches ``{"latents": [B, N, d], "captions": list[str]}`` from latent caches, for the latent sampler.

    The sampler stage reads :attr:`index` (``token_grid``, ``latent_dim``, ``fingerprint``) and calls
    :meth:`check_fingerprint` with its adapter and reducer in ``setup`` so a stale cache is refused.

    Args:
        cache_dir: The training cache (written by ``vugen cache-latents``).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 reads in the main process).
        shuffle: Shuffle the training samples (in an order fixed by ``seed``).
        seed: Seed of the training shuffle order.
        val_cache_dir: Optional validation cache, made by the same adapter and reducer; None: no validation.
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        val_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.cache_dirs = {"train": cache_dir, "val": val_cache_dir}
        self.batch_size, self.num_workers, self.shuffle, self.seed = batch_size, num_workers, shuffle, seed
        self._datasets: dict[str, LatentCacheDataset] = {}

    def dataset(self, split: str) -> LatentCacheDataset:
        """The ``train`` or ``val`` dataset, opened on first use (the val cache must match the train cache)."""
        if self.cache_dirs.get(split) is None:
            raise ValueError(f"no {split} latent cache: set {'cache_dir' if split == 'train' else 'val_cache_dir'}")
        if split not in self._datasets:
            dataset = LatentCacheDataset(self.cache_dirs[split])
            if split == "val":
                differing = [
                    k for k in ("token_grid", "latent_dim", "fingerprint") if dataset.index[k] != self.index[k]
                ]
                if differing:
                    raise ValueError(f"val cache {self.cache_dirs['val']} differs from the train cache on {differing}")
            self._datasets[split] = dataset
        return self._datasets[split]

    @property
    def index(self) -> dict[str, Any]:
        """The training cache's index: ``token_grid``, ``latent_dim``, ``image_size``, ``fingerprint``, ..."""
        return self.dataset("train").index

    def check_fingerprint(self, adapter: VLMAdapter, reducer: DimensionReducer) -> None:
        """:func:`check_fingerprint` of every configured cache; raises :class:`StaleCacheError`."""
        for directory in filter(None, self.cache_dirs.values()):
            check_fingerprint(directory, adapter, reducer)

    def setup(self, stage: str) -> None:
        """Open the caches ``stage`` reads, so missing or broken caches fail here."""
        for split in {"fit": ("train", "val"), "validate": ("val",)}.get(stage, ()):
            if self.cache_dirs[split] is not None:
                self.dataset(split)

    def train_dataloader(self) -> ResumableDataLoader:
        """Training batches, shuffled when ``shuffle`` (in an order fixed by ``seed`` and the epoch), resumable
        mid-epoch."""
        return ResumableDataLoader(
            self.dataset("train"), shuffle=self.shuffle, seed=self.seed, **self._loader_options()
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in cache order; no loader (validation skipped) without ``val_cache_dir``."""
        if self.cache_dirs["val"] is None:
            return []
        return DataLoader(self.dataset("val"), **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
