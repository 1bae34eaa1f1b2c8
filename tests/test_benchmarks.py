"""`python -m benchmarks.run --quick`: it runs end to end, prints the environment and table, and writes rows whose
numbers are positive and finite with each ratio equal to measured / reference; bad flags fail clearly; each benchmark's
flags override its preset. The sampler benchmark's uncached reference generates the latents that
`LatentSampler.generate` does, and its real-geometry rows (run on the tiny LLaVA by --quick) scale depth cuts
linearly and say how close the caches come to their ideal."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks.common import Row, Settings, intervals_after, quiet_workspace
from benchmarks.run import BENCHMARKS, build_parser, main
from benchmarks.sampler import (
    GEOMETRIES,
    build_stage,
    make_prompts,
    per_layer_cost,
    scale_to_depth,
    uncached_latents,
)
from benchmarks.sampler import PRESETS as SAMPLER_PRESETS

ROOT = Path(__file__).resolve().parents[1]
QUICK_SAMPLING = [f"decoder/sample/{solver}/{steps}" for solver in ("euler", "heun") for steps in (2, 4)]
QUICK_SAMPLER = ["sampler/generate/euler/2", "sampler/generate/ideal", "sampler/train_step", "sampler/train_throughput"]
QUICK_SAMPLER_REAL = [
    "sampler/generate_real",
    "sampler/generate_real/ideal",
    "sampler/train_throughput_real",
    "sampler/train_throughput_real/ideal",
]


def run_benchmarks(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.run", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quick_run_writes_consistent_rows(tmp_path):
    out = tmp_path / "out.json"
    result = run_benchmarks("--quick", "--device", "cpu", "--threads", "1", "--json", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    env = report["environment"]
    assert (env["threads"], env["precision"], env["preset"]) == (1, "32-true", "quick")
    assert env["device"].startswith("cpu")
    for value in (env["device"], f"torch: {env['torch']}", "threads: 1", "vugen benchmarks", "decoder/train_step"):
        assert value in result.stdout
    rows = {row["name"]: row for row in report["rows"]}
    names = list(rows)
    # The decoder's rows first (these in this order, with any others of its own), then exactly the sampler's.
    decoder = [name for name in names if name.startswith("decoder/")]
    assert "decoder/one_step_vs_teacher" in decoder
    assert names == [*decoder, *QUICK_SAMPLER, *QUICK_SAMPLER_REAL]
    expected = ["decoder/train_step", "decoder/mfu", *QUICK_SAMPLING]
    assert [name for name in decoder if name in expected] == expected
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
    # Sampler: P is the quick preset's 24-token prompt, N the tiny LLaVA's 8 x 8 latent tokens.
    generate, ideal = rows["sampler/generate/euler/2"], rows["sampler/generate/ideal"]
    assert (generate["unit"], generate["target"]) == ("ms/image", 1.05) and "P=24+BOI N=64" in generate["detail"]
    # The ideal ratio is T_img / T_full and its inverse is the speedup in the detail (not asserted below 1: at tiny
    # sizes on a loaded machine the two forwards are within noise of each other; `make bench` measures it).
    assert ideal["unit"] == "ms/forward" and ideal["ratio"] > 0
    assert f"= {1 / ideal['ratio']:.2f}x" in ideal["detail"]
    assert (rows["sampler/train_step"]["unit"], rows["sampler/train_step"]["target"]) == ("ms/step", 1.05)
    throughput = rows["sampler/train_throughput"]
    assert throughput["unit"] == "samples/s" and throughput["compares"].startswith("latent cache / images")
    check_real_rows(rows)


def check_real_rows(rows):
    """The real-geometry rows at --quick: the tiny LLaVA, scaled from its two depth cuts to its full depth of 2."""
    generate, ideal = rows["sampler/generate_real"], rows["sampler/generate_real/ideal"]
    assert generate["unit"] == "images/s" and "speedup" in generate["compares"]
    assert "P=48+BOI N=64" in generate["detail"] and "generate timed at depth 1, + 1 layer(s)" in generate["detail"]
    # T_img / T_full (timings: not asserted below 1 at tiny sizes); the speedup's fraction of the ideal is the product.
    assert ideal["unit"] == "ms/forward" and ideal["ratio"] > 0
    fraction = generate["ratio"] * ideal["ratio"]
    assert (
        f"speedup {generate['ratio']:.3f}x = {fraction:.2f} of the ideal {1 / ideal['ratio']:.3f}x"
        in generate["detail"]
    )
    throughput, best = rows["sampler/train_throughput_real"], rows["sampler/train_throughput_real/ideal"]
    assert throughput["unit"] == best["unit"] == "images/s"
    assert throughput["compares"].startswith("latent cache / images")
    # Both share the step on latents; the ideal adds the tower's forward to it, so it is a speedup above 1.
    assert throughput["measured"] == best["measured"] and best["ratio"] > 1
    share = throughput["ratio"] / best["ratio"]
    assert f"= {share:.2f} of the ideal {best['ratio']:.3f}x" in throughput["detail"]
    assert "B=2, P=48+BOI N=64" in throughput["detail"]
    assert "GFLOP/image at full depth" in best["detail"] and "tower timed at depth 1, + 1 layer(s)" in best["detail"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decoder-image-size", "18"], "--decoder-image-size (18) must be a multiple of --decoder-patch-size (4)"),
        (["--decoder-width", "30"], "--decoder-width (30) must be a multiple of 4 and of --decoder-heads (2)"),
        (["--decoder-sample-steps", "5", "0"], "--decoder-sample-steps must be >= 1, got (5, 0)"),
        (["--decoder-solvers", "sde"], "argument --decoder-solvers: invalid choice: 'sde'"),
        (["--only", "nothing"], "argument --only: invalid choice: 'nothing'"),
        (["--sampler-lm-heads", "3"], "--sampler-lm-heads (3) must be even and divide --sampler-lm-width (64)"),
        (["--sampler-latent-dim", "32"], "--sampler-latent-dim (32) must be below --sampler-vision-width (32)"),
        (["--sampler-prompt-tokens", "0"], "--sampler-prompt-tokens must be >= 1, got 0"),
        (["--sampler-solver", "sde"], "argument --sampler-solver: invalid choice: 'sde'"),
        (["--sampler-real-geometry", "huge"], "argument --sampler-real-geometry: invalid choice: 'huge'"),
        (
            ["--sampler-real-depths", "2", "1"],
            "--sampler-real-depths must be two depths d1 < d2 <= 2 (the tiny LLaVA tower's and language model's "
            "layers), got (2, 1)",
        ),
        (["--sampler-real-depths", "1", "3"], "must be two depths d1 < d2 <= 2"),
        (["--sampler-real-depths", "1"], "must be two depths d1 < d2 <= 2"),
        (["--sampler-real-depths", "0", "2"], "--sampler-real-depths must be >= 1, got (0, 2)"),
    ],
)
def test_bad_flags_fail_before_measuring_and_name_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--device", "cpu", *args])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "decoder:" not in stderr and "sampler:" not in stderr  # nothing was measured


def test_each_benchmark_takes_its_preset_with_the_given_flags():
    quick = Settings(torch.device("cpu"), "32-true", quick=True)
    parser = build_parser()
    decoder, sampler = BENCHMARKS["decoder"], BENCHMARKS["sampler"]
    assert decoder.configure(quick, parser.parse_args([])) == decoder.presets["quick"]
    assert sampler.configure(dataclasses.replace(quick, quick=False), parser.parse_args([])) == sampler.presets["cpu"]
    args = parser.parse_args(["--decoder-sample-steps", "3", "5", "--sampler-solver", "heun", "--sampler-prompts", "2"])
    assert decoder.configure(quick, args) == dataclasses.replace(decoder.presets["quick"], sample_steps=(3, 5))
    assert sampler.configure(quick, args) == dataclasses.replace(sampler.presets["quick"], solver="heun", prompts=2)
    # The real rows' cuts are checked against the preset's geometry: 27 tower and 28 LM layers on the CPU.
    cpu = dataclasses.replace(quick, quick=False)
    real = parser.parse_args(["--sampler-real-depths", "2", "27", "--sampler-real-sample-steps", "8"])
    expected = dataclasses.replace(sampler.presets["cpu"], real_depths=(2, 27), real_sample_steps=8)
    assert sampler.configure(cpu, real) == expected
    assert GEOMETRIES[expected.real_geometry].vision_layers == 27


def test_depth_cuts_give_per_layer_costs_that_scale_the_shallow_timings():
    # Pairs timed one after the other at depths 1 and 3: differences 3, 3, 4, 2 and 90 (a burst over one sample), so
    # 3 over 2 layers: 1.5 per layer. The medians of the cuts (10 and 14) would give 2.
    cuts = {3: [13.0, 12.0, 14.0, 99.0, 32.0], 1: [10.0, 9.0, 10.0, 9.0, 30.0]}
    assert per_layer_cost(cuts) == 1.5
    assert per_layer_cost({1: [5.0, 5.0], 2: [4.0, 4.5]}) == 0.0  # a layer costs no less than nothing
    with pytest.raises(ValueError):  # unpaired samples
        per_layer_cost({1: [1.0], 2: [2.0, 3.0]})
    # A step timed at the shallow cut, + 27 LM layers at 1.5 and 26 tower layers at 0.5; the spread stays its own.
    assert scale_to_depth([10.0, 12.0], (27, 1.5), (26, 0.5)) == [10.0 + 40.5 + 13.0, 12.0 + 40.5 + 13.0]
    assert scale_to_depth([10.0], (0, 1.5)) == [10.0]


# Lightning's wording of the advice that does not apply to the benchmarks (lightning/pytorch/trainer/...).
LIGHTNING_ADVICE = [
    "The 'train_dataloader' does not have many workers which may be a bottleneck. Consider increasing ...",
    "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
    "Found 2 module(s) in eval mode at the start of training. This may lead to unexpected behavior ...",
]


def test_quiet_workspace_silences_only_lightnings_advice_and_only_inside():
    with quiet_workspace() as tmp, warnings.catch_warnings(record=True) as caught:
        assert tmp.is_dir()
        for message in [*LIGHTNING_ADVICE, "other advice"]:
            warnings.warn(message, UserWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["other advice"]
    assert not tmp.exists()
    with warnings.catch_warnings(record=True) as caught:  # the filters end with the workspace
        for message in LIGHTNING_ADVICE:
            warnings.warn(message, UserWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == LIGHTNING_ADVICE


@pytest.fixture(scope="module")
def sampler_stage(tmp_path_factory):
    return build_stage(tmp_path_factory.mktemp("sampler-bench"), SAMPLER_PRESETS["quick"]).eval()


def test_the_uncached_reference_generates_the_latents_of_the_prompt_cache(sampler_stage):
    sampler, sampling = sampler_stage.latent_sampler, sampler_stage.sampling
    prompts = make_prompts(sampler_stage.adapter, 2, 24)
    with torch.no_grad():
        cached = sampler.generate(prompts, [0, 1], sampling)
        uncached = uncached_latents(sampler, prompts, [0, 1], sampling)
        other_prompts = uncached_latents(sampler, prompts[::-1], [0, 1], sampling)
    torch.testing.assert_close(uncached, cached, atol=1e-5, rtol=1e-4)
    # Not equal by accident: the latents depend on the prompt (the perturbed LoRA and bridge read it).
    assert (other_prompts - cached).abs().max() > 1e-2


def test_prompts_are_the_shortest_of_at_least_the_asked_tokens(sampler_stage):
    adapter = sampler_stage.adapter
    prompts = make_prompts(adapter, 3, 40)
    assert len(set(prompts)) == 3
    for prompt in prompts:
        assert adapter.tokenize([prompt])["input_ids"].shape[1] >= 40
        shorter = prompt.rsplit(" ", 1)[0]
        assert adapter.tokenize([shorter])["input_ids"].shape[1] < 40


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
