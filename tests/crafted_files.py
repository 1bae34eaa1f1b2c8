"""Crafted files for the security tests: real stage checkpoints whose recorded configuration is edited, VLM folders
that ship modelling code, and importable modules that leave a marker file when anything imports them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from tests.fixtures_bundle import IMAGE_SIZE
from tests.helpers import QUIET_TRAINER
from vugen.data.shapes_datamodule import ShapesDataModule


def trained_checkpoint(stage: LightningModule, path: Path) -> Path:
    """``path``: the checkpoint of ``stage`` after one training step, as Lightning writes it."""
    trainer = Trainer(max_steps=1, default_root_dir=path.parent, **QUIET_TRAINER | {"limit_val_batches": 0})
    trainer.fit(stage, datamodule=ShapesDataModule(image_size=IMAGE_SIZE, train_size=2, val_size=2, batch_size=2))
    trainer.save_checkpoint(path)
    return path


def edited_checkpoint(source: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of checkpoint ``source`` at ``target`` whose ``hyper_parameters`` ``edit`` changed in place."""
    checkpoint = torch.load(source, weights_only=True)
    edit(checkpoint["hyper_parameters"])
    torch.save(checkpoint, target)
    return target


def marker_module(directory: Path, name: str, marker: Path) -> Path:
    """``directory/name.py``: importing it writes ``marker``; it defines ``Evil`` (a class) and ``run`` (a function)."""
    module = directory / f"{name}.py"
    module.write_text(
        f"from pathlib import Path\n\nPath({str(marker)!r}).write_text('imported')\n\n\n"
        "class Evil:\n    pass\n\n\ndef run(*args, **kwargs):\n    return None\n"
    )
    return module


def remote_code_vlm(pretrained: Path, folder: Path, marker: Path) -> Path:
    """A copy of the VLM folder ``pretrained`` whose config asks for its own modelling code (``auto_map``):
    ``modeling_evil.py`` writes ``marker`` when imported, then defines the model as the plain LLaVA."""
    shutil.copytree(pretrained, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        f"from pathlib import Path\n\nPath({str(marker)!r}).write_text('remote code ran')\n\n"
        "from transformers import LlavaForConditionalGeneration\n\n\n"
        "class EvilModel(LlavaForConditionalGeneration):\n    pass\n"
    )
    return folder


def asks_for_remote_code(folder: Path) -> Callable[[dict[str, Any]], None]:
    """An edit of a sampler checkpoint's hyperparameters: its adapter loads ``folder`` with ``trust_remote_code:
    true``; the writer's class is recorded as a LightningCLI run records it."""

    def edit(hyperparameters: dict[str, Any]) -> None:
        hyperparameters["adapter"]["init_args"].update(pretrained=str(folder), trust_remote_code=True)
        hyperparameters["_class_path"] = "vugen.stages.sampler.SamplerStage"

    return edit
