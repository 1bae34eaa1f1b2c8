"""The latent cache's ``index.json``: its format, reading it (every rank's part merged), and the fingerprint.

The fingerprint is the adapter's ``describe()`` record, the content fingerprint of its VLM
(:func:`vugen.fingerprint.vlm_fingerprint`: files' sizes, safetensors headers, sampled blocks and small files'
sha256, or a Hub snapshot's commit) and the reducer's class, config and sha256 of its weights.
:func:`check_fingerprint` compares it with the adapter and reducer at hand and refuses a stale cache with a
:class:`StaleCacheError` naming what differs. The cache layout is described in :mod:`vugen.data.latent_cache`.

Index version 2 added the VLM's content fingerprint. A version-1 cache recorded only the VLM's path, which cannot
tell whether the weights there changed since: it is refused with a line asking to re-run ``vugen cache-latents``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from vugen.adapter import VLMAdapter
from vugen.errors import VugenError
from vugen.fingerprint import describe_fingerprint, fingerprint_differences, vlm_fingerprint
from vugen.nn.reducer import DimensionReducer

INDEX_FILE = "index.json"
FORMAT, VERSION = "vugen.latent_cache", 2
# describe() fields that change how the VLM is loaded or run, not the features it computes.
_RUNTIME_ONLY = frozenset({"attn_implementation", "trust_remote_code"})
# describe() fields that say where the VLM is, not what it is: skipped when both VLMs have a content fingerprint.
_LOCATION = frozenset({"pretrained", "revision"})
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
    """What makes the latents: the adapter's ``describe()`` record, its VLM's content fingerprint and the reducer's
    class, config and weights hash.

    The VLM's fingerprint is :func:`~vugen.fingerprint.vlm_fingerprint` of the adapter's ``pretrained`` and
    ``revision``; None when that is neither a local path nor a Hub snapshot in the local cache (a custom adapter's
    source, say), and the cache then identifies the VLM by its ``pretrained`` value alone. A local ``pretrained``
    is recorded as its absolute path (for the reader, and for that fallback).
    """
    record = json.loads(json.dumps(adapter.describe()))  # as it reads back from index.json (tuples -> lists)
    local = Path(record.get("pretrained", "")).expanduser()
    if record.get("pretrained") and local.exists():
        record["pretrained"] = str(local.resolve())
    cls = type(reducer)
    return {
        "adapter": record,
        "vlm": vlm_fingerprint(record.get("pretrained"), record.get("revision")),
        "reducer": {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "config": json.loads(json.dumps(reducer.config)),
            "sha256": reducer_sha256(reducer),
        },
    }


def check_fingerprint(cache_dir: str | Path, adapter: VLMAdapter, reducer: DimensionReducer) -> None:
    """Refuse a cache that ``adapter`` and ``reducer`` would not reproduce.

    Compares the cache's fingerprint (the VLM's contents; every other adapter field but the runtime-only
    ``attn_implementation`` and ``trust_remote_code``; the reducer's class, config and weights), its latent dim and
    its token grid with the current ones. The VLM is compared by content when both fingerprints have one (the
    same VLM at another path is accepted, other weights at the same path are not), else by its ``pretrained`` and
    ``revision`` values.

    Args:
        cache_dir: A cache folder written by :func:`~vugen.data.latent_writer.write_latent_cache`.
        adapter: The adapter the latents are used with.
        reducer: The reducer the latents are used with (e.g. the one that decodes sampled latents).

    Raises:
        StaleCacheError: Naming every difference, e.g. ``reducer weights differ: cache sha256 ab12.. vs current
            cd34..`` or ``adapter VLM differs: ... model.safetensors changed contents``.
    """
    index = read_index(cache_dir)
    cached, current = index["fingerprint"], fingerprint(adapter, reducer)
    by_content = cached.get("vlm") is not None and current["vlm"] is not None
    skip = (_RUNTIME_ONLY | _LOCATION) if by_content else _RUNTIME_ONLY
    problems = _differences("adapter", cached["adapter"], current["adapter"], skip=skip)
    problems += _vlm_differences(cached, current)
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


def _vlm_differences(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The VLM's content changes, in one phrase naming both ``pretrained`` values (none: same VLM, or no content
    fingerprint on either side, when ``pretrained`` itself is compared)."""
    old, new = cached.get("vlm"), current["vlm"]
    if old is None and new is None:
        return []
    where = f"cache {cached['adapter'].get('pretrained')!r} vs current {current['adapter'].get('pretrained')!r}"
    if old is None or new is None:
        recorded = "no contents" if old is None else describe_fingerprint(old)
        found = "no contents" if new is None else describe_fingerprint(new)
        return [f"adapter VLM cannot be compared by content ({where}: {recorded} vs {found})"]
    changes = fingerprint_differences(old, new)
    return [f"adapter VLM differs ({where}): {', '.join(changes)}"] if changes else []


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
    if isinstance(index, dict) and index.get("format") == FORMAT and index.get("version") == 1:
        raise StaleCacheError(
            f"{path}: a version-1 latent cache (an older vugen recorded the VLM's path, not its contents, so it "
            "cannot tell whether the VLM changed since): re-run `vugen cache-latents`"
        )
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        found = {k: index.get(k) for k in ("format", "version")} if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} index, found {found}")
    return index
