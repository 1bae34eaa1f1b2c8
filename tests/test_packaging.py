"""A regular (wheel) install ships both import packages and the adapter entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    """A package folder missing from `packages` still lands in the wheel, as package data with a deprecation
    warning from setuptools, so the wheel test below cannot catch it: compare the folders with the list."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items() | {("vugen", "vugen")}:
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert found == set(setuptools["packages"])


@pytest.mark.slow
def test_wheel_installs_vugen_and_vugen_adapters(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, ROOT],
        check=True,
    )
    wheel = next(tmp_path.glob("vugen-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel], check=True)
    probe = (
        "import importlib.metadata as m, vugen, vugen.stages, vugen.nn, vugen.diffusion, vugen.data.shapes_datamodule;"
        "import vugen_adapters.llava as l, vugen_adapters.tiny;"
        "print(vugen.__file__); print(l.__file__);"
        "print(sorted(e.name for e in m.entry_points(group='vugen.adapters')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env={"PYTHONPATH": str(target)}, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    vugen_file, adapters_file, names = out.stdout.splitlines()
    assert vugen_file.startswith(str(target)) and adapters_file == str(target / "vugen_adapters" / "llava.py")
    assert "'llava'" in names and "'auto'" in names
