"""Latent cache for stage 2: encode a dataset once into reducer latents, then train the latent sampler from disk.

The latent sampler's targets are ``z = reducer.encode(adapter.encode_images(images))`` with the reducer in eval mode
(no training noise): a fixed function of each image, so running the vision tower at every training step only
repeats work. :func:`write_latent_cache` (the ``vugen cache-latents`` command is :func:`cache_latents`) writes them
once; :class:`LatentCacheDataModule` serves ``{"latents": [B, N, d], "captions": list[str]}`` batches from them.

Layout of a cache folder (written atomically: complete, or absent)::

    index.json                   what the cache holds and the fingerprint of what made it (see below)
    latents-00000.safetensors    tensor "latents" [n, N, d]; metadata "captions": JSON list of the n captions
    latents-00001.safetensors    ...

Captions live in each shard's safetensors metadata rather than in a ``captions-*.json`` beside it: a shard is then
one self-contained file, so latents and captions are written, replaced and read together and can never drift
apart, and the reader parses them from the header it reads anyway. The cost is safetensors' 100 MB header limit,
far above ``shard_size`` captions of any real length (4096 captions of 20 KB each).

``index.json`` holds the number of samples, the shards and their counts, the token grid ``(gh, gw)``, the latent
dim, the image size, the storage dtype and the **fingerprint**: the adapter's ``describe()`` record and the
reducer's class, config and sha256 of its weights. :func:`check_fingerprint` compares it with the adapter and
reducer at hand and refuses a stale cache with a :class:`StaleCacheError` naming what differs.

Several processes (DDP ranks) write one cache together: rank ``r`` of ``W`` encodes every ``W``-th sample (an
iterable dataset must split itself by rank, as ``ImageTextShards`` does) into its own folder
``out_dir/rank-{r}/`` (shards ``latents-r{r}-{i}.safetensors`` and the rank's ``index.json``), each written
atomically. Nothing needs merging: the reader of ``out_dir`` reads every rank's part, once all ``W`` parts exist
and agree (same world size, fingerprint, grid), and refuses the folder otherwise, naming the missing or
disagreeing part.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from rich.progress import track
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from vugen.atomic import atomic_directory
from vugen.data.image_text import collate_skipping_none
from vugen.data.shapes_datamodule import check_positive
from vugen.nn.reducer import DimensionReducer
from vugen.stages.base import batch_images
from vugen_adapters.base import VLMAdapter

__all__ = [
    "INDEX_FILE",
    "LatentCacheDataModule",
    "LatentCacheDataset",
    "StaleCacheError",
    "cache_latents",
    "check_fingerprint",
    "fingerprint",
    "read_index",
    "reducer_sha256",
    "write_latent_cache",
]

INDEX_FILE = "index.json"
FORMAT, VERSION = "vugen.latent_cache", 1
# describe() fields that change how the VLM is loaded or run, not the features it computes.
_RUNTIME_ONLY = frozenset({"attn_implementation", "trust_remote_code"})
# Fields every rank's part of one cache must share.
_SHARED_FIELDS = ("split", "world_size", "token_grid", "latent_dim", "image_size", "dtype", "fingerprint")


class StaleCacheError(ValueError):
    """A latent cache was made by another adapter or reducer than the ones it is used with."""


# ---------------------------------------------------------------------------------------------------- fingerprint
def reducer_sha256(reducer: DimensionReducer) -> str:
    """sha256 of the reducer's state dict: every tensor's name, dtype, shape and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(reducer.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: exact for any dtype
    return digest.hexdigest()


def fingerprint(adapter: VLMAdapter, reducer: DimensionReducer) -> dict[str, Any]:
    """What makes the latents: the adapter's ``describe()`` record and the reducer's class, config and weights hash.

    A local ``pretrained`` folder is recorded as its absolute path, so the same folder matches from any working
    directory.
    """
    record = json.loads(json.dumps(adapter.describe()))  # as it reads back from index.json (tuples -> lists)
    local = Path(record.get("pretrained", "")).expanduser()
    if record.get("pretrained") and local.exists():
        record["pretrained"] = str(local.resolve())
    cls = type(reducer)
    return {
        "adapter": record,
        "reducer": {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "config": json.loads(json.dumps(reducer.config)),
            "sha256": reducer_sha256(reducer),
        },
    }


def check_fingerprint(cache_dir: str | Path, adapter: VLMAdapter, reducer: DimensionReducer) -> None:
    """Refuse a cache that ``adapter`` and ``reducer`` would not reproduce.

    Compares the cache's fingerprint (every adapter field but the runtime-only ``attn_implementation`` and
    ``trust_remote_code``; the reducer's class, config and weights), its latent dim and its token grid with the
    current ones.

    Args:
        cache_dir: A cache folder written by :func:`write_latent_cache`.
        adapter: The adapter the latents are used with.
        reducer: The reducer the latents are used with (e.g. the one that decodes sampled latents).

    Raises:
        StaleCacheError: Naming every difference, e.g. ``reducer weights differ: cache sha256 ab12.. vs current
            cd34..`` or ``adapter pretrained differs: cache 'x' vs current 'y'``.
    """
    index = read_index(cache_dir)
    cached, current = index["fingerprint"], fingerprint(adapter, reducer)
    problems = _differences("adapter", cached["adapter"], current["adapter"], skip=_RUNTIME_ONLY)
    cached_reducer, current_reducer = cached["reducer"], current["reducer"]
    problems += _differences("reducer", cached_reducer, current_reducer, skip=frozenset({"config", "sha256"}))
    problems += _differences("reducer config", cached_reducer["config"], current_reducer["config"])
    if cached_reducer["sha256"] != current_reducer["sha256"]:
        problems.append(
            f"reducer weights differ: cache sha256 {cached_reducer['sha256'][:12]}.. "
            f"vs current {current_reducer['sha256'][:12]}.."
        )
    if index["latent_dim"] != reducer.latent_dim:
        problems.append(f"latent_dim differs: cache {index['latent_dim']} vs current reducer {reducer.latent_dim}")
    grid = list(adapter.token_grid(*index["image_size"]))
    if index["token_grid"] != grid:
        problems.append(f"token grid of {index['image_size']} images differs: cache {index['token_grid']} vs {grid}")
    if problems:
        raise StaleCacheError(
            f"latent cache {cache_dir} was made by another adapter or reducer: {'; '.join(problems)}. "
            "Re-run `vugen cache-latents` with the current ones."
        )


def _differences(
    what: str, cached: dict[str, Any], current: dict[str, Any], skip: frozenset = frozenset()
) -> list[str]:
    """``"{what} {key} differs: cache .. vs current .."`` for every key whose values differ."""
    return [
        f"{what} {key} differs: cache {cached.get(key)!r} vs current {current.get(key)!r}"
        for key in sorted((cached.keys() | current.keys()) - skip)
        if cached.get(key) != current.get(key)
    ]


# ---------------------------------------------------------------------------------------------------- writing
class _ShardWriter:
    """Buffers latents and captions and writes them as ``{prefix}-{i:05d}.safetensors`` of ``shard_size`` each."""

    def __init__(self, directory: Path, prefix: str, shard_size: int, dtype: torch.dtype) -> None:
        self.directory, self.prefix, self.shard_size, self.dtype = directory, prefix, shard_size, dtype
        self.latents: list[Tensor] = []
        self.captions: list[str] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, latents: Tensor, captions: list[str]) -> None:
        """Buffer a batch; write every full shard."""
        self.latents.extend(latents.detach().to("cpu", self.dtype).unbind(0))
        self.captions.extend(captions)
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
    error midway (or an interrupt) leaves no cache and no staging folder behind.

    Args:
        data: A datamodule with ``dataset(split)`` (``ShapesDataModule``, ``ImageTextDataModule``), read in
            order, without shuffling or dropping, by a loader built here; or any iterable of batches
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
        ValueError: Bad arguments, a reducer whose ``feature_dim`` is not the adapter's, malformed batches,
            images of more than one size, or no samples at all.
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
                "fingerprint": fingerprint(adapter, reducer),
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
    finally:
        reducer.train(was_training)
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
    if world > 1 and not isinstance(dataset, IterableDataset):  # iterable datasets split by rank themselves
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


# ---------------------------------------------------------------------------------------------------- reading
def read_index(cache_dir: str | Path) -> dict[str, Any]:
    """The index of a cache folder, with every rank's part merged into one (shard files relative to ``cache_dir``).

    Raises:
        FileNotFoundError: No cache in ``cache_dir`` (never written, or its write did not finish).
        ValueError: An index of another format, or rank parts that are missing or disagree, naming them.
    """
    cache_dir = Path(cache_dir)
    if (cache_dir / INDEX_FILE).is_file():
        return _load_index(cache_dir / INDEX_FILE)
    parts = {}
    for path in sorted(cache_dir.glob(f"rank-*/{INDEX_FILE}")):
        part = _load_index(path)
        part["shards"] = [{**shard, "file": f"{path.parent.name}/{shard['file']}"} for shard in part["shards"]]
        parts[part["rank"]] = part
    if not parts:
        raise FileNotFoundError(
            f"no latent cache in {cache_dir}: no {INDEX_FILE} (nor rank-*/{INDEX_FILE}); write one with "
            "`vugen cache-latents` (an interrupted write leaves none)"
        )
    first = parts[min(parts)]
    missing = sorted(set(range(first["world_size"])) - parts.keys())
    if missing:
        raise ValueError(f"latent cache {cache_dir}: rank parts {missing} of {first['world_size']} are missing")
    for rank, part in parts.items():
        differing = [field for field in _SHARED_FIELDS if part[field] != first[field]]
        if differing:
            raise ValueError(
                f"latent cache {cache_dir}: rank-{rank} disagrees with rank-{min(parts)} on {differing} (parts of "
                "different runs?): re-run every rank"
            )
    ordered = [parts[rank] for rank in sorted(parts)]
    shards = [shard for part in ordered for shard in part["shards"]]
    return first | {"shards": shards, "num_samples": sum(part["num_samples"] for part in ordered), "rank": None}


def _load_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        found = {k: index.get(k) for k in ("format", "version")} if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} index, found {found}")
    return index


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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches, shuffled when ``shuffle``."""
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in cache order; no loader (validation skipped) without ``val_cache_dir``."""
        return self._loader("val", shuffle=False) if self.cache_dirs["val"] is not None else []


# ---------------------------------------------------------------------------------------------------- command
def cache_latents(
    *,  # keyword-only: jsonargparse then takes every argument as an option (`--adapter.class_path ...`)
    adapter: VLMAdapter,
    reducer_path: str,
    data: LightningDataModule,
    out_dir: str,
    split: str = "train",
    shard_size: int = 4096,
    batch_size: int | None = None,
    device: str | None = None,
) -> Path:
    """`vugen cache-latents`: encode a dataset split once into the reducer latents the latent sampler trains on.

    Args:
        adapter: The frozen VLM the reducer was trained on, e.g. ``--adapter.class_path
            vugen_adapters.llava.LlavaAdapter --adapter.init_args.pretrained llava-hf/llava-1.5-7b-hf``.
        reducer_path: The trained reducer: a folder exported by stage 1 or stage 3 (its ``reducer/``) or a Hub id.
        data: The image-text datamodule, e.g. ``--data.class_path vugen.data.shapes_datamodule.ShapesDataModule``.
        out_dir: The cache folder to write (replaced whole if it exists).
        split: The split of ``data`` to encode: ``train``, ``val``, ``test``.
        shard_size: Samples per shard file.
        batch_size: Images per encoder batch; None: the datamodule's ``batch_size``.
        device: Device to encode on; None: ``cuda`` when available, else ``cpu``.

    Returns:
        The cache folder.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reducer = DimensionReducer.from_pretrained(reducer_path)
    return write_latent_cache(
        data, adapter.to(device), reducer.to(device), out_dir, split, shard_size=shard_size, batch_size=batch_size
    )
