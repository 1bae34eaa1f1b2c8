"""Run the `vugen` command as a user does (a subprocess) and check how it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vugen.cli import main

ROOT = Path(__file__).resolve().parent.parent
VUGEN = Path(sys.executable).parent / "vugen"  # the console script of this venv


def run_vugen(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    """``vugen ARGS`` in ``cwd`` with one torch thread; returns the completed process (text output)."""
    inherited = {key: value for key, value in os.environ.items() if key != "VUGEN_TRACEBACK"}
    environment = {**inherited, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    command = [str(VUGEN), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> str:
    """The run failed with exit ``code`` (any non-zero if None) and one ``vugen ...: error:`` line holding every
    fragment, without a traceback; returns that line."""
    report = f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode != 0 if code is None else result.returncode == code, report
    assert "Traceback" not in result.stderr, report
    errors = [line for line in result.stderr.splitlines() if line.startswith("vugen") and ": error: " in line]
    assert len(errors) == 1, report
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in the error line\n{report}"
    return errors[0]


def error_line_in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """The one error line of ``vugen ARGS`` run in this process (cheaper than a subprocess), which exits with 1."""
    with pytest.raises(SystemExit) as exited:
        main([str(arg) for arg in args])
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert exited.value.code == 1 and len(errors) == 1, errors
    return errors[0]


def demo_config(stage: str, directory: Path, pretrained: Path, **init_args) -> Path:
    """``configs/demo/<stage>.yaml`` with the tiny VLM ``pretrained``, outputs under ``directory`` and no logger;
    ``init_args`` replace the model's arguments. Returns the written file."""
    config = yaml.safe_load((ROOT / "configs" / "demo" / f"{stage}.yaml").read_text())
    config["trainer"]["logger"] = False
    config["model"]["init_args"]["adapter"]["init_args"]["pretrained"] = str(pretrained)
    config["model"]["init_args"].update(init_args)
    path = directory / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
