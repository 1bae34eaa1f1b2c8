"""Qwen family adapters on tiny checkpoints: fast pixel path, patch layout, feature order, language model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from vugen_adapters.auto import AutoAdapter, normalized_pixels
from vugen_adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter, flatten_patches
from vugen_adapters.tiny import build_tiny_vlm

FAMILIES = {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter, "qwen3_vl": Qwen3VLAdapter}
# Square, non-square, and (for Qwen2.5-VL's 32-px windows) several attention windows per image.
SIZES = [(32, 32), (32, 48), (64, 64)]
PATCH, MERGE = 8, 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-qwen")
    return {family: str(build_tiny_vlm(family, root / family)) for family in FAMILIES}


@pytest.fixture(scope="module")
def adapters(checkpoints: dict[str, str]) -> dict[str, Qwen2VLAdapter]:
    return {family: cls(checkpoints[family]) for family, cls in FAMILIES.items()}


@pytest.fixture(scope="module")
def projector_adapters(checkpoints: dict[str, str]) -> dict[str, Qwen2VLAdapter]:
    return {family: cls(checkpoints[family], feature_source="projector") for family, cls in FAMILIES.items()}


def images(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def raster_patches(pixels: torch.Tensor, temporal: int) -> torch.Tensor:
    """Independent reference: `[B, h*w, C*T*p*p]` patches in raster order, cut with `F.unfold`."""
    columns = F.unfold(pixels, kernel_size=PATCH, stride=PATCH)  # [B, C*p*p, h*w], raster over patches
    batch, _, tokens = columns.shape
    per_channel = columns.transpose(1, 2).reshape(batch, tokens, 3, 1, PATCH * PATCH)
    return per_channel.expand(-1, -1, -1, temporal, -1).reshape(batch, tokens, -1)


def raster_to_blocks(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`[B, rows*cols, D]` raster -> `[B * rows*cols/m^2, m*m*D]`: each merge block's tokens, row by row."""
    batch, _, dim = features.shape
    grid = features.reshape(batch, rows // MERGE, MERGE, cols // MERGE, MERGE, dim)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(-1, MERGE * MERGE * dim)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_fast_pixels_equal_the_hf_processor(adapters, family, size):
    adapter = adapters[family]
    x = images(size)
    fast = adapter.pixel_inputs(x)
    reference = adapter.processor_inputs(x)  # the checkpoint's own image processor
    assert set(fast) == set(reference) == {"pixel_values", "image_grid_thw"}
    assert torch.equal(fast["pixel_values"], reference["pixel_values"])
    assert torch.equal(fast["image_grid_thw"], reference["image_grid_thw"])
    assert fast["image_grid_thw"].tolist() == [[1, size[0] // PATCH, size[1] // PATCH]] * 2


@pytest.mark.parametrize("size", SIZES)
def test_unpermuted_patches_are_raster(adapters, size):
    adapter = adapters["qwen2_vl"]
    x = images(size)
    inputs = adapter.pixel_inputs(x)
    # The un-permutation the "vision" tokens go through, applied to the patches themselves.
    raster = adapter.select_features(SimpleNamespace(last_hidden_state=inputs["pixel_values"]), size, batch=2)
    expected = raster_patches(normalized_pixels(x, adapter.image_processor, torch.float32), temporal=2)
    assert torch.equal(raster, expected)


def test_flatten_patches_rejects_sizes_off_the_merge_grid():
    with pytest.raises(ValueError, match="multiples of 16 px"):
        flatten_patches(torch.zeros(1, 3, 32, 24), patch=PATCH, merge=MERGE, temporal=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_rejects_sizes_off_the_merge_grid(adapters, family):
    with pytest.raises(ValueError, match="multiples of 16 px"):
        adapters[family].encode_images(torch.zeros(1, 3, 40, 40))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_vision_tokens_are_raster_and_feed_the_merger(adapters, projector_adapters, family, size):
    """Regroup the raster "vision" tokens into merge blocks ourselves: the VLM's merger must then give the
    "projector" tokens, raster over the merged grid. A token out of place anywhere breaks the equality."""
    vision, projector = adapters[family], projector_adapters[family]
    x = images(size)
    rows, cols = size[0] // PATCH, size[1] // PATCH
    features, merged = vision.encode_images(x), projector.encode_images(x)
    assert vision.token_grid(*size) == (rows, cols) and projector.token_grid(*size) == (rows // 2, cols // 2)
    assert features.shape == (2, rows * cols, 32) and merged.shape == (2, rows * cols // 4, 64)
    blocks = raster_to_blocks(features, rows, cols)
    merger = vision.vlm.model.visual.merger
    # The merger normalises each token before concatenating a block: feed it the block's tokens in order.
    expected = merger(blocks.reshape(-1, features.shape[-1])).reshape(merged.shape)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert not features.requires_grad


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("size", SIZES)
def test_auto_adapter_gives_the_same_features(adapters, checkpoints, family, size):
    auto = AutoAdapter(checkpoints[family])
    x = images(size, seed=1)
    torch.testing.assert_close(auto.encode_images(x), adapters[family].encode_images(x), rtol=0, atol=1e-6)


def test_auto_adapter_agrees_on_qwen2_5_within_one_window(adapters, checkpoints):
    # Beyond one attention window AutoAdapter reads Qwen2.5-VL's window-ordered tokens (see the module docstring).
    x = images((32, 32), seed=1)
    auto = AutoAdapter(checkpoints["qwen2_5_vl"])
    torch.testing.assert_close(auto.encode_images(x), adapters["qwen2_5_vl"].encode_images(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_cache_and_positions(adapters, family):
    adapter = adapters[family]
    batch = adapter.tokenize(["a red circle", "a small blue square to the left of a large yellow triangle"])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # left padding
    embeds = adapter.embed_tokens(batch["input_ids"])
    full, _ = adapter.run_language_model(embeds, mask)
    split = embeds.shape[1] - 3
    _, cache = adapter.run_language_model(embeds[:, :split], mask[:, :split])
    tail, _ = adapter.run_language_model(embeds[:, split:], mask, past_key_values=cache)
    torch.testing.assert_close(tail, full[:, split:], rtol=1e-5, atol=1e-5)
    # Reference positions: the full VLM on the same text builds its own 3-D M-RoPE positions.
    reference = adapter.vlm.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    torch.testing.assert_close(full[mask.bool()], reference[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_the_language_model_projections(adapters, family):
    adapter = adapters[family]
    names = {name.rsplit(".", 1)[-1] for name, _ in adapter.language_model.named_modules()}
    assert set(adapter.lora_target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert set(adapter.lora_target_modules) <= names


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_runs_a_full_vlm_forward(adapters, checkpoints, family):
    processor = AutoProcessor.from_pretrained(checkpoints[family])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    x = images((32, 48))
    inputs = processor(text=[text] * 2, images=list(x), return_tensors="pt", do_rescale=False, padding=True)
    vlm = adapters[family].vlm
    assert (inputs["input_ids"] == vlm.config.image_token_id).sum(1).tolist() == [6, 6]  # 4x6 patches merged 2x2
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == vlm.config.image_token_id)
    logits = vlm(**inputs).logits
    assert logits.shape == (2, inputs["input_ids"].shape[1], len(processor.tokenizer)) and logits.isfinite().all()
