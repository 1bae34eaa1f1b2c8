"""What a VLM checkpoint *is*, by content, in milliseconds even for 15 GB: :func:`vlm_fingerprint`.

The latent cache (:mod:`vugen.data.latent_index`) and the bundle (:mod:`vugen.bundle`) record the fingerprint of the
VLM they were made with, so that the same VLM found at another path is accepted and other weights found at the same
path are refused (:func:`fingerprint_differences` names what changed).

A ``pretrained`` value resolves to:

* a **local folder** (or file), as transformers resolves it (relative to the working directory): the fingerprint
  of each file at its top level (:func:`file_fingerprint`), documentation (``*.md``, licences, images) and hidden
  files left out;
* else a **Hub id** whose snapshot is in the local Hugging Face cache (found without network, at ``revision`` or
  ``main``): its commit, plus the fingerprint of the snapshot folder's files, so that a byte copy of the snapshot
  elsewhere (an offline machine's local folder) compares equal to it;
* else nothing (None): a Hub id not downloaded yet, or a source that is not a file path, as a custom adapter may
  use. Callers then fall back to comparing the ``pretrained`` value itself.

**What it can miss.** A file larger than :data:`FULL_HASH_LIMIT` (the weight shards) is fingerprinted by its size,
its safetensors header (every tensor's name, dtype, shape and offsets) and :data:`SAMPLED_BLOCKS` blocks of
:data:`BLOCK_BYTES` spread evenly over it (the first and last included): 2 MiB read per file. Other weights, a
fine-tune, a dtype conversion or a re-sharding change the header, the size or every block; but a same-size edit
that leaves the header and all sampled blocks alone (one tensor patched in place between two blocks, bit rot) goes
unseen: a random single-byte change of a 4 GB shard is caught with probability about 2 MiB / 4 GB. Files up to
:data:`FULL_HASH_LIMIT` (configs, processor and tokenizer files, the chat template, small checkpoints) are hashed
whole, so any change to them is caught. Files in subfolders are not looked at (transformers loads from the top
level). A checkpoint re-saved with ``save_pretrained`` is *other bytes* (metadata, sharding) and fingerprints
differently even when its tensors are equal.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import struct
from pathlib import Path
from typing import Any

__all__ = [
    "BLOCK_BYTES",
    "FULL_HASH_LIMIT",
    "SAMPLED_BLOCKS",
    "describe_fingerprint",
    "file_fingerprint",
    "fingerprint_differences",
    "vlm_fingerprint",
]

SAMPLED_BLOCKS = 32
BLOCK_BYTES = 64 * 1024
FULL_HASH_LIMIT = 64 * 1024 * 1024  # bytes; larger files are sampled
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on its JSON header
# Top-level files that describe a checkpoint without deciding what it computes.
_NOT_CHECKPOINT = ("*.md", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "*.png", "*.jpg", "*.jpeg", "*.gif")


def vlm_fingerprint(pretrained: str | os.PathLike | None, revision: str | None = None) -> dict[str, Any] | None:
    """The content fingerprint of the VLM that ``pretrained`` (and ``revision``, for a Hub id) resolves to.

    Args:
        pretrained: A local folder or file (relative to the working directory, as transformers reads it), or a Hub
            id.
        revision: The Hub revision (branch, tag or commit); None: ``main``. Ignored for a local path.

    Returns:
        ``{"kind": "local", "files": {name: file_fingerprint}}``, ``{"kind": "hub", "repo_id", "commit", "files"}``,
        or None when ``pretrained`` is neither a local path nor a Hub id in the local cache (see the module
        docstring).
    """
    if not pretrained:
        return None
    local = Path(pretrained).expanduser()
    if local.exists():
        return {"kind": "local", "files": _folder_fingerprint(local)}
    snapshot = _cached_snapshot(str(pretrained), revision)
    if snapshot is None:
        return None
    return {"kind": "hub", "repo_id": str(pretrained), "commit": snapshot.name, "files": _folder_fingerprint(snapshot)}


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file up to :data:`FULL_HASH_LIMIT` bytes; of a larger one ``{"size",
    "header_sha256" (a safetensors file only), "sampled_sha256"}`` (see the module docstring for what it can miss).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= FULL_HASH_LIMIT:
            return {"size": size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
        record: dict[str, Any] = {"size": size}
        header = _safetensors_header(handle, size)
        if header is not None:
            record["header_sha256"] = hashlib.sha256(header).hexdigest()
        sampled = hashlib.sha256()
        for offset in _block_offsets(size):
            handle.seek(offset)
            sampled.update(handle.read(BLOCK_BYTES))
        record["sampled_sha256"] = sampled.hexdigest()
    return record


def fingerprint_differences(recorded: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints of :func:`vlm_fingerprint`, one short phrase per file (none: same VLM).

    Two snapshots of the same Hub repository at the same commit are the same VLM; otherwise their files are
    compared, whatever their kind (a local byte copy of a snapshot is the same VLM as the snapshot).
    """
    if recorded.get("commit") is not None and recorded.get("commit") == found.get("commit"):
        return []
    old, new = recorded["files"], found["files"]
    changes = [f"{name} only in the recorded VLM" for name in sorted(old.keys() - new.keys())]
    changes += [f"{name} only in the found VLM" for name in sorted(new.keys() - old.keys())]
    changes += [_file_change(name, old[name], new[name]) for name in sorted(old.keys() & new.keys())]
    return [change for change in changes if change]


def describe_fingerprint(record: dict[str, Any]) -> str:
    """A few words on where a fingerprint came from: ``local files`` or ``Hub repo@commit``."""
    if record["kind"] == "hub":
        return f"Hub snapshot {record['repo_id']}@{record['commit'][:12]}"
    return f"{len(record['files'])} local files"


def _file_change(name: str, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    if old == new:
        return None
    if "sha256" in old and "sha256" in new:
        return f"{name} changed contents"
    if old["size"] != new["size"]:
        return f"{name} changed size ({old['size']} -> {new['size']} bytes)"
    if old.get("header_sha256") != new.get("header_sha256"):
        return f"{name} has another tensor layout (safetensors header)"
    return f"{name} changed contents (sampled blocks)"


def _folder_fingerprint(path: Path) -> dict[str, dict[str, Any]]:
    if path.is_file():
        return {path.name: file_fingerprint(path)}
    return {
        child.name: file_fingerprint(child)
        for child in sorted(path.iterdir())
        if child.is_file() and not child.name.startswith(".") and not _is_documentation(child.name)
    }


def _is_documentation(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _NOT_CHECKPOINT)


def _block_offsets(size: int) -> list[int]:
    """:data:`SAMPLED_BLOCKS` block starts from 0 to ``size - BLOCK_BYTES``, evenly spread (fixed for a size)."""
    last = size - BLOCK_BYTES
    return [last * i // (SAMPLED_BLOCKS - 1) for i in range(SAMPLED_BLOCKS)]


def _safetensors_header(handle: Any, size: int) -> bytes | None:
    """The first ``8 + N`` bytes of a safetensors file (N: its little-endian u64 header length), else None."""
    handle.seek(0)
    prefix = handle.read(8)
    (length,) = struct.unpack("<Q", prefix)
    if length > SAFETENSORS_HEADER_LIMIT or 8 + length > size:
        return None
    header = handle.read(length)
    return prefix + header if header[:1] == b"{" else None


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` in the local Hugging Face cache, without network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except HFValidationError:  # not a Hub id either (a missing local path, say)
        return None
    return Path(config).parent if isinstance(config, str) else None
