"""Idefics3 / SmolVLM adapters on tiny checkpoints: fast pixels, tile size, connector order, grey images."""

from __future__ import annotations

import pytest
import torch

from vugen.conformance import check_raster_order
from vugen_adapters.auto import AutoAdapter
from vugen_adapters.idefics3 import Idefics3Adapter, SmolVLMAdapter

FAMILIES = {"idefics3": Idefics3Adapter, "smolvlm": SmolVLMAdapter}
SCALE = 2  # the tiny connector's pixel-shuffle factor


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def adapter(family, tiny_checkpoint) -> Idefics3Adapter:
    return FAMILIES[family](str(tiny_checkpoint(family)))


@pytest.fixture(scope="module")
def projector_adapter(family, tiny_checkpoint) -> Idefics3Adapter:
    return FAMILIES[family](str(tiny_checkpoint(family)), feature_source="projector")


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_fast_pixels_equal_the_hf_processor(adapter):
    x = images()
    fast = adapter.pixel_inputs(x)
    # The processor's own call for one whole-image tile per sample (a flat list would be ONE sample).
    reference = adapter.image_processor(
        images=[[image] for image in x],
        do_resize=False,
        do_image_splitting=False,
        do_rescale=False,
        return_tensors="pt",
    )
    assert fast["pixel_values"].shape == (2, 1, 3, 32, 32)
    torch.testing.assert_close(fast["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(fast["pixel_attention_mask"], reference["pixel_attention_mask"])


def test_native_size_is_one_tile_of_max_image_size(adapter):
    assert adapter.native_size == (32, 32)  # max_image_size; the processor's `size` (64) is for splitting
    assert adapter.token_grid(64, 64) == (8, 8) and adapter.patch_stride == 4
    assert adapter.encode_images(images(size=64)).shape == (2, 64, 32)


def test_features_equal_get_image_features(adapter, projector_adapter):
    x = images()
    inputs = adapter.pixel_inputs(x)
    reference = adapter.vlm.model.get_image_features(**inputs)
    torch.testing.assert_close(adapter.encode_images(x), reference.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(projector_adapter.encode_images(x), torch.stack(reference.pooler_output), rtol=0, atol=0)


def test_connector_tokens_are_raster_blocks_of_vision_tokens(adapter, projector_adapter):
    """Regroup raster vision tokens into scale x scale blocks ourselves (rows, then columns, then channels):
    the connector's projection of block (i, j) must be projector token i * cols + j."""
    x = images(seed=1)
    vision, projected = adapter.encode_images(x), projector_adapter.encode_images(x)
    rows, cols = 8 // SCALE, 8 // SCALE
    blocks = vision.reshape(2, rows, SCALE, cols, SCALE, -1).permute(0, 1, 3, 2, 4, 5).reshape(2, rows * cols, -1)
    expected = adapter.vlm.model.connector.modality_projection(blocks)
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-6)
    assert projector_adapter.token_grid(32, 32) == (rows, cols)


@pytest.mark.parametrize("axis", [3, 2], ids=["columns", "rows"])
def test_projector_tokens_are_raster(projector_adapter, axis):
    check_raster_order(projector_adapter, 32, axes=(axis,))


def test_uniform_grey_images_are_not_dropped(adapter):
    # Mid-grey normalises to exact zeros under mean = std = 0.5: HF's get_image_features takes it for padding.
    x = torch.cat([torch.full((1, 3, 32, 32), 0.5), images(batch=1)])
    inputs = adapter.pixel_inputs(x)
    assert [len(tokens) for tokens in adapter.vlm.model.get_image_features(**inputs).pooler_output] == [0, 16]
    features = adapter.encode_images(x)
    tower = adapter.vlm.model.vision_model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state
    torch.testing.assert_close(features[:1], tower, rtol=0, atol=0)
    torch.testing.assert_close(features[1:], adapter.encode_images(x[1:]), rtol=0, atol=1e-6)


def test_auto_adapter_reads_the_same_vision_tokens(adapter, family, tiny_checkpoint):
    x = images(seed=2)
    auto = AutoAdapter(str(tiny_checkpoint(family)))
    torch.testing.assert_close(auto.encode_images(x), adapter.encode_images(x), rtol=0, atol=1e-6)
