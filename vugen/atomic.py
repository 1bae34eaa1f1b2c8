"""Atomic folder writes: an export or bundle is either complete or absent, never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``directory`` that replaces it when the block succeeds.

    Write everything into the yielded folder. On success it is renamed to ``directory`` (an existing folder there
    is moved aside first and deleted afterwards); on any error it is deleted and ``directory`` is left untouched.
    Both renames happen on one filesystem, so a reader never sees a partly written folder.

    Args:
        directory: The final folder.

    Yields:
        The temporary folder to write into.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make shared exports unreadable to others
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not directory.exists():
        staging.rename(directory)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    directory.rename(retired / directory.name)
    staging.rename(directory)
    shutil.rmtree(retired, ignore_errors=True)
