"""Stage-1 dimension reducer: VLM vision features ``[B, N, D]`` -> compact latents ``[B, N, d]`` and back.

The reducer keeps the token grid and only shrinks the channel dimension. Its encoder and decoder are each a
linear *skip path* plus a zero-initialised residual-MLP *branch* (VGT recipe: residual MLP blocks, per-token
channel normalisation, additive latent noise). The split makes PCA initialisation exact: the skip paths take
the PCA maps and the branches start at zero, so training starts from the optimal linear reducer and the
non-linear branches can only add to it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from vugen.nn.hub import HUB_METADATA, HUB_TAGS

__all__ = [
    "DimensionReducer",
    "ResidualMLP",
    "ResidualMLPBlock",
    "add_latent_noise",
    "explained_variance",
    "pca_explained_variance",
]

_LN_EPS = 1e-6
# Whitening floor, relative to the largest component variance: keeps a rank-deficient sample from
# producing huge encoder weights for directions that carry no variance.
_VARIANCE_FLOOR = 1e-6


class ResidualMLPBlock(nn.Module):
    """Pre-LN residual MLP block: ``x + fc2(gelu(fc1(layer_norm(x))))``.

    Args:
        width: Channels in and out.
        mlp_ratio: Hidden width of the MLP relative to ``width``.
    """

    def __init__(self, width: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(width * mlp_ratio))
        self.norm = nn.LayerNorm(width, eps=_LN_EPS)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``[..., width]``."""
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Non-linear branch: [LayerNorm] -> linear to hidden -> residual blocks -> LayerNorm -> linear out.

    The output layer is zero-initialised, so a fresh branch adds exactly nothing to its skip path.

    Args:
        in_dim: Input channels.
        hidden_dim: Width of the residual blocks.
        out_dim: Output channels.
        num_blocks: Number of :class:`ResidualMLPBlock`.
        mlp_ratio: MLP expansion inside each block.
        input_norm: Whether to LayerNorm the input (useful for raw VLM features with outlier channels).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_blocks: int, mlp_ratio: float, input_norm: bool
    ) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim, eps=_LN_EPS) if input_norm else nn.Identity()
        self.proj_in = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden_dim, mlp_ratio) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(hidden_dim, eps=_LN_EPS)
        self.proj_out = nn.Linear(hidden_dim, out_dim)
        self.zero_init_output()

    def zero_init_output(self) -> None:
        """Zero the output layer so that the branch contributes nothing."""
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[..., in_dim]`` to ``[..., out_dim]``."""
        h = self.proj_in(self.norm_in(x))
        for block in self.blocks:
            h = block(h)
        return self.proj_out(self.norm_out(h))


class DimensionReducer(
    nn.Module,
    PyTorchModelHubMixin,
    **HUB_METADATA,
    tags=[*HUB_TAGS, "feature-reducer"],
):
    """Reduces VLM vision features ``[B, N, D]`` to latents ``[B, N, d]`` and reconstructs them.

    Encoder: ``z = norm(in_proj(F) + encoder(F))`` then, in training mode only, ``z + alpha * eps`` with
    ``alpha ~ U[0, noise_gamma]`` per sample. Decoder (the reconstruction head R^-1):
    ``F_hat = out_proj(z) + decoder(z)``. ``norm`` is a per-token LayerNorm without affine parameters over the
    ``d`` channels (``normalize_latents``), which gives the latent sampler a well-scaled target.

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (``config.json`` + ``model.safetensors``).

    Args:
        feature_dim: ``D``, channels of the VLM vision features.
        latent_dim: ``d``, channels of the latents; ``1 <= d < D`` (``d >= 2`` when normalising).
        hidden_dim: Width of the residual-MLP branches.
        num_blocks: Residual MLP blocks per branch (0 keeps only the branch's input/output layers).
        mlp_ratio: MLP expansion inside each residual block.
        noise_gamma: Upper bound of the training-time latent noise level; 0 disables the noise.
        normalize_latents: Apply the per-token channel normalisation to the latents.
        cosine_weight: Weight of the ``1 - cos`` term in :meth:`reconstruction_loss`.
    """

    def __init__(
        self,
        feature_dim: int,
        latent_dim: int = 32,
        hidden_dim: int = 1024,
        num_blocks: int = 2,
        mlp_ratio: float = 2.0,
        noise_gamma: float = 0.1,
        normalize_latents: bool = True,
        cosine_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _check_reducer_args(feature_dim, latent_dim, hidden_dim, num_blocks, mlp_ratio, noise_gamma, normalize_latents)
        self.feature_dim = feature_dim
        self.latent_dim = latent_dim
        self.noise_gamma = float(noise_gamma)
        self.normalize_latents = normalize_latents
        self.cosine_weight = float(cosine_weight)
        self.in_proj = nn.Linear(feature_dim, latent_dim)
        self.encoder = ResidualMLP(feature_dim, hidden_dim, latent_dim, num_blocks, mlp_ratio, input_norm=True)
        self.out_proj = nn.Linear(latent_dim, feature_dim)
        # Latents are already per-token normalised (or whitened by PCA init): no input norm needed, and
        # a LayerNorm over very few channels would discard most of their information.
        self.decoder = ResidualMLP(latent_dim, hidden_dim, feature_dim, num_blocks, mlp_ratio, input_norm=False)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as saved to ``config.json``."""
        return dict(self._hub_mixin_config)

    def encode(self, features: Tensor) -> Tensor:
        """Encode features ``[..., D]`` to latents ``[..., d]`` (noise added in training mode only)."""
        _check_last_dim(features, self.feature_dim, "features")
        z = self.in_proj(features) + self.encoder(features)
        if self.normalize_latents:
            z = F.layer_norm(z, (self.latent_dim,), eps=_LN_EPS)
        if self.training and self.noise_gamma > 0:
            z = self.add_noise(z)
        return z

    def add_noise(self, latents: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return ``latents + alpha * eps`` with ``alpha ~ U[0, noise_gamma]`` drawn per sample (dim 0).

        Args:
            latents: Latents ``[B, ...]``.
            generator: Optional generator for reproducible noise.
        """
        return add_latent_noise(latents, self.noise_gamma, generator)

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruct features ``[..., D]`` from latents ``[..., d]``."""
        _check_last_dim(latents, self.latent_dim, "latents")
        return self.out_proj(latents) + self.decoder(latents)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Encode and reconstruct.

        Args:
            features: VLM vision features ``[B, N, D]``.

        Returns:
            ``(latents [B, N, d], reconstruction [B, N, D])``.
        """
        latents = self.encode(features)
        return latents, self.decode(latents)

    def reconstruction_loss(self, features: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
        """Feature reconstruction loss ``mse + cosine_weight * (1 - cos)``.

        Args:
            features: Target features ``[..., D]``.
            reconstruction: Decoder output of the same shape.

        Returns:
            Dict with ``mse`` (mean squared error), ``cosine`` (mean per-token cosine similarity) and
            ``loss``; computed in fp32.
        """
        _check_same_shape(features, reconstruction)
        target, pred = features.float(), reconstruction.float()
        mse = F.mse_loss(pred, target)
        cosine = F.cosine_similarity(pred, target, dim=-1, eps=1e-8).mean()
        return {"mse": mse, "cosine": cosine, "loss": mse + self.cosine_weight * (1.0 - cosine)}

    @torch.no_grad()
    def init_from_pca(self, features_sample: Tensor) -> None:
        """Initialise the reducer as the PCA reducer of a feature sample (fp64 PCA).

        The encoder skip path becomes the *whitened* projection on the top-``d`` principal directions,
        ``in_proj(F) = diag(1/sigma) V (F - mu)``, so every latent channel has unit variance; both residual
        branches are zeroed. Then:

        - ``normalize_latents=False``: ``out_proj(z) = V^T diag(sigma) z + mu`` undoes the whitening, so
          encoder+decoder are exactly the PCA projection/reconstruction.
        - ``normalize_latents=True``: the per-token LayerNorm removes each token's mean and scale across the
          ``d`` channels. No decoder can recover those two numbers, so exact PCA is impossible; whitening
          keeps the loss small (the per-token scale of ``d`` unit-variance channels is close to 1), and
          ``out_proj`` is fitted by least squares to the normalised latents: the best linear decoder of
          them on this sample.

        Args:
            features_sample: Features ``[..., D]`` with more than ``d`` tokens in total.
        """
        flat = _flatten_features(features_sample, self.feature_dim, "features_sample").double()
        if flat.shape[0] <= self.latent_dim:
            raise ValueError(
                f"features_sample has {flat.shape[0]} tokens; PCA to latent_dim={self.latent_dim} needs more."
            )
        mean, components, variances, _ = _pca(flat, self.latent_dim)
        scale = variances.clamp_min(_VARIANCE_FLOOR * variances[0]).sqrt()
        enc_weight = components / scale[:, None]
        enc_bias = -enc_weight @ mean
        if self.normalize_latents:
            latents = F.layer_norm(flat @ enc_weight.T + enc_bias, (self.latent_dim,), eps=_LN_EPS)
            dec_weight, dec_bias = _least_squares_linear(latents, flat)
        else:
            dec_weight, dec_bias = components.T * scale, mean
        self.in_proj.weight.copy_(enc_weight)
        self.in_proj.bias.copy_(enc_bias)
        self.out_proj.weight.copy_(dec_weight)
        self.out_proj.bias.copy_(dec_bias)
        self.encoder.zero_init_output()
        self.decoder.zero_init_output()


def add_latent_noise(latents: Tensor, gamma: float, generator: torch.Generator | None = None) -> Tensor:
    """Return ``latents + alpha * eps`` with ``alpha ~ U[0, gamma]`` drawn per sample (dim 0), ``eps ~ N(0, 1)``.

    Args:
        latents: Latents ``[B, ...]``.
        gamma: Upper bound of the noise level.
        generator: Optional generator for reproducible noise (its device is the noise's).
    """
    device = generator.device if generator is not None else latents.device
    shape = (latents.shape[0],) + (1,) * (latents.ndim - 1)
    alpha = torch.rand(shape, generator=generator, device=device) * gamma
    eps = torch.randn(latents.shape, generator=generator, device=device)
    return latents + (alpha * eps).to(device=latents.device, dtype=latents.dtype)


def explained_variance(features: Tensor, reconstruction: Tensor) -> Tensor:
    """Fraction of feature variance a reconstruction explains: ``1 - SSE / SST`` over all tokens.

    ``SST`` is taken around the per-channel mean over tokens, so predicting the mean feature scores 0 and
    a perfect reconstruction scores 1. Constant features (``SST = 0``) give a non-finite value.

    Args:
        features: Features ``[..., D]``.
        reconstruction: Reconstruction of the same shape.

    Returns:
        A 0-d fp32 tensor (accumulated in fp64).
    """
    _check_same_shape(features, reconstruction)
    target = features.reshape(-1, features.shape[-1]).double()
    pred = reconstruction.reshape(-1, features.shape[-1]).double()
    sse = (target - pred).square().sum()
    sst = (target - target.mean(dim=0)).square().sum()
    return (1.0 - sse / sst).float()


def pca_explained_variance(features: Tensor, latent_dim: int) -> Tensor:
    """Explained variance of the best rank-``latent_dim`` linear reconstruction (PCA) of ``features``.

    The baseline a learned reducer with the same ``d`` has to beat; equal to :func:`explained_variance` of
    the PCA reconstruction of the same sample.

    Args:
        features: Features ``[..., D]``.
        latent_dim: Number of principal components, ``1 <= latent_dim <= D``.

    Returns:
        A 0-d fp32 tensor.
    """
    dim = features.shape[-1]
    if not 1 <= latent_dim <= dim:
        raise ValueError(f"latent_dim must be in [1, {dim}] (the feature dimension), got {latent_dim}.")
    _, _, variances, total = _pca(_flatten_features(features, dim, "features").double(), latent_dim)
    return (variances.sum() / total).float()


def _pca(flat: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-``k`` PCA of ``flat [M, D]`` via the covariance eigendecomposition (memory ``D^2``, not ``M D``).

    Returns:
        ``(mean [D], components [k, D] (orthonormal rows), variances [k] descending, total variance)``.
    """
    mean = flat.mean(dim=0)
    centred = flat - mean
    cov = centred.T @ centred / flat.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    top = torch.arange(flat.shape[1] - 1, flat.shape[1] - 1 - k, -1, device=flat.device)
    return mean, eigvecs[:, top].T, eigvals[top].clamp_min(0), eigvals.clamp_min(0).sum()


def _least_squares_linear(inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares ``targets ~ inputs @ W.T + b``; returns ``(W [D, d], b [D])``.

    Uses the pseudo-inverse of the normal equations: LayerNorm-ed inputs sum to zero over channels, so
    ``[inputs, 1]`` is rank deficient and plain ``lstsq`` (CUDA's ``gels``) would be ill-posed.
    """
    design = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)
    solution = torch.linalg.pinv(design.T @ design, hermitian=True) @ (design.T @ targets)
    return solution[:-1].T, solution[-1]


def _flatten_features(features: Tensor, dim: int, name: str) -> Tensor:
    _check_last_dim(features, dim, name)
    return features.detach().reshape(-1, dim)


def _check_last_dim(tensor: Tensor, dim: int, name: str) -> None:
    if tensor.ndim < 2 or tensor.shape[-1] != dim:
        raise ValueError(f"{name} must have shape [..., {dim}], got {tuple(tensor.shape)}.")


def _check_same_shape(features: Tensor, reconstruction: Tensor) -> None:
    if features.shape != reconstruction.shape:
        raise ValueError(
            f"reconstruction shape {tuple(reconstruction.shape)} != features shape {tuple(features.shape)}."
        )


def _check_reducer_args(
    feature_dim: int,
    latent_dim: int,
    hidden_dim: int,
    num_blocks: int,
    mlp_ratio: float,
    noise_gamma: float,
    normalize_latents: bool,
) -> None:
    if feature_dim < 2:
        raise ValueError(f"feature_dim must be >= 2, got {feature_dim}.")
    if not 1 <= latent_dim < feature_dim:
        raise ValueError(f"latent_dim must satisfy 1 <= latent_dim < feature_dim={feature_dim}, got {latent_dim}.")
    if normalize_latents and latent_dim < 2:
        raise ValueError("latent_dim must be >= 2 with normalize_latents=True (a 1-channel LayerNorm outputs 0).")
    if hidden_dim < 1 or num_blocks < 0:
        raise ValueError(f"hidden_dim must be >= 1 and num_blocks >= 0, got {hidden_dim} and {num_blocks}.")
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}.")
    if noise_gamma < 0:
        raise ValueError(f"noise_gamma must be >= 0, got {noise_gamma}.")
