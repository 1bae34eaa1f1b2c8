"""Captioned images from a folder: :class:`ImageTextFolder` (map-style) and its metadata readers.

A metadata file in the Hugging Face ``imagefolder`` convention, JSONL (one object per line) or CSV (header row),
names each image relative to the folder and its caption: ``{"file_name": "a/b.jpg", "text": "a red car"}``. Without
one, every image under the folder (recursive, :data:`~vugen.data.image_io.IMAGE_EXTENSIONS`) with an empty caption.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vugen.data.image_io import IMAGE_EXTENSIONS, Sample, SkipLog, check_side, image_transform, load_rgb

METADATA_NAMES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv")


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

    An unreadable image gives None (see :func:`~vugen.data.image_io.collate_skipping_none`), counted in ``skips``.
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
