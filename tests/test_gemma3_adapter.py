"""Gemma 3 adapter on a tiny checkpoint: pooled projector order, sliding-window KV cache, the text path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from vugen.conformance import check_raster_order
from vugen_adapters.gemma3 import Gemma3Adapter

PROMPTS = ["a large red circle on the left", "a small blue square to the left of a large yellow triangle"]


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint) -> Gemma3Adapter:
    return Gemma3Adapter(str(tiny_checkpoint("gemma3")))


@pytest.fixture(scope="module")
def projector_adapter(tiny_checkpoint) -> Gemma3Adapter:
    return Gemma3Adapter(str(tiny_checkpoint("gemma3")), feature_source="projector")


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_projector_tokens_are_raster_average_pools(adapter, projector_adapter):
    """Pool the raster 8x8 vision grid 2x2 ourselves, then norm and project: the projector tokens, in order."""
    x = images(seed=1)
    vision = adapter.encode_images(x)
    grid = vision.transpose(1, 2).reshape(2, -1, 8, 8)
    pooled = F.avg_pool2d(grid, kernel_size=2).flatten(2).transpose(1, 2)
    projector = adapter.vlm.model.multi_modal_projector
    expected = projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight
    torch.testing.assert_close(projector_adapter.encode_images(x), expected, rtol=1e-5, atol=1e-6)
    assert projector_adapter.token_grid(32, 32) == (4, 4)


@pytest.mark.parametrize("axis", [3, 2], ids=["columns", "rows"])
def test_projector_tokens_are_raster(projector_adapter, axis):
    check_raster_order(projector_adapter, 32, axes=(axis,))


def test_projector_tokens_are_the_image_embeddings_of_a_full_forward(projector_adapter, tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("gemma3"))
    x = images(batch=1, seed=2)
    inputs = processor(images=[x[0]], text=["<start_of_image> a red circle"], do_rescale=False, return_tensors="pt")
    assert inputs["token_type_ids"].sum() == 16  # Gemma 3 reads image blocks from token_type_ids
    captured = {}

    def keep(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    vlm = projector_adapter.vlm
    hook = vlm.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        vlm(**inputs)
    finally:
        hook.remove()
    image_embeds = captured["embeds"][inputs["token_type_ids"].bool()]
    torch.testing.assert_close(image_embeds, projector_adapter.encode_images(x)[0], rtol=1e-5, atol=1e-5)


def test_kv_cache_across_the_sliding_window(adapter):
    """A prompt longer than the window, then a latent block longer than the window, from a copied prompt cache
    (the sampler reuses one prompt cache at every flow step): equal to one uncached pass."""
    window = adapter.vlm.config.text_config.sliding_window
    encoding = adapter.tokenize(PROMPTS)
    prompt, mask = adapter.embed_tokens(encoding["input_ids"]), encoding["attention_mask"]
    assert mask.sum(-1).min() > window
    _, prompt_cache = adapter.run_language_model(prompt, mask)
    assert prompt_cache.layers[0].keys.shape[-2] == window - 1  # the sliding layer keeps only its window
    for seed in (0, 1):
        latents = torch.randn(2, window + 4, adapter.hidden_size, generator=torch.Generator().manual_seed(seed))
        full_mask = torch.cat([mask, torch.ones(2, latents.shape[1], dtype=mask.dtype)], dim=1)
        full, _ = adapter.run_language_model(torch.cat([prompt, latents], dim=1), full_mask)
        tail, _ = adapter.run_language_model(latents, full_mask, past_key_values=copy.deepcopy(prompt_cache))
        torch.testing.assert_close(tail, full[:, prompt.shape[1] :], rtol=1e-5, atol=1e-5)


def test_embeddings_and_language_model_match_the_models_text_path(adapter):
    encoding = adapter.tokenize(PROMPTS)
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    embeds = adapter.embed_tokens(ids)
    raw = adapter.vlm.get_input_embeddings().weight[ids]
    torch.testing.assert_close(embeds, raw * adapter.hidden_size**0.5, rtol=1e-6, atol=1e-6)
    hidden, _ = adapter.run_language_model(embeds, mask)
    reference = adapter.vlm.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    torch.testing.assert_close(hidden[mask.bool()], reference.last_hidden_state[mask.bool()], rtol=1e-5, atol=1e-5)
