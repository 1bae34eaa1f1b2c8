"""`vugen tiny FAMILY DIR --understand shapes`: the tiny VLM trained to understand Shapes, then scored.

The recipe (:class:`~vugen.understanding_recipe.UnderstandingRecipe`) was chosen by the ablation in
``docs/understanding.md``: which parts of the VLM learn, and how many examples ask attribute questions instead of the
caption. The run trains the
:class:`~vugen.stages.understanding.UnderstandingStage` with a Lightning ``Trainer`` (CPU, 32-true), exports the VLM
over ``DIR`` (``save_pretrained``: the same adapter loads it), reloads it from there and scores captions on the test
and held-out splits (:func:`~vugen.eval.captioning.caption_accuracy`).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from vugen.adapter import VLMAdapter
from vugen.commands._recipe_checks import _quiet as quiet_lightning
from vugen.data.shapes_understanding import ShapesUnderstandingDataModule
from vugen.eval.captioning import AnswerScore, caption_accuracy
from vugen.stages.understanding import UnderstandingStage
from vugen.understanding_recipe import UnderstandingRecipe

__all__ = ["TASKS", "check_task", "train_understanding", "understanding_table"]

TASKS = ("shapes",)
RECORD = "understanding.json"
EVAL_SPLITS = ("test", "heldout")
EVAL_IMAGES = 128  # per split: about 90 one-object and 40 two-object scenes


def check_task(task: str) -> None:
    """Raise one line when ``task`` is no understanding task vugen knows."""
    if task not in TASKS:
        raise ValueError(f"--understand: unknown task {task!r}; expected one of: {', '.join(TASKS)}")


def train_understanding(
    adapter: VLMAdapter, directory: str | Path, steps: int, recipe: UnderstandingRecipe
) -> dict[str, Any]:
    """Train ``adapter``'s VLM on Shapes for ``steps`` steps and export it to ``directory``.

    Returns:
        ``{"trained_parts", "steps", "seconds", "final_loss"}`` of the fit.
    """
    data = ShapesUnderstandingDataModule(
        question_ratio=recipe.question_ratio,
        train_size=steps * recipe.batch_size,  # every training image drawn once
        batch_size=recipe.batch_size,
        two_object_ratio=recipe.two_object_ratio,
        heldout_ratio=recipe.heldout_ratio,
        seed=recipe.seed,
    )
    stage = UnderstandingStage(
        adapter,
        trainable=recipe.trainable,
        optimizer=functools.partial(torch.optim.AdamW, lr=recipe.lr),
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.OneCycleLR, max_lr=recipe.lr, total_steps=steps, pct_start=recipe.warmup
        ),
        export_dir=str(directory),
    )
    start = time.perf_counter()
    with quiet_lightning():
        trainer = Trainer(
            accelerator="cpu",
            precision="32-true",
            max_steps=steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(stage, datamodule=data)
    return {
        "trained_parts": list(stage.trainable),  # the recipe's, less those this VLM has no weights for
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(trainer.callback_metrics["train/loss"]),
    }


def score_captions(adapter: VLMAdapter) -> dict[str, dict[str, AnswerScore]]:
    """Caption accuracy per split (test, heldout) and scene kind (one_object, two_object)."""
    return {split: caption_accuracy(adapter, split, EVAL_IMAGES) for split in EVAL_SPLITS}


def write_record(
    directory: str | Path, fit: dict[str, Any], recipe: UnderstandingRecipe, scores: dict[str, dict[str, AnswerScore]]
) -> Path:
    """``DIR/understanding.json``: the task, the fit (parts trained, steps, seconds, final loss), the recipe, the
    accuracies."""
    accuracy = {split: {kind: score.to_dict() for kind, score in kinds.items()} for split, kinds in scores.items()}
    record = {"task": "shapes", **fit, "recipe": asdict(recipe), "caption_accuracy": accuracy}
    path = Path(directory) / RECORD
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def understanding_table(scores: dict[str, dict[str, AnswerScore]]) -> str:
    """The accuracies as a small table: one row per split, one column per scene kind."""
    kinds = list(next(iter(scores.values())))
    rows = [f"{'split':<8} " + " ".join(f"{kind:>16}" for kind in kinds)]
    for split, by_kind in scores.items():
        cells = [f"{str(by_kind[kind]) + f' ({by_kind[kind].accuracy:.0%})':>16}" for kind in kinds]
        rows.append(f"{split:<8} " + " ".join(cells))
    return "\n".join(rows)
