"""Exact resume of a fit: :class:`ExactResume`, the callback every vugen stage adds (``configure_callbacks``).

A run killed after a checkpoint and resumed from it (``vugen fit ... --ckpt_path last.ckpt``) must train on the same
batches with the same random numbers as the run that was not interrupted. Lightning restores the weights, the
optimizer, the schedulers and its loop counters; this callback adds what it leaves out:

* **Data position.** Lightning saves and restores the state of stateful training loaders
  (:class:`~vugen.data.resumable.ResumableDataLoader`); the callback keeps their position in step with the trainer:
  the batches that *trained* (the trainer may have fetched one more), and the trainer's epoch.
* **Random state.** The global torch (CPU and CUDA), numpy and Python random states go into the checkpoint (every
  rank's: they are gathered, as only rank 0 writes the file) and each rank restores its own in
  ``on_train_batch_start`` of the first training batch of the resumed run: after setup, dataloader creation, the
  sanity check and Lightning's fast-forward of a validation due at the checkpoint's step (which creates the
  validation dataloader, and torch's ``DataLoader`` draws its worker seed from the global state unless it has a
  generator). Callbacks listed in the trainer run their ``on_train_batch_start`` before this one: one that draws
  from the global state there sees, on that first batch only, the state before the restore.
* **A training stream of its own.** For a restored state to continue the interrupted run, nothing between a
  checkpoint and the next training step may draw from the global random state. The sanity check and every
  validation therefore run on a fork of it: the state after the last training batch is put back when they end
  (before ``ModelCheckpoint``, always the last callback, saves). Training thus also does not depend on how often,
  or whether, validation runs.

A module of your own gets the same with ``Trainer(callbacks=[ExactResume()])`` and a ``ResumableDataLoader`` as its
training loader.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from vugen.data.resumable import ResumableDataLoader

__all__ = ["ExactResume", "collect_rng_states", "set_rng_states"]


def collect_rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and every CUDA device), numpy and Python, in types that
    ``torch.load(weights_only=True)`` reads (numpy's key array as a tensor)."""
    states = _collect_rng_states(include_cuda=True)
    kind, keys, position, has_gauss, gauss = states["numpy"]
    states["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the global random states saved by :func:`collect_rng_states`."""
    kind, keys, position, has_gauss, gauss = states["numpy"]
    numpy_state = (kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss)
    _set_rng_states({**states, "numpy": numpy_state})


def _flatten(loaders: Any) -> Iterator[Any]:
    """The loaders in ``trainer.train_dataloader``: one, or lists / tuples / dicts of them."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for loader in loaders:
            yield from _flatten(loader)
    elif loaders is not None:
        yield loaders


def _resumable_loaders(trainer: Trainer) -> list[ResumableDataLoader]:
    return [loader for loader in _flatten(trainer.train_dataloader) if isinstance(loader, ResumableDataLoader)]


class ExactResume(Callback):
    """Keeps resumable loaders at the trainer's position and makes the global random state resume exactly.

    See the module docstring. The checkpoint state is ``{"rng": [states of rank 0, rank 1, ...]}``; a run resumed
    on another number of ranks warns and keeps its own random states.
    """

    def __init__(self) -> None:
        self._training_stream: dict[str, Any] | None = None  # the state training continues from
        self._saved_streams: list[dict[str, Any]] | None = None  # from a checkpoint, set at the first training batch

    # ------------------------------------------------------------------ data position
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the resumable loaders the trainer's epoch (Lightning sets only samplers' epochs)."""
        for loader in _resumable_loaders(trainer):
            loader.set_epoch(trainer.fit_loop.epoch_progress.current.processed)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Report the batches trained in this epoch to the loaders, and remember the training stream."""
        progress = trainer.fit_loop.epoch_loop.batch_progress
        for loader in _resumable_loaders(trainer):
            loader.report_progress(progress.current.processed, epoch_done=progress.is_last_batch)
        self._training_stream = collect_rng_states()

    # ------------------------------------------------------------------ random state
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """On the first training batch after a resume, set this rank's saved random states."""
        if self._saved_streams is None:
            return
        streams, self._saved_streams = self._saved_streams, None
        if len(streams) != trainer.world_size:
            warnings.warn(
                f"the checkpoint holds the random states of {len(streams)} processes and this run has "
                f"{trainer.world_size}: they are not restored (the resume is not exact)",
                stacklevel=2,
            )
            return
        set_rng_states(streams[trainer.global_rank])

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fork: the sanity check must not move the training stream."""
        self._training_stream = collect_rng_states()

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Back to the training stream."""
        self._resume_training_stream()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Back to the training stream after a validation during fit (the dataloader's creation included)."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._resume_training_stream()

    def _resume_training_stream(self) -> None:
        if self._training_stream is not None:
            set_rng_states(self._training_stream)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``{"rng": [...]}``: every rank's random states (gathered: call on all ranks, as checkpointing does)."""
        states = collect_rng_states()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {"rng": [states]}
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, states)
        return {"rng": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the random states until the first training batch (setup and the sanity check come in between)."""
        if set(state_dict) != {"rng"} or not isinstance(state_dict["rng"], list):
            raise ValueError(f"an ExactResume state is {{'rng': [per-rank states]}}, got the keys {sorted(state_dict)}")
        self._saved_streams = state_dict["rng"]
