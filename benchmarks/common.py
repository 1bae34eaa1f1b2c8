"""What every benchmark module shares: run settings, flags, timing, spread statistics, FLOP counting, the plain
training loop, result rows, the table.

A benchmark module (``benchmarks/<name>.py``) declares its sizes as a config dataclass of :func:`flag` fields with a
preset per device, measures inside :func:`quiet_workspace` and returns :class:`Row` objects; its :class:`Benchmark`
(name, config class, presets, rows) is what ``benchmarks/run.py`` lists in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import tempfile
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.data import DataLoader
from transformers.utils import logging as transformers_logging

__all__ = [
    "LEARNING_RATE",
    "TARGET_RATIO",
    "Benchmark",
    "Row",
    "Settings",
    "add_config_arguments",
    "check_positive",
    "config_from_args",
    "count_flops",
    "environment",
    "flag",
    "interleaved",
    "intervals_after",
    "lightning_steps",
    "matmul_flops_per_second",
    "median_iqr",
    "plain_steps",
    "print_report",
    "progress",
    "quiet_workspace",
    "synchronize",
    "timed",
    "train_step_row",
]

PRECISIONS = ("32-true", "bf16-mixed")
LEARNING_RATE = 1e-4  # AdamW's, in the stages and in their plain reference loops
TARGET_RATIO = 1.05  # framework overhead allowed over the plain loop

_aten = torch.ops.aten


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts 0 for CPU SDPA: its registry lacks the CPU flash-attention ops (pytorch/pytorch#195460,
# fixed upstream by #195801 after torch 2.14). Their leading arguments match the generic SDPA formulas.
_CPU_SDPA_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


@dataclass(frozen=True)
class Settings:
    """What every benchmark of one run shares.

    Args:
        device: Where the benchmarks run (``cpu`` or ``cuda``).
        precision: Lightning precision, ``"32-true"`` or ``"bf16-mixed"``; the plain references autocast alike.
        quick: Tiny sizes and few repeats (for the test), whatever the device.
    """

    device: torch.device
    precision: str
    quick: bool

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def preset(self) -> str:
        """The name of the default sizes: ``"quick"``, ``"cpu"`` or ``"cuda"``."""
        return "quick" if self.quick else self.device.type

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in under this precision (that of the peak FLOP/s measurement)."""
        return torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context Lightning's precision plugin puts around ``training_step`` (none for 32-true)."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Row:
    """One result: a measured median against a reference median of the same run, and their ratio.

    Args:
        name: Stable identifier, ``<benchmark>/<case>`` (e.g. ``decoder/train_step``).
        unit: Unit of ``measured`` and ``reference``.
        measured: Median of the measured side (the framework: Lightning, ``DecoderStage``, achieved FLOP/s).
        measured_iqr: Interquartile range of the measured samples.
        reference: Median of the reference side (plain PyTorch, or the machine's peak).
        reference_iqr: Interquartile range of the reference samples.
        compares: What is divided by what, e.g. ``"Lightning fit / plain loop"``.
        target: Upper bound the ratio should stay under, if any.
        detail: Sizes and counts behind the numbers.
    """

    name: str
    unit: str
    measured: float
    measured_iqr: float
    reference: float
    reference_iqr: float
    compares: str
    target: float | None = None
    detail: str = ""
    ratio: float = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", self.measured / self.reference)

    @classmethod
    def from_samples(
        cls, name: str, unit: str, measured: Sequence[float], reference: Sequence[float], **kwargs: Any
    ) -> Row:
        """A row from raw samples of both sides (medians and interquartile ranges); ``kwargs`` as for the class."""
        (m_median, m_iqr), (r_median, r_iqr) = median_iqr(measured), median_iqr(reference)
        return cls(name, unit, m_median, m_iqr, r_median, r_iqr, **kwargs)


def median_iqr(samples: Sequence[float]) -> tuple[float, float]:
    """The median and interquartile range of ``samples`` (what a :class:`Row` shows of each side)."""
    q1, median, q3 = np.percentile(np.asarray(samples, dtype=np.float64), [25, 50, 75])
    return float(median), float(q3 - q1)


# ---------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Benchmark:
    """A benchmark module as ``run.py`` registers it: its flags and presets, and what it measures.

    Args:
        name: Prefix of its rows (``<name>/<case>``) and of its flags (``--<name>-<field>``).
        config_type: Frozen dataclass of its sizes and repeat counts, one :func:`flag` field per flag.
        presets: A ``config_type`` instance per preset name of :attr:`Settings.preset` (``quick``, ``cpu``, ``cuda``).
        rows: Measures with the run's settings and the checked config, and returns the result rows.
    """

    name: str
    config_type: type
    presets: dict[str, Any]
    rows: Callable[[Settings, Any], list[Row]]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this benchmark's ``--<name>-*`` flags to ``parser``."""
        add_config_arguments(parser, self.name, self.config_type)

    def configure(self, settings: Settings, args: argparse.Namespace) -> Any:
        """The preset of ``settings`` with the given ``--<name>-*`` flags; ValueError naming a bad flag."""
        return config_from_args(args, self.name, self.presets[settings.preset])


def flag(help_text: str, **options: Any) -> Any:
    """A config field that :func:`add_config_arguments` turns into a flag with this help (no default: the presets
    give the values); ``options`` are further ``add_argument`` options (e.g. ``choices``)."""
    return dataclasses.field(metadata={"help": help_text, **options})


def add_config_arguments(parser: argparse.ArgumentParser, prefix: str, config_type: type) -> None:
    """Add one ``--<prefix>-<field>`` flag per field of the dataclass ``config_type`` (default: its preset).

    A ``tuple[T, ...]`` field takes one or more values; a field's ``metadata`` holds its ``help`` and any other
    ``add_argument`` options (e.g. ``choices``), as :func:`flag` writes them.
    """
    group = parser.add_argument_group(f"{prefix} benchmark (defaults: the preset of --device / --quick)")
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        kind = hints[field.name]
        options: dict[str, Any] = {"default": None, "dest": f"{prefix}_{field.name}", **field.metadata}
        if "choices" not in options:
            options["metavar"] = field.name.upper()
        if typing.get_origin(kind) is tuple:
            options |= {"nargs": "+", "type": typing.get_args(kind)[0]}
        else:
            options["type"] = kind
        group.add_argument(_flag_name(prefix, field.name), **options)


def config_from_args(args: argparse.Namespace, prefix: str, preset: Any) -> Any:
    """``preset`` (a dataclass instance) with the flags of :func:`add_config_arguments` that were given."""
    given = {field.name: getattr(args, f"{prefix}_{field.name}") for field in dataclasses.fields(preset)}
    overrides = {name: tuple(v) if isinstance(v, list) else v for name, v in given.items() if v is not None}
    return dataclasses.replace(preset, **overrides)


def check_positive(config: Any, prefix: str) -> None:
    """Raise a ValueError naming the flag of the first int (or int in a tuple) field of ``config`` below 1."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, int) and v < 1 for v in values):
            raise ValueError(f"{_flag_name(prefix, field.name)} must be >= 1, got {value}")


def _flag_name(prefix: str, name: str) -> str:
    return f"--{prefix}-{name.replace('_', '-')}"


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it covers that work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def intervals_after(stamps: Sequence[float], skip: int) -> list[float]:
    """Differences of consecutive ``stamps`` (end-of-step clock reads), without the first ``skip`` steps.

    Step ``i`` lasts from the end of step ``i - 1`` to its own end, so ``skip >= 1`` (the first step has no start).
    """
    if skip < 1 or len(stamps) <= skip:
        raise ValueError(f"need skip >= 1 and more than {skip} stamps, got skip={skip} and {len(stamps)} stamps")
    return np.diff(np.asarray(stamps))[skip - 1 :].tolist()


def interleaved(runs: dict[str, Callable[[], list[float]]], repeats: int) -> dict[str, list[float]]:
    """Call each run ``repeats`` times, alternating their order (ABBA...), and pool the samples of each.

    Alternating spreads slow drifts of a shared machine (thermal, other jobs) evenly over the compared sides.
    """
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            samples[name] += runs[name]()
    return samples


# ---------------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that ``fn`` runs (``FlopCounterMode``, backward included)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> list[float]:
    """FLOP/s of ``repeats`` square ``size`` x ``size`` matmuls in ``dtype``: the machine's practical peak."""
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
    torch.mm(a, b)  # warm-up: library initialisation and kernel selection
    return [2 * size**3 / timed(lambda: torch.mm(a, b), device) for _ in range(repeats)]


# ---------------------------------------------------------------------------------------------------- report
_stderr = Console(stderr=True, log_path=False)


def progress(message: str) -> None:
    """Say on stderr what is being measured (benchmarks take a while)."""
    _stderr.log(message)


def environment(settings: Settings) -> dict[str, Any]:
    """Device, library versions, thread count and precision of this run (printed above the table, saved in JSON)."""
    if settings.device.type == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(settings.device)})"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": device,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "precision": settings.precision,
        "preset": settings.preset,
    }


def print_report(rows: Sequence[Row], env: dict[str, Any], console: Console | None = None) -> None:
    """Print the environment line and the rows as a table (ratios over their target in red)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: rich would squeeze the table into 80 columns
            console = Console(width=180)
    console.print(" · ".join(f"{key}: {value}" for key, value in env.items()))
    table = Table(title="vugen benchmarks (median ± IQR)", title_justify="left")
    for column in ("benchmark", "measured / reference", "unit", "measured", "reference", "ratio", "target", "detail"):
        table.add_column(column, justify="right" if column in ("measured", "reference", "ratio") else "left")
    for row in rows:
        over = row.target is not None and row.ratio > row.target
        table.add_row(
            row.name,
            row.compares,
            row.unit,
            f"{row.measured:.4g} ± {row.measured_iqr:.2g}",
            f"{row.reference:.4g} ± {row.reference_iqr:.2g}",
            f"[red]{row.ratio:.3f}[/red]" if over else f"{row.ratio:.3f}",
            f"<= {row.target:g}" if row.target is not None else "",
            row.detail,
        )
    console.print(table)


# ---------------------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def quiet_workspace() -> Iterator[Path]:
    """A temporary directory to build models in, with transformers' progress bars off and Lightning's advice that
    does not apply to the benchmarks silenced: in-memory batches need no loader workers, validation is not
    benchmarked, and frozen modules (the VLM, the sampler's reducer and decoder) stay in eval mode on purpose."""
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        for message in ("does not have many workers", "no `val_dataloader`", "module\\(s\\) in eval mode"):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        yield Path(tmp)


class StepClock(lightning.Callback):
    """Reads the clock at the end of every optimizer step, after the device has finished it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: Any) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())


def lightning_steps(
    stage: lightning.LightningModule, batch: dict[str, Any], warmup_steps: int, train_steps: int, settings: Settings
) -> list[float]:
    """Seconds per optimizer step of ``Trainer.fit`` on ``batch`` repeated, after ``warmup_steps`` untimed steps."""
    clock = StepClock(settings.device)
    trainer = lightning.Trainer(
        accelerator=settings.device.type,
        devices=1,
        precision=settings.precision,
        max_epochs=1,
        callbacks=[clock],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    # batch_size=None: the loader yields the prepared batch itself, already on the device.
    trainer.fit(stage, DataLoader([batch] * (warmup_steps + train_steps), batch_size=None))
    return intervals_after(clock.stamps, warmup_steps)


def plain_steps(
    stage: torch.nn.Module, loss: Callable[[], Tensor], warmup_steps: int, train_steps: int, settings: Settings
) -> list[float]:
    """Seconds per optimizer step of the plain PyTorch loop that :func:`lightning_steps` is compared with.

    Each step computes ``loss()`` under the precision's autocast (as Lightning's precision plugin does), runs backward,
    an AdamW step on the stage's trainable parameters and zero_grad; clocked alike, after ``warmup_steps`` untimed.
    """
    stage.to(settings.device).train()  # Lightning's teardown moves the module back to the CPU
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=LEARNING_RATE)
    stamps = []
    for _ in range(warmup_steps + train_steps):
        with settings.autocast():
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize(settings.device)
        stamps.append(time.perf_counter())
    return intervals_after(stamps, warmup_steps)


def train_step_row(name: str, fit: Sequence[float], plain: Sequence[float], compares: str, detail: str) -> Row:
    """The ``ms/step`` row of :func:`lightning_steps` against :func:`plain_steps` times (seconds), held to
    ``TARGET_RATIO``."""
    fit_ms, plain_ms = [1e3 * t for t in fit], [1e3 * t for t in plain]
    return Row.from_samples(name, "ms/step", fit_ms, plain_ms, compares=compares, target=TARGET_RATIO, detail=detail)
