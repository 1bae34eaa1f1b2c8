"""Flow matching for vugen, with no model code: timesteps, predictions, loss, samplers, guidance.

One convention throughout: rectified flow with ``t`` in ``[0, 1]``, ``t = 0`` pure noise and
``t = 1`` data, ``x_t = t * x + (1 - t) * eps`` and velocity ``v = dx_t/dt = x - eps``; sampling
integrates from ``t = 0`` to ``t = 1`` (the JiT convention).

Typical use::

    t = sample_timesteps(b, "logit_normal", mean=-0.8, std=0.8, shift=resolution_shift(h * w * 3))
    x_t, _ = flow_matching_inputs(x, eps, t, prediction="x")
    loss = flow_matching_loss(model(x_t, t, cond), x, eps, t, prediction="x")  # v-loss

    guided = classifier_free_guidance(model, cond, null_cond, scale=4.0, interval=(0.1, 1.0))
    image = sample(as_velocity_fn(guided, "x"), noise, steps=50, method="heun", shift=shift)
"""

from vugen.diffusion.guidance import ModelFn, classifier_free_guidance
from vugen.diffusion.loss import flow_matching_inputs, flow_matching_loss
from vugen.diffusion.prediction import (
    DEFAULT_MIN_DENOM,
    PREDICTIONS,
    Prediction,
    as_velocity_fn,
    broadcast_time,
    check_prediction,
    convert_prediction,
    interpolate,
    target_for,
)
from vugen.diffusion.samplers import METHODS, Method, VelocityFn, sample
from vugen.diffusion.timesteps import (
    SCHEDULES,
    Schedule,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
    time_grid,
)

__all__ = [
    "DEFAULT_MIN_DENOM",
    "METHODS",
    "PREDICTIONS",
    "SCHEDULES",
    "Method",
    "ModelFn",
    "Prediction",
    "Schedule",
    "VelocityFn",
    "as_velocity_fn",
    "broadcast_time",
    "check_prediction",
    "classifier_free_guidance",
    "convert_prediction",
    "flow_matching_inputs",
    "flow_matching_loss",
    "interpolate",
    "resolution_shift",
    "sample",
    "sample_timesteps",
    "shift_timesteps",
    "target_for",
    "time_grid",
]
