"""The latent cache's ``index.json``: its format, reading it (every rank's part merged), and the fingerprint.

The fingerprint is the adapter's ``describe()`` record and the reducer's class, config and sha256 of its weights.
:func:`check_fingerprint` compares it with the adapter and reducer at hand and refuses a stale cache with a
:class:`StaleCacheError` naming what differs. The cache layout is described in :mod:`vugen.data.latent_cache`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from vugen.errors import VugenError
from vugen.nn.reducer import DimensionReducer
from vugen_adapters.base import VLMAdapter

INDEX_FILE = "index.json"
FORMAT, VERSION = "vugen.latent_cache", 1
# describe() fields that change how the VLM is loaded or run, not the features it computes.
_RUNTIME_ONLY = frozenset({"attn_implementation", "trust_remote_code"})
# Fields every rank's part of one cache must share.
_SHARED_FIELDS = ("split", "world_size", "token_grid", "latent_dim", "image_size", "dtype", "fingerprint")


class StaleCacheError(VugenError, ValueError):
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
        cache_dir: A cache folder written by :func:`~vugen.data.latent_writer.write_latent_cache`.
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
