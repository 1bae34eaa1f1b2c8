"""Reading a folder of generated images in the GenEval layout (what ``vugen export-geneval`` writes)."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

__all__ = ["read_geneval_folder"]


def _read_prompt(folder: Path) -> str:
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"GenEval folder {str(folder)!r} has no metadata.jsonl")
    lines = metadata.read_text(encoding="utf-8").splitlines()
    try:
        record = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(metadata)!r}: the first line is not JSON ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{str(metadata)!r}: the first line must be a JSON object with a string 'prompt'")
    return record["prompt"]


def read_geneval_folder(path: str | PathLike[str]) -> list[tuple[str, list[Path]]]:
    """The prompts and sample images of a folder laid out as ``<idx:05d>/metadata.jsonl`` and
    ``<idx:05d>/samples/<NNNN>.png``.

    A prompt is the ``"prompt"`` of the first JSON line of its ``metadata.jsonl``; other entries (e.g.
    ``grid.png``) are ignored.

    Args:
        path: The image folder.

    Returns:
        ``(prompt, sample PNG paths in name order)`` per prompt folder, in index order.

    Raises:
        FileNotFoundError: If ``path`` is not a directory or a prompt folder lacks its metadata.
        ValueError: If there is no prompt folder, one has no sample PNG, or a metadata file is invalid.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"GenEval image folder {str(path)!r} is not a directory")
    folders = sorted(entry for entry in root.iterdir() if entry.is_dir() and entry.name.isdigit())
    if not folders:
        raise ValueError(f"GenEval image folder {str(path)!r} has no <index:05d>/ prompt folders")
    entries = []
    for folder in folders:
        prompt = _read_prompt(folder)
        samples = sorted((folder / "samples").glob("*.png"))
        if not samples:
            raise ValueError(f"GenEval folder {str(folder)!r} has no samples/*.png")
        entries.append((prompt, samples))
    return entries
