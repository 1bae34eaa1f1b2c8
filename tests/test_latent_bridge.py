"""The latent bridge's patching: p x p latent tokens per LM token, in and out, with exact round trips."""

from __future__ import annotations

import pytest
import torch

from vugen.nn.latent_bridge import LatentBridge

GRID = (4, 6)
LATENT_DIM = 3


def bridge(patch_size: int, head: str = "mlp") -> LatentBridge:
    torch.manual_seed(0)
    module = LatentBridge(LATENT_DIM, 16, *GRID, head=head, head_width=16, head_depth=1, patch_size=patch_size)
    final = module.head if head == "linear" else module.head.out_proj
    torch.nn.init.normal_(final.weight)  # zero at init: give the output something to carry
    return module


def raster_latents(batch: int = 2) -> torch.Tensor:
    """Latents whose values name their token and channel: token ``(r, c)`` holds ``k * 1000 + r * 100 + c`` in
    channel ``k``."""
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    tokens = (rows * 100 + cols).reshape(-1, 1).float() + 1000 * torch.arange(LATENT_DIM).float()
    return tokens.expand(batch, -1, -1).clone()


def test_a_patch_holds_its_square_of_neighbouring_tokens():
    patches = bridge(2)._patchify(raster_latents())
    assert patches.shape == (2, 6, LATENT_DIM * 4)
    squares = patches.reshape(2, 6, LATENT_DIM, 2, 2)  # (channel, row, column) within each patch
    channel = 1000 * torch.arange(LATENT_DIM).view(LATENT_DIM, 1, 1)
    # Patch 4 is row 1, column 1 of the 2 x 3 patch grid: latent rows 2-3, columns 2-3, each channel in its place.
    assert torch.equal(squares[1, 4], channel + torch.tensor([[202.0, 203.0], [302.0, 303.0]]))
    assert torch.equal(squares[0, 0], channel + torch.tensor([[0.0, 1.0], [100.0, 101.0]]))


@pytest.mark.parametrize("patch_size", [1, 2])
def test_patching_round_trips_exactly(patch_size):
    module = bridge(patch_size)
    latents = torch.randn(2, 24, LATENT_DIM)
    assert torch.equal(module._unpatchify(module._patchify(latents)), latents)
    assert module.sequence_length == 24 // patch_size**2 and module.num_tokens == 24


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_each_lm_token_writes_the_velocity_of_its_own_patch_only(head):
    module = bridge(2, head)
    hidden, t, context = torch.randn(1, 6, 16), torch.tensor([0.4]), torch.randn(1, 16)
    embeds = module.embed(torch.randn(1, 24, LATENT_DIM), t)
    assert embeds.shape == (1, 6, 16)
    base = module.velocity(hidden, t, context)
    assert base.shape == (1, 24, LATENT_DIM)
    moved = hidden.clone()
    moved[0, 4] += 1.0  # patch 4: latent rows 2-3, columns 2-3
    changed = (module.velocity(moved, t, context) - base).abs().amax(-1).reshape(GRID) > 1e-6
    expected = torch.zeros(GRID, dtype=torch.bool)
    expected[2:4, 2:4] = True
    assert torch.equal(changed, expected)


def test_a_patch_size_that_does_not_divide_the_grid_is_named():
    with pytest.raises(ValueError, match=r"patch_size 4 must divide the latent token grid \(4, 6\)"):
        LatentBridge(LATENT_DIM, 16, *GRID, patch_size=4)
