"""The understanding ablation of docs/understanding.md: which parts of the tiny LLaVA learn, and whether attribute
questions join the captions.

Each arm is one `vugen tiny llava OUT/ARM --understand shapes ...` run (one after another, one torch thread, as the
docs' figures were measured); then every arm's checkpoint is scored on the test and held-out splits: captions (read
from its understanding.json) and attribute questions (`vugen.eval.captioning.question_accuracy`), printed as the
docs' Markdown table.

    python -m tools.understanding_ablation OUT                 # train every arm missing under OUT, then score
    python -m tools.understanding_ablation OUT --train false   # score what is there
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from jsonargparse import CLI

from vugen.eval.captioning import question_accuracy
from vugen.registry import get_adapter_class

# Arm -> (trained parts, fraction of attribute questions); the rest of the recipe is the default's.
ARMS: dict[str, tuple[str, float]] = {
    "lm_q0": ("[language_model]", 0.0),
    "lmproj_q0": ("[language_model,projector]", 0.0),
    "all_q0": ("[vision_tower,projector,language_model]", 0.0),
    "lm_q25": ("[language_model]", 0.25),
    "lmproj_q25": ("[language_model,projector]", 0.25),
    "all_q25": ("[vision_tower,projector,language_model]", 0.25),
    "lmproj_q50": ("[language_model,projector]", 0.5),
}
SPLITS = ("test", "heldout")
KINDS = ("one_object", "two_object")


def train_arm(out: Path, arm: str, steps: int) -> None:
    """`vugen tiny llava OUT/ARM --understand shapes` with the arm's parts and question ratio, on one thread."""
    parts, ratio = ARMS[arm]
    command = [
        *(sys.executable, "-m", "vugen.cli", "tiny", "llava", str(out / arm)),
        *("--understand", "shapes", "--understand_steps", str(steps)),
        *("--understand_recipe.trainable", parts, "--understand_recipe.question_ratio", str(ratio)),
    ]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def score_arm(directory: Path) -> dict[str, object]:
    """The arm's record (steps, seconds, captions) and its question accuracy per split and scene kind."""
    record = json.loads((directory / "understanding.json").read_text())
    adapter = get_adapter_class("llava")(pretrained=str(directory))
    scores = {split: question_accuracy(adapter, split) for split in SPLITS}
    record["question_accuracy"] = {split: {k: v.to_dict() for k, v in kinds.items()} for split, kinds in scores.items()}
    return record


def _cell(score: dict) -> str:
    return f"{score['correct']}/{score['total']} ({score['accuracy']:.0%})"


def table(records: dict[str, dict]) -> str:
    """The Markdown table: one row per arm; captions then questions, per split and scene kind."""
    columns = [
        f"{what} {split} {kind.split('_')[0]}" for what in ("caption", "question") for split in SPLITS for kind in KINDS
    ]
    lines = ["| arm | parts | questions | steps | s | " + " | ".join(columns) + " |", "|" + "---|" * (5 + len(columns))]
    for arm, record in records.items():
        captions = [record["caption_accuracy"][s][k] for s in SPLITS for k in KINDS]
        questions = [record["question_accuracy"][s][k] for s in SPLITS for k in KINDS]
        recipe = record["recipe"]
        head = [
            arm,
            "+".join(recipe["trainable"]),
            f"{recipe['question_ratio']:.2f}",
            str(record["steps"]),
            f"{record['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(head + [_cell(score) for score in captions + questions]) + " |")
    return "\n".join(lines)


def ablation(out: str, steps: int = 1200, train: bool = True, arms: list[str] | None = None) -> None:
    """Train the missing arms under ``out`` (when ``train``), score every arm there and print the table.

    Args:
        out: Folder holding one checkpoint per arm.
        steps: Training steps of each arm.
        train: Train the arms whose folder has no understanding.json.
        arms: The arms (default: all of ``ARMS``).
    """
    torch.set_num_threads(1)
    folder = Path(out)
    chosen = arms or list(ARMS)
    for arm in chosen:
        if train and not (folder / arm / "understanding.json").is_file():
            train_arm(folder, arm, steps)
    records = {arm: score_arm(folder / arm) for arm in chosen if (folder / arm / "understanding.json").is_file()}
    print(table(records))


if __name__ == "__main__":
    CLI(ablation)
