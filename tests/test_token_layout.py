"""The image-token layout read off real image processors (`vugen_adapters.token_layout`), checked against raster patches
cut independently with `F.unfold`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2VLImageProcessor, SiglipImageProcessor
from transformers.models.siglip2.image_processing_siglip2 import Siglip2ImageProcessor

from vugen_adapters.auto import AutoAdapter
from vugen_adapters.token_layout import LayoutNotDerivable, PatchLayout, as_batch, measure_patch_layout, to_raster

PATCH = 4
PROCESSORS = {
    # flat patches packed in 2x2 merge-block order, each patch repeated over 2 frames
    "qwen2_vl": Qwen2VLImageProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2),
    # flat patches in raster order, padded to 256 slots per image (NaFlex)
    "siglip2": Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=256),
    # an image tensor the tower patchifies itself
    "siglip": SiglipImageProcessor(size={"height": 32, "width": 32}),
}


def layout(name: str, height: int = 16, width: int = 24) -> PatchLayout:
    return measure_patch_layout(PROCESSORS[name], AutoAdapter._process, height, width, PATCH, name)


def raster_patches(image: torch.Tensor) -> torch.Tensor:
    """`[1, rows*cols, 3*p*p]` patches of one image in raster order, cut by `F.unfold` (channel-major)."""
    return F.unfold(image[None], kernel_size=PATCH, stride=PATCH).transpose(1, 2)


def tokens_from_slots(name: str, image: torch.Tensor) -> torch.Tensor:
    """A stand-in vision tower: token `k` = the pixels of patch slot `k` (channel-major, one frame), so each token
    says which patch it came from."""
    processor = PROCESSORS[name]
    processor.do_normalize = False
    try:
        pixels = AutoAdapter._process(processor, image[None])["pixel_values"]
    finally:
        processor.do_normalize = True
    slots = pixels.reshape(-1, pixels.shape[-1])
    if name == "siglip2":  # NaFlex stores each patch as [p, p, C]
        slots = slots.reshape(-1, PATCH, PATCH, 3).permute(0, 3, 1, 2)
    return slots.reshape(len(slots), 3, -1)[..., : PATCH * PATCH].reshape(1, len(slots), -1)


@pytest.mark.parametrize("name", ["qwen2_vl", "siglip2"])
def test_flat_patch_slots_read_back_in_raster_order(name):
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(0))
    grid = layout(name)
    assert (grid.rows, grid.cols) == (4, 6)
    assert grid.slots == (256 if name == "siglip2" else 24)
    assert not grid.is_raster  # block order, or padding: a plain reshape would be wrong
    assert torch.equal(to_raster(tokens_from_slots(name, image), grid, name), raster_patches(image))


def test_an_image_tensor_is_raster_over_the_tower_patches():
    grid = layout("siglip", 32, 32)
    assert (grid.rows, grid.cols, grid.slots) == (8, 8, 64) and grid.is_raster


@pytest.mark.parametrize("prefix", [1, 5])
def test_leading_cls_and_register_tokens_are_dropped(prefix):
    grid = PatchLayout.raster_grid(4, 6)
    patches = torch.randn(2, 24, 8)
    tokens = torch.cat([torch.full((2, prefix, 8), 99.0), patches], dim=1)
    assert torch.equal(to_raster(tokens, grid, "test"), patches)


def test_merged_blocks_follow_the_processor_block_order():
    """Qwen's merger concatenates 4 consecutive slots (one 2x2 block); its tokens are raster over blocks."""
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(1))
    grid = layout("qwen2_vl")
    merged = tokens_from_slots("qwen2_vl", image).reshape(1, 6, -1)  # 6 blocks of 4 consecutive slots
    blocks = raster_patches(image).reshape(1, 2, 2, 3, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(1, 6, -1)
    assert torch.equal(to_raster(merged, grid, "qwen2_vl"), blocks)


def test_pooled_tokens_of_a_raster_grid_stay_raster():
    grid = PatchLayout.raster_grid(8, 8)
    pooled = torch.randn(2, 16, 8)  # 2x2 pooling / pixel shuffle of an 8x8 grid
    assert torch.equal(to_raster(pooled, grid, "test"), pooled)


def test_a_token_count_that_fits_no_grid_names_the_model_and_the_hook():
    with pytest.raises(LayoutNotDerivable, match=r"toy_vlm: 37 image tokens .* 8x8 patch grid .* `select_features`"):
        to_raster(torch.randn(1, 37, 4), PatchLayout.raster_grid(8, 8), "toy_vlm")


def test_a_processor_that_changes_pixel_values_is_refused():
    """Negative control: a processor that quantises to 8 bits loses the position code and must say so."""

    def quantising(processor, images):
        return {"pixel_values": (images * 255).round() / 255}

    with pytest.raises(LayoutNotDerivable, match="toy_vlm: none of the 1 view.* is that image unmoved"):
        measure_patch_layout(PROCESSORS["siglip"], quantising, 32, 32, PATCH, "toy_vlm")


@pytest.mark.parametrize(
    "shape_of",
    [
        lambda t: t,  # [B, N, D]
        lambda t: t.reshape(1, -1, t.shape[-1]),  # Pixtral: every image's tokens in one [1, sum N, D] sequence
        lambda t: t.reshape(-1, t.shape[-1]),  # Qwen: [sum N, D]
        lambda t: [image[None] for image in t],  # one [1, N, D] per image
        lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[-1], 4, 6),  # a conv tower's [B, D, h, w] map
    ],
    ids=["batched", "packed-1", "packed", "per-image", "conv-map"],
)
def test_every_output_form_reads_as_batch_tokens(shape_of):
    tokens = torch.randn(3, 24, 8)
    assert torch.equal(as_batch(shape_of(tokens), batch=3), tokens)
