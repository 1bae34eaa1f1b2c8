"""Tests for vugen.nn.reducer: PCA init against a numpy reference, learning beyond PCA, save/load, noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vugen.nn import DimensionReducer
from vugen.nn.reducer import explained_variance, pca_explained_variance


def _synthetic_features(num_images: int, seed: int, dim: int = 32, rank: int = 4) -> torch.Tensor:
    """Features on a rank-``rank`` manifold: a linear part plus a non-linear (sine) part plus small noise.

    The mixing matrices are fixed; ``seed`` only draws the manifold coordinates, so two seeds are two
    samples of the same distribution.
    """
    mix = torch.Generator().manual_seed(1234)
    linear = torch.randn(rank, dim, generator=mix)
    freqs = torch.randn(rank, 16, generator=mix)
    nonlinear = torch.randn(16, dim, generator=mix) / 4
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(num_images * 64, rank, generator=g)
    feats = u @ linear + torch.sin(2 * u @ freqs) @ nonlinear + 0.01 * torch.randn(u.shape[0], dim, generator=g)
    return feats.reshape(num_images, 64, dim)


def _numpy_pca_reconstruction(features: torch.Tensor, k: int) -> np.ndarray:
    x = features.reshape(-1, features.shape[-1]).double().numpy()
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return (x - mean) @ vt[:k].T @ vt[:k] + mean


def _numpy_explained_variance(features: torch.Tensor, reconstruction: np.ndarray) -> float:
    x = features.reshape(-1, features.shape[-1]).double().numpy()
    return 1.0 - ((x - reconstruction) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (including the zero-initialised ones) a random non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_pca_init_is_exact_pca_without_normalisation():
    feats = _synthetic_features(8, seed=0, dim=48)
    reducer = DimensionReducer(48, 8, hidden_dim=32, noise_gamma=0.1, normalize_latents=False).eval()
    reducer.init_from_pca(feats)
    with torch.no_grad():
        latents, recon = reducer(feats)
    reference = _numpy_pca_reconstruction(feats, 8)
    ev_reference = _numpy_explained_variance(feats, reference)
    assert abs(explained_variance(feats, recon).item() - ev_reference) < 1e-4
    assert abs(pca_explained_variance(feats, 8).item() - ev_reference) < 1e-4
    scale = feats.abs().max().item()
    np.testing.assert_allclose(recon.reshape(-1, 48).double().numpy(), reference, atol=1e-4 * scale)
    # Latents are whitened PCA coordinates: zero mean, identity covariance over tokens.
    flat = latents.reshape(-1, 8).double()
    cov = torch.cov(flat.T, correction=0)
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(flat.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-4, rtol=0)


def test_pca_init_with_normalisation_fits_the_best_linear_decoder():
    feats = _synthetic_features(8, seed=0, dim=48)
    reducer = DimensionReducer(48, 8, hidden_dim=32, normalize_latents=True).eval()
    reducer.init_from_pca(feats)
    with torch.no_grad():
        latents, recon = reducer(feats)
    # Independent reference: numpy least squares from the (normalised) latents plus a bias column.
    design = np.concatenate([latents.reshape(-1, 8).double().numpy(), np.ones((latents[..., 0].numel(), 1))], 1)
    target = feats.reshape(-1, 48).double().numpy()
    # rcond drops the near-null direction left by the LayerNorm (channels sum to 0 up to fp32 rounding).
    coef, *_ = np.linalg.lstsq(design, target, rcond=1e-6)
    ev_lstsq = _numpy_explained_variance(feats, design @ coef)
    ev_model = explained_variance(feats, recon).item()
    assert abs(ev_model - ev_lstsq) < 1e-4
    # The per-token LayerNorm loses each token's mean and scale: strictly below PCA, but it keeps most.
    ev_pca = pca_explained_variance(feats, 8).item()
    assert 0.6 < ev_model < ev_pca - 0.01


def test_training_beats_pca_on_held_out_features():
    train, held_out = _synthetic_features(16, seed=0), _synthetic_features(16, seed=1)
    torch.manual_seed(0)
    reducer = DimensionReducer(32, 6, hidden_dim=64, num_blocks=2, noise_gamma=0.0)
    reducer.init_from_pca(train)
    optimizer = torch.optim.Adam(reducer.parameters(), lr=3e-3)
    for _ in range(250):
        _, recon = reducer(train)
        loss = reducer.reconstruction_loss(train, recon)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reducer.eval()
    with torch.no_grad():
        ev_learned = explained_variance(held_out, reducer(held_out)[1]).item()
    # PCA fitted on the held-out set itself: the strongest linear baseline at d=6.
    assert ev_learned > pca_explained_variance(held_out, 6).item() + 0.01


def test_save_pretrained_round_trip_is_exact(tmp_path):
    reducer = DimensionReducer(40, 6, hidden_dim=24, num_blocks=1, mlp_ratio=1.5, noise_gamma=0.05).eval()
    _perturb(reducer)
    reducer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == reducer.config
    assert (tmp_path / "model.safetensors").is_file()
    loaded = DimensionReducer.from_pretrained(tmp_path, strict=True)
    assert loaded.config == reducer.config
    assert (loaded.latent_dim, loaded.noise_gamma, loaded.normalize_latents) == (6, 0.05, True)
    assert not loaded.training
    feats = torch.randn(2, 9, 40)
    with torch.no_grad():
        for got, want in zip(loaded(feats), reducer(feats), strict=True):
            assert torch.equal(got, want)


def test_noise_only_in_training_and_bounded_by_gamma():
    reducer = DimensionReducer(24, 8, hidden_dim=16, noise_gamma=0.1)
    feats = torch.randn(3, 10, 24)
    with torch.no_grad():
        clean = reducer.eval().encode(feats)
        assert torch.equal(clean, reducer.encode(feats))
        assert not torch.equal(clean, reducer.train().encode(feats))
        noisy = reducer.add_noise(torch.zeros(400, 256, 8), generator=torch.Generator().manual_seed(0))
    alpha = noisy.flatten(1).std(dim=1)  # per-sample noise level estimate (2048 draws each)
    assert alpha.max() < 0.1 * 1.08
    assert alpha.min() < 0.01
    assert abs(alpha.mean().item() - 0.05) < 0.005  # alpha ~ U[0, 0.1]
    silent = DimensionReducer(24, 8, hidden_dim=16, noise_gamma=0.0).train()
    with torch.no_grad():
        assert torch.equal(silent.encode(feats), silent.eval().encode(feats))


@pytest.mark.parametrize("normalize", [True, False])
def test_latent_channel_norm(normalize):
    reducer = DimensionReducer(24, 8, hidden_dim=16, normalize_latents=normalize).eval()
    _perturb(reducer)
    with torch.no_grad():
        latents = reducer.encode(3.0 * torch.randn(4, 10, 24) + 1.0)
    mean, var = latents.mean(-1), latents.var(-1, unbiased=False)
    is_normalised = torch.allclose(mean, torch.zeros_like(mean), atol=1e-5) and torch.allclose(
        var, torch.ones_like(var), atol=1e-3
    )
    assert is_normalised == normalize


def test_reconstruction_loss_and_explained_variance_values():
    reducer = DimensionReducer(4, 2, hidden_dim=8, cosine_weight=0.5)
    feats = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])
    recon = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])
    losses = reducer.reconstruction_loss(feats, recon)
    torch.testing.assert_close(losses["mse"], torch.tensor(2.0 / 8))
    torch.testing.assert_close(losses["cosine"], torch.tensor(0.5))  # cos = 0 and 1
    torch.testing.assert_close(losses["loss"], torch.tensor(2.0 / 8 + 0.5 * 0.5))
    assert reducer.reconstruction_loss(feats, feats)["loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert explained_variance(feats, feats).item() == pytest.approx(1.0)
    assert explained_variance(feats, feats.mean(dim=1, keepdim=True).expand_as(feats)).item() == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature_dim": 16, "latent_dim": 16}, "latent_dim"),
        ({"feature_dim": 16, "latent_dim": 20}, "latent_dim"),
        ({"feature_dim": 16, "latent_dim": 0}, "latent_dim"),
        ({"feature_dim": 16, "latent_dim": 1}, "normalize_latents"),
        ({"feature_dim": 16, "latent_dim": 4, "noise_gamma": -0.1}, "noise_gamma"),
        ({"feature_dim": 16, "latent_dim": 4, "mlp_ratio": 0}, "mlp_ratio"),
        ({"feature_dim": 16, "latent_dim": 4, "hidden_dim": 0}, "hidden_dim"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DimensionReducer(**kwargs)


def test_bad_inputs():
    reducer = DimensionReducer(16, 4, hidden_dim=8)
    with pytest.raises(ValueError, match="features must have shape"):
        reducer.encode(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="latents must have shape"):
        reducer.decode(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="features_sample has 3 tokens"):
        reducer.init_from_pca(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="reconstruction shape"):
        explained_variance(torch.randn(2, 16), torch.randn(3, 16))
    with pytest.raises(ValueError, match="latent_dim must be in"):
        pca_explained_variance(torch.randn(10, 16), 17)
