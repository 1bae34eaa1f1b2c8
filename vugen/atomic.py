"""Atomic folder writes: an export or bundle is either complete or absent, never half-written."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _host() -> str:
    """This machine's name as it goes into a staging folder's name (no separators or odd characters)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "unknown"


def _is_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (another user's counts: signal 0 then fails with EPERM)."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows: assume alive, delete nothing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(directory: Path) -> None:
    """Delete the staging and retired folders of ``directory`` left by killed writers on this machine.

    A folder's owner is in its name (``.NAME.tmp-HOST-PID-*``, ``.NAME.old-HOST-PID-*``). Kept: folders of a live
    process (it may be writing right now) and of other hosts (a shared filesystem: their liveness is unknown here).
    """
    owned = re.compile(rf"\.{re.escape(directory.name)}\.(?:tmp|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[^-]+")
    host = _host()
    for sibling in directory.parent.iterdir():
        match = owned.fullmatch(sibling.name)
        if match and match["host"] == host and not _is_alive(int(match["pid"])):
            shutil.rmtree(sibling, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the permissions of a plain create under the umask.

    Writers choose their own: ``mkdtemp`` makes 0700 folders, ``safetensors`` 0600 files; an export shared between
    users must be readable like any other file they write.
    """
    umask = _umask()
    root.chmod(0o777 & ~umask)
    for folder, subfolders, files in os.walk(root):
        for names, mode in ((subfolders, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):  # a link's own mode means nothing; its target may lie elsewhere
                    os.chmod(path, mode & ~umask)


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``directory`` that replaces it when the block succeeds.

    Write everything into the yielded folder. On success its files and folders get the permissions of the umask
    (whatever wrote them) and it is renamed to ``directory`` (an existing folder there is moved aside first and
    deleted afterwards); on any error it is deleted and ``directory`` is left untouched. Both renames happen on one
    filesystem, so a reader never sees a partly written folder.

    The temporary folders are named after their owner, ``.NAME.tmp-HOST-PID-*`` (and ``.NAME.old-HOST-PID-*`` for the
    one moved aside), so those a killed process left behind are deleted by the next call for the same ``directory``
    on the same host.

    Args:
        directory: The final folder.

    Yields:
        The temporary folder to write into.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(directory)
    owner = f"{_host()}-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{owner}", dir=directory.parent))
    try:
        yield staging
        _apply_umask(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not directory.exists():
        staging.rename(directory)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-{owner}", dir=directory.parent))
    directory.rename(retired / directory.name)
    staging.rename(directory)
    shutil.rmtree(retired, ignore_errors=True)
