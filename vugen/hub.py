"""Whether a ``pretrained``-style value is a local folder or a Hub id, decided at once from the value itself.

A mistyped local folder must fail at once naming it, not be taken for a Hub id and wait on the network (about a
minute offline before transformers or huggingface_hub give up).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = ["local_folder_or_hub_id"]


def local_folder_or_hub_id(value: str | Path, what: str) -> Path | None:
    """The local path ``value`` names, or None when it is a Hub repo id.

    An existing path (relative or absolute) is local. A value that does not exist but looks like a path is an
    error: it is no valid Hub repo id (``huggingface_hub.utils.validate_repo_id``: it starts with ``.``, ``/`` or
    ``~``, holds a backslash or more than one ``/``, ...) or its first component is an existing local folder
    (``outputs/tiny-lava`` when ``outputs/`` exists). Any other value (``org/name`` or ``name``) is a Hub id.

    Args:
        value: The value given, e.g. an adapter's ``pretrained``.
        what: The argument's name for the error message, e.g. ``"adapter `pretrained`"``.

    Raises:
        FileNotFoundError: ``value`` looks like a local path that does not exist (naming ``what`` and ``value``).
    """
    text = str(value)
    path = Path(text).expanduser()
    if path.exists():
        return path
    reason = _looks_like_a_path(text)
    if reason is not None:
        raise FileNotFoundError(f"{what}: no such folder {text!r} ({reason}; a Hub id looks like 'org/name')")
    return None


def _looks_like_a_path(text: str) -> str | None:
    """Why ``text`` (which does not exist) is meant as a local path, or None for a Hub repo id."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return "written as a path"
    first = text.split("/", 1)[0]
    if "/" in text and Path(first).is_dir():
        return f"{first}/ is a local folder"
    try:
        validate_repo_id(text)
    except HFValidationError:
        return "not a Hub repo id either"
    return None
