"""Tests for vugen.nn.pixel_decoder: zero init, patching, latent conditioning, CFG dropout, grids, saving."""

from __future__ import annotations

import json
import time

import pytest
import torch

from vugen.nn import PixelDecoder
from vugen.nn.pixel_decoder import patchify, resample_grid, sincos_pos_embed_2d, unpatchify

TINY = {"latent_dim": 8, "patch_size": 4, "width": 64, "depth": 2, "num_heads": 4, "image_size": 32}


def _inputs(batch: int = 4, size: int = 32, grid: tuple[int, int] = (4, 4), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    z = torch.randn(batch, grid[0] * grid[1], TINY["latent_dim"], generator=g)
    return x_t, t, z


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (including the zero-initialised ones) a random non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _train_steps(model: PixelDecoder, steps: int, lr: float = 1e-3) -> None:
    x_t, t, z = _inputs()
    target = torch.randn_like(x_t)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = (model(x_t, t, z, (4, 4)) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_output_is_zero_at_init_and_moves_after_one_step():
    model = PixelDecoder(**TINY)
    x_t, t, z = _inputs()
    out = model(x_t, t, z, (4, 4))
    assert out.shape == (4, 3, 32, 32)
    assert torch.count_nonzero(out) == 0
    _train_steps(model, 1)
    with torch.no_grad():
        assert model(x_t, t, z, (4, 4)).abs().mean() > 1e-4


def test_patchify_layout_and_round_trip():
    images = torch.randn(2, 3, 8, 12)
    tokens = patchify(images, 4)
    assert tokens.shape == (2, 6, 48)
    torch.testing.assert_close(tokens[:, 0], images[:, :, :4, :4].reshape(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 1], images[:, :, :4, 4:8].reshape(2, -1), rtol=0, atol=0)  # row-major
    torch.testing.assert_close(tokens[:, 3], images[:, :, 4:8, :4].reshape(2, -1), rtol=0, atol=0)
    assert torch.equal(unpatchify(tokens, 4, (2, 3), 3), images)


def test_resample_grid_values():
    tokens = torch.randn(2, 64, 5)
    assert torch.equal(resample_grid(tokens, (8, 8), (8, 8)), tokens)
    # Downsampling by 2 is the 2x2 block mean.
    blocks = tokens.reshape(2, 4, 2, 4, 2, 5).mean(dim=(2, 4)).reshape(2, 16, 5)
    torch.testing.assert_close(resample_grid(tokens, (8, 8), (4, 4)), blocks)
    # Constants survive every resampling; a column ramp stays a column ramp (no row/column swap).
    for grid in [(4, 4), (2, 3), (3, 5), (16, 16)]:
        const = torch.full((1, grid[0] * grid[1], 2), 0.7)
        torch.testing.assert_close(resample_grid(const, grid, (8, 8)), torch.full((1, 64, 2), 0.7))
    ramp = torch.arange(3.0).repeat(2)[None, :, None]  # 2x3 grid, value = column index
    up = resample_grid(ramp, (2, 3), (8, 8)).reshape(8, 8)
    assert torch.equal(up, up[:1].expand(8, 8))
    assert (up[0, 1:] >= up[0, :-1]).all() and up[0, -1] - up[0, 0] > 1.0


def test_sincos_position_embedding():
    emb = sincos_pos_embed_2d(16, (2, 3))
    assert emb.shape == (6, 16)
    # Channel 0 is sin(row * 1), channel 8 is sin(col * 1); cos channels of frequency 1 follow at 4 and 12.
    rows = torch.tensor([0.0, 0, 0, 1, 1, 1])
    cols = torch.tensor([0.0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(emb[:, 0], rows.sin())
    torch.testing.assert_close(emb[:, 4], rows.cos())
    torch.testing.assert_close(emb[:, 8], cols.sin())


@pytest.mark.parametrize(("size", "grid"), [(32, (4, 4)), (32, (8, 8)), (32, (2, 3)), (64, (8, 8)), (16, (5, 7))])
def test_latent_grids_and_resolutions(size, grid):
    model = PixelDecoder(**TINY)
    _perturb(model)
    x_t, t, z = _inputs(batch=2, size=size, grid=grid)
    with torch.no_grad():
        out = model(x_t, t, z, grid)
        other = model(x_t, t, torch.randn_like(z), grid)
    assert out.shape == (2, 3, size, size) and torch.isfinite(out).all()
    assert (out - other).abs().mean() > 1e-3


def test_latents_condition_the_output_and_dropped_samples_ignore_them():
    model = PixelDecoder(**TINY)
    _train_steps(model, 5)
    x_t, t, z = _inputs(seed=1)
    z_other = torch.randn_like(z)
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        assert (model(x_t, t, z, (4, 4)) - model(x_t, t, z_other, (4, 4))).abs().mean() > 1e-4
        out, out_other = model(x_t, t, z, (4, 4), drop), model(x_t, t, z_other, (4, 4), drop)
        null = model(x_t, t, model.null_latent.expand_as(z), (4, 4))
    assert torch.equal(out[drop], out_other[drop])
    assert torch.allclose(out[drop], null[drop], atol=1e-6)
    assert (out[~drop] - out_other[~drop]).abs().mean() > 1e-4


def test_draw_drop_mask():
    model = PixelDecoder(**{**TINY, "cond_drop_prob": 0.25})
    first = model.draw_drop_mask(4000, generator=torch.Generator().manual_seed(3))
    again = model.draw_drop_mask(4000, generator=torch.Generator().manual_seed(3))
    assert first.dtype == torch.bool and torch.equal(first, again)
    assert abs(first.float().mean().item() - 0.25) < 0.03
    assert not PixelDecoder(**{**TINY, "cond_drop_prob": 0.0}).draw_drop_mask(100).any()


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_gradient_checkpointing_matches(mlp):
    model = PixelDecoder(**{**TINY, "mlp": mlp, "bottleneck_dim": 16})
    _perturb(model)
    x_t, t, z = _inputs()
    drop = torch.tensor([True, False, False, False])  # so the null token gets a gradient too

    def run():
        model.zero_grad()
        out = model(x_t, t, z, (4, 4), drop)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_plain, grads_plain = run()
    model.gradient_checkpointing = True
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    for got, want in zip(grads_ckpt, grads_plain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert sum(g.abs().sum() for g in grads_plain) > 0


def test_overfits_one_batch_with_x_prediction():
    torch.manual_seed(0)
    model = PixelDecoder(**TINY)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = []
    for _ in range(4):  # a coloured square at a random place on a dark background
        colour, (cx, cy) = torch.rand(3, 1, 1, generator=g) * 2 - 1, torch.rand(2, generator=g) * 1.2 - 0.6
        inside = ((xx - cx).abs() < 0.35) & ((yy - cy).abs() < 0.35)
        images.append(torch.where(inside, colour, torch.full((3, 1, 1), -0.8)))
    x, z = torch.stack(images), torch.randn(4, 16, 8, generator=g)
    eval_t, eval_eps = torch.rand(64, generator=g), torch.randn(64, 3, 32, 32, generator=g)

    def loss_at(t, eps, images, latents):
        tt = t[:, None, None, None]
        x_t = tt * images + (1 - tt) * eps  # flow convention: t=0 noise, t=1 data
        return (model(x_t, t, latents, (4, 4)) - images).square().mean()

    def eval_loss():
        with torch.no_grad():
            return loss_at(eval_t, eval_eps, x.repeat(16, 1, 1, 1), z.repeat(16, 1, 1)).item()

    initial = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(150):
        loss = loss_at(torch.rand(4, generator=g), torch.randn(4, 3, 32, 32, generator=g), x, z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < initial / 5


def test_tiny_config_is_fast():
    model = PixelDecoder(**TINY)
    _perturb(model)
    x_t, t, z = _inputs(batch=8)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        model(x_t, t, z, (4, 4)).square().mean().backward()
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[2] < 0.1


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_save_pretrained_round_trip_is_exact(tmp_path, pos_embed):
    model = PixelDecoder(**{**TINY, "pos_embed": pos_embed, "prediction": "v", "bottleneck_dim": 12})
    _perturb(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == model.config
    loaded = PixelDecoder.from_pretrained(tmp_path, strict=True)
    assert loaded.config == model.config and loaded.prediction == "v"
    x_t, t, z = _inputs(batch=2, size=48, grid=(3, 3))  # off the 32px base grid: resampled learned table
    drop = torch.tensor([False, True])
    with torch.no_grad():
        assert torch.equal(loaded(x_t, t, z, (3, 3), drop), model.eval()(x_t, t, z, (3, 3), drop))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 62}, "width"),
        ({"width": 64, "num_heads": 3}, "width"),
        ({"mlp": "relu"}, "mlp"),
        ({"pos_embed": "rope"}, "pos_embed"),
        ({"image_size": 30}, "image_size"),
        ({"cond_drop_prob": 1.0}, "cond_drop_prob"),
        ({"prediction": "noise"}, "prediction"),
        ({"depth": 0}, "depth"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelDecoder(**{**TINY, **kwargs})


def test_bad_forward_inputs():
    model = PixelDecoder(**TINY)
    x_t, t, z = _inputs(batch=2)
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(2, 3, 30, 32), t, z, (4, 4))
    with pytest.raises(ValueError, match="latent_grid"):
        model(x_t, t, z, (4, 5))
    with pytest.raises(ValueError, match="latents must have shape"):
        model(x_t, t, z[..., :4], (4, 4))
    with pytest.raises(ValueError, match="t must be"):
        model(x_t, torch.rand(3), z, (4, 4))
    with pytest.raises(ValueError, match="drop_cond"):
        model(x_t, t, z, (4, 4), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="x_t must have shape"):
        model(torch.randn(2, 1, 32, 32), t, z, (4, 4))
