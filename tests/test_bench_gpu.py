"""`python -m benchmarks.gpu` (`make bench-gpu`): the dry run builds and runs every configuration at tiny size on the
CPU and writes every row with finite numbers; without CUDA and without --dry-run it stops with one line; a failed,
skipped or over-budget configuration becomes a row and the table still prints; the memory estimates come from the
configs' comments."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from benchmarks import gpu
from benchmarks.common import Settings

ROOT = Path(__file__).resolve().parents[1]
DECODER_TRAIN = [f"decoder/train/compile_{c}/ckpt_{k}" for c in ("off", "on") for k in ("off", "on")]
SAMPLER_TRAIN = [
    "sampler/train/sdpa/bidirectional",
    "sampler/train/sdpa/causal",
    "sampler/train/flash_attention_2/causal",
]
GENERATION = [f"generation/b{b}/{kind}" for b in (1, 2) for kind in ("uncached", "cached")]
EXPECTED = [
    "matmul/bf16_peak",
    *DECODER_TRAIN,
    *SAMPLER_TRAIN,
    *GENERATION,
    "decoder/sample/heun_10",
    "decoder/sample/euler_1",
]
# Rows with a reference: the MFU rows (over the matmul peak) and the speedups (over the uncached / multi-step side).
WITH_REFERENCE = [
    *DECODER_TRAIN,
    *SAMPLER_TRAIN,
    "generation/b1/cached",
    "generation/b2/cached",
    "decoder/sample/euler_1",
]
CPU = Settings(torch.device("cpu"), gpu.PRECISION, quick=True)


@pytest.mark.slow
def test_dry_run_builds_and_measures_every_configuration(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--json", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["environment"]["device"].startswith("cpu") and report["environment"]["precision"] == "bf16-mixed"
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == EXPECTED == gpu.row_names(gpu.DRY_RUN)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["status"])
        assert math.isfinite(row["measured"]) and row["measured"] > 0, (name, row["measured"])
        assert math.isfinite(row["measured_iqr"]) and row["measured_iqr"] >= 0, (name, row["measured_iqr"])
        assert row["peak_memory_gib"] is None  # no GPU memory on the CPU
        if name in WITH_REFERENCE:
            assert math.isfinite(row["reference"]) and row["reference"] > 0, (name, row["reference"])
            assert row["ratio"] == pytest.approx(row["measured"] / row["reference"], rel=1e-12)
        else:
            assert row["reference"] is None and row["ratio"] is None, name
    assert all(rows[name]["unit"] == "TFLOP/s" for name in ["matmul/bf16_peak", *DECODER_TRAIN, *SAMPLER_TRAIN])
    assert all(rows[name]["unit"] == "images/s" for name in [*GENERATION, "decoder/sample/heun_10"])
    for name in DECODER_TRAIN:
        assert rows[name]["memory_estimate"] == "VLM ~4.5 GB + ~5-10 GB (qwen2_vl/decoder.yaml)"
    for name in SAMPLER_TRAIN:
        assert rows[name]["memory_estimate"] == "~13 GB in all (qwen2_vl/sampler.yaml)"
    assert "compile on (aot_eager)" in rows["decoder/train/compile_on/ckpt_on"]["detail"]
    if gpu.flash_attention_missing():  # the CPU has no FlashAttention: sdpa stands in, and the row says so
        assert "sdpa in place of flash_attention_2" in rows["sampler/train/flash_attention_2/causal"]["detail"]
    assert "vugen GPU benchmark" in result.stdout and "n/a (cpu)" in result.stdout
    assert "Traceback" not in result.stderr


def test_without_cuda_it_stops_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "benchmarks.gpu: no CUDA device on this machine; run it on a GPU, or pass --dry-run to build every "
        "configuration at tiny size on the CPU"
    ]


def test_bad_budget_fails_before_measuring(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--dry-run", "--budget-s", "0"])
    assert exit_info.value.code == 2
    assert "--budget-s must be > 0, got 0" in capsys.readouterr().err


def test_failed_and_over_budget_configurations_become_rows_and_the_table_prints():
    runner = gpu.Runner(CPU, budget_s=60)

    def boom() -> gpu.Measured:
        raise ValueError("no kernel for this\nsecond line")

    assert runner.row("a/fails", "~1 GB (x.yaml)", boom) is None
    assert runner.row("a/works", "", lambda: gpu.Measured("images/s", [2.0, 4.0], "x", [1.0, 1.0])) is not None

    def one_row_of_two() -> None:
        runner.row("b/one", "", boom)

    def failed_setup() -> None:
        boom()

    runner.group(["b/one", "b/two"], "", one_row_of_two)
    runner.group(["c/setup"], "", failed_setup)  # a failed setup fails each of its rows
    runner.deadline = 0.0  # the budget is spent: nothing more is measured
    runner.group(["d/late"], "", lambda: pytest.fail("measured past the budget"))
    assert runner.row("e/late", "", lambda: pytest.fail("measured past the budget")) is None
    statuses = {row.name: row.status for row in runner.rows}
    assert statuses == {
        "a/fails": "failed: ValueError: no kernel for this",
        "a/works": "ok",
        "b/one": "failed: ValueError: no kernel for this",
        "b/two": "failed: not measured",
        "c/setup": "failed: ValueError: no kernel for this",
        "d/late": "skipped: time budget spent (--budget-s 60)",
        "e/late": "skipped: time budget spent (--budget-s 60)",
    }
    works = next(row for row in runner.rows if row.name == "a/works")
    assert (works.measured, works.reference, works.ratio, works.peak_memory_gib) == (3.0, 1.0, 3.0, None)
    out = io.StringIO()
    gpu.print_table(runner.rows, {"device": "cpu (test)"}, Console(file=out, width=300))
    table = out.getvalue()
    for text in ("a/fails", "failed: ValueError: no kernel for this", "~1 GB (x.yaml)", "skipped: time budget spent"):
        assert text in table
    assert "n/a (cpu)" in table and "3.000" in table


def test_flash_attention_row_is_skipped_on_a_gpu_without_flash_attn(monkeypatch):
    monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda name: None)
    assert gpu.flash_attention_missing() == "skipped: flash_attn not installed"
    monkeypatch.setattr(gpu, "SAMPLER_ATTENTION", ((gpu.FLASH, "causal"),))
    runner = gpu.Runner(Settings(torch.device("cuda"), gpu.PRECISION, quick=False), budget_s=60)
    gpu._sampler_training(runner, SimpleNamespace(sizes=gpu.GPU), peak=None)  # builds nothing for a skipped row
    [row] = runner.rows
    assert (row.name, row.status) == ("sampler/train/flash_attention_2/causal", "skipped: flash_attn not installed")


def test_memory_estimates_are_read_from_the_config_comments(tmp_path):
    assert gpu.memory_estimate(gpu.SAMPLER_CONFIG).endswith("= ~13 GB. Checkpoints: ~1.6 GB each.")
    assert gpu.estimate_summary(gpu.SAMPLER_CONFIG, "vlm") == "VLM ~4.4 GB (qwen2_vl/sampler.yaml)"
    config = tmp_path / "family" / "decoder.yaml"
    config.parent.mkdir()
    config.write_text("# a recipe\nseed_everything: 0\n")
    assert gpu.memory_estimate(config) == ""
    assert gpu.estimate_summary(config) == "none (family/decoder.yaml states none)"
