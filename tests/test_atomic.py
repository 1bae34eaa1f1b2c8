"""`atomic_directory`: a folder is replaced whole or not at all, with the umask's permissions; killed writers' leftovers
are removed by the next write."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vugen.atomic
from vugen.atomic import atomic_directory


def test_a_new_folder_appears_complete(tmp_path):
    target = tmp_path / "out" / "export"
    with atomic_directory(target) as staging:
        assert not target.exists() and staging.parent == target.parent
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["export"]


def test_an_existing_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_error_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as staging:
        (staging / "half.txt").write_text("half")
        raise KeyboardInterrupt  # an interrupted save
    assert (target / "old.txt").read_text() == "old" and not (target / "half.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def killed_writer(target: Path) -> tuple[Path, int]:
    """Start a process that stages a write to ``target``, SIGKILL it inside the block; its staging folder and pid."""
    code = (  # loads vugen/atomic.py alone: the vugen package would import transformers (seconds)
        "import importlib.util, sys, time\n"
        "spec = importlib.util.spec_from_file_location('atomic', sys.argv[1])\n"
        "atomic = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(atomic)\n"
        "with atomic.atomic_directory(sys.argv[2]) as staging:\n"
        "    (staging / 'half.txt').write_text('half')\n"
        "    print(staging, flush=True)\n"
        "    time.sleep(600)\n"
    )
    args = [sys.executable, "-c", code, vugen.atomic.__file__, str(target)]
    writer = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    staging = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    writer.stdout.close()
    return staging, writer.pid


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "export"
    staging, pid = killed_writer(target)
    assert staging.parent == tmp_path and (staging / "half.txt").exists() and not target.exists()
    host = staging.name.removeprefix(".export.tmp-").rsplit("-", 2)[0]
    retired = tmp_path / f".export.old-{host}-{pid}-abc"  # a kill between the two renames of a replacement
    elsewhere = tmp_path / f".export.tmp-otherhost-{pid}-abc"  # a shared filesystem: that pid is not ours to test
    other_target = tmp_path / f".other.tmp-{host}-{pid}-abc"
    for folder in (retired, elsewhere, other_target):
        folder.mkdir()
    with atomic_directory(target) as new:
        (new / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", elsewhere.name, other_target.name])


def test_the_staging_folder_of_a_live_writer_is_kept(tmp_path):
    target = tmp_path / "export"
    with atomic_directory(target) as first:  # this process is alive while a second write to the target runs
        (first / "a.txt").write_text("first")
        with atomic_directory(target) as second:
            (second / "a.txt").write_text("second")
        assert (first / "a.txt").read_text() == "first"
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)], ids=["022", "027"]
)
def test_an_export_gets_the_permissions_of_the_umask_whatever_wrote_it(tmp_path, umask, file_mode, folder_mode):
    """safetensors writes its files 0600 and mkdtemp its folders 0700: the finished export follows the umask."""
    target = tmp_path / "export"
    previous = os.umask(umask)
    try:
        with atomic_directory(target) as staging:
            (staging / "model").mkdir()
            save_file({"w": torch.zeros(2)}, staging / "model" / "model.safetensors")
            (staging / "config.json").write_text("{}")
            tempfile.mkdtemp(dir=staging)
    finally:
        os.umask(previous)
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in target.rglob("*")}
    assert stat.S_IMODE(target.stat().st_mode) == folder_mode
    assert modes["export/model/model.safetensors"] == file_mode and modes["export/config.json"] == file_mode
    assert [mode for path, mode in modes.items() if (tmp_path / path).is_dir()] == [folder_mode] * 2
