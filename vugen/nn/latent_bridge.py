"""The latent bridge: what turns a language model into a flow-matching velocity predictor for reduced latents.

In: a noisy latent token ``z_t`` becomes ``in_proj(z_t) + position + time`` in the LM's width. Out: the LM's hidden
state at that token becomes a velocity ``[d]``, through a linear ``out_proj`` or a small adaLN MLP flow head
conditioned on ``t`` (VGT / MAR style). With ``patch_size`` p > 1, each LM token carries a p x p patch of latent
tokens (``p * p * d`` values in and out, as DiT patchifies its latent): the LM's sequence is p^2 times shorter.
``boi`` is the learned begin-of-image embedding that separates the prompt from the latent block.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from vugen.nn.hub import HUB_METADATA, HUB_TAGS
from vugen.nn.pixel_decoder import patchify, timestep_embedding, unpatchify

__all__ = ["LatentBridge"]

_TIME_FREQ_DIM = 256
_INIT_STD = 0.02


class _AdaLNResidual(nn.Module):
    """``x + gate * mlp(norm(x) * (1 + scale) + shift)``, the modulation from the time condition (zero-init gate)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada_ln[-1].weight)
        nn.init.zeros_(self.ada_ln[-1].bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale, gate = self.ada_ln(cond).unsqueeze(1).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class _FlowHead(nn.Module):
    """Hidden state -> velocity through ``depth`` adaLN residual MLP blocks conditioned on ``t``."""

    def __init__(self, hidden_size: int, latent_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, width)
        self.time_embed = nn.Sequential(nn.Linear(_TIME_FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.context_proj = nn.Linear(hidden_size, width)
        self.blocks = nn.ModuleList(_AdaLNResidual(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_proj = nn.Linear(width, latent_dim)

    def forward(self, hidden: Tensor, t: Tensor, context: Tensor) -> Tensor:
        cond = self.time_embed(timestep_embedding(t, _TIME_FREQ_DIM).to(hidden.dtype)) + self.context_proj(context)
        x = self.in_proj(hidden)
        for block in self.blocks:
            x = block(x, cond)
        return self.out_proj(self.norm(x))


class LatentBridge(
    nn.Module,
    PyTorchModelHubMixin,
    **HUB_METADATA,
    tags=[*HUB_TAGS, "latent-bridge"],
):
    """Embeds noisy latent tokens for a language model and reads velocities from its hidden states.

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (``config.json`` + ``model.safetensors``).

    Args:
        latent_dim: ``d``, channels of the reduced latents.
        hidden_size: Width of the language model.
        grid_height: Rows of the latent token grid.
        grid_width: Columns of the latent token grid (``N = grid_height * grid_width`` tokens, row-major).
        head: ``"linear"`` (``out_proj``) or ``"mlp"`` (an adaLN MLP flow head conditioned on ``t``).
        head_width: Width of the MLP head.
        head_depth: Residual blocks of the MLP head.
        patch_size: Side of the square of latent tokens one LM token carries; divides both grid sides.
    """

    def __init__(
        self,
        latent_dim: int,
        hidden_size: int,
        grid_height: int,
        grid_width: int,
        head: Literal["linear", "mlp"] = "mlp",
        head_width: int = 512,
        head_depth: int = 2,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (
            ("latent_dim", latent_dim),
            ("hidden_size", hidden_size),
            ("grid_height", grid_height),
            ("grid_width", grid_width),
            ("head_width", head_width),
            ("head_depth", head_depth),
            ("patch_size", patch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if grid_height % patch_size or grid_width % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the latent token grid ({grid_height}, {grid_width})")
        if head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
        self.latent_dim, self.hidden_size = latent_dim, hidden_size
        self.grid, self.patch_size = (grid_height, grid_width), patch_size
        patch_dim = latent_dim * patch_size**2
        self.in_proj = nn.Linear(patch_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(self.sequence_length, hidden_size) * _INIT_STD)
        self.time_embed = nn.Sequential(
            nn.Linear(_TIME_FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.boi = nn.Parameter(torch.randn(hidden_size) * _INIT_STD)
        self.head: nn.Module = (
            nn.Linear(hidden_size, patch_dim)
            if head == "linear"
            else _FlowHead(hidden_size, patch_dim, head_width, head_depth)
        )
        final = self.head if head == "linear" else self.head.out_proj
        nn.init.zeros_(final.weight)  # zero velocity at init: training starts from a neutral prediction
        nn.init.zeros_(final.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as saved to ``config.json``."""
        return dict(self._hub_mixin_config)

    @property
    def num_tokens(self) -> int:
        """``N``, latent tokens per image."""
        return self.grid[0] * self.grid[1]

    @property
    def sequence_length(self) -> int:
        """LM tokens of the latent block: ``N / patch_size^2``."""
        return self.num_tokens // self.patch_size**2

    def _patchify(self, latents: Tensor) -> Tensor:
        """``[B, N, c]`` in raster order -> ``[B, N / p^2, c * p * p]``, one row per p x p patch (raster order), as
        the pixel decoder cuts images: the latents are a ``c``-channel image of the token grid."""
        grid_image = latents.transpose(1, 2).reshape(latents.shape[0], latents.shape[-1], *self.grid)
        return patchify(grid_image, self.patch_size)

    def _unpatchify(self, patches: Tensor) -> Tensor:
        """The inverse of :meth:`_patchify`."""
        p, (gh, gw) = self.patch_size, self.grid
        grid_image = unpatchify(patches, p, (gh // p, gw // p), patches.shape[-1] // p**2)
        return grid_image.flatten(2).transpose(1, 2)

    def embed(self, z_t: Tensor, t: Tensor) -> Tensor:
        """Noisy latents ``[B, N, d]`` at times ``t`` ``[B]`` -> LM input embeddings ``[B, N / p^2, hidden_size]``."""
        if z_t.ndim != 3 or z_t.shape[1:] != (self.num_tokens, self.latent_dim):
            raise ValueError(
                f"latents must have shape [B, {self.num_tokens}, {self.latent_dim}] (grid {self.grid}), "
                f"got {tuple(z_t.shape)}"
            )
        time = self.time_embed(timestep_embedding(t, _TIME_FREQ_DIM).to(z_t.dtype))
        return self.in_proj(self._patchify(z_t)) + self.pos_embed.to(z_t.dtype) + time[:, None]

    def begin_image(self, batch: int, dtype: torch.dtype) -> Tensor:
        """The begin-of-image embedding for a batch: ``[B, 1, hidden_size]``.

        A copy, not a view: under FSDP2 the gathered parameter is freed when this method returns.
        """
        return self.boi.to(dtype).expand(batch, 1, -1).clone()

    def velocity(self, hidden: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """LM hidden states at the latent block ``[B, N / p^2, hidden_size]`` -> velocities ``[B, N, d]``.

        ``context`` ``[B, hidden_size]`` is the LM's hidden state at the BOI token (it has read the whole prompt); the
        MLP head adds it to its time condition, so every token's velocity sees the prompt directly (the linear head
        adds it to the hidden states).
        """
        dtype = self.in_proj.weight.dtype
        hidden, context = hidden.to(dtype), context.to(dtype)
        if isinstance(self.head, nn.Linear):
            return self._unpatchify(self.head(hidden + context[:, None]))
        return self._unpatchify(self.head(hidden, t, context))
