"""Exponential moving average (EMA) of the trainable weights, for unsharded and sharded models.

Lightning's ``EMAWeightAveraging`` deep-copies the whole LightningModule (ours hold a frozen multi-billion-parameter
VLM) and does not support sharded models. This callback keeps fp32 averages of the parameters that train, and only
those, in each parameter's own layout: a ``DTensor`` parameter (FSDP2 / ``ModelParallelStrategy``) gets a ``DTensor``
average, so every rank keeps and updates its own shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from vugen.errors import check_positive

__all__ = ["EMA"]


class EMA(Callback):
    """Exponential moving average of the parameters with ``requires_grad=True``, updated once per optimizer step.

    After optimizer step ``s`` (``trainer.global_step``) the average ``e`` of each parameter ``p`` becomes
    ``e = d * e + (1 - d) * p`` when ``s > start_step`` and ``s % update_every_n_steps == 0``; before ``start_step``
    the average copies the weights. With ``warmup`` the decay of the ``k``-th update (from 0) is
    ``min(decay, (1 + k) / (10 + k))`` (timm / diffusers), so the early average is not dominated by the
    initialisation. Each ``fit`` starts a fresh average from the weights at its start, unless it resumes a checkpoint.

    Validation and test run with the averaged weights (``swap_for_eval``), the training weights coming back after;
    at the end of ``fit`` the averages are copied into the model (``apply_at_end``), so an export or a test after fit
    uses them. The checkpoint keeps the model's training weights in its ``state_dict`` and the averages in this
    callback's state (full tensors on CPU, gathered from the shards: Lightning writes callback state from rank 0
    only), so a resumed run continues the same average, on any number of ranks, and ``trainer.test(ckpt_path=...)``
    with this callback tests the averaged weights.

    Args:
        decay: Decay ``d`` of the average, in ``(0, 1)``.
        warmup: Use ``min(decay, (1 + k) / (10 + k))`` for the ``k``-th update instead of ``decay``.
        update_every_n_steps: Average after every n-th optimizer step (``global_step % n == 0``).
        start_step: The average copies the weights up to this optimizer step and averages after it.
        apply_at_end: Copy the averages into the model when ``fit`` ends.
        swap_for_eval: Validate and test with the averaged weights, then restore the training weights.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        apply_at_end: bool = True,
        swap_for_eval: bool = True,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        check_positive("EMA update_every_n_steps", update_every_n_steps)
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        self.decay, self.warmup = decay, warmup
        self.update_every_n_steps, self.start_step = update_every_n_steps, start_step
        self.apply_at_end, self.swap_for_eval = apply_at_end, swap_for_eval
        self._averages: dict[str, Tensor] | None = None
        self._num_updates = 0
        self._last_step = 0
        self._pending_state: dict[str, Any] | None = None  # loaded from a checkpoint before the averages exist
        self._training_weights: dict[str, Tensor] | None = None  # held while the averages are swapped in

    @property
    def state_key(self) -> str:
        """Tells two EMA callbacks with different decays apart in a checkpoint."""
        return self._generate_state_key(decay=self.decay)

    @property
    def averages(self) -> dict[str, Tensor]:
        """The fp32 averages by parameter name (``DTensor`` shards for sharded parameters); empty before ``fit``."""
        return dict(self._averages or {})

    @property
    def num_updates(self) -> int:
        """Averaging updates done so far (copies before ``start_step`` not counted)."""
        return self._num_updates

    def decay_at(self, update: int) -> float:
        """Decay used by the ``update``-th averaging update (counted from 0)."""
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    # ------------------------------------------------------------------ training
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the averages from the (set up, possibly sharded) weights, or from the checkpoint being resumed."""
        self._averages = None
        self._prepare(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember the (possibly restored) step, and take a state restored after ``on_fit_start``."""
        self._prepare(pl_module)
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update after each optimizer step (once per accumulated batch group)."""
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step <= self.start_step:
            self._copy(self._tracked(pl_module), self._averages)
        elif step % self.update_every_n_steps == 0:
            self._update(pl_module)

    @torch.no_grad()
    def _update(self, pl_module: LightningModule) -> None:
        weight = 1.0 - self.decay_at(self._num_updates)
        params = self._tracked(pl_module)
        for name, average in self._averages.items():
            average.lerp_(params[name].detach().to(average.dtype), weight)
        self._num_updates += 1

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Copy the averages into the model (``apply_at_end``)."""
        if self.apply_at_end and self._averages is not None:
            self._copy(self._averages, self._tracked(pl_module))

    # ------------------------------------------------------------------ evaluation with the averaged weights
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Swap the averages in (from ``on_validation_start`` to ``on_validation_end``, so epoch-end hooks see them)."""
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restore the training weights (before ``ModelCheckpoint``, always the last callback, saves)."""
        self._swap_out(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Swap the averages in for testing."""
        self._swap_in(pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restore the weights the model had before testing."""
        self._swap_out(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Never leave the averages in the model when a run stops during evaluation."""
        self._swap_out(pl_module)

    def _swap_in(self, pl_module: LightningModule) -> None:
        if not self.swap_for_eval or self._training_weights is not None:
            return
        if self._averages is None and self._pending_state is None:
            return  # no fit and no checkpoint: nothing to evaluate with
        self._prepare(pl_module)
        params = self._tracked(pl_module)
        self._training_weights = {name: params[name].detach().clone() for name in self._averages}
        self._copy(self._averages, params)

    def _swap_out(self, pl_module: LightningModule) -> None:
        if self._training_weights is not None:
            self._copy(self._training_weights, self._tracked(pl_module))
            self._training_weights = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"num_updates": int, "averages": {name: fp32 CPU tensor}}`` (empty before the averages exist)."""
        if self._averages is None:
            return dict(self._pending_state or {})
        return {
            "num_updates": self._num_updates,
            "averages": {name: _full_cpu_copy(average) for name, average in self._averages.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's averages until the model is set up (Lightning restores callbacks before that)."""
        if set(state_dict) != {"num_updates", "averages"}:
            raise ValueError(f"EMA state must have the keys ['averages', 'num_updates'], got {sorted(state_dict)}")
        self._pending_state = state_dict

    def _prepare(self, pl_module: LightningModule) -> None:
        """Create the averages from the model's weights if needed, then load a pending checkpoint state into them."""
        if self._averages is None:
            self._averages = {
                name: param.detach().to(torch.float32, copy=True) for name, param in self._tracked(pl_module).items()
            }
            self._num_updates = 0
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load(state, pl_module)

    @torch.no_grad()
    def _load(self, state: Mapping[str, Any], pl_module: LightningModule) -> None:
        saved, averages = state["averages"], self._averages
        missing = sorted(averages.keys() - saved.keys())
        unexpected = sorted(saved.keys() - averages.keys())
        shapes = {
            name: f"{tuple(saved[name].shape)} != {tuple(averages[name].shape)}"
            for name in averages.keys() & saved.keys()
            if saved[name].shape != averages[name].shape
        }
        if missing or unexpected or shapes:
            raise ValueError(
                f"EMA state does not match the trainable parameters of {type(pl_module).__name__} (another model, "
                f"or other parameters frozen?): missing {missing}, unexpected {unexpected}, "
                f"shape mismatches (saved != model) {shapes}"
            )
        for name, average in averages.items():
            average.copy_(_like(saved[name], average))
        self._num_updates = int(state["num_updates"])

    @classmethod
    def apply_checkpoint(cls, pl_module: LightningModule, checkpoint: Mapping[str, Any]) -> int | None:
        """Copy the averages saved in a Lightning checkpoint dict into ``pl_module``'s trainable parameters.

        For exports: a checkpoint's ``state_dict`` holds the training weights, the averages sit in this callback's
        state. Returns the number of averaging updates, or None when the checkpoint has no EMA state (the weights are
        left alone). Several EMA states (callbacks with different decays) are an error naming their keys.
        """
        states = {
            key: state
            for key, state in checkpoint.get("callbacks", {}).items()
            if key.startswith(cls.__qualname__ + "{") and state
        }
        if not states:
            return None
        if len(states) > 1:
            raise ValueError(f"the checkpoint holds {len(states)} EMA states, {sorted(states)}: keep one EMA callback")
        ema = cls()
        ema.load_state_dict(next(iter(states.values())))
        ema._prepare(pl_module)
        ema._copy(ema._averages, ema._tracked(pl_module))
        return ema.num_updates

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _tracked(pl_module: LightningModule) -> dict[str, Tensor]:
        return {name: param for name, param in pl_module.named_parameters() if param.requires_grad}

    @staticmethod
    @torch.no_grad()
    def _copy(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        for name, tensor in source.items():
            target[name].copy_(tensor)


def _full_cpu_copy(tensor: Tensor) -> Tensor:
    """A CPU copy of the whole tensor; a ``DTensor`` is gathered (a collective: every rank saves a checkpoint)."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor().cpu()
    return tensor.detach().to("cpu", copy=True)


def _like(full: Tensor, target: Tensor) -> Tensor:
    """``full`` (a whole tensor) laid out like ``target``: its shard on this rank when ``target`` is a ``DTensor``."""
    full = full.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        # Every rank holds the whole tensor (each loaded the checkpoint): slice locally, no communication.
        return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    return full
