"""The ``Trainer.predict`` run behind ``vugen generate``, ``export-geneval`` and ``export-dpg``.

Processes: by default one (on the GPU when there is one). ``--devices N`` lets Lightning start ``N`` processes on
this machine (it re-runs the command line, one process per device; ``strategy`` ``auto`` is DDP, over gloo on CPUs).
Under ``torchrun`` (which starts the processes and sets ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``), ``devices`` and
``num_nodes`` default to what it launched, since Lightning's ``TorchElasticEnvironment`` requires
``devices * num_nodes == WORLD_SIZE``.
"""

from __future__ import annotations

import os

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from vugen.callbacks.prediction_writers import SIDECAR_FILE
from vugen.data.prompts import PromptDataModule
from vugen.prediction import PipelinePredictor


def predict(
    predictor: PipelinePredictor,
    data: PromptDataModule,
    writer: BasePredictionWriter,
    accelerator: str,
    devices: int | None,
    num_nodes: int | None,
    strategy: str,
) -> None:
    """Run ``Trainer.predict`` of ``predictor`` over ``data``, ``writer`` writing the images; keeps no predictions."""
    launched_devices, launched_nodes = _torchrun_processes()
    trainer = Trainer(
        accelerator=accelerator,
        devices=launched_devices if devices is None else devices,
        num_nodes=launched_nodes if num_nodes is None else num_nodes,
        strategy=strategy,
        callbacks=[writer],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.predict(predictor, datamodule=data, return_predictions=False)


def _torchrun_processes() -> tuple[int, int]:
    """``(devices, num_nodes)``: the processes per node and nodes torchrun started, else ``(1, 1)``."""
    if not torch.distributed.is_torchelastic_launched():
        return 1, 1
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return per_node, int(os.environ["WORLD_SIZE"]) // per_node


@rank_zero_only  # one line, not one per process
def say_written(command: str, written: str, out: str | os.PathLike[str], layout: str) -> None:
    """The command's last line: what it wrote, where, in which layout, and where the settings are recorded."""
    print(f"vugen {command}: wrote {written} to {out}/ ({layout}; the settings used in {SIDECAR_FILE})")
