"""``training.json``: what trained an export, so that a later export never replaces a better one unannounced.

The reducer and decoder stages write it into their export folders: the stage, its ``global_step``, the run's last
``val/loss`` and ``train/loss`` when they were logged, and the time. Before an export replaces a folder,
:func:`replacement_warning` compares the two records.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["TRAINING_FILE", "read_training_record", "replacement_warning", "training_record", "write_training_record"]

TRAINING_FILE = "training.json"
RECORDED_METRICS = ("val/loss", "train/loss")


def training_record(stage: str, global_step: int | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """The record of an export.

    Args:
        stage: The stage class name.
        global_step: Optimizer steps of the run that trained the weights; None when unknown (no trainer).
        metrics: The trainer's ``callback_metrics``; the finite ``val/loss`` and ``train/loss`` among them are kept.
    """
    kept = {name: float(metrics[name]) for name in RECORDED_METRICS if name in metrics}
    return {
        "stage": stage,
        "global_step": global_step,
        "metrics": {name: value for name, value in kept.items() if math.isfinite(value)},
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_training_record(directory: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as ``directory/training.json``."""
    (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_training_record(directory: str | Path) -> dict[str, Any] | None:
    """The ``training.json`` of an export folder, or None when it has none (or an unreadable one)."""
    path = Path(directory) / TRAINING_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def replacement_warning(directory: str | Path, new: dict[str, Any]) -> str | None:
    """One line to say after replacing the export in ``directory`` when it had been trained more (more steps) or
    validated better (lower ``val/loss``) than the ``new`` record; None otherwise, or when it had no record.

    Call it before writing (it reads the old record), say it after the new export is in place.
    """
    old = read_training_record(directory)
    if old is None:
        return None
    old_steps, new_steps = old.get("global_step"), new.get("global_step")
    old_loss, new_loss = old.get("metrics", {}).get("val/loss"), new["metrics"].get("val/loss")
    fewer_steps = isinstance(old_steps, int) and (new_steps is None or new_steps < old_steps)
    worse_loss = isinstance(old_loss, float) and isinstance(new_loss, float) and new_loss > old_loss
    if not (fewer_steps or worse_loss):
        return None
    worse = " and ".join(
        reason for reason, found in (("fewer steps", fewer_steps), ("a worse val/loss", worse_loss)) if found
    )
    return (
        f"replaced the export in {directory} ({_describe(old)}) with one of {worse} ({_describe(new)}); "
        "give each run its own export_dir to keep both"
    )


def _describe(record: dict[str, Any]) -> str:
    steps = record.get("global_step")
    parts = [str(record.get("stage", "unknown stage")), f"{steps if steps is not None else 'unknown'} steps"]
    parts += [f"{name} {value:.4g}" for name, value in record.get("metrics", {}).items()]
    parts.append(f"written {record.get('written_at', 'at an unknown time')}")
    return ", ".join(parts)
