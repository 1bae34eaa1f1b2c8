"""InternVL adapter on tiny checkpoints: the tokens the projector reads, pixel-shuffle order."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from vugen.conformance import check_raster_order
from vugen_adapters.auto import AutoAdapter
from vugen_adapters.internvl import InternVLAdapter
from vugen_adapters.tiny.internvl import tiny_internvl


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint) -> InternVLAdapter:
    return InternVLAdapter(str(tiny_checkpoint("internvl")))


@pytest.fixture(scope="module")
def projector_adapter(tiny_checkpoint) -> InternVLAdapter:
    return InternVLAdapter(str(tiny_checkpoint("internvl")), feature_source="projector")


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def projector_input(adapter: InternVLAdapter, x: torch.Tensor) -> torch.Tensor:
    """What InternVL's own `get_image_features` hands its projector (captured with a hook)."""
    captured = []
    hook = adapter.vlm.model.multi_modal_projector.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        adapter.vlm.model.get_image_features(pixel_values=adapter.pixel_inputs(x)["pixel_values"])
    finally:
        hook.remove()
    return captured[0]


def shuffled(vision: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Independent pixel shuffle: token (i, j) concatenates patches (2i + r, 2j + c) in (r, c) order."""
    grid = vision.reshape(vision.shape[0], rows // 2, 2, cols // 2, 2, -1)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(vision.shape[0], rows * cols // 4, -1)


def test_list_patch_size_is_read(adapter):
    assert list(adapter.vision_config.patch_size) == [4, 4]
    assert adapter.vit_patch_size == 4 and adapter.token_grid(32, 32) == (8, 8)


def test_vision_tokens_pixel_shuffled_are_the_projector_input(adapter):
    x = images(seed=1)
    vision = adapter.encode_images(x)
    assert vision.shape == (2, 64, 32)  # CLS dropped
    torch.testing.assert_close(shuffled(vision, 8, 8), projector_input(adapter, x), rtol=0, atol=0)


def test_projector_tokens_are_the_projection_of_raster_blocks(adapter, projector_adapter):
    x = images(seed=2)
    expected = adapter.vlm.model.multi_modal_projector(shuffled(adapter.encode_images(x), 8, 8))
    torch.testing.assert_close(projector_adapter.encode_images(x), expected, rtol=1e-5, atol=1e-6)
    assert projector_adapter.token_grid(32, 32) == (4, 4)


@pytest.mark.parametrize("axis", [3, 2], ids=["columns", "rows"])
def test_projector_tokens_are_raster(projector_adapter, axis):
    check_raster_order(projector_adapter, 32, axes=(axis,))


def test_last_layer_is_read_after_the_towers_final_norm(tmp_path):
    """With `use_mean_pooling=False` the tower ends in a LayerNorm: layer -1 is `last_hidden_state`, as in
    InternVL's `get_image_features`, not `hidden_states[-1]` (which the generic lookup would read)."""
    torch.manual_seed(0)
    model, processor = tiny_internvl()
    model.config.vision_config.use_mean_pooling = False
    model = InternVLForConditionalGeneration(model.config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    adapter = InternVLAdapter(str(tmp_path))
    x = images(seed=3)
    torch.testing.assert_close(shuffled(adapter.encode_images(x), 8, 8), projector_input(adapter, x), rtol=0, atol=0)
    assert not torch.allclose(AutoAdapter(str(tmp_path)).encode_images(x), adapter.encode_images(x))
