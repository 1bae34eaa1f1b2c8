"""ODE and SDE samplers for rectified flow.

Convention (the same in every ``vugen.diffusion`` module): rectified flow with ``t`` in ``[0, 1]``,
``t = 0`` pure noise and ``t = 1`` data, ``x_t = t * x + (1 - t) * eps``, ``v = x - eps``.
Sampling integrates from ``t = 0`` (the given noise) to ``t = 1`` on
:func:`vugen.diffusion.timesteps.time_grid` ``(steps, shift)``. ``velocity_fn(x_t, t)`` takes
``x_t`` of shape ``[B, ...]`` and ``t`` of shape ``[B]`` and returns the velocity (wrap an x- or
eps-prediction model with :func:`vugen.diffusion.prediction.as_velocity_fn`).

Methods, with ``h = t_{k+1} - t_k``:

- ``"euler"``: ``x_{k+1} = x_k + h v(x_k, t_k)``. Global order 1, ``steps`` evaluations.
- ``"heun"``: the explicit trapezoid rule (predict with Euler, correct with the mean of the two end
  velocities). The last step, which ends at ``t = 1``, is a plain Euler step so the velocity is
  never evaluated at the data end, where the x/eps-to-v conversion is singular (as in JiT and EDM).
  One Euler step adds a local error of ``O(h^2)``, so the global order stays 2;
  ``2 * steps - 1`` evaluations.
- ``"sde"``: Euler–Maruyama on the reverse-time SDE that has the same marginals as the flow,

      dx = [v + (g^2 / 2) * score] dt + g dW,    g(t)^2 = 2 c (1 - t),   c = sde_noise_scale.

  For ``x_t = t x + (1 - t) eps`` Tweedie's formula gives ``score = -E[eps | x_t] / (1 - t)`` and
  ``E[eps | x_t] = x_t - t v``, so the drift is ``v - c * (x_t - t v)``: bounded at both ends,
  with the noise vanishing at the data end. (The Fokker–Planck equation of this SDE equals the
  continuity equation of the ODE because the added ``(g^2/2) div(p score)`` and ``(g^2/2) lap(p)``
  terms cancel.) ``c = 0`` is exactly the Euler ODE sampler. Weak order 1, ``steps`` evaluations.

Samplers do not disable autograd: call them under ``torch.no_grad()`` (or inference mode) unless
gradients through sampling are wanted. They are deterministic given the noise and, for ``"sde"``,
the ``generator`` (which must live on the noise's device).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from vugen.diffusion.timesteps import time_grid

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Method = Literal["euler", "heun", "sde"]
METHODS: tuple[str, ...] = ("euler", "heun", "sde")


def _velocity(velocity_fn: VelocityFn, x: Tensor, t: float) -> Tensor:
    v = velocity_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn must return the shape of x_t {tuple(x.shape)}, got {tuple(v.shape)}")
    return v


def _euler_step(velocity_fn: VelocityFn, x: Tensor, t0: float, t1: float) -> Tensor:
    return x + (t1 - t0) * _velocity(velocity_fn, x, t0)


def _heun_step(velocity_fn: VelocityFn, x: Tensor, t0: float, t1: float) -> Tensor:
    h = t1 - t0
    v0 = _velocity(velocity_fn, x, t0)
    v1 = _velocity(velocity_fn, x + h * v0, t1)
    return x + 0.5 * h * (v0 + v1)


def _sde_step(
    velocity_fn: VelocityFn,
    x: Tensor,
    t0: float,
    t1: float,
    noise_scale: float,
    generator: torch.Generator | None,
) -> Tensor:
    h = t1 - t0
    v = _velocity(velocity_fn, x, t0)
    eps_hat = x - t0 * v
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + h * (v - noise_scale * eps_hat) + math.sqrt(2.0 * noise_scale * (1.0 - t0) * h) * z


def sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    steps: int,
    method: Method = "euler",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    sde_noise_scale: float = 1.0,
) -> Tensor:
    """Integrate the flow from noise (``t = 0``) to data (``t = 1``).

    Args:
        velocity_fn: ``velocity_fn(x_t, t) -> v`` with ``x_t`` ``[B, ...]`` and ``t`` ``[B]``.
        noise: Starting point ``x_0``, shape ``[B, ...]``, floating point; its dtype and device are
            those of the whole computation.
        steps: Number of integration steps, >= 1 (the velocity is evaluated ``steps`` times for
            ``"euler"``/``"sde"`` and ``2 * steps - 1`` times for ``"heun"``).
        method: ``"euler"``, ``"heun"`` or ``"sde"`` (see the module docstring).
        shift: Time shift of the grid (see :func:`vugen.diffusion.timesteps.time_grid`).
        generator: Random generator for the ``"sde"`` noise; unused by the ODE methods.
        sde_noise_scale: ``c >= 0`` in the diffusion coefficient ``g(t)^2 = 2 c (1 - t)``.

    Returns:
        The sample at ``t = 1``, same shape, dtype and device as ``noise``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(noise, Tensor) and noise.is_floating_point() and noise.ndim >= 1):
        raise ValueError("noise must be a floating-point tensor of shape [B, ...]")
    if not (math.isfinite(sde_noise_scale) and sde_noise_scale >= 0):
        raise ValueError(f"sde_noise_scale must be a finite number >= 0, got {sde_noise_scale!r}")
    grid = time_grid(steps, shift).tolist()
    x = noise
    for k in range(steps):
        t0, t1 = grid[k], grid[k + 1]
        if method == "sde":
            x = _sde_step(velocity_fn, x, t0, t1, sde_noise_scale, generator)
        elif method == "heun" and k < steps - 1:
            x = _heun_step(velocity_fn, x, t0, t1)
        else:
            x = _euler_step(velocity_fn, x, t0, t1)
    return x
