"""Tests of vugen.diffusion against closed forms (Gaussian data, where the flow is exact)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from vugen.diffusion import (
    as_velocity_fn,
    broadcast_time,
    classifier_free_guidance,
    convert_prediction,
    flow_matching_inputs,
    flow_matching_loss,
    interpolate,
    resolution_shift,
    sample,
    sample_timesteps,
    shift_timesteps,
    time_grid,
)

PAIRS = [(a, b) for a in ("x", "v", "eps") for b in ("x", "v", "eps")]


class Gaussian:
    """Data ~ N(mu, s^2) per dimension, noise ~ N(0, 1): every quantity of the flow is closed-form.

    x_t = t x + (1 - t) eps is Gaussian with mean t mu and variance V_t = t^2 s^2 + (1 - t)^2;
    E[v | x_t] = mu + Cov(v, x_t) / V_t (x_t - t mu) with Cov(v, x_t) = t s^2 - (1 - t), and the
    exact ODE map is x_t = t mu + sqrt(V_t) eps, so x_1 = mu + s eps.
    """

    def __init__(self, mu: torch.Tensor, s: torch.Tensor) -> None:
        self.mu, self.s = mu, s

    def _v_t(self, t: torch.Tensor) -> torch.Tensor:
        return t**2 * self.s**2 + (1 - t) ** 2

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = broadcast_time(t, x_t)
        return self.mu + (t * self.s**2 - (1 - t)) / self._v_t(t) * (x_t - t * self.mu)

    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = broadcast_time(t, x_t)
        return self.mu + t * self.s**2 / self._v_t(t) * (x_t - t * self.mu)

    def exact(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mu + self.s * noise


def _gaussian(dim: int = 4, dtype: torch.dtype = torch.float64) -> Gaussian:
    mu = torch.linspace(-1.5, 2.0, dim, dtype=dtype)
    s = torch.linspace(0.3, 1.5, dim, dtype=dtype)
    return Gaussian(mu, s)


def _slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(steps)."""
    x = torch.tensor(steps, dtype=torch.float64).log()
    y = torch.tensor(errors, dtype=torch.float64).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


# ----------------------------------------------------------------------------------------- timesteps


def test_uniform_timesteps_moments_and_range():
    t = sample_timesteps(200_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005
    assert abs(t.var().item() - 1 / 12) < 0.002


def test_logit_normal_timesteps_moments():
    t = sample_timesteps(200_000, "logit_normal", mean=-0.8, std=0.8, generator=torch.Generator().manual_seed(1))
    assert t.min() > 0 and t.max() < 1
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() + 0.8) < 0.01
    assert abs(logit.std().item() - 0.8) < 0.01


def test_timesteps_are_deterministic_given_a_generator():
    a = sample_timesteps(16, generator=torch.Generator().manual_seed(3))
    b = sample_timesteps(16, generator=torch.Generator().manual_seed(3))
    c = sample_timesteps(16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shifted_sampling_is_the_shift_of_unshifted_sampling():
    plain = sample_timesteps(64, "uniform", generator=torch.Generator().manual_seed(5))
    shifted = sample_timesteps(64, "uniform", shift=3.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(shifted, shift_timesteps(plain, 3.0))
    assert (shifted <= plain).all() and (shifted < plain).any()


def test_shift_matches_the_noise_level_formula_and_its_properties():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    for shift in (0.5, 2.0, 6.9):
        s = 1 - t
        expected = 1 - shift * s / (1 + (shift - 1) * s)  # SD3 / RAE, on the noise level
        shifted = shift_timesteps(t, shift)
        torch.testing.assert_close(shifted, expected)
        assert (shifted.diff() > 0).all()  # increasing
        assert shifted[0] == 0 and shifted[-1] == 1
        assert ((shifted < t)[1:-1] if shift > 1 else (shifted > t)[1:-1]).all()
    # A Moebius map in the noise level: shifts compose by multiplication.
    torch.testing.assert_close(shift_timesteps(shift_timesteps(t, 2.0), 3.0), shift_timesteps(t, 6.0))


def test_resolution_shift():
    assert resolution_shift(4096) == 1.0
    assert resolution_shift(256 * 256 * 3) == pytest.approx(math.sqrt(48))
    assert resolution_shift(1024, base_dim=256) == 2.0
    with pytest.raises(ValueError, match="dim"):
        resolution_shift(0)


def test_time_grid():
    grid = time_grid(10)
    torch.testing.assert_close(grid, torch.linspace(0, 1, 11, dtype=torch.float64))
    for shift in (0.3, 3.7):
        grid = time_grid(7, shift)
        assert grid.shape == (8,) and grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
        torch.testing.assert_close(grid, shift_timesteps(torch.linspace(0, 1, 8, dtype=torch.float64), shift))


def test_timestep_bad_input():
    with pytest.raises(ValueError, match="schedule"):
        sample_timesteps(4, "cosine")
    with pytest.raises(ValueError, match="shift"):
        sample_timesteps(4, shift=0.0)
    with pytest.raises(ValueError, match="std"):
        sample_timesteps(4, std=0.0)
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


# ---------------------------------------------------------------------------------------- prediction


def _triple(shape=(6, 3, 4), t_lo=0.1, t_hi=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * (t_hi - t_lo) + t_lo
    return x, eps, t


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_conversions_are_exact_and_round_trip(source, target):
    x, eps, t = _triple()
    x_t = interpolate(x, eps, t)
    truth = {"x": x, "v": x - eps, "eps": eps}
    converted = convert_prediction(truth[source], x_t, t, source, target)
    torch.testing.assert_close(converted, truth[target])
    back = convert_prediction(converted, x_t, t, target, source)
    torch.testing.assert_close(back, truth[source])


def test_interpolate_end_points_and_broadcasting():
    x, eps, _ = _triple()
    torch.testing.assert_close(interpolate(x, eps, torch.zeros(6, dtype=torch.float64)), eps)
    torch.testing.assert_close(interpolate(x, eps, torch.ones(6, dtype=torch.float64)), x)
    torch.testing.assert_close(interpolate(x, eps, 0.25), 0.25 * x + 0.75 * eps)
    with pytest.raises(ValueError, match="t must be"):
        interpolate(x, eps, torch.zeros(5))


def test_conversions_clamp_the_singular_ends():
    x, eps, _ = _triple()
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    at_data = interpolate(x, eps, ones)  # 1 - t = 0
    v = convert_prediction(x + 1, at_data, ones, "x", "v")
    torch.testing.assert_close(v, torch.full_like(x, 1 / 0.05))
    at_noise = interpolate(x, eps, zeros)  # t = 0
    torch.testing.assert_close(
        convert_prediction(eps, at_noise, zeros, "eps", "x", min_denom=0.1), zeros.new_zeros(x.shape)
    )
    # Conversions from v never divide: exact at both ends.
    torch.testing.assert_close(convert_prediction(x - eps, at_data, ones, "v", "x"), x)
    torch.testing.assert_close(convert_prediction(x - eps, at_noise, zeros, "v", "eps"), eps)
    with pytest.raises(ValueError, match="source"):
        convert_prediction(x, x, ones, "score", "v")
    with pytest.raises(ValueError, match="min_denom"):
        convert_prediction(x, x, ones, "x", "v", min_denom=1.0)


@pytest.mark.parametrize("prediction", ["x", "eps"])
def test_as_velocity_fn_matches_the_closed_form_velocity(prediction):
    gauss = _gaussian()
    x_t = torch.randn(32, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 32, dtype=torch.float64)
    x_hat = gauss.posterior_mean(x_t, t)
    # Tweedie in both directions: E[eps | x_t] = (x_t - t E[x | x_t]) / (1 - t).
    model = {
        "x": lambda z, s: gauss.posterior_mean(z, s),
        "eps": lambda z, s: (z - s[:, None] * x_hat) / (1 - s[:, None]),
    }
    torch.testing.assert_close(as_velocity_fn(model[prediction], prediction)(x_t, t), gauss.velocity(x_t, t))


# ---------------------------------------------------------------------------------------------- loss


def test_flow_matching_inputs():
    x, eps, t = _triple()
    x_t, target = flow_matching_inputs(x, eps, t, "v")
    torch.testing.assert_close(x_t, t[:, None, None] * x + (1 - t[:, None, None]) * eps)
    torch.testing.assert_close(target, x - eps)
    assert flow_matching_inputs(x, eps, t, "x")[1] is x and flow_matching_inputs(x, eps, t, "eps")[1] is eps


@pytest.mark.parametrize(("prediction", "loss_space"), PAIRS)
def test_loss_is_zero_at_the_true_target_and_positive_otherwise(prediction, loss_space):
    x, eps, t = _triple(t_lo=0.0, t_hi=1.0)
    t[0], t[1] = 0.0, 1.0  # both clamped ends
    _, target = flow_matching_inputs(x, eps, t, prediction)
    assert flow_matching_loss(target, x, eps, t, prediction, loss_space).item() < 1e-20
    assert flow_matching_loss(target + 0.01, x, eps, t, prediction, loss_space).item() > 1e-6


def test_x_prediction_v_loss_value_and_weights():
    x, eps, t = _triple(t_lo=0.0, t_hi=1.0)
    t[0] = 0.99  # inside the clamp
    x_pred = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    weight = torch.arange(1.0, 7.0, dtype=torch.float64)
    per_sample = ((x_pred - x) ** 2).mean(dim=(1, 2)) / (1 - t).clamp_min(0.05) ** 2
    torch.testing.assert_close(flow_matching_loss(x_pred, x, eps, t, "x"), per_sample.mean())
    torch.testing.assert_close(flow_matching_loss(x_pred, x, eps, t, "x", weight=weight), (weight * per_sample).mean())
    plain = ((x_pred - x) ** 2).mean()
    torch.testing.assert_close(flow_matching_loss(x_pred, x, eps, t, "x", loss_space="x"), plain)
    with pytest.raises(ValueError, match="weight"):
        flow_matching_loss(x_pred, x, eps, t, "x", weight=weight[:3])
    with pytest.raises(ValueError, match="loss_space"):
        flow_matching_loss(x_pred, x, eps, t, "x", loss_space="score")


def test_loss_gradient_flows_to_the_prediction():
    x, eps, t = _triple()
    pred = torch.zeros_like(x, requires_grad=True)
    flow_matching_loss(pred, x, eps, t, "v").backward()
    torch.testing.assert_close(pred.grad, -2 * (x - eps) / x.numel())


# ------------------------------------------------------------------------------------------ samplers


def _ode_errors(method: str, shift: float, steps: list[int]) -> list[float]:
    gauss = _gaussian()
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = gauss.exact(noise)
    return [(sample(gauss.velocity, noise, n, method, shift=shift) - exact).abs().max().item() for n in steps]


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_samplers_converge_at_their_order(method, order, shift):
    # A sampler converging to a wrong answer plateaus (slope -> 0); one of the wrong order misses.
    steps = [16, 32, 64, 128]
    errors = _ode_errors(method, shift, steps)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert abs(-_slope(steps, errors) - order) < 0.15, errors


def test_heun_is_more_accurate_than_euler_at_equal_cost():
    # 2N - 1 Heun evaluations against 2N Euler evaluations.
    assert _ode_errors("heun", 1.0, [16])[0] < _ode_errors("euler", 1.0, [32])[0] / 5


@pytest.mark.parametrize(("method", "calls"), [("euler", 10), ("heun", 19), ("sde", 10)])
def test_samplers_never_evaluate_the_data_end(method, calls):
    seen: list[torch.Tensor] = []

    def velocity_fn(x_t, t):
        seen.append(t)
        return -x_t

    sample(velocity_fn, torch.randn(3, 2), 10, method, generator=torch.Generator().manual_seed(0))
    assert len(seen) == calls
    assert all(t.shape == (3,) and t.dtype == torch.float32 and (t < 1).all() for t in seen)


def test_samplers_work_on_image_shaped_tensors_in_float32():
    gauss = Gaussian(torch.tensor(0.5), torch.tensor(0.5))
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sample(gauss.velocity, noise, 64, "heun", shift=2.0)
    assert out.shape == noise.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, gauss.exact(noise), atol=1e-2, rtol=0)


def test_x_prediction_model_samples_through_as_velocity_fn():
    gauss = _gaussian()
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # min_denom=0: the exact conversion; Heun never reaches t = 1 where it would divide by zero.
    out = sample(as_velocity_fn(gauss.posterior_mean, "x", min_denom=0.0), noise, 64, "heun")
    torch.testing.assert_close(out, gauss.exact(noise), atol=1e-3, rtol=0)


@functools.cache
def _sde_output(steps: int, noise_scale: float) -> torch.Tensor:
    gauss = _gaussian(dtype=torch.float32)
    noise = torch.randn(1 << 16, 4, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    return sample(gauss.velocity, noise, steps, "sde", generator=gen, sde_noise_scale=noise_scale)


@pytest.mark.parametrize("noise_scale", [0.5, 1.0, 3.0])
def test_sde_matches_the_data_distribution(noise_scale):
    gauss = _gaussian(dtype=torch.float32)
    out = _sde_output(128, noise_scale)
    # Standard errors over 65536 samples: mean s / 256 <= 0.006, std 0.3% relative.
    # (Dropping the 2 of g^2, or scaling the score term wrongly, is off by about 30%.)
    torch.testing.assert_close(out.mean(0), gauss.mu, atol=0.03, rtol=0)
    torch.testing.assert_close(out.std(0), gauss.s, atol=0, rtol=0.03)
    # Not the ODE in disguise: the same noise lands elsewhere.
    assert (out - gauss.exact(torch.randn(1 << 16, 4, generator=torch.Generator().manual_seed(3)))).std() > 0.1


def test_sde_bias_shrinks_with_steps():
    s = _gaussian(dtype=torch.float32).s
    coarse = (_sde_output(8, 1.0).std(0) / s - 1).abs().mean().item()
    fine = (_sde_output(128, 1.0).std(0) / s - 1).abs().mean().item()
    assert coarse > 0.03 and fine < coarse / 4, (coarse, fine)


def test_sde_is_deterministic_given_a_generator_and_reduces_to_euler():
    gauss = _gaussian()
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def run(seed: int, scale: float = 1.0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample(gauss.velocity, noise, 12, "sde", generator=gen, sde_noise_scale=scale)

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    torch.testing.assert_close(run(0, scale=0.0), sample(gauss.velocity, noise, 12, "euler"), rtol=1e-12, atol=0)


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="method"):
        sample(lambda x, t: x, torch.zeros(2, 2), 4, "rk4")
    with pytest.raises(ValueError, match="steps"):
        sample(lambda x, t: x, torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="velocity_fn"):
        sample(lambda x, t: x[:1], torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="sde_noise_scale"):
        sample(lambda x, t: x, torch.zeros(2, 2), 4, "sde", sde_noise_scale=-1.0)


# ------------------------------------------------------------------------------------------ guidance


class Recorder:
    """Model whose output is x_t + cond (cond a tensor, a dict {"c": tensor}, or None -> 0); logs calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, object]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        self.calls.append((x_t.shape[0], cond))
        if isinstance(cond, dict):
            cond = cond["c"]
        return x_t + (0.0 if cond is None else cond)


def _cfg_case():
    x_t = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    null = torch.randn(1, 3, generator=torch.Generator().manual_seed(2)).expand(4, 3)
    return x_t, cond, null


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_cfg_maths_in_one_doubled_call(scale):
    x_t, cond, null = _cfg_case()
    model = Recorder()
    out = classifier_free_guidance(model, cond, null, scale)(x_t, torch.full((4,), 0.5))
    torch.testing.assert_close(out, x_t + null + scale * (cond - null))
    assert len(model.calls) == 1 and model.calls[0][0] == 8


@pytest.mark.parametrize("null_is_none", [True, False])
def test_cfg_two_calls_when_conditions_do_not_batch(null_is_none):
    x_t, cond, null = _cfg_case()
    uncond, uncond_out = (None, x_t) if null_is_none else (null, x_t + null)
    model = Recorder()
    # A None condition cannot be batched; a tensor one is not batched when asked so.
    out = classifier_free_guidance(model, cond, uncond, 3.0, batched=null_is_none)(x_t, torch.full((4,), 0.5))
    torch.testing.assert_close(out, uncond_out + 3.0 * (x_t + cond - uncond_out))
    assert [c[0] for c in model.calls] == [4, 4] and model.calls[1][1] is uncond


def test_cfg_batches_dict_conditions():
    x_t, cond, null = _cfg_case()
    model = Recorder()
    out = classifier_free_guidance(model, {"c": cond}, {"c": null}, 2.0)(x_t, torch.full((4,), 0.5))
    torch.testing.assert_close(out, x_t + null + 2.0 * (cond - null))
    assert len(model.calls) == 1 and model.calls[0][1]["c"].shape == (8, 3)


def test_cfg_scale_one_never_runs_the_unconditional_branch():
    x_t, cond, null = _cfg_case()
    model = Recorder()
    out = classifier_free_guidance(model, cond, null, 1.0)(x_t, torch.full((4,), 0.5))
    torch.testing.assert_close(out, x_t + cond)
    assert len(model.calls) == 1 and model.calls[0][0] == 4 and model.calls[0][1] is cond


def test_cfg_interval():
    x_t, cond, null = _cfg_case()
    model = Recorder()
    guided = classifier_free_guidance(model, cond, null, 4.0, interval=(0.2, 0.6))
    torch.testing.assert_close(guided(x_t, torch.full((4,), 0.7)), x_t + cond)
    assert [c[0] for c in model.calls] == [4]  # outside: conditional pass only
    t = torch.tensor([0.1, 0.2, 0.6, 0.9])  # ends of the interval are inside
    out = guided(x_t, t)
    inside = torch.tensor([False, True, True, False])[:, None]
    torch.testing.assert_close(out, torch.where(inside, x_t + null + 4.0 * (cond - null), x_t + cond))
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(model, cond, null, 4.0, interval=(0.6, 0.2))


def test_cfg_on_x_prediction_equals_cfg_on_velocity():
    x_t, cond, null = _cfg_case()
    t = torch.linspace(0.1, 0.97, 4)  # includes the clamped region

    def x_model(z, s, c):
        return 0.5 * z + c

    def v_model(z, s, c):
        return convert_prediction(x_model(z, s, c), z, s, "x", "v")

    via_x = as_velocity_fn(classifier_free_guidance(x_model, cond, null, 3.0), "x")(x_t, t)
    via_v = classifier_free_guidance(v_model, cond, null, 3.0)(x_t, t)
    torch.testing.assert_close(via_x, via_v)
