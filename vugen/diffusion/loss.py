"""The flow-matching training loss.

Convention (the same in every ``vugen.diffusion`` module): rectified flow with ``t`` in ``[0, 1]``,
``t = 0`` pure noise and ``t = 1`` data, ``x_t = t * x + (1 - t) * eps``, ``v = x - eps``.

The model predicts one of ``x``, ``v``, ``eps`` (its *prediction* type); the loss is an MSE measured
in a possibly different *loss space*. JiT's recipe is x-prediction with the loss in velocity space:
both the prediction and the exact target are mapped to ``v`` with the same (clamped) conversion of
:mod:`vugen.diffusion.prediction`, so the loss is ``||x_pred - x||^2 / max(1 - t, min_denom)^2``,
exactly zero at the true target for every ``t``.
"""

from __future__ import annotations

from torch import Tensor

from vugen.diffusion.prediction import (
    DEFAULT_MIN_DENOM,
    Prediction,
    check_prediction,
    convert_prediction,
    interpolate,
    target_for,
)


def flow_matching_inputs(x: Tensor, eps: Tensor, t: Tensor, prediction: Prediction = "v") -> tuple[Tensor, Tensor]:
    """Build the model input and its exact regression target.

    Args:
        x: Clean data, shape ``[B, ...]``.
        eps: Noise, same shape as ``x``.
        t: Times, shape ``[B]`` (see :func:`vugen.diffusion.timesteps.sample_timesteps`).
        prediction: What the model predicts: ``"x"``, ``"v"`` or ``"eps"``.

    Returns:
        ``(x_t, target)``: ``x_t = t * x + (1 - t) * eps`` and the target of type ``prediction``.
    """
    return interpolate(x, eps, t), target_for(x, eps, prediction)


def flow_matching_loss(
    pred: Tensor,
    x: Tensor,
    eps: Tensor,
    t: Tensor,
    prediction: Prediction,
    loss_space: Prediction = "v",
    weight: Tensor | None = None,
    min_denom: float = DEFAULT_MIN_DENOM,
) -> Tensor:
    """Mean squared error between a model output and its exact target, measured in ``loss_space``.

    Args:
        pred: Model output of type ``prediction``, shape ``[B, ...]``, computed from
            ``x_t = t * x + (1 - t) * eps``.
        x: Clean data, same shape.
        eps: Noise, same shape.
        t: Times, shape ``[B]``.
        prediction: Type of ``pred``: ``"x"``, ``"v"`` or ``"eps"``.
        loss_space: Space the error is measured in; pass ``loss_space=prediction`` for a plain MSE
            on the model output. ``"v"`` by default (JiT's x-prediction, v-loss).
        weight: Optional per-sample weights, shape ``[B]``; each sample's mean squared error is
            multiplied by its weight before the batch mean.
        min_denom: Denominator clamp of the conversions (see
            :func:`vugen.diffusion.prediction.convert_prediction`).

    Returns:
        Scalar loss: the batch mean of the (weighted) per-sample mean squared errors.
    """
    check_prediction(loss_space, "loss_space")
    if pred.shape != x.shape:
        raise ValueError(f"pred must have the shape of x {tuple(x.shape)}, got {tuple(pred.shape)}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape [B] = ({x.shape[0]},), got {tuple(t.shape)}")
    x_t, target = flow_matching_inputs(x, eps, t, prediction)
    pred = convert_prediction(pred, x_t, t, prediction, loss_space, min_denom)
    target = convert_prediction(target, x_t, t, prediction, loss_space, min_denom)
    per_sample = (pred - target).square().reshape(x.shape[0], -1).mean(dim=1)
    if weight is not None:
        if weight.shape != per_sample.shape:
            raise ValueError(f"weight must have shape [B] = ({x.shape[0]},), got {tuple(weight.shape)}")
        per_sample = per_sample * weight
    return per_sample.mean()
