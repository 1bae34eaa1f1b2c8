"""Stage-3 pixel decoder: a VAE-free diffusion transformer over pixel patches (JiT / PixNerd lineage).

The network sees a noisy image ``x_t``, the flow time ``t`` and the reducer latents ``z`` (on their own token
grid). It returns the raw network prediction; whether that is the clean image, the velocity or the noise is
the training stage's choice, recorded here as ``prediction`` so samplers downstream can read it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vugen.nn.hub import HUB_METADATA, HUB_TAGS

__all__ = [
    "PixelDecoder",
    "PixelDecoderBlock",
    "patchify",
    "resample_grid",
    "sincos_pos_embed_2d",
    "timestep_embedding",
    "unpatchify",
]

_LN_EPS = 1e-6
_PREDICTIONS = ("x", "v", "eps")
_TIME_FREQ_DIM = 256


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Split images ``[B, C, H, W]`` into row-major patch tokens ``[B, (H/p)*(W/p), C*p*p]``.

    Each token is one patch flattened in ``(C, p, p)`` order.
    """
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c * patch_size * patch_size)


def unpatchify(tokens: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: tokens ``[B, gh*gw, C*p*p]`` -> images ``[B, C, gh*p, gw*p]``."""
    gh, gw = grid
    b = tokens.shape[0]
    x = tokens.reshape(b, gh, gw, channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, gh * patch_size, gw * patch_size)


def resample_grid(tokens: Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> Tensor:
    """Resample row-major grid tokens ``[B, gh*gw, C]`` to ``target_grid``, giving ``[B, th*tw, C]``.

    Area averaging when both sides shrink (exact block means for integer factors), antialiased bilinear
    otherwise (``align_corners=False``); the identity when the grids match.
    """
    if tuple(grid) == tuple(target_grid):
        return tokens
    b, _, c = tokens.shape
    # fp32: antialiased bilinear has no bf16 CPU kernel, and the grids are small.
    x = tokens.float().transpose(1, 2).reshape(b, c, *grid)
    if target_grid[0] <= grid[0] and target_grid[1] <= grid[1]:
        x = F.interpolate(x, size=tuple(target_grid), mode="area")
    else:
        x = F.interpolate(x, size=tuple(target_grid), mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(2).transpose(1, 2).to(tokens.dtype)


def sincos_pos_embed_2d(width: int, grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``[gh*gw, width]`` (MAE style, fp32).

    The first half of the channels encodes the row, the second half the column; ``width % 4 == 0``.
    Defined for any grid, so the decoder can change resolution.
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows = torch.arange(grid[0], dtype=torch.float64, device=device)
    cols = torch.arange(grid[1], dtype=torch.float64, device=device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    row_args = rr.reshape(-1, 1) * omega
    col_args = cc.reshape(-1, 1) * omega
    emb = torch.cat([row_args.sin(), row_args.cos(), col_args.sin(), col_args.cos()], dim=1)
    return emb.float()


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of flow times ``t [B]`` in ``[0, 1]`` (scaled by ``time_scale``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * time_scale)[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _RMSNormFP32(nn.RMSNorm):
    """RMSNorm computed in fp32 whatever the input/weight dtypes (precise under autocast and bf16 weights)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


class _Attention(nn.Module):
    """Multi-head self-attention with optional RMS QK-norm (stabilises pixel-space training, as in JiT)."""

    def __init__(self, width: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = _RMSNormFP32(head_dim, eps=_LN_EPS) if qk_norm else nn.Identity()
        self.k_norm = _RMSNormFP32(head_dim, eps=_LN_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, w // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class _SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _make_mlp(width: int, mlp_ratio: float, kind: str) -> nn.Module:
    if kind == "swiglu":
        # 2/3 of the GELU hidden width keeps the parameter count equal.
        return _SwiGLU(width, max(1, round(width * mlp_ratio * 2 / 3)))
    hidden = max(1, round(width * mlp_ratio))
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class PixelDecoderBlock(nn.Module):
    """DiT block with adaLN-Zero: pre-norm attention and MLP, each shifted/scaled/gated by the condition.

    The modulation layer is zero-initialised, so a fresh block is the identity. One block is the unit for
    FSDP wrapping and activation checkpointing.

    Args:
        width: Token width.
        num_heads: Attention heads (``width % num_heads == 0``).
        mlp_ratio: MLP hidden width relative to ``width``.
        mlp: ``"swiglu"`` or ``"gelu"``.
        qk_norm: RMS-normalise queries and keys per head.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, mlp: str, qk_norm: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=_LN_EPS)
        self.attn = _Attention(width, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=_LN_EPS)
        self.mlp = _make_mlp(width, mlp_ratio, mlp)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Update tokens ``x [B, N, width]`` under the conditioning vector ``cond [B, width]``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(cond).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class _FinalLayer(nn.Module):
    """adaLN (shift/scale) + linear to patch pixels; both zero-initialised so the network starts at 0."""

    def __init__(self, width: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=_LN_EPS)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.ada_ln(cond).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class PixelDecoder(
    nn.Module,
    PyTorchModelHubMixin,
    **HUB_METADATA,
    tags=[*HUB_TAGS, "pixel-diffusion"],
):
    """Pixel-space diffusion transformer conditioned on reducer latents.

    Tokens: linear (optionally bottleneck) embedding of ``patch_size`` pixel patches + 2-D position
    embedding + the latents, projected to the width and resampled from their grid to the patch grid. The
    condition vector driving adaLN-Zero in every block is ``time_embed(t) + pool_proj(mean(latent tokens))``:
    the pooled latent gives every block global image information (palette, layout, semantics) as a
    multiplicative modulation, without first gathering it through attention, and it carries the CFG null
    condition into the modulation too. Output: ``[B, C, H, W]``, zero at initialisation.

    Condition dropout for classifier-free guidance replaces a sample's whole latent grid by a learned null
    latent token (``drop_cond``); :meth:`draw_drop_mask` draws that mask at ``cond_drop_prob``.

    Args:
        latent_dim: ``d``, channels of the reducer latents.
        in_channels: Image channels.
        patch_size: Pixels per patch side.
        width: Transformer width (``width % 4 == 0`` for the 2-D sincos embedding).
        depth: Number of :class:`PixelDecoderBlock`.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to ``width``.
        mlp: ``"swiglu"`` or ``"gelu"``.
        bottleneck_dim: If set, the patch embedding is ``patch -> bottleneck_dim -> width`` (JiT).
        pos_embed: ``"sincos"`` (fixed, any resolution) or ``"learned"`` (a table for ``image_size``,
            initialised with sincos and resampled like the latents for other sizes).
        image_size: Nominal training resolution (sizes the learned position table).
        qk_norm: RMS-normalise queries and keys.
        cond_drop_prob: Probability used by :meth:`draw_drop_mask`.
        prediction: What the output means to the training stage: ``"x"``, ``"v"`` or ``"eps"``.
    """

    def __init__(
        self,
        latent_dim: int = 32,
        in_channels: int = 3,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp: Literal["swiglu", "gelu"] = "swiglu",
        bottleneck_dim: int | None = None,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        image_size: int = 256,
        qk_norm: bool = True,
        cond_drop_prob: float = 0.1,
        prediction: Literal["x", "v", "eps"] = "x",
    ) -> None:
        super().__init__()
        _check_decoder_args(
            latent_dim,
            in_channels,
            patch_size,
            width,
            depth,
            num_heads,
            mlp_ratio,
            mlp,
            bottleneck_dim,
            pos_embed,
            image_size,
            cond_drop_prob,
            prediction,
        )
        self.latent_dim = latent_dim
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.width = width
        self.cond_drop_prob = float(cond_drop_prob)
        self.prediction = prediction
        self.gradient_checkpointing = False
        patch_dim = in_channels * patch_size * patch_size
        if bottleneck_dim is None:
            self.patch_embed: nn.Module = nn.Linear(patch_dim, width)
        else:
            self.patch_embed = nn.Sequential(
                nn.Linear(patch_dim, bottleneck_dim, bias=False), nn.Linear(bottleneck_dim, width)
            )
        self.base_grid = (image_size // patch_size, image_size // patch_size)
        self.pos_table = (
            nn.Parameter(sincos_pos_embed_2d(width, self.base_grid)[None]) if pos_embed == "learned" else None
        )
        self.time_embed = nn.Sequential(nn.Linear(_TIME_FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.latent_proj = nn.Linear(latent_dim, width)
        self.pool_proj = nn.Linear(width, width)
        # Zero null token: no real latent is all-zero after the reducer's channel normalisation.
        self.null_latent = nn.Parameter(torch.zeros(latent_dim))
        self.blocks = nn.ModuleList(PixelDecoderBlock(width, num_heads, mlp_ratio, mlp, qk_norm) for _ in range(depth))
        self.final_layer = _FinalLayer(width, patch_dim)
        self._init_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as saved to ``config.json``."""
        return dict(self._hub_mixin_config)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zero_layers = [block.ada_ln[-1] for block in self.blocks]
        zero_layers += [self.final_layer.ada_ln[-1], self.final_layer.linear]
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(height / p, width / p)`` of an image size; raises if not divisible."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size={self.patch_size}.")
        return height // self.patch_size, width // self.patch_size

    def draw_drop_mask(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Draw a CFG condition-dropout mask ``[batch_size]`` (bool, True = drop) at ``cond_drop_prob``.

        Args:
            batch_size: Number of samples.
            generator: Optional generator; drawing happens on its device, then moves to ``device``.
            device: Device of the returned mask (default: the generator's, else CPU).
        """
        draw_device = generator.device if generator is not None else device
        mask = torch.rand(batch_size, generator=generator, device=draw_device) < self.cond_drop_prob
        return mask.to(device) if device is not None else mask

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        latents: Tensor,
        latent_grid: tuple[int, int],
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """Predict from a noisy image.

        Args:
            x_t: Noisy images ``[B, C, H, W]``, ``H`` and ``W`` divisible by ``patch_size``.
            t: Flow times ``[B]`` (or a scalar) in ``[0, 1]``.
            latents: Reducer latents ``[B, N, d]`` on a row-major grid.
            latent_grid: ``(gh, gw)`` with ``gh * gw == N``; any grid is resampled to the patch grid.
            drop_cond: Optional bool mask ``[B]``; True replaces that sample's latents by the null token.

        Returns:
            The raw prediction ``[B, C, H, W]`` (its meaning is ``self.prediction``).
        """
        t = self._check_inputs(x_t, t, latents, latent_grid, drop_cond)
        grid = self.patch_grid(x_t.shape[-2], x_t.shape[-1])
        if drop_cond is not None:
            latents = torch.where(drop_cond[:, None, None], self.null_latent.to(latents.dtype), latents)
        cond_tokens = self.latent_proj(latents)
        tokens = self.patch_embed(patchify(x_t, self.patch_size))
        tokens = tokens + self._position_embedding(grid, x_t.device).to(tokens.dtype)
        tokens = tokens + resample_grid(cond_tokens, latent_grid, grid)
        t_emb = self.time_embed(timestep_embedding(t, _TIME_FREQ_DIM).to(x_t.dtype))
        cond = t_emb + self.pool_proj(cond_tokens.mean(dim=1))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, cond, use_reentrant=False)
            else:
                tokens = block(tokens, cond)
        out = self.final_layer(tokens, cond)
        return unpatchify(out, self.patch_size, grid, self.in_channels)

    def _position_embedding(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        if self.pos_table is None:
            return sincos_pos_embed_2d(self.width, grid, device)
        return resample_grid(self.pos_table, self.base_grid, grid) if grid != self.base_grid else self.pos_table

    def _check_inputs(
        self, x_t: Tensor, t: Tensor, latents: Tensor, latent_grid: tuple[int, int], drop_cond: Tensor | None
    ) -> Tensor:
        """Validate shapes; returns ``t`` broadcast to ``[B]``."""
        if x_t.ndim != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(f"x_t must have shape [B, {self.in_channels}, H, W], got {tuple(x_t.shape)}.")
        b = x_t.shape[0]
        if latents.ndim != 3 or latents.shape[0] != b or latents.shape[2] != self.latent_dim:
            raise ValueError(f"latents must have shape [{b}, N, {self.latent_dim}], got {tuple(latents.shape)}.")
        if len(latent_grid) != 2 or min(latent_grid) < 1 or latent_grid[0] * latent_grid[1] != latents.shape[1]:
            raise ValueError(f"latent_grid {tuple(latent_grid)} does not match N={latents.shape[1]} latent tokens.")
        if drop_cond is not None and (drop_cond.shape != (b,) or drop_cond.dtype != torch.bool):
            raise ValueError(
                f"drop_cond must be a bool tensor of shape [{b}], got {drop_cond.dtype} {drop_cond.shape}."
            )
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape [{b}], got {tuple(t.shape)}.")
        return t


def _check_decoder_args(
    latent_dim: int,
    in_channels: int,
    patch_size: int,
    width: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    mlp: str,
    bottleneck_dim: int | None,
    pos_embed: str,
    image_size: int,
    cond_drop_prob: float,
    prediction: str,
) -> None:
    positive = {
        "latent_dim": latent_dim,
        "in_channels": in_channels,
        "patch_size": patch_size,
        "depth": depth,
        "num_heads": num_heads,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if width < 4 or width % 4 or width % num_heads:
        raise ValueError(f"width must be a positive multiple of 4 and of num_heads={num_heads}, got {width}.")
    if mlp_ratio <= 0 or mlp not in ("swiglu", "gelu"):
        raise ValueError(f"need mlp_ratio > 0 and mlp in ('swiglu', 'gelu'), got {mlp_ratio} and {mlp!r}.")
    if bottleneck_dim is not None and bottleneck_dim < 1:
        raise ValueError(f"bottleneck_dim must be None or >= 1, got {bottleneck_dim}.")
    if pos_embed not in ("sincos", "learned"):
        raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}.")
    if image_size < patch_size or image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}.")
    if not 0.0 <= cond_drop_prob < 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}.")
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be one of {_PREDICTIONS}, got {prediction!r}.")
