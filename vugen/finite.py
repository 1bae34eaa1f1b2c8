"""Non-finite weights and losses: the one check that training, checkpoints and exports share.

A diverged run (a learning rate too high, an fp16 overflow) turns weights into NaN or Inf; once written, a NaN
checkpoint or export spreads silently (black images, NaN latents downstream). :func:`require_finite` refuses such
tensors with one line naming the first bad one; :func:`last_checkpoint` names where a run can go back to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from vugen.errors import VugenError

__all__ = [
    "DIVERGENCE_ADVICE",
    "NO_CHECKPOINT",
    "NonFiniteError",
    "first_non_finite",
    "last_checkpoint",
    "require_finite",
]

NO_CHECKPOINT = "none written"
DIVERGENCE_ADVICE = (
    "try a lower learning rate (optimizer lr), gradient clipping (trainer.gradient_clip_val), bf16 instead of fp16, "
    "or let vugen.callbacks.NonFiniteGuard(max_skipped_steps=N) skip rare bad batches"
)


class NonFiniteError(VugenError):
    """A loss, gradient or weight is NaN or Inf; nothing non-finite was written."""


def first_non_finite(tensors: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an Inf, or None when all are finite.

    Non-tensors and integer or bool tensors are skipped; a ``DTensor`` (FSDP2 shard) is checked on its local shard
    only, so the answer differs between ranks: agree on it across ranks (see :func:`require_finite`).

    Args:
        tensors: ``(name, tensor)`` pairs, e.g. ``state_dict().items()`` or ``named_parameters()``.
    """
    named = [(name, _local(tensor)) for name, tensor in tensors if _is_float_tensor(tensor)]
    named = [(name, tensor) for name, tensor in named if tensor.numel()]
    if not named:
        return None
    # One flag per tensor, gathered on one device: a single host sync however many tensors there are.
    device = named[0][1].device
    flags = torch.stack([tensor.isfinite().all().to(device) for _, tensor in named]).cpu()
    bad = (~flags).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def require_finite(
    tensors: Iterable[tuple[str, Any]], what: str, agree: Callable[[bool], bool] | None = None, advice: str = ""
) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor that holds NaN or Inf; return when all are finite.

    Args:
        tensors: ``(name, tensor)`` pairs (see :func:`first_non_finite`).
        what: What the tensors are, for the message, e.g. ``"refusing to export the reducer to out/reducer"``.
        agree: ``decision -> decision of all ranks`` (``trainer.strategy.reduce_boolean_decision``), so that every
            rank raises or none does (a rank left behind would hang in the next collective); None: this rank only.
        advice: What to do, appended to the message.

    Raises:
        NonFiniteError: ``"{what}: {name} holds NaN or Inf values"`` (the tensor may sit on another rank's shard).
    """
    name = first_non_finite(tensors)
    finite = name is None
    if agree is not None:
        finite = agree(finite)
    if not finite:
        where = name if name is not None else "a tensor shard of another rank"
        raise NonFiniteError(f"{what}: {where} holds NaN or Inf values{'; ' + advice if advice else ''}")


def last_checkpoint(trainer: Any) -> str:
    """The most recently written checkpoint of the trainer's ``ModelCheckpoint`` callbacks, or ``"none written"``.

    Checkpoints are only written with finite weights (``AdapterStage.on_save_checkpoint``), so this is the last good
    one: its last, best and top-k files, whichever exists and is newest.
    """
    paths = {
        path
        for callback in getattr(trainer, "checkpoint_callbacks", [])
        for path in (
            getattr(callback, "last_model_path", ""),
            getattr(callback, "best_model_path", ""),
            *getattr(callback, "best_k_models", {}),
        )
        if path and os.path.isfile(path)
    }
    return max(paths, key=os.path.getmtime) if paths else NO_CHECKPOINT


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())


def _local(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.detach()
