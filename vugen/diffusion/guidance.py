"""Classifier-free guidance (CFG) as a wrapper that turns a conditional model into a sampler input.

Convention (the same in every ``vugen.diffusion`` module): rectified flow with ``t`` in ``[0, 1]``,
``t = 0`` pure noise and ``t = 1`` data.

The model is a function ``model_fn(x_t, t, cond)``; the unconditional branch is the same function
called with the ``uncond`` condition (a null embedding, an empty prompt's encoding, or ``None`` if
the model understands it). The guided output is

    out = out_u + scale * (out_c - out_u)

for samples whose time lies in the closed ``interval`` ``[t_lo, t_hi]`` (guidance-interval
sampling, Kynkäänniemi et al., 2024, as used by JiT), and the conditional output elsewhere.
``scale = 1`` is the conditional model and never runs the unconditional branch; nor does a step
whose times all lie outside the interval.

The rule is affine with weights summing to one and the x/v/eps conversions of
:mod:`vugen.diffusion.prediction` are affine in the prediction for fixed ``(x_t, t)``, so guiding
x-, eps- or v-predictions gives the same velocity: wrap the guided function with
:func:`vugen.diffusion.prediction.as_velocity_fn` when the model does not predict ``v``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vugen.diffusion.prediction import broadcast_time

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


def _concat_conditions(cond: Any, uncond: Any) -> Any | None:
    """``[cond; uncond]`` along the batch for tensors and matching dicts/lists/tuples of tensors.

    Equal non-tensor leaves (e.g. an image size) are kept; anything else gives ``None``.
    """
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        return torch.cat([cond, uncond]) if cond.shape[1:] == uncond.shape[1:] else None
    if isinstance(cond, dict) and isinstance(uncond, dict):
        if cond.keys() != uncond.keys():
            return None
        parts = {key: _concat_conditions(cond[key], uncond[key]) for key in cond}
        return None if any(part is None for part in parts.values()) else parts
    if isinstance(cond, (list, tuple)) and type(cond) is type(uncond) and len(cond) == len(uncond):
        items = [_concat_conditions(c, u) for c, u in zip(cond, uncond, strict=True)]
        return None if any(item is None for item in items) else type(cond)(items)
    if isinstance(cond, (bool, int, float, str)) and type(cond) is type(uncond) and cond == uncond:
        return cond
    return None


def classifier_free_guidance(
    model_fn: ModelFn,
    cond: Any,
    uncond: Any,
    scale: float,
    interval: tuple[float, float] | None = None,
    batched: bool = True,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model_fn(x_t, t, cond)`` into a guided ``fn(x_t, t)`` for the samplers.

    Args:
        model_fn: The conditional model; returns a ``[B, ...]`` output (v, x or eps).
        cond: The condition of the batch (anything ``model_fn`` accepts).
        uncond: The null condition for the unconditional branch (e.g. a null embedding or ``None``).
        scale: Guidance scale ``s``; ``1`` means no guidance (a single conditional pass), ``0`` the
            unconditional model.
        interval: Optional ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <= 1``: guide only samples with
            ``t_lo <= t <= t_hi``; ``None`` guides at every time.
        batched: Run both branches in one call on a doubled batch ``[x_t; x_t]`` with condition
            ``[cond; uncond]`` when both are tensors or matching dicts/lists/tuples of tensors
            (otherwise, or if ``False``, two calls are made).

    Returns:
        ``fn(x_t, t)`` with ``t`` of shape ``[B]``.
    """
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if interval is not None:
        t_lo, t_hi = interval
        if not 0.0 <= t_lo <= t_hi <= 1.0:
            raise ValueError(f"interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {interval!r}")
    both = _concat_conditions(cond, uncond) if batched else None

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return model_fn(x_t, t, cond)
        active = torch.ones_like(t, dtype=torch.bool) if interval is None else (t >= t_lo) & (t <= t_hi)
        if not active.any():
            return model_fn(x_t, t, cond)
        if both is not None:
            out_c, out_u = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        else:
            out_c, out_u = model_fn(x_t, t, cond), model_fn(x_t, t, uncond)
        out = out_u + scale * (out_c - out_u)
        return out if active.all() else torch.where(broadcast_time(active, out), out, out_c)

    return guided
