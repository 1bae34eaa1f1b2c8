"""requirements/lock.txt (what `make install` and CI install) pins every dependency pyproject.toml declares, inside
the declared range: a range edited without `make lock` fails here rather than in a user's install."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the lock is made on 3.11

ROOT = Path(__file__).resolve().parents[1]


def locked_versions() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")  # a constraints file: exact pins only, no URLs or editables
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_every_dependency_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [Requirement(line) for line in project["dependencies"] + extras["dev"]]
    # "vugen[serve]" in dev: vugen's own extras, whose requirements are locked, not vugen itself
    own = [r for r in declared if canonicalize_name(r.name) == canonicalize_name(project["name"])]
    declared = [r for r in declared if r not in own] + [
        Requirement(line) for r in own for e in r.extras for line in extras[e]
    ]
    pins = locked_versions()
    assert {"torch", "transformers", "lightning", "peft", "jsonargparse"} <= pins.keys()
    unmet = {
        str(requirement): str(pins.get(canonicalize_name(requirement.name)))
        for requirement in declared
        if canonicalize_name(requirement.name) not in pins
        or not requirement.specifier.contains(pins[canonicalize_name(requirement.name)], prereleases=True)
    }
    assert unmet == {}, f"requirements/lock.txt is stale for pyproject.toml (run `make lock`): {unmet}"
