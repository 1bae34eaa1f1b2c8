"""Stop a diverging run at its first NaN or Inf, or skip a few bad steps within a budget.

Lightning trains on through NaN losses: every later step, checkpoint and export holds NaN weights. Every vugen stage
adds a :class:`NonFiniteGuard` (``max_skipped_steps=0``: stop at once) unless the trainer already has one, so a
guard configured in the trainer's callbacks, with its own budget, is the one that runs.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from vugen.finite import DIVERGENCE_ADVICE, NonFiniteError, first_non_finite, last_checkpoint

__all__ = ["NonFiniteGuard"]

_LOSS = "training loss"
log = logging.getLogger(__name__)


class NonFiniteGuard(Callback):
    """Check every training loss and, before each optimizer step, every gradient for NaN and Inf.

    A bad step (a non-finite loss, or a non-finite gradient) is skipped while the run has skipped fewer than
    ``max_skipped_steps`` steps: its gradients are dropped, so the optimizer leaves the weights (and its own state)
    as they were; the step still counts in ``trainer.global_step`` and a line says which step was skipped. Beyond
    the budget the run stops with :class:`~vugen.finite.NonFiniteError`: one line naming the step, the stage, what
    was non-finite and the last checkpoint written (all checkpoints hold finite weights, see
    ``AdapterStage.on_save_checkpoint``).

    Ranks agree on every decision (``trainer.strategy.reduce_boolean_decision``), so under DDP or FSDP2 all skip or
    all stop together. Under fp16 mixed precision the gradients are not checked: the ``GradScaler`` already skips
    steps with Inf gradients (that is how it finds its scale); the loss is. The skip count is saved in checkpoints,
    so the budget holds for a whole run, resumed or not.

    The stages also read :meth:`applied_steps` to export only after a fit that changed the weights.

    Args:
        max_skipped_steps: How many bad steps a run may skip before it stops; 0 stops at the first.
    """

    def __init__(self, max_skipped_steps: int = 0) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"NonFiniteGuard max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0
        self._losses: list[Tensor] = []  # of the batches accumulated into the coming optimizer step
        self._batch_idx = 0
        self._fit_start: tuple[int, int] | None = None  # (global_step, skipped_steps) when training started

    # ------------------------------------------------------------------ checks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember where this fit's training starts (after a resumed checkpoint was restored)."""
        self._fit_start = (trainer.global_step, self.skipped_steps)
        self._losses = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the batch, for the message."""
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Keep the loss; it is checked with the gradients, in one host sync per optimizer step."""
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Skip the step or stop the run when a loss or (outside fp16) a gradient is non-finite on any rank."""
        checked = [(_LOSS, loss) for loss in self._losses]
        self._losses = []
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = ((name, param.grad) for name, param in pl_module.named_parameters() if param.grad is not None)
            checked += [(f"gradient of {name}", grad) for name, grad in grads]
        bad = first_non_finite(checked)
        if trainer.strategy.reduce_boolean_decision(bad is None):
            return
        what = bad or "loss or a gradient shard of another rank"
        if self.skipped_steps >= self.max_skipped_steps:
            budget = f" after {self.skipped_steps} skipped steps (max_skipped_steps)" if self.max_skipped_steps else ""
            raise NonFiniteError(
                f"{type(pl_module).__name__}: the {what} is NaN or Inf at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {self._batch_idx}){budget}; stopped before the weights took it; "
                f"last good checkpoint: {last_checkpoint(trainer)}; {DIVERGENCE_ADVICE}"
            )
        for param in pl_module.parameters():
            param.grad = None  # an optimizer steps no parameter without a gradient: weights and state stay
        self.skipped_steps += 1
        if trainer.is_global_zero:
            log.warning(
                f"NonFiniteGuard: skipped step {trainer.global_step} of {type(pl_module).__name__} (the {what} is "
                f"NaN or Inf); {self.skipped_steps} of max_skipped_steps={self.max_skipped_steps} used"
            )

    def applied_steps(self, trainer: Trainer) -> int:
        """Optimizer steps of the current (or last) fit that were not skipped; 0 when its training never started
        (e.g. ``Trainer.fit`` stopped: No training batches)."""
        if self._fit_start is None:
            return 0
        start_step, start_skipped = self._fit_start
        return trainer.global_step - start_step - (self.skipped_steps - start_skipped)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A new fit: nothing applied yet."""
        self._fit_start = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"skipped_steps": int}``: the run's skips so far."""
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the run's skip count."""
        self.skipped_steps = int(state_dict["skipped_steps"])
