"""`atomic_directory`: a folder is replaced whole or not at all."""

from __future__ import annotations

import pytest

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
