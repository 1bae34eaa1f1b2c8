"""Prediction types (x, v, eps) of a flow-matching model and the exact conversions among them.

Convention (the same in every ``vugen.diffusion`` module): rectified flow with ``t`` in ``[0, 1]``,
``t = 0`` pure noise and ``t = 1`` data,

    x_t = t * x + (1 - t) * eps,        v = dx_t/dt = x - eps.

Given ``(x_t, t)`` any one of ``x``, ``v``, ``eps`` determines the other two:

=========  ===============================  ===============================
from       to x / to eps                    to v
=========  ===============================  ===============================
``v``      x = x_t + (1 - t) v              (identity)
           eps = x_t - t v
``x``      eps = (x_t - t x) / (1 - t)      v = (x - x_t) / (1 - t)
``eps``    x = (x_t - (1 - t) eps) / t      v = (x_t - eps) / t
=========  ===============================  ===============================

The divisions are singular at one end (``1 - t`` at the data end, ``t`` at the noise end), so the
denominator is clamped from below by ``min_denom`` (0.05 by default, JiT's ``t_eps``). Outside the
clamped region the conversions are exact and round trips are the identity; inside it, conversions
from ``v`` stay exact while those from ``x``/``eps`` are damped (as in JiT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

Prediction = Literal["x", "v", "eps"]
PREDICTIONS: tuple[str, ...] = ("x", "v", "eps")
DEFAULT_MIN_DENOM = 0.05


def check_prediction(prediction: str, name: str = "prediction") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``prediction`` is one of ``"x"``, ``"v"``, ``"eps"``."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"{name} must be one of {PREDICTIONS}, got {prediction!r}")


def broadcast_time(t: Tensor | float, like: Tensor) -> Tensor | float:
    """Shape per-sample times so they broadcast against a ``[B, ...]`` tensor.

    Args:
        t: A Python float, a 0-d tensor, a ``[B]`` tensor, or a tensor already of ``like.ndim`` dims.
        like: The tensor ``t`` must broadcast against.

    Returns:
        ``t`` unchanged, or a ``[B]`` tensor viewed as ``[B, 1, ..., 1]``.
    """
    if not isinstance(t, Tensor) or t.ndim == 0 or t.ndim == like.ndim:
        return t
    if t.ndim == 1 and t.shape[0] == like.shape[0]:
        return t.view(-1, *([1] * (like.ndim - 1)))
    raise ValueError(
        f"t must be a scalar, a [B] tensor with B={like.shape[0]}, or have {like.ndim} dims; got shape {tuple(t.shape)}"
    )


def interpolate(x: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """The point on the path at time ``t``: ``x_t = t * x + (1 - t) * eps``.

    Args:
        x: Data, shape ``[B, ...]``.
        eps: Noise, same shape as ``x``.
        t: Times (see :func:`broadcast_time`).
    """
    if x.shape != eps.shape:
        raise ValueError(f"x and eps must have the same shape, got {tuple(x.shape)} and {tuple(eps.shape)}")
    t = broadcast_time(t, x)
    return t * x + (1 - t) * eps


def target_for(x: Tensor, eps: Tensor, prediction: Prediction) -> Tensor:
    """The exact regression target of a ``prediction``-type model: ``x``, ``x - eps`` or ``eps``."""
    check_prediction(prediction)
    if prediction == "x":
        return x
    return eps if prediction == "eps" else x - eps


def _clamp(denom: Tensor | float, min_denom: float) -> Tensor | float:
    if isinstance(denom, Tensor):
        return denom.clamp_min(min_denom)
    return max(denom, min_denom)


def convert_prediction(
    pred: Tensor,
    x_t: Tensor,
    t: Tensor | float,
    source: Prediction,
    target: Prediction,
    min_denom: float = DEFAULT_MIN_DENOM,
) -> Tensor:
    """Convert a model output between the ``x``, ``v`` and ``eps`` parameterisations.

    Args:
        pred: The model output, of type ``source``, shape ``[B, ...]``.
        x_t: The model input at time ``t``, same shape as ``pred``.
        t: Times (see :func:`broadcast_time`).
        source: Prediction type of ``pred``.
        target: Prediction type wanted.
        min_denom: Lower clamp of the ``1 - t`` or ``t`` denominator (see the module docstring);
            ``0`` disables clamping.

    Returns:
        The same quantity expressed as ``target``.
    """
    check_prediction(source, "source")
    check_prediction(target, "target")
    if not 0.0 <= min_denom < 1.0:
        raise ValueError(f"min_denom must be in [0, 1), got {min_denom!r}")
    if pred.shape != x_t.shape:
        raise ValueError(f"pred and x_t must have the same shape, got {tuple(pred.shape)} and {tuple(x_t.shape)}")
    if source == target:
        return pred
    t = broadcast_time(t, x_t)
    if source == "v":
        return x_t + (1 - t) * pred if target == "x" else x_t - t * pred
    if source == "x":
        numerator = pred - x_t if target == "v" else x_t - t * pred
        return numerator / _clamp(1 - t, min_denom)
    numerator = x_t - pred if target == "v" else x_t - (1 - t) * pred
    return numerator / _clamp(t, min_denom)


def as_velocity_fn(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    prediction: Prediction,
    min_denom: float = DEFAULT_MIN_DENOM,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model_fn(x_t, t) -> prediction`` into ``velocity_fn(x_t, t) -> v`` for the samplers.

    Args:
        model_fn: Returns an output of type ``prediction`` for inputs ``x_t`` ``[B, ...]`` and ``t`` ``[B]``.
        prediction: ``"x"``, ``"v"`` or ``"eps"``.
        min_denom: See :func:`convert_prediction`.
    """
    check_prediction(prediction)
    if prediction == "v":
        return model_fn

    def velocity_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return convert_prediction(model_fn(x_t, t), x_t, t, prediction, "v", min_denom)

    return velocity_fn
