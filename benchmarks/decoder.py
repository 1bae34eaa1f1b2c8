"""Stage 3 (``DecoderStage``) against plain PyTorch doing the same work on the same model, in the same run.

Rows:

- ``decoder/train_step``: ms per optimizer step of ``Trainer.fit`` vs a hand-written loop (frozen VLM features
  under no_grad, reducer encode, decoder forward, flow-matching loss, backward, AdamW step, zero_grad) on one
  in-memory batch. Both sides are timed alike, from the end of one step to the end of the next (device synced),
  warm-up steps dropped, runs interleaved; the loop's loss is first checked equal to ``training_step``'s.
- ``decoder/mfu``: FLOP/s achieved by the Lightning step (FLOPs of one step counted by ``FlopCounterMode``) vs the
  machine's matmul FLOP/s measured now in the precision's dtype; the ratio is the model FLOP utilisation.
- ``decoder/sample/<solver>/<steps>``: ms per image of ``DecoderStage.decode`` vs a hand loop of Euler (or Heun)
  steps calling the decoder directly from the same noise (outputs checked equal once per solver).
- ``decoder/one_step_vs_teacher``: ms per image of one Euler step vs the 10-step Heun teacher (19 calls) on the same
  decoder (target <= 0.1: 10x faster). With ``--decoder-distilled CONFIG`` (a ``DecoderDistillStage`` YAML such as
  ``configs/demo/distill.yaml``, its outputs trained), per config: that timing on its own decoders, and
  ``.../psnr``: the student's held-out reconstruction PSNR vs its teacher's on the config's test set, from the same
  noise seeds, as ``10^(-PSNR/10)`` so that the ratio is ``<= 1.259`` exactly when the student is within 1 dB.

The frozen VLM is the tiny offline LLaVA (``vugen_adapters.tiny``): its cost is small next to the decoder's.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.cli import instantiate_class
from torch import Tensor

from benchmarks.common import (
    LEARNING_RATE,
    TARGET_RATIO,
    Benchmark,
    Row,
    Settings,
    check_positive,
    count_flops,
    flag,
    interleaved,
    lightning_steps,
    matmul_flops_per_second,
    median_iqr,
    plain_steps,
    progress,
    quiet_workspace,
    timed,
    train_step_row,
)
from vugen.decoder_export import read_decoder_export
from vugen.diffusion import flow_matching_inputs, flow_matching_loss, sample_timesteps, time_grid
from vugen.diffusion.prediction import DEFAULT_MIN_DENOM
from vugen.generation import SamplingConfig, decode_latents
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage
from vugen.stages.distill import teacher_settings
from vugen.stages.reconstructing import mean_psnr
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.tiny import build_tiny_vlm

__all__ = ["BENCHMARK", "PRESETS", "DecoderBenchConfig", "plain_loss", "plain_sample", "rows"]

NAME = "decoder"
_SOLVERS = ("euler", "heun")


@dataclass(frozen=True)
class DecoderBenchConfig:
    """Sizes and repeat counts of the decoder benchmark (each field is a ``--decoder-<field>`` flag)."""

    image_size: int = flag("image side in pixels")
    patch_size: int = flag("decoder patch side in pixels")
    width: int = flag("decoder width (reducer hidden width too)")
    depth: int = flag("decoder blocks")
    heads: int = flag("decoder attention heads")
    latent_dim: int = flag("latent channels, below the tiny LLaVA's 32 feature channels")
    batch_size: int = flag("training batch")
    train_steps: int = flag("timed optimizer steps per run")
    warmup_steps: int = flag("untimed optimizer steps first in each run")
    repeats: int = flag("interleaved runs of each side (x3 for the peak matmul)")
    sample_batch_size: int = flag("images per sampling call")
    sample_steps: tuple[int, ...] = flag("sampling step counts")
    solvers: tuple[str, ...] = flag("ODE solvers of sampling", choices=_SOLVERS)
    peak_size: int = flag("side of the square matmul that measures the peak FLOP/s")
    distilled: tuple[str, ...] = flag("DecoderDistillStage YAMLs (trained) whose student and teacher are compared")

    def __post_init__(self) -> None:
        check_positive(self, NAME)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"--decoder-image-size ({self.image_size}) must be a multiple of --decoder-patch-size "
                f"({self.patch_size})"
            )
        if self.width % 4 or self.width % self.heads:
            raise ValueError(
                f"--decoder-width ({self.width}) must be a multiple of 4 and of --decoder-heads ({self.heads})"
            )


PRESETS = {
    "quick": DecoderBenchConfig(16, 4, 32, 1, 2, 8, 4, 3, 1, 2, 2, (2, 4), _SOLVERS, 256, ()),
    "cpu": DecoderBenchConfig(32, 4, 192, 4, 3, 16, 16, 10, 3, 3, 4, (5, 10, 25, 50), _SOLVERS, 2048, ()),
    "cuda": DecoderBenchConfig(256, 16, 768, 12, 12, 16, 32, 20, 5, 3, 32, (5, 10, 25, 50), _SOLVERS, 8192, ()),
}


def rows(settings: Settings, config: DecoderBenchConfig) -> list[Row]:
    """Measure training steps, FLOP utilisation and sampling (see the module docstring)."""
    with quiet_workspace() as tmp:
        stage = _build_stage(LlavaAdapter(str(build_tiny_vlm("llava", tmp))), config)
        generator = torch.Generator().manual_seed(0)
        train_images, sample_images = (
            torch.rand(n, 3, config.image_size, config.image_size, generator=generator).to(settings.device)
            for n in (config.batch_size, config.sample_batch_size)
        )
        batch = {"images": train_images}
        _check_same_loss(stage, batch, settings)
        train_row, step_times = _training_row(stage, batch, config, settings)
        mfu_row = _mfu_row(stage, batch, step_times, config, settings)
        sampling = _sampling_rows(stage, sample_images, config, settings)
        stage.eval()
        with torch.no_grad():
            latents, grid = stage.encode(sample_images)
        speed = one_step_speed_row("", stage.decoder, stage.decoder, latents, grid, config.repeats, settings)
        distilled = [row for path in config.distilled for row in distilled_rows(path, config.repeats, settings)]
        return [train_row, mfu_row, *sampling, speed, *distilled]


BENCHMARK = Benchmark(NAME, DecoderBenchConfig, PRESETS, rows)


def _build_stage(adapter: LlavaAdapter, config: DecoderBenchConfig) -> DecoderStage:
    decoder = PixelDecoder(
        latent_dim=config.latent_dim,
        patch_size=config.patch_size,
        width=config.width,
        depth=config.depth,
        num_heads=config.heads,
        image_size=config.image_size,
        prediction="x",
    )
    reducer = DimensionReducer(adapter.feature_dim, config.latent_dim, hidden_dim=config.width)
    optimizer = functools.partial(torch.optim.AdamW, lr=LEARNING_RATE)
    return DecoderStage(adapter, decoder, reducer=reducer, pca_init=False, optimizer=optimizer)


def _describe(config: DecoderBenchConfig, batch_size: int) -> str:
    return f"B={batch_size} {config.image_size}px p{config.patch_size} w{config.width} d{config.depth}"


# ---------------------------------------------------------------------------------------------------- training
def plain_loss(stage: DecoderStage, images: Tensor) -> Tensor:
    """The stage's training loss computed by hand from its modules, drawing the same random numbers in order."""
    with torch.no_grad():
        features = stage.adapter.encode_images(images).to(stage.param_dtype)
    latents = stage.reducer.encode(features)
    grid = stage.adapter.token_grid(images.shape[-2], images.shape[-1])
    drop = torch.rand(len(images), device=images.device) < stage.decoder.cond_drop_prob
    x = images.to(stage.param_dtype) * 2 - 1
    eps = torch.randn_like(x)
    shift = stage.shift_for(x)
    t = sample_timesteps(len(x), stage.time_schedule, stage.time_mean, stage.time_std, shift, device=x.device)
    x_t, _ = flow_matching_inputs(x, eps, t, stage.decoder.prediction)
    prediction = stage.decoder(x_t, t, latents, grid, drop_cond=drop)
    return flow_matching_loss(prediction, x, eps, t, stage.decoder.prediction, loss_space=stage.loss_space)


def _check_same_loss(stage: DecoderStage, batch: dict[str, Tensor], settings: Settings) -> None:
    """Fail unless the plain loop computes exactly what ``training_step`` does (same seed, same loss)."""
    stage.to(settings.device).train()
    with torch.no_grad(), settings.autocast(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
        torch.manual_seed(0)
        expected = stage.training_step(batch, 0)
        torch.manual_seed(0)
        got = plain_loss(stage, batch["images"])
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
        raise RuntimeError(
            f"the plain reference loop no longer does the work of DecoderStage.training_step: loss {got.item()} "
            f"vs {expected.item()}; update benchmarks/decoder.py:plain_loss"
        )


def _plain_backward(stage: DecoderStage, batch: dict[str, Tensor], settings: Settings) -> None:
    """Forward (autocast as Lightning's precision plugin does) and backward of the plain loss."""
    with settings.autocast():
        loss = plain_loss(stage, batch["images"])
    loss.backward()


def _training_row(
    stage: DecoderStage, batch: dict[str, Tensor], config: DecoderBenchConfig, settings: Settings
) -> tuple[Row, list[float]]:
    """The step-time row and the Lightning step times (seconds)."""
    progress(f"decoder: training steps, Lightning vs plain loop ({config.repeats} runs each)")
    loss = functools.partial(plain_loss, stage, batch["images"])
    times = interleaved(
        {
            "lightning": lambda: lightning_steps(stage, batch, config.warmup_steps, config.train_steps, settings),
            "plain": lambda: plain_steps(stage, loss, config.warmup_steps, config.train_steps, settings),
        },
        config.repeats,
    )
    detail = f"{_describe(config, config.batch_size)}; {config.train_steps} steps x {config.repeats} runs"
    row = train_step_row("decoder/train_step", times["lightning"], times["plain"], "Lightning fit / plain loop", detail)
    return row, times["lightning"]


def _mfu_row(
    stage: DecoderStage,
    batch: dict[str, Tensor],
    step_times: list[float],
    config: DecoderBenchConfig,
    settings: Settings,
) -> Row:
    progress("decoder: FLOPs of one step and the matmul peak")
    stage.to(settings.device).train()
    flops = count_flops(lambda: _plain_backward(stage, batch, settings))
    stage.zero_grad(set_to_none=True)
    dtype = settings.compute_dtype
    peak = matmul_flops_per_second(settings.device, dtype, config.peak_size, 3 * config.repeats)
    dtype_name = str(dtype).removeprefix("torch.")
    return Row.from_samples(
        "decoder/mfu",
        "GFLOP/s",
        [flops / t / 1e9 for t in step_times],
        [f / 1e9 for f in peak],
        compares="achieved (Lightning step) / matmul peak",
        detail=f"{flops / 1e9:.3g} GFLOP per step (fwd+bwd); peak: {config.peak_size}^2 {dtype_name} matmul",
    )


# ---------------------------------------------------------------------------------------------------- sampling
def plain_sample(
    decoder: PixelDecoder, latents: Tensor, grid: tuple[int, int], noise: Tensor, steps: int, solver: str, shift: float
) -> Tensor:
    """Integrate the flow by hand with an x-prediction ``decoder``: Euler steps, or Heun's with a final Euler step.

    ``steps`` intervals of ``time_grid(steps, shift)`` take the flow from ``noise`` (``t = 0``) to data.

    Returns:
        Images ``[B, C, H, W]`` in ``[0, 1]``, as ``DecoderStage.decode`` returns them.
    """
    if decoder.prediction != "x":
        raise ValueError(f"plain_sample integrates an x-prediction decoder, got prediction={decoder.prediction!r}")

    def velocity(x: Tensor, t: float) -> Tensor:
        t_batch = torch.full((len(x),), t, device=x.device, dtype=x.dtype)
        return (decoder(x, t_batch, latents, grid) - x) / (1 - t_batch).clamp_min(DEFAULT_MIN_DENOM).view(-1, 1, 1, 1)

    times = time_grid(steps, shift).tolist()
    x = noise
    for k, (t0, t1) in enumerate(zip(times[:-1], times[1:], strict=True)):
        v0 = velocity(x, t0)
        if solver == "heun" and k < steps - 1:
            x = x + 0.5 * (t1 - t0) * (v0 + velocity(x + (t1 - t0) * v0, t1))
        else:
            x = x + (t1 - t0) * v0
    return ((x.float() + 1) / 2).clamp(0, 1)


def _sampling_rows(stage: DecoderStage, images: Tensor, config: DecoderBenchConfig, settings: Settings) -> list[Row]:
    stage.to(settings.device).eval()
    with torch.no_grad():
        latents, grid = stage.encode(images)
    size, count = tuple(images.shape[-2:]), len(images)

    def noise() -> Tensor:  # what `decode` draws from the same generator
        generator = torch.Generator(settings.device).manual_seed(0)
        return torch.randn(count, 3, *size, generator=generator, device=settings.device).to(stage.param_dtype)

    def framework(steps: int, solver: str) -> Tensor:
        generator = torch.Generator(settings.device).manual_seed(0)
        with settings.autocast():
            return stage.decode(latents, grid, size, generator=generator, solver=solver, steps=steps)

    @torch.no_grad()
    def plain(steps: int, solver: str) -> Tensor:
        with settings.autocast():
            start = noise()
            return plain_sample(stage.decoder, latents, grid, start, steps, solver, stage.shift_for(start))

    result = []
    for solver in config.solvers:
        progress(f"decoder: sampling with {solver}, steps {list(config.sample_steps)}")
        _check_same_images(framework(min(config.sample_steps), solver), plain(min(config.sample_steps), solver))
        for steps in config.sample_steps:
            times = interleaved(
                {
                    "vugen": lambda s=steps, m=solver: [timed(lambda: framework(s, m), settings.device)],
                    "plain": lambda s=steps, m=solver: [timed(lambda: plain(s, m), settings.device)],
                },
                config.repeats,
            )
            calls = 2 * steps - 1 if solver == "heun" else steps
            result.append(
                Row.from_samples(
                    f"decoder/sample/{solver}/{steps}",
                    "ms/image",
                    [1e3 * t / count for t in times["vugen"]],
                    [1e3 * t / count for t in times["plain"]],
                    compares=f"DecoderStage.decode / hand {solver} loop",
                    target=TARGET_RATIO,
                    detail=f"{_describe(config, count)}; {calls} decoder calls x {config.repeats} runs",
                )
            )
    return result


def _check_same_images(framework: Tensor, plain: Tensor) -> None:
    error = (framework - plain).abs().max().item()
    if error > 1e-3:
        raise RuntimeError(
            f"the hand sampling loop no longer matches DecoderStage.decode (max abs difference {error:.3g}); "
            "update benchmarks/decoder.py:plain_sample"
        )


# ---------------------------------------------------------------------------------------------------- one step
TEACHER = SamplingConfig(solver="heun", steps=10)
ONE_STEP = SamplingConfig(solver="euler", steps=1)
WITHIN_ONE_DB = 10**0.1  # the ratio of two 10^(-PSNR/10) values when their PSNRs are 1 dB apart


def one_step_speed_row(
    label: str,
    student: PixelDecoder,
    teacher: PixelDecoder,
    latents: Tensor,
    grid: tuple[int, int],
    repeats: int,
    settings: Settings,
    student_sampling: SamplingConfig = ONE_STEP,
    teacher_sampling: SamplingConfig = TEACHER,
) -> Row:
    """ms per image of the student's sampling vs the teacher's, interleaved, the same latents and noise."""
    side = student.base_grid[0] * student.patch_size
    count = len(latents)

    def run(decoder: PixelDecoder, sampling: SamplingConfig) -> list[float]:
        generator = torch.Generator(settings.device).manual_seed(0)
        with torch.no_grad(), settings.autocast():
            decode = functools.partial(decode_latents, decoder, latents, grid, (side, side), sampling, generator)
            return [timed(decode, settings.device)]

    progress(f"decoder: one step vs the teacher {label}".rstrip())
    times = interleaved(
        {"student": lambda: run(student, student_sampling), "teacher": lambda: run(teacher, teacher_sampling)}, repeats
    )
    return Row.from_samples(
        f"decoder/one_step_vs_teacher{label}",
        "ms/image",
        [1e3 * t / count for t in times["student"]],
        [1e3 * t / count for t in times["teacher"]],
        compares=f"{_sampling_name(student_sampling)} / {_sampling_name(teacher_sampling)}",
        target=0.1,
        detail=f"B={count} {side}px p{student.patch_size} w{student.width} d{len(student.blocks)}; {repeats} runs",
    )


def distilled_rows(config_path: str, repeats: int, settings: Settings) -> list[Row]:
    """The speed and held-out PSNR rows of a trained distillation (a ``DecoderDistillStage`` YAML and its outputs)."""
    run = _load_distillation(Path(config_path))
    label = f"/{Path(config_path).parent.name}"
    images = run["images"].to(settings.device)
    reducer, adapter = run["reducer"].to(settings.device), run["adapter"].to(settings.device)
    with torch.no_grad():
        latents = reducer.encode(adapter.encode_images(images).float())
    grid = adapter.token_grid(images.shape[-2], images.shape[-1])
    student, teacher = run["student"].to(settings.device), run["teacher"].to(settings.device)
    sampling = {"student": run["student_sampling"], "teacher": run["teacher_sampling"]}
    speed = one_step_speed_row(
        label, student, teacher, latents[:32], grid, repeats, settings, sampling["student"], sampling["teacher"]
    )
    progress(f"decoder: held-out PSNR of the student and the teacher of {config_path} ({repeats} noise seeds)")
    psnr = {name: [] for name in sampling}
    for seed in range(repeats):
        for name, decoder in (("student", student), ("teacher", teacher)):
            generator = torch.Generator(settings.device).manual_seed(seed)
            with torch.no_grad(), settings.autocast():
                out = decode_latents(decoder, latents, grid, tuple(images.shape[-2:]), sampling[name], generator)
            psnr[name].append(mean_psnr(out, images).item())
    errors = {name: [10 ** (-p / 10) for p in values] for name, values in psnr.items()}
    student_db, teacher_db = (-10 * math.log10(median_iqr(values)[0]) for values in errors.values())
    quality = Row.from_samples(
        f"decoder/one_step_vs_teacher{label}/psnr",
        "10^(-dB/10)",
        errors["student"],
        errors["teacher"],
        compares=f"{_sampling_name(sampling['student'])} / {_sampling_name(sampling['teacher'])}",
        target=WITHIN_ONE_DB,
        detail=f"{len(images)} test images: {student_db:.2f} vs {teacher_db:.2f} dB ({student_db - teacher_db:+.2f})",
    )
    return [speed, quality]


def _load_distillation(path: Path) -> dict[str, Any]:
    """The teacher, the student, their sampling, the reducer, the VLM and the test images a distillation YAML names.

    Its outputs must exist (``vugen fit --config`` it first); paths are read from the working directory, as
    ``vugen fit`` does.
    """
    config = yaml.safe_load(path.read_text())
    model = config["model"]["init_args"]
    if model.get("export_dir") is None:
        raise ValueError(f"--decoder-distilled {path}: model.init_args.export_dir is not set (nothing to compare)")
    reducer, teacher, teacher_sampling = read_decoder_export(model["teacher_export"])
    _, student, student_sampling = read_decoder_export(model["export_dir"])
    if model.get("teacher_sampling"):
        given = SamplingConfig.from_dict(model["teacher_sampling"], f"{path}: teacher_sampling")
        teacher_sampling = teacher_settings(given, teacher_sampling)
    data = instantiate_class((), config["data"])
    data.setup("test")
    images = torch.cat([batch["images"] for batch in data.test_dataloader()])
    return {
        "adapter": instantiate_class((), model["adapter"]),
        "reducer": reducer.eval(),
        "teacher": teacher.eval(),
        "student": student.eval(),
        "teacher_sampling": teacher_sampling,
        "student_sampling": student_sampling,
        "images": images,
    }


def _sampling_name(sampling: SamplingConfig) -> str:
    return f"{sampling.solver} {sampling.steps}"
