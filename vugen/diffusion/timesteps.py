"""Timestep sampling for training and time grids for sampling.

Convention (the same in every ``vugen.diffusion`` module): rectified flow with ``t`` in ``[0, 1]``,
``t = 0`` pure noise and ``t = 1`` data, ``x_t = t * x + (1 - t) * eps`` (the JiT convention).

The *shift* is the one of SD3 (Esser et al., 2024, eq. 23) and RAE (Zheng et al., "Diffusion
Transformers with Representation Autoencoders", arXiv 2510.11690, Sec. 4: dimension-dependent
noise schedule shift). Written for the noise level ``s = 1 - t`` it reads

    s' = shift * s / (1 + (shift - 1) * s),

which in data time is ``t' = t / (shift - (shift - 1) * t)``. It fixes both ends, is increasing in
``t``, is the identity for ``shift = 1`` and moves mass towards noise for ``shift > 1``. RAE sets
``shift = sqrt(m / n)`` with ``m`` the data dimension and ``n = 4096`` the base dimension
(:func:`resolution_shift`): larger inputs keep more signal at a given noise level, so they need
more noise. The same shift serves for training (:func:`sample_timesteps`) and for the sampling
grid (:func:`time_grid`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Schedule = Literal["uniform", "logit_normal"]
SCHEDULES: tuple[str, ...] = ("uniform", "logit_normal")


def _check_shift(shift: float) -> None:
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")


def resolution_shift(dim: int, base_dim: int = 4096) -> float:
    """Dimension-dependent time shift of RAE: ``sqrt(dim / base_dim)``.

    Args:
        dim: Number of values the diffusion model generates per sample (tokens x channels for a
            latent, ``H * W * 3`` for pixels).
        base_dim: Dimension at which no shift is applied (RAE uses 4096).

    Returns:
        The shift factor to pass as ``shift`` to :func:`sample_timesteps` and :func:`time_grid`.
    """
    if dim <= 0 or base_dim <= 0:
        raise ValueError(f"dim and base_dim must be > 0, got dim={dim!r}, base_dim={base_dim!r}")
    return math.sqrt(dim / base_dim)


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Apply the SD3/RAE shift to data times ``t`` (see the module docstring).

    Args:
        t: Times in ``[0, 1]`` (``0`` noise, ``1`` data), any shape.
        shift: Shift factor > 0; ``1`` is the identity, ``> 1`` means noisier.

    Returns:
        Shifted times, same shape and dtype as ``t``.
    """
    _check_shift(shift)
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1.0) * t)


def sample_timesteps(
    batch: int,
    schedule: Schedule = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw one training time per sample.

    ``"logit_normal"`` draws ``t = sigmoid(u)`` with ``u ~ N(mean, std^2)``, where ``t`` is the data
    time (as JiT: a negative ``mean`` favours noisy times). ``"uniform"`` draws ``t ~ U[0, 1)`` and
    ignores ``mean``/``std``. The shift is applied last.

    Args:
        batch: Number of times to draw.
        schedule: ``"logit_normal"`` or ``"uniform"``.
        mean: Mean of the logit of ``t`` (logit-normal only).
        std: Standard deviation of the logit of ``t`` (logit-normal only), > 0.
        shift: Time shift (see :func:`resolution_shift`).
        generator: Optional generator for reproducible draws.
        device: Device of the result (the generator's device must match).
        dtype: Floating dtype of the result.

    Returns:
        Tensor of shape ``[batch]`` with values in ``[0, 1]``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}")
    _check_shift(shift)
    if schedule == "uniform":
        t = torch.rand(batch, generator=generator, device=device, dtype=dtype)
    elif schedule == "logit_normal":
        if not std > 0:
            raise ValueError(f"std must be > 0 for the logit-normal schedule, got {std!r}")
        u = torch.randn(batch, generator=generator, device=device, dtype=dtype)
        t = torch.sigmoid(u * std + mean)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return shift_timesteps(t, shift)


def time_grid(
    steps: int,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Sampling grid from noise (``t = 0``) to data (``t = 1``), uniform before the shift.

    Args:
        steps: Number of integration steps, >= 1.
        shift: Time shift (see :func:`resolution_shift`); ``> 1`` spends more steps at high noise.
        device: Device of the result.
        dtype: Dtype of the result (float64 by default: the grid feeds step sizes).

    Returns:
        Increasing tensor of shape ``[steps + 1]`` with ``grid[0] = 0`` and ``grid[-1] = 1``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    grid = shift_timesteps(torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype), shift)
    grid[-1] = 1.0  # exact end point whatever the rounding of the shift
    return grid
