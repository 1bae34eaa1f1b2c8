"""`python -m benchmarks.run --quick`: it runs end to end, prints the environment and table, and writes rows whose
numbers are positive and finite with each ratio equal to measured / reference; bad flags fail clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import Row, intervals_after
from benchmarks.run import main

ROOT = Path(__file__).resolve().parents[1]
QUICK_SAMPLING = [f"decoder/sample/{method}/{steps}" for method in ("euler", "heun") for steps in (2, 4)]


def run_benchmarks(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.run", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quick_run_writes_consistent_rows(tmp_path):
    out = tmp_path / "out.json"
    result = run_benchmarks("--quick", "--device", "cpu", "--threads", "1", "--json", str(out), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    env = report["environment"]
    assert (env["threads"], env["precision"], env["preset"]) == (1, "32-true", "quick")
    assert env["device"].startswith("cpu")
    for value in (env["device"], f"torch: {env['torch']}", "threads: 1", "vugen benchmarks", "decoder/train_step"):
        assert value in result.stdout
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["decoder/train_step", "decoder/mfu", *QUICK_SAMPLING]
    for row in rows.values():
        for key in ("measured", "reference", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key, row[key])
        for key in ("measured_iqr", "reference_iqr"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["name"], key, row[key])
        assert row["ratio"] == pytest.approx(row["measured"] / row["reference"], rel=1e-12)
    train = rows["decoder/train_step"]
    assert (train["unit"], train["target"]) == ("ms/step", 1.05)
    # MFU: the achieved FLOP/s of a training step cannot exceed the machine's matmul peak by much.
    assert rows["decoder/mfu"]["unit"] == "GFLOP/s" and 0 < rows["decoder/mfu"]["ratio"] < 1.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decoder-image-size", "18"], "--decoder-image-size (18) must be a multiple of --decoder-patch-size (4)"),
        (["--decoder-width", "30"], "--decoder-width (30) must be a multiple of 4 and of --decoder-heads (2)"),
        (["--decoder-sample-steps", "5", "0"], "--decoder-sample-steps must be >= 1, got (5, 0)"),
        (["--decoder-samplers", "sde"], "argument --decoder-samplers: invalid choice: 'sde'"),
        (["--only", "nothing"], "argument --only: invalid choice: 'nothing'"),
    ],
)
def test_bad_flags_fail_before_measuring_and_name_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--device", "cpu", *args])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "decoder:" not in stderr  # nothing was measured


def test_row_ratio_and_spread_come_from_the_samples():
    row = Row.from_samples("x/y", "ms", [1.0, 2.0, 3.0, 4.0, 100.0], [2.0, 2.0, 2.0], compares="a / b")
    assert (row.measured, row.measured_iqr) == (3.0, 2.0)  # numpy's linear percentiles: q1 = 2, q3 = 4
    assert (row.reference, row.reference_iqr, row.ratio) == (2.0, 0.0, 1.5)


def test_step_intervals_drop_the_warmup_steps():
    stamps = [10.0, 10.5, 11.5, 13.5]  # ends of steps 0..3: steps 1..3 took 0.5, 1 and 2
    assert intervals_after(stamps, 1) == [0.5, 1.0, 2.0]
    assert intervals_after(stamps, 2) == [1.0, 2.0]
    with pytest.raises(ValueError, match="skip >= 1"):
        intervals_after(stamps, 0)
