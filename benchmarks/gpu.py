"""``make bench-gpu``: one table of what vugen's stages get out of one GPU, offline, in under 8 minutes.

``python -m benchmarks.gpu [--dry-run] [--json PATH] [--budget-s N]``. Every model has random weights at the geometry
of the shipped Qwen2-VL-2B configs (``configs/qwen2_vl/decoder.yaml`` and ``sampler.yaml``, read here), so nothing
is downloaded. Rows, in bf16-mixed precision:

- ``matmul/bf16_peak``: TFLOP/s of a square bf16 ``torch.mm``, the practical peak that the MFU rows divide by.
- ``decoder/train/compile_{off,on}/ckpt_{off,on}``: TFLOP/s of a ``DecoderStage`` training step (``Trainer.fit``)
  at 256 px with the configs' ``PixelDecoder`` (width 768, depth 12, patch 16) and reducer, over the matmul peak:
  the model FLOP utilisation. FLOPs of one eager step are counted by ``FlopCounterMode`` (activation recomputation
  is not counted: MFU, not hardware utilisation). The frozen VLM is a 2-layer LLaVA with the reducer's input width
  (its cost is small next to the decoder's).
- ``sampler/train/<attention>/<image_attention>``: the same for a ``SamplerStage`` step on latent-cache batches:
  the config's LoRA (rank 64 on every projection) and flow head in a Qwen2-1.5B-wide language model (1536 x 28,
  12 / 2 heads: the LM of Qwen2-VL-2B, as a Llama), 32 x 32 latents, activation checkpointing as the config. With
  sdpa (the configs' bidirectional latent block, and causal) and FlashAttention 2 (``image_attention: causal``);
  the FlashAttention row says it was skipped where ``flash_attn`` is not installed.
- ``generation/b<B>/{uncached,cached}``: images per second of the latent sampler (latents only, no decoding) at each
  batch size: ``LatentSampler.generate``, which reuses the prompt's KV cache at every flow step, and the same flow
  re-running the whole sequence each step (:func:`benchmarks.sampler.uncached_latents`). The cached row's ratio is
  the cache's speedup. Guidance as the config (it doubles the batch); fewer flow steps than its 50 (time is linear in
  them).
- ``decoder/sample/{heun_10,euler_1}``: images per second of ``DecoderStage.decode`` at 256 px, ten Heun steps and
  one Euler step (the one-step row's ratio is its speedup).

Each row shows the peak GPU memory it allocated (``torch.cuda.max_memory_allocated``, reset before the row) next to
the estimate that the relevant config states in a comment (for that config's batch, image size and whole VLM). A
configuration that fails (out of memory, a missing kernel) becomes a row saying so and the table still prints; rows
reached after ``--budget-s`` seconds are skipped. ``--dry-run`` runs the same code on the CPU with every model at tiny
size, 1-2 steps each, so that a typo cannot first show on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import io
import json
import logging
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor
from transformers import LlavaConfig, LlavaForConditionalGeneration

from benchmarks.common import (
    LEARNING_RATE,
    Settings,
    count_flops,
    environment,
    lightning_steps,
    matmul_flops_per_second,
    median_iqr,
    progress,
    quiet_workspace,
    timed,
)
from benchmarks.sampler import make_prompts, uncached_latents
from vugen.decoder_export import write_decoder_export
from vugen.generation import LatentSamplerConfig, SamplingConfig
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage
from vugen.stages.sampler import SamplerStage
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.tiny import build_tiny_vlm

__all__ = [
    "DEFAULT_BUDGET_S",
    "DRY_RUN",
    "GPU",
    "GpuBenchSizes",
    "GpuRow",
    "Measured",
    "build_parser",
    "build_vlm",
    "estimate_summary",
    "flash_attention_missing",
    "main",
    "memory_estimate",
    "print_table",
    "row_names",
    "run",
    "step_flops",
]

ROOT = Path(__file__).resolve().parents[1]
DECODER_CONFIG = ROOT / "configs" / "qwen2_vl" / "decoder.yaml"
SAMPLER_CONFIG = ROOT / "configs" / "qwen2_vl" / "sampler.yaml"
DEFAULT_BUDGET_S = 420.0  # of measuring; with start-up and the last row's overrun the run stays under 8 minutes
PRECISION = "bf16-mixed"
FLASH = "flash_attention_2"
SAMPLER_ATTENTION = (("sdpa", "bidirectional"), ("sdpa", "causal"), (FLASH, "causal"))
MFU = "achieved / bf16 matmul peak (MFU)"
# Arguments of the configs' DecoderStage that shape its training step (the rest are logging, export, schedules).
_DECODER_TRAINING = ("train_reducer", "feature_loss_weight", "time_schedule", "time_mean", "time_std", "loss_space")
_SAMPLER_TRAINING = ("prompt_dropout", "time_schedule", "time_mean", "time_std", "activation_checkpointing")


@dataclass(frozen=True)
class GpuBenchSizes:
    """Sizes and step counts of one run: :data:`GPU` (real geometry) or :data:`DRY_RUN` (tiny, CPU).

    The ``*_args`` mappings replace entries of the configs' ``init_args`` (empty: the config's geometry); the
    ``*_text`` / ``*_vision`` mappings update the random LLaVA's ``text_config`` / ``vision_config``.
    """

    matmul_size: int
    matmul_repeats: int
    decoder_image_size: int
    decoder_args: Mapping[str, Any]
    reducer_args: Mapping[str, Any]
    decoder_vision: Mapping[str, Any]
    decoder_batch: int
    decoder_warmup_steps: int
    decoder_train_steps: int
    compile_backend: str | None  # None: the stage's own ``block.compile()`` (inductor)
    sample_batch: int
    sample_repeats: int
    sampler_text: Mapping[str, Any]
    sampler_vision: Mapping[str, Any]
    latent_sampler_args: Mapping[str, Any]
    latent_dim: int
    prompt_tokens: int
    sampler_batch: int
    sampler_warmup_steps: int
    sampler_train_steps: int
    generation_batches: tuple[int, ...]
    generation_steps: int
    generation_repeats: int


GPU = GpuBenchSizes(
    matmul_size=8192,
    matmul_repeats=10,
    decoder_image_size=256,
    decoder_args={},
    reducer_args={},
    # A 2-layer SigLIP as wide as the configs' reducer input (1280), 16 x 16 tokens: the decoder's patch grid.
    decoder_vision={"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "patch_size": 2},
    decoder_batch=32,
    decoder_warmup_steps=3,
    decoder_train_steps=10,
    compile_backend=None,
    sample_batch=32,
    sample_repeats=3,
    # Qwen2-1.5B's (and Qwen2-VL-2B's) language model: 1536 wide, 28 layers, 12 query / 2 key-value heads of 128.
    sampler_text={
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "head_dim": 128,
    },
    # Patch 1 on the tiny tower's 32 px input: 32 x 32 latent tokens, the configs' grid (448 px, 14 px patches merged).
    sampler_vision={"hidden_size": 64, "intermediate_size": 128, "patch_size": 1},
    latent_sampler_args={},
    latent_dim=32,
    prompt_tokens=64,
    sampler_batch=32,
    sampler_warmup_steps=2,
    sampler_train_steps=4,
    generation_batches=(1, 8, 32),
    generation_steps=10,
    generation_repeats=2,
)

DRY_RUN = GpuBenchSizes(
    matmul_size=128,
    matmul_repeats=2,
    decoder_image_size=16,
    decoder_args={"patch_size": 4, "width": 32, "depth": 2, "num_heads": 2, "bottleneck_dim": 8, "latent_dim": 8},
    reducer_args={"hidden_dim": 32, "num_blocks": 1, "latent_dim": 8},
    decoder_vision={"patch_size": 4},
    decoder_batch=2,
    decoder_warmup_steps=1,
    decoder_train_steps=1,
    compile_backend="aot_eager",  # traces each block as on the GPU, without inductor's minute of CPU code generation
    sample_batch=2,
    sample_repeats=1,
    sampler_text={},
    sampler_vision={"patch_size": 4},
    latent_sampler_args={"lora_rank": 4, "lora_alpha": 4.0, "head_width": 32, "head_depth": 1},
    latent_dim=8,
    prompt_tokens=16,
    sampler_batch=2,
    sampler_warmup_steps=1,
    sampler_train_steps=1,
    generation_batches=(1, 2),
    generation_steps=2,
    generation_repeats=1,
)


# ---------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Measured:
    """What a row's measurement returns: samples of its value, and of its reference if it has one.

    Args:
        unit: Unit of ``samples`` and ``reference``.
        samples: Measured values (one per timed step or call).
        compares: What the value is, or what is divided by what when there is a reference.
        reference: Samples of the reference (the matmul peak, the uncached or multi-step side), if any.
        detail: Sizes and counts behind the numbers.
    """

    unit: str
    samples: Sequence[float]
    compares: str = ""
    reference: Sequence[float] | None = None
    detail: str = ""


@dataclass(frozen=True)
class GpuRow:
    """One line of the table: a measurement with its peak memory and the configs' estimate, or why there is none.

    Args:
        name: Stable identifier, ``<part>/<case>`` (e.g. ``decoder/train/compile_on/ckpt_off``).
        status: ``ok``, ``skipped: <why>`` or ``failed: <error>``; only ``ok`` rows have numbers.
        unit: Unit of ``measured`` and ``reference``.
        measured: Median of the measured samples.
        measured_iqr: Their interquartile range.
        reference: Median of the reference samples, if the row has a reference.
        reference_iqr: Their interquartile range.
        ratio: ``measured / reference`` (the MFU, or a speedup).
        compares: What the value is, or what the ratio divides.
        peak_memory_gib: ``torch.cuda.max_memory_allocated`` over the row in GiB (None on the CPU).
        memory_estimate: The relevant config's estimate (its comment, shortened), or what there is instead.
        detail: Sizes and counts behind the numbers.
    """

    name: str
    status: str = "ok"
    unit: str = ""
    measured: float | None = None
    measured_iqr: float | None = None
    reference: float | None = None
    reference_iqr: float | None = None
    ratio: float | None = None
    compares: str = ""
    peak_memory_gib: float | None = None
    memory_estimate: str = ""
    detail: str = ""

    @classmethod
    def from_measured(cls, name: str, measured: Measured, peak_memory_gib: float | None, estimate: str) -> GpuRow:
        """The ``ok`` row of a measurement (medians and interquartile ranges of its samples)."""
        value, value_iqr = median_iqr(measured.samples)
        reference = reference_iqr = ratio = None
        if measured.reference:
            reference, reference_iqr = median_iqr(measured.reference)
            ratio = value / reference
        return cls(
            name,
            unit=measured.unit,
            measured=value,
            measured_iqr=value_iqr,
            reference=reference,
            reference_iqr=reference_iqr,
            ratio=ratio,
            compares=measured.compares,
            peak_memory_gib=peak_memory_gib,
            memory_estimate=estimate,
            detail=measured.detail,
        )


def row_names(sizes: GpuBenchSizes) -> list[str]:
    """Every row a run of ``sizes`` prints, in the table's order."""
    decoder = [f"decoder/train/compile_{c}/ckpt_{k}" for c in ("off", "on") for k in ("off", "on")]
    sampler = [f"sampler/train/{attention}/{mask}" for attention, mask in SAMPLER_ATTENTION]
    generation = [f"generation/b{b}/{kind}" for b in sizes.generation_batches for kind in ("uncached", "cached")]
    return ["matmul/bf16_peak", *decoder, *sampler, *generation, "decoder/sample/heun_10", "decoder/sample/euler_1"]


def _failure(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "failed: CUDA out of memory"
    lines = str(error).strip().splitlines()
    message = f"failed: {type(error).__name__}" + (f": {lines[0]}" if lines else "")
    return message if len(message) <= 160 else message[:157] + "..."


class Runner:
    """Measures rows one at a time: peak memory reset before each, failures and the time budget turned into rows.

    Args:
        settings: Device and precision of the run.
        budget_s: Seconds after which rows not yet started are skipped.
    """

    def __init__(self, settings: Settings, budget_s: float) -> None:
        self.settings, self.budget_s = settings, budget_s
        self.deadline = time.monotonic() + budget_s
        self.rows: list[GpuRow] = []

    @property
    def cuda(self) -> bool:
        """Whether the run measures GPU memory."""
        return self.settings.device.type == "cuda"

    def budget_spent(self) -> str | None:
        """The skip status once the budget is spent, else None."""
        if time.monotonic() > self.deadline:
            return f"skipped: time budget spent (--budget-s {self.budget_s:g})"
        return None

    def row(self, name: str, estimate: str, measure: Callable[[], Measured]) -> Measured | None:
        """Measure one row and add it (or the row saying why not); returns the measurement, None if there is none."""
        skipped = self.budget_spent()
        if skipped is not None:
            self.rows.append(GpuRow(name, status=skipped, memory_estimate=estimate))
            return None
        progress(f"gpu: {name}")
        self.free()  # what the setup before this row dropped is not this row's memory
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.settings.device)
        try:
            measured = measure()
        except Exception as error:  # noqa: BLE001 (any failure of a configuration is a row of the table)
            traceback.print_exc()
            self.rows.append(
                GpuRow(name, status=_failure(error), peak_memory_gib=self._peak(), memory_estimate=estimate)
            )
            measured = None
        else:
            self.rows.append(GpuRow.from_measured(name, measured, self._peak(), estimate))
        finally:
            self.free()
        return measured

    def group(self, names: Sequence[str], estimate: str, body: Callable[[], None]) -> None:
        """Run ``body`` (a shared setup and its :meth:`row` calls); rows of ``names`` it did not add say why."""
        start = len(self.rows)
        status = self.budget_spent()
        if status is None:
            try:
                body()
            except Exception as error:  # noqa: BLE001 (a failed setup fails its rows, not the table)
                traceback.print_exc()
                status = _failure(error)
            finally:
                self.free()
        done = {row.name for row in self.rows[start:]}
        missing = [name for name in names if name not in done]
        self.rows += [
            GpuRow(name, status=status or "failed: not measured", memory_estimate=estimate) for name in missing
        ]

    def skip(self, name: str, status: str, estimate: str) -> None:
        """Add a row that was not measured, saying why."""
        self.rows.append(GpuRow(name, status=status, memory_estimate=estimate))

    def _peak(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.settings.device) / 2**30 if self.cuda else None

    def free(self) -> None:
        """Collect what the last row left behind and return the cached blocks, so the next row starts clean."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- configs
def _model_args(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["model"]["init_args"]


def memory_estimate(path: Path) -> str:
    """The text of a config's ``GPU memory ... (estimate, not measured): ...`` comment, in one line ('' if none)."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and "GPU memory" in line and "estimate" in line:
            comment = [line]
            for following in lines[i + 1 :]:
                if not following.startswith("#"):
                    break
                comment.append(following)
            text = " ".join(part.lstrip("#").strip() for part in comment)
            return text.split("):", 1)[-1].strip()
    return ""


def estimate_summary(path: Path, part: str = "total") -> str:
    """A config's memory estimate (:func:`memory_estimate`) in a few words, naming the config.

    Args:
        path: The config file.
        part: ``total``: the stated total (``= ~13 GB``), else the VLM's weights plus the other amounts;
            ``vlm``: the VLM's weights only (``the bf16 VLM (~4.4 GB)``).
    """
    text, source = memory_estimate(path), f"{path.parent.name}/{path.name}"
    vlm = re.search(r"VLM \((~[\d.]+ GB)", text)
    total = re.search(r"= (~[\d.]+ GB)", text)
    amounts = re.findall(r"~[\d.]+(?:-[\d.]+)? GB", text)
    if part == "vlm" and vlm:
        return f"VLM {vlm.group(1)} ({source})"
    if part == "total" and total:
        return f"{total.group(1)} in all ({source})"
    if part == "total" and amounts:
        others = [amount for amount in amounts if not vlm or amount != vlm.group(1)]
        parts = ([f"VLM {vlm.group(1)}"] if vlm else []) + others
        return f"{' + '.join(parts)} ({source})"
    return f"none ({source} states none)"


# ---------------------------------------------------------------------------------------------------- models
def build_vlm(directory: Path, text: Mapping[str, Any], vision: Mapping[str, Any], device: torch.device) -> Path:
    """A random LLaVA (the tiny offline one, its tokenizer and processor) with its text and vision configs updated,
    initialised on ``device`` and saved in bf16 to ``directory`` (as :func:`benchmarks.sampler.build_stage` widens
    it)."""
    pretrained = build_tiny_vlm("llava", directory)
    config = LlavaConfig.from_pretrained(pretrained)
    config.text_config.update(dict(text))
    config.vision_config.update(dict(vision))
    torch.manual_seed(0)
    with torch.device(device):  # the random initialisation of a 1.5B model takes seconds on a GPU
        model = LlavaForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(pretrained)
    del model
    return pretrained


class Models:
    """The run's random checkpoints (built once, in ``directory``) and the stages on them, from the configs.

    Args:
        directory: A temporary folder for the checkpoints.
        sizes: The run's sizes.
        settings: The run's device.
    """

    def __init__(self, directory: Path, sizes: GpuBenchSizes, settings: Settings) -> None:
        self.directory, self.sizes, self.settings = directory, sizes, settings
        self.decoder_config, self.sampler_config = _model_args(DECODER_CONFIG), _model_args(SAMPLER_CONFIG)

    @functools.cached_property
    def decoder_vlm(self) -> Path:
        """The decoder stage's frozen VLM: two layers, the reducer's input width."""
        progress("gpu: building the decoder stage's random VLM")
        return build_vlm(self.directory / "decoder-vlm", {}, self.sizes.decoder_vision, self.settings.device)

    @functools.cached_property
    def sampler_vlm(self) -> Path:
        """The sampler stage's VLM: its language model at the sizes' width and depth."""
        progress("gpu: building the sampler stage's random VLM")
        sizes = self.sizes
        return build_vlm(self.directory / "sampler-vlm", sizes.sampler_text, sizes.sampler_vision, self.settings.device)

    def adapter(self, pretrained: Path, config: Mapping[str, Any], attention: str | None = None) -> LlavaAdapter:
        """The adapter on ``pretrained``, in the dtype of the config's adapter, with ``attention`` (default: sdpa)."""
        dtype = config["adapter"]["init_args"].get("dtype", "bfloat16")
        return LlavaAdapter(str(pretrained), dtype=dtype, attn_implementation=attention)

    def decoder_stage(self, adapter: LlavaAdapter, compile: bool = False, checkpointing: bool = False) -> DecoderStage:
        """The config's ``DecoderStage`` at the sizes' image size: its decoder and a fresh reducer on ``adapter``."""
        args, sizes = self.decoder_config, self.sizes
        decoder_args = args["decoder"]["init_args"] | {"image_size": sizes.decoder_image_size} | sizes.decoder_args
        reducer_args = args["reducer"]["init_args"] | sizes.reducer_args | {"feature_dim": adapter.feature_dim}
        stage = DecoderStage(
            adapter,
            PixelDecoder(**decoder_args),
            reducer=DimensionReducer(**reducer_args),
            pca_init=False,
            sampling=SamplingConfig(**args["sampling"]),
            activation_checkpointing=checkpointing,
            compile=compile,
            optimizer=functools.partial(torch.optim.AdamW, lr=LEARNING_RATE),
            **{key: args[key] for key in _DECODER_TRAINING if key in args},
        )
        if compile:
            torch._dynamo.reset()  # each compiled configuration starts from an empty cache (no recompile limits)
            if sizes.compile_backend is not None:  # else `configure_model` compiles each block (inductor)
                for block in stage.decoder.blocks:
                    block.compile(backend=sizes.compile_backend)
        return stage

    def sampler_stage(self, attention: str, image_attention: str) -> SamplerStage:
        """The config's ``SamplerStage`` on the sampler VLM with ``attention`` and ``image_attention``."""
        args, sizes = self.sampler_config, self.sizes
        # On the device before the adapter measures its vision tower: FlashAttention runs on CUDA tensors only.
        adapter = self.adapter(self.sampler_vlm, args, attention).to(self.settings.device)
        settings = args["latent_sampler"] | sizes.latent_sampler_args | {"image_attention": image_attention}
        sampling = SamplingConfig(**args["sampling"]).with_overrides(steps=sizes.generation_steps)
        export = self._sampler_export(adapter.feature_dim)
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights" per module
            return SamplerStage(
                adapter,
                str(export),
                latent_sampler=LatentSamplerConfig(**settings),
                sampling=sampling,
                optimizer=functools.partial(torch.optim.AdamW, lr=LEARNING_RATE),
                **{key: args[key] for key in _SAMPLER_TRAINING if key in args},
            )

    @functools.cache  # noqa: B019 (one Models per run)
    def _sampler_export(self, feature_dim: int) -> Path:
        """A small random decoder export: the sampler stage needs one, its rows never decode."""
        reducer = DimensionReducer(feature_dim, self.sizes.latent_dim, hidden_dim=32, num_blocks=1)
        decoder = PixelDecoder(self.sizes.latent_dim, patch_size=8, width=32, depth=1, num_heads=2, image_size=32)
        directory = self.directory / "sampler-decoder-export"
        write_decoder_export(directory, reducer, decoder, SamplingConfig())
        return directory


def step_flops(stage: torch.nn.Module, loss: Callable[[], Tensor], settings: Settings) -> int:
    """FLOPs of one eager training step: ``loss()`` under the precision's autocast, then its backward."""
    stage.to(settings.device).train()

    def step() -> None:
        with settings.autocast():
            value = loss()
        value.backward()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
        flops = count_flops(step)
    stage.zero_grad(set_to_none=True)
    return flops


def flash_attention_missing() -> str | None:
    """Why the FlashAttention 2 row cannot run here (``skipped: ...``), or None when ``flash_attn`` is installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return "skipped: flash_attn not installed"
    return None


def _throughput(call: Callable[[], Any], count: int, repeats: int, device: torch.device) -> list[float]:
    """Items per second of ``repeats`` timed calls of ``call`` (``count`` items each), after one untimed call."""
    call()
    return [count / timed(call, device) for _ in range(repeats)]


# ---------------------------------------------------------------------------------------------------- measuring
def _matmul_peak(runner: Runner, sizes: GpuBenchSizes) -> list[float] | None:
    size, repeats = sizes.matmul_size, sizes.matmul_repeats

    def measure() -> Measured:
        flops = matmul_flops_per_second(runner.settings.device, torch.bfloat16, size, repeats)
        return Measured("TFLOP/s", [f / 1e12 for f in flops], "square bf16 torch.mm", detail=f"{size}^2 x {repeats}")

    measured = runner.row("matmul/bf16_peak", "", measure)
    return list(measured.samples) if measured else None


def _decoder_training(runner: Runner, models: Models, peak: list[float] | None) -> None:
    sizes, settings = models.sizes, runner.settings
    estimate = estimate_summary(DECODER_CONFIG)
    names = [f"decoder/train/compile_{c}/ckpt_{k}" for c in ("off", "on") for k in ("off", "on")]

    def body() -> None:
        adapter = models.adapter(models.decoder_vlm, models.decoder_config)
        size = sizes.decoder_image_size
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(sizes.decoder_batch, 3, size, size, generator=generator).to(settings.device)
        batch = {"images": images}
        flops, decoder = _decoder_flops(models, adapter, batch, settings)
        grid = adapter.token_grid(size, size)
        shape = (
            f"B={sizes.decoder_batch} {size}px {decoder}; "
            f"{flops / 1e9:.4g} GFLOP/step (eager, no recompute); {sizes.decoder_train_steps} timed steps after "
            f"{sizes.decoder_warmup_steps} warm-up; frozen VLM: 2-layer LLaVA, {grid[0]}x{grid[1]} tokens of "
            f"D={adapter.feature_dim}"
        )
        for name in names:
            compile, checkpointing = "compile_on" in name, name.endswith("ckpt_on")

            def measure(compile: bool = compile, checkpointing: bool = checkpointing) -> Measured:
                stage = models.decoder_stage(adapter, compile, checkpointing)
                times = lightning_steps(stage, batch, sizes.decoder_warmup_steps, sizes.decoder_train_steps, settings)
                backend = sizes.compile_backend or "inductor"
                detail = f"{shape}; compile {'on (' + backend + ')' if compile else 'off'}"
                return Measured("TFLOP/s", [flops / t / 1e12 for t in times], MFU, peak, detail)

            runner.row(name, estimate, measure)

    runner.group(names, estimate, body)


def _decoder_flops(
    models: Models, adapter: LlavaAdapter, batch: dict[str, Tensor], settings: Settings
) -> tuple[int, str]:
    """FLOPs of one eager training step of the decoder stage (no compilation, no recomputation), and its decoder's
    patch, width and depth."""
    stage = models.decoder_stage(adapter)
    decoder = stage.decoder
    return step_flops(stage, lambda: stage.training_step(batch, 0), settings), _decoder_shape(decoder)


def _decoder_shape(decoder: PixelDecoder) -> str:
    return f"p{decoder.patch_size} w{decoder.width} d{len(decoder.blocks)}"


def _sampler_training(runner: Runner, models: Models, peak: list[float] | None) -> None:
    sizes, settings = models.sizes, runner.settings
    estimate = estimate_summary(SAMPLER_CONFIG)
    counted: dict[str, int] = {}
    for attention, image_attention in SAMPLER_ATTENTION:
        name = f"sampler/train/{attention}/{image_attention}"
        runs, note = attention, ""
        if attention == FLASH and (missing := flash_attention_missing()) is not None:
            if settings.device.type == "cuda":
                runner.skip(name, missing, estimate)
                continue
            runs, note = "sdpa", f"; dry run: sdpa in place of {FLASH} ({missing.removeprefix('skipped: ')})"

        def measure(runs: str = runs, image_attention: str = image_attention, note: str = note) -> Measured:
            stage = models.sampler_stage(runs, image_attention).to(settings.device)
            bridge = stage.latent_sampler.bridge
            caption = make_prompts(stage.adapter, 1, sizes.prompt_tokens)  # one caption: every sequence alike
            generator = torch.Generator().manual_seed(0)
            latents = torch.randn(sizes.sampler_batch, bridge.num_tokens, bridge.latent_dim, generator=generator)
            batch = {"latents": latents.to(settings.device), "captions": caption * sizes.sampler_batch}
            if "flops" not in counted:  # FLOPs are linear in the batch of equal sequences: count one, eagerly
                one = {"latents": batch["latents"][:1], "captions": caption}
                counted["flops"] = sizes.sampler_batch * step_flops(
                    stage, lambda: stage.loss(one, drop_prompts=False), settings
                )
            flops = counted["flops"]
            times = lightning_steps(stage, batch, sizes.sampler_warmup_steps, sizes.sampler_train_steps, settings)
            detail = _sampler_detail(stage, batch, flops, note)
            return Measured("TFLOP/s", [flops / t / 1e12 for t in times], MFU, peak, detail)

        runner.row(name, estimate, measure)


def _sampler_detail(stage: SamplerStage, batch: dict[str, Any], flops: int, note: str) -> str:
    text = stage.adapter.vlm.config.text_config
    sampler = stage.latent_sampler
    lora = sum(p.numel() for n, p in sampler.adapter.language_model.named_parameters() if "lora_" in n)
    weights = sum(p.numel() * p.element_size() for p in stage.adapter.parameters()) / 2**30
    prompt = stage.adapter.tokenize(batch["captions"][:1])["input_ids"].shape[1]
    return (
        f"LM w{text.hidden_size} d{text.num_hidden_layers} heads {text.num_attention_heads}/"
        f"{text.num_key_value_heads}; LoRA r{sampler.config.lora_rank} ({lora / 1e6:.3g}M) + "
        f"{sampler.config.head} head w{sampler.config.head_width}; B={len(batch['captions'])} x "
        f"({prompt} prompt + BOI + {sampler.bridge.num_tokens} latent) tokens; "
        f"activation checkpointing {'on' if stage.activation_checkpointing else 'off'}; VLM weights {weights:.2g} GiB; "
        f"{flops / 1e12:.4g} TFLOP/step (eager, no recompute){note}"
    )


def _generation(runner: Runner, models: Models) -> None:
    sizes, settings = models.sizes, runner.settings
    estimate = estimate_summary(SAMPLER_CONFIG, "vlm")
    names = [f"generation/b{b}/{kind}" for b in sizes.generation_batches for kind in ("uncached", "cached")]

    def body() -> None:
        image_attention = models.sampler_config["latent_sampler"].get("image_attention", "bidirectional")
        stage = models.sampler_stage("sdpa", image_attention).to(settings.device).eval()
        sampler, sampling = stage.latent_sampler, stage.sampling
        prompts = make_prompts(stage.adapter, max(sizes.generation_batches), sizes.prompt_tokens)
        for count in sizes.generation_batches:
            batch, seeds = prompts[:count], list(range(count))

            @torch.no_grad()
            def cached(batch: list[str] = batch, seeds: list[int] = seeds) -> Tensor:
                with settings.autocast():
                    return sampler.generate(batch, seeds, sampling)

            @torch.no_grad()
            def uncached(batch: list[str] = batch, seeds: list[int] = seeds) -> Tensor:
                with settings.autocast():
                    return uncached_latents(sampler, batch, seeds, sampling)

            detail = (
                f"B={count} x CFG {sampling.guidance_scale:g}; {sampling.solver} {sampling.steps} steps (config: 50; "
                f"time is linear in steps); P={sizes.prompt_tokens}+ tokens + BOI + N={sampler.bridge.num_tokens}; "
                f"latents only, sdpa {image_attention}"
            )

            def measure_uncached(call: Callable[[], Tensor] = uncached, count: int = count, detail: str = detail):
                samples = _throughput(call, count, sizes.generation_repeats, settings.device)
                return Measured("images/s", samples, "full sequence every flow step", detail=detail)

            reference = runner.row(f"generation/b{count}/uncached", estimate, measure_uncached)

            def measure_cached(
                call: Callable[[], Tensor] = cached,
                count: int = count,
                detail: str = detail,
                reference: Measured | None = reference,
            ) -> Measured:
                samples = _throughput(call, count, sizes.generation_repeats, settings.device)
                baseline = reference.samples if reference else None
                return Measured("images/s", samples, "prompt KV cache / uncached (speedup)", baseline, detail)

            runner.row(f"generation/b{count}/cached", estimate, measure_cached)

    runner.group(names, estimate, body)


def _decoder_sampling(runner: Runner, models: Models) -> None:
    sizes, settings = models.sizes, runner.settings
    estimate = f"none ({DECODER_CONFIG.parent.name}/{DECODER_CONFIG.name} gives one for training only)"
    names = ["decoder/sample/heun_10", "decoder/sample/euler_1"]

    def body() -> None:
        adapter = models.adapter(models.decoder_vlm, models.decoder_config)
        stage = models.decoder_stage(adapter).to(settings.device).eval()
        size, count = sizes.decoder_image_size, sizes.sample_batch
        images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)).to(settings.device)
        with torch.no_grad():
            latents, grid = stage.encode(images)

        def decode(solver: str, steps: int) -> Tensor:
            generator = torch.Generator(settings.device).manual_seed(0)
            with settings.autocast():
                return stage.decode(latents, grid, (size, size), generator=generator, solver=solver, steps=steps)

        detail = f"B={count} {size}px {_decoder_shape(stage.decoder)}; no guidance"

        def multi() -> Measured:
            samples = _throughput(lambda: decode("heun", 10), count, sizes.sample_repeats, settings.device)
            return Measured("images/s", samples, "Heun, 10 steps (19 decoder calls)", detail=detail)

        reference = runner.row("decoder/sample/heun_10", estimate, multi)

        def one() -> Measured:
            samples = _throughput(lambda: decode("euler", 1), count, sizes.sample_repeats, settings.device)
            baseline = reference.samples if reference else None
            return Measured("images/s", samples, "Euler 1 step / Heun 10 (speedup)", baseline, detail)

        runner.row("decoder/sample/euler_1", estimate, one)

    runner.group(names, estimate, body)


def run(settings: Settings, sizes: GpuBenchSizes, budget_s: float) -> list[GpuRow]:
    """Measure every row of :func:`row_names` (or say why not) and return them in the table's order."""
    runner = Runner(settings, budget_s)
    with quiet_workspace() as tmp:
        models = Models(tmp, sizes, settings)
        peak = _matmul_peak(runner, sizes)
        _decoder_training(runner, models, peak)
        _decoder_sampling(runner, models)
        _sampler_training(runner, models, peak)
        _generation(runner, models)
    order = {name: i for i, name in enumerate(row_names(sizes))}
    return sorted(runner.rows, key=lambda row: order.get(row.name, len(order)))


# ---------------------------------------------------------------------------------------------------- report
def _number(value: float | None, spread: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4g} ± {spread:.2g}" if spread is not None else f"{value:.4g}"


def print_table(rows: Sequence[GpuRow], env: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the environment line and the rows as one table (rows that did not run say why, in red)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: rich would squeeze the table into 80 columns
            console = Console(width=240)
    console.print(escape(" · ".join(f"{key}: {value}" for key, value in env.items())))
    table = Table(title="vugen GPU benchmark (median ± IQR; ratio = measured / reference)", title_justify="left")
    for column in ("benchmark", "unit", "measured", "reference", "ratio", "compares", "peak memory", "estimate"):
        table.add_column(column, justify="right" if column in ("measured", "reference", "ratio") else "left")
    table.add_column("detail")
    cpu = env.get("device", "").startswith("cpu")
    for row in rows:
        if row.status != "ok":
            status = f"[red]{escape(row.status)}[/red]"
            table.add_row(escape(row.name), "", status, "", "", "", "", escape(row.memory_estimate), "")
            continue
        memory = "n/a (cpu)" if cpu or row.peak_memory_gib is None else f"{row.peak_memory_gib:.3g} GiB"
        table.add_row(
            escape(row.name),
            row.unit,
            _number(row.measured, row.measured_iqr),
            _number(row.reference, row.reference_iqr),
            f"{row.ratio:.3f}" if row.ratio is not None else "",
            escape(row.compares),
            memory,
            escape(row.memory_estimate),
            escape(row.detail),
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--dry-run``, ``--json PATH``, ``--budget-s N``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build and run every configuration at tiny size on the CPU (seconds; checks the script, measures nothing)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the environment and rows as JSON")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        metavar="N",
        help=f"seconds of measuring after which the rows not yet started are skipped (default {DEFAULT_BUDGET_S:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, measure, print the table and write the JSON.

    Returns:
        0 when the table printed (on a GPU, failed configurations are rows of it); 1 after a dry run with a row that
        did not run; 2 without CUDA and without ``--dry-run`` (one line on stderr).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s:g}")
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks.gpu: no CUDA device on this machine; run it on a GPU, or pass --dry-run to build every "
            "configuration at tiny size on the CPU",
            file=sys.stderr,
        )
        return 2
    settings = Settings(torch.device("cpu" if args.dry_run else "cuda"), PRECISION, quick=args.dry_run)
    sizes = DRY_RUN if args.dry_run else GPU
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: ..." banner per fit
    start = time.monotonic()
    rows = run(settings, sizes, args.budget_s)
    env = environment(settings) | {
        "mode": "dry run (tiny models on the CPU)" if args.dry_run else "gpu",
        "wall_s": round(time.monotonic() - start, 1),
        "budget_s": args.budget_s,
    }
    print_table(rows, env)
    if args.json is not None:
        report = {"environment": env, "rows": [dataclasses.asdict(row) for row in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.dry_run and any(row.status != "ok" for row in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
