"""Callbacks that the resume tests give `vugen fit` subprocesses by class path (``tests`` is a package; the
subprocesses run from the repository root)."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class KillAfterStep(Callback):
    """SIGKILLs the process (every rank) right after optimizer step ``step``: no hook, no clean-up, no save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveWeights(Callback):
    """Saves the module's state dict (the trained weights, no VLM) to ``path`` when training ends (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save({name: value.detach().cpu() for name, value in pl_module.state_dict().items()}, self.path)


class SeedPerRank(Callback):
    """Gives each rank its own global random state when fit starts, so that ranks' states differ."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        torch.manual_seed(1000 + trainer.global_rank)
