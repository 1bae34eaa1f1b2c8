"""The image-token layout read off real image processors (`vugen_adapters.token_layout`), checked against raster patches
cut independently with `F.unfold`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2VLImageProcessor, SiglipImageProcessor
from transformers.models.inkling.image_processing_inkling import InklingImageProcessor
from transformers.models.inkling2.image_processing_inkling2 import Inkling2ImageProcessor
from transformers.models.kosmos2_5.image_processing_kosmos2_5 import Kosmos2_5ImageProcessor
from transformers.models.minicpmv4_6.image_processing_minicpmv4_6 import MiniCPMV4_6ImageProcessor
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor
from transformers.models.siglip2.image_processing_siglip2 import Siglip2ImageProcessor

from vugen.conformance import check_raster_order
from vugen_adapters.auto import AutoAdapter
from vugen_adapters.token_layout import (
    LayoutNotDerivable,
    PatchLayout,
    as_batch,
    measure_patch_layout,
    size_kept,
    to_raster,
)

PATCH = 4
PROCESSORS = {
    # flat patches packed in 2x2 merge-block order, each patch repeated over 2 frames
    "qwen2_vl": Qwen2VLImageProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2),
    # flat patches in raster order, padded to 256 slots per image (NaFlex)
    "siglip2": Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=256),
    # an image tensor the tower patchifies itself
    "siglip": SiglipImageProcessor(size={"height": 32, "width": 32}),
    # patches side by side in a [C, p, N*p] strip, the image always resized to an area of 32x32
    "minicpmv4_6": MiniCPMV4_6ImageProcessor(patch_size=PATCH, scale_resolution=32),
    # Pix2Struct flat patches [N, 2 + p*p*C]: (row, col) ids from 1, then the pixels; resized to fill 64 patches
    "kosmos2_5": Kosmos2_5ImageProcessor(patch_size={"height": PATCH, "width": PATCH}, max_patches=64),
    # two crops of flat patches [2, N, p*p*C] for a 32x32 image: the global view and the one crop, both whole
    "molmo2": Molmo2ImageProcessor(
        patch_size=PATCH, size={"height": 32, "width": 32}, max_crops=2, overlap_margins=[1, 1], pooling_size=[2, 2]
    ),
    # one [T, p, p, C] slot per patch, the still image repeated over T = 2 frames, each row ending in a -1 slot
    "inkling": InklingImageProcessor(size={"height": PATCH, "width": PATCH}),
    # one [t, t, C] tile per merged token, t = 2 encoder patches: the tower cuts each tile into its patches
    "inkling2": Inkling2ImageProcessor(size={"height": 2 * PATCH, "width": 2 * PATCH}),
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


def strip_of(patches: torch.Tensor) -> dict[str, torch.Tensor]:
    """`[N, 3, p, p]` patches side by side as MiniCPM-V lays them out: `[1, 3, p, N * p]`."""
    return {"pixel_values": patches.permute(1, 2, 0, 3).reshape(1, 3, PATCH, -1)}


def test_a_strip_of_patches_reads_as_its_grid():
    grid = layout("minicpmv4_6", 32, 32)
    assert (grid.rows, grid.cols, grid.slots) == (8, 8, 64) and grid.is_raster


def test_a_strip_in_column_order_is_put_back_in_raster_order():
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(2))

    def column_major_strip(processor, images):
        patches = raster_patches(images[0]).reshape(4, 6, 3, PATCH, PATCH)
        return strip_of(patches.transpose(0, 1).reshape(-1, 3, PATCH, PATCH))

    grid = measure_patch_layout(None, column_major_strip, 16, 24, PATCH, "toy_vlm")
    assert (grid.rows, grid.cols) == (4, 6) and not grid.is_raster
    strip = column_major_strip(None, image[None])["pixel_values"]
    tokens = strip.reshape(3, PATCH, 24, PATCH).permute(2, 0, 1, 3).reshape(1, 24, -1)  # one token per block
    assert torch.equal(to_raster(tokens, grid, "toy_vlm"), raster_patches(image))


def test_image_rows_side_by_side_are_not_a_strip_of_patches():
    """Negative control: `[3, 4, 256]` cut from a 32x32 image row-wise has the strip's shape, not its patches."""

    def rows_reshaped(processor, images):
        return {"pixel_values": images.reshape(1, 3, PATCH, -1)}

    with pytest.raises(LayoutNotDerivable, match="toy_vlm: its flat pixel slots are not 4x4 patches"):
        measure_patch_layout(None, rows_reshaped, 32, 32, PATCH, "toy_vlm")


@pytest.mark.parametrize("name", ["minicpmv4_6", "kosmos2_5"])
def test_a_processor_that_resizes_on_its_own_is_measured_at_the_size_it_keeps(name):
    with pytest.raises(LayoutNotDerivable, match="changes the pixels of a 8x8 image"):
        layout(name, 8, 8)
    assert size_kept(PROCESSORS[name], AutoAdapter._process, 8, PATCH, name) == 32


@pytest.mark.parametrize("name", ["qwen2_vl", "siglip2"])
def test_a_processor_that_keeps_any_size_has_no_size_of_its_own(name):
    """Negative control: dynamic-resolution processors keep the probe, so the adapter keeps the input's size."""
    assert size_kept(PROCESSORS[name], AutoAdapter._process, 8, PATCH, name) is None


def test_pix2struct_patches_are_read_by_their_pixels_and_their_ids_checked():
    grid = layout("kosmos2_5", 32, 32)
    assert (grid.rows, grid.cols, grid.slots) == (8, 8, 64) and grid.is_raster

    def ids_swapped(processor, images):
        patches = AutoAdapter._process(processor, images)["flattened_patches"].clone()
        patches[..., :2] = patches[..., :2].flip(-1)  # (col, row): not where the pixels came from
        return {"flattened_patches": patches}

    with pytest.raises(LayoutNotDerivable, match="leading whole-number column.* not each patch's \\(row, col\\)"):
        measure_patch_layout(PROCESSORS["kosmos2_5"], ids_swapped, 32, 32, PATCH, "toy_vlm")


def test_the_whole_image_view_among_crops_of_flat_patches_is_kept():
    grid = layout("molmo2", 32, 32)
    assert (grid.crops, grid.crop, grid.rows, grid.cols) == (2, 0, 8, 8) and grid.is_raster

    def crop_then_whole(processor, images):
        whole = raster_patches(images[0])[0]
        top_rows_twice = torch.cat([whole[:12], whole[:12]])  # an overlapping crop: patches 0-11, twice
        return {"pixel_values": torch.stack([top_rows_twice, whole])}

    grid = measure_patch_layout(None, crop_then_whole, 16, 24, PATCH, "toy_vlm")
    assert (grid.crops, grid.crop) == (2, 1)
    patches = torch.randn(2, 24, 8)
    assert torch.equal(to_raster(torch.cat([torch.randn(2, 24, 8), patches], dim=1), grid, "toy_vlm"), patches)


def test_crops_none_of_which_is_the_whole_image_are_refused():
    """Negative control: two overlapping crops together hold every patch, yet no one view is the image."""

    def two_halves_overlapping(processor, images):
        whole = raster_patches(images[0])[0]
        return {"pixel_values": torch.stack([whole[:16], whole[8:]])}

    with pytest.raises(LayoutNotDerivable, match="toy_vlm: neither its flat patches nor any of the 2 views"):
        measure_patch_layout(None, two_halves_overlapping, 16, 24, PATCH, "toy_vlm")


def test_repeated_frames_are_one_slot_and_slots_of_no_pixel_are_padding():
    """Inkling: `[N, 2, p, p, C]`, each row of patches ending in a slot of -1: 2 rows of 3 patches in 8 slots."""
    image = torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(3))
    grid = layout("inkling", 8, 12)
    assert (grid.rows, grid.cols, grid.slots) == (2, 3, 8)
    assert grid.slot_index.tolist() == [0, 1, 2, 4, 5, 6]
    processor = PROCESSORS["inkling"]
    processor.do_normalize = False
    try:
        pixels = AutoAdapter._process(processor, image[None])["pixel_values"]
    finally:
        processor.do_normalize = True
    tokens = pixels[:, 0].permute(0, 3, 1, 2).reshape(1, 8, -1)  # frame 0 of each slot, channel-major
    assert torch.equal(to_raster(tokens, grid, "inkling"), raster_patches(image))


def test_frames_that_differ_are_not_one_slot():
    """Negative control: a frame axis holding two different images is not a repeated still image."""

    def two_frames(processor, images):
        patches = raster_patches(images[0])[0].reshape(-1, 3, PATCH, PATCH)
        return {"pixel_values": torch.stack([patches, patches.roll(1, dims=0)], dim=1)}  # [N, 2, 3, p, p]

    with pytest.raises(LayoutNotDerivable, match="toy_vlm: its flat pixel slots are not"):
        measure_patch_layout(None, two_frames, 16, 24, PATCH, "toy_vlm")


def tower_cut_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """`[T, t, t, C]` tiles -> `[1, T * (t/p)^2, C*p*p]` patches (channel-major) as Inkling 2's tower cuts them
    (`Inkling2VisionEmbeddings`: `reshape(-1, merge, p, merge, p, C).transpose(2, 3)`): tile after tile, raster
    within each tile."""
    merge = tiles.shape[1] // PATCH
    patches = tiles.reshape(-1, merge, PATCH, merge, PATCH, 3).transpose(2, 3)
    return patches.permute(0, 1, 2, 5, 3, 4).reshape(1, -1, 3 * PATCH * PATCH)


def inkling2_tiles(image: torch.Tensor, padding: int = 0) -> dict[str, torch.Tensor]:
    """The Inkling 2 processor's `[6, 8, 8, C]` tiles of a 16x24 image (normalisation off), then `padding` slots of -1
    (as Gemma 4 Unified pads its merged patches)."""
    processor = PROCESSORS["inkling2"]
    processor.do_normalize = False
    try:
        tiles = AutoAdapter._process(processor, image[None])["pixel_values"]
    finally:
        processor.do_normalize = True
    return {"pixel_values": torch.cat([tiles, torch.full((padding, *tiles.shape[1:]), -1.0)])}


def raster_tiles(image: torch.Tensor) -> torch.Tensor:
    """`[1, 6, 4 * 3*p*p]` the 8-px tiles of a 16x24 image in raster order, each its 4 raster patches concatenated."""
    return raster_patches(image).reshape(1, 2, 2, 3, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(1, 6, -1)


def test_tiles_of_several_patches_are_read_at_the_encoder_patch_resolution():
    """Inkling 2: six 8-px tiles of a 16x24 image are a 4x6 grid of 4-px patches, tile after tile: one CLS token plus
    one per patch read back in raster order, one token per tile (the merger's) in raster order over tiles."""
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(5))
    grid = layout("inkling2")
    assert (grid.rows, grid.cols, grid.slots, grid.split) == (4, 6, 24, 2) and not grid.is_raster
    assert grid.raster[:8].tolist() == [0, 1, 6, 7, 2, 3, 8, 9]  # the first two tiles, raster within each
    patches = tower_cut_tiles(inkling2_tiles(image)["pixel_values"])
    cls = torch.full((1, 1, patches.shape[-1]), 99.0)
    assert torch.equal(to_raster(torch.cat([cls, patches], dim=1), grid, "inkling2"), raster_patches(image))
    merged = patches.reshape(1, 6, -1)  # the merger concatenates each tile's 4 patches
    assert torch.equal(to_raster(merged, grid, "inkling2"), raster_tiles(image))


def test_padded_tiles_give_their_real_tokens_one_per_tile_or_one_per_patch():
    """Two padding slots after six tiles: tokens one per slot or one per patch of every slot, padding included, read
    back as the real tiles' or patches' (a tower that takes each tile as one patch, Gemma 4 Unified's, gives the
    former)."""
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(6))
    grid = measure_patch_layout(
        PROCESSORS["inkling2"], lambda _, images: inkling2_tiles(images[0], 2), 16, 24, PATCH, "toy"
    )
    assert (grid.rows, grid.cols, grid.slots, grid.split) == (4, 6, 32, 2)
    patches = tower_cut_tiles(inkling2_tiles(image)["pixel_values"])
    per_patch = torch.cat([patches, torch.full((1, 8, patches.shape[-1]), 99.0)], dim=1)
    assert torch.equal(to_raster(per_patch, grid, "toy"), raster_patches(image))
    per_tile = per_patch.reshape(1, 8, -1)
    assert torch.equal(to_raster(per_tile, grid, "toy"), raster_tiles(image))


@pytest.mark.parametrize("patch", [1, 3, 8])
def test_tiles_that_are_no_whole_number_of_smaller_patches_stay_slots(patch):
    """Negative control: a tower that names no patch size (1), a patch that does not divide the tile (3), or one the
    size of the tile (8) leaves the processor's 8-px slots as they are."""
    grid = measure_patch_layout(PROCESSORS["inkling2"], AutoAdapter._process, 16, 24, patch, "inkling2")
    assert (grid.rows, grid.cols, grid.slots, grid.split) == (2, 3, 6, 1) and grid.is_raster


@pytest.mark.parametrize(
    ("arch", "source", "native"),
    [
        ("minicpmv4_6", "vision", (32, 32)),
        ("kosmos-2.5", "vision", (32, 32)),
        ("molmo2", "vision", (32, 32)),
        ("inkling_mm_model", "vision", None),
        ("inkling2", "vision", None),  # a 4-px patch of an 8-px tile
        ("inkling2", "projector", None),  # a tile of 2x2 patches, merged
    ],
)
def test_changing_one_patch_moves_its_own_token(arch, source, native, tiny_checkpoint):
    """The real tiny architectures, end to end: the token indexed at a place is the one its pixels move. MiniCPM-V
    and Kosmos-2.5 resize whatever they are told: the adapter feeds them the size they keep."""
    adapter = AutoAdapter(str(tiny_checkpoint(arch)), feature_source=source)
    assert adapter.native_size == native
    rows, cols = adapter.token_grid(32, 32)
    stride = adapter.patch_stride
    base = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.25
    before = adapter.encode_images(base)
    for row, col in [(0, cols - 1), (rows - 1, 0), (rows // 2, cols // 2)]:
        image = base.clone()
        image[..., row * stride : (row + 1) * stride, col * stride : (col + 1) * stride] = 1.0
        change = (adapter.encode_images(image) - before).norm(dim=-1)[0]
        assert change.argmax().item() == row * cols + col


class TilesReadAsRaster(AutoAdapter):
    """The tile-major patches of Inkling 2 read as if they were raster: the layout the split of tiles replaces."""

    def patch_layout(self, height: int, width: int) -> PatchLayout:
        grid = super().patch_layout(height, width)
        return PatchLayout.raster_grid(grid.rows, grid.cols)


def test_tile_major_patches_read_as_raster_are_caught(tiny_checkpoint):
    """Negative control: Inkling 2's patches, tile after tile, read as raster fail `raster_order` and move the wrong
    token, where the measured layout passes both."""
    path = str(tiny_checkpoint("inkling2"))
    check_raster_order(AutoAdapter(path), 32)
    adapter = TilesReadAsRaster(path)
    assert adapter.token_grid(32, 32) == (8, 8)
    with pytest.raises(AssertionError, match="not in raster order"):
        check_raster_order(adapter, 32)
    base = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.25
    image = base.clone()
    image[..., 0:4, 28:32] = 1.0  # raster patch 7, (0, 7): the tower's token 13 (tile 3, within it (0, 1))
    change = (adapter.encode_images(image) - adapter.encode_images(base)).norm(dim=-1)[0]
    assert change.argmax().item() == 13
