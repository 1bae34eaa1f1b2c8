"""The adapter conformance suite: every adapter passes it unchanged (peft's `PeftCommonTester` pattern).

Shipped with vugen so third-party adapters can run it too (it needs pytest, a dev extra).

Use it by subclassing `AdapterConformance` in a `Test*` class that provides two fixtures:
`adapter` (the adapter under test) and `image_size` (a side in pixels the adapter accepts).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from peft import LoraConfig, get_peft_model

PROMPTS = ["a large red circle on the left", "a small blue square"]


def half_images(size: int, axis: int) -> torch.Tensor:
    """Two images: dark then bright along `axis` (3: left|right, 2: top|bottom), and the mirror image."""
    image = torch.zeros(1, 3, size, size)
    image.narrow(axis, size // 2, size - size // 2).fill_(1.0)
    return torch.cat([image, image.flip(axis)])


def separation_auc(score: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a positive token scores above a negative one (1.0: perfect separation)."""
    pos, neg = score[positive], score[negative]
    return (pos[:, None] > neg[None, :]).float().mean().item()


class AdapterConformance:
    """Behaviour every `VLMAdapter` must show. Subclasses provide the `adapter` and `image_size` fixtures."""

    def images(self, size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    # ----------------------------------------------------------------- vision
    def test_feature_shape_matches_grid_and_dim(self, adapter, image_size):
        rows, cols = adapter.token_grid(image_size, image_size)
        features = adapter.encode_images(self.images(image_size))
        assert features.shape == (2, rows * cols, adapter.feature_dim)
        assert features.is_floating_point() and torch.isfinite(features).all()
        assert features.std() > 0, "features are constant"

    @pytest.mark.parametrize("axis", [3, 2], ids=["columns", "rows"])
    def test_tokens_are_in_raster_order(self, adapter, image_size, axis):
        # Tokens over the bright half change most between an image and its mirror: if the order were not
        # raster, the tokens we index as "right half" would be a mix of both halves.
        rows, cols = adapter.token_grid(image_size, image_size)
        features = adapter.encode_images(half_images(image_size, axis)).float()
        base = adapter.encode_images(torch.zeros(1, 3, image_size, image_size)).float()
        change = (features - base).norm(dim=-1)  # [2, N]
        score = (change[0] - change[1]).reshape(rows, cols)
        count = cols if axis == 3 else rows
        first, second = (torch.arange(count) * 2 + 2 <= count), (torch.arange(count) * 2 >= count)
        score = score if axis == 3 else score.T  # lines along the split axis become columns
        positive = second.expand(score.shape[0], -1).reshape(-1)
        negative = first.expand(score.shape[0], -1).reshape(-1)
        assert separation_auc(score.reshape(-1), positive, negative) >= 0.95

    def test_encoding_is_deterministic(self, adapter, image_size):
        images = self.images(image_size)
        assert torch.equal(adapter.encode_images(images), adapter.encode_images(images))

    def test_vlm_is_frozen_and_in_eval_mode(self, adapter, image_size):
        adapter.train()
        assert not adapter.training and not any(m.training for m in adapter.modules())
        assert not any(p.requires_grad for p in adapter.parameters())
        assert not adapter.encode_images(self.images(image_size)).requires_grad

    # ----------------------------------------------------------------- language
    def test_tokenize_left_pads_and_applies_template(self, adapter):
        encoding = adapter.tokenize(PROMPTS)
        ids, mask = encoding["input_ids"], encoding["attention_mask"]
        assert ids.shape == mask.shape and ids.dtype == torch.long and ids.shape[0] == len(PROMPTS)
        assert mask[:, -1].all(), "prompts must end at the same position (left padding)"
        lengths = mask.sum(-1)
        assert lengths[0] > lengths[1] and not mask[1, 0], "the shorter prompt is padded on the left"
        assert mask[1, -int(lengths[1]) :].all()

    def test_embeddings_have_hidden_size(self, adapter):
        embeds = adapter.embed_tokens(adapter.tokenize(PROMPTS)["input_ids"])
        assert embeds.shape[-1] == adapter.hidden_size

    def test_gradients_reach_inputs_not_the_vlm(self, adapter):
        encoding = adapter.tokenize(PROMPTS)
        embeds = adapter.embed_tokens(encoding["input_ids"]).detach().float().requires_grad_(True)
        hidden, _ = adapter.run_language_model(embeds.to(adapter.dtype), encoding["attention_mask"])
        hidden.float().square().mean().backward()
        assert embeds.grad is not None and embeds.grad.abs().sum() > 0
        assert all(p.grad is None for p in adapter.parameters())

    def test_kv_cache_gives_the_same_hidden_states(self, adapter):
        encoding = adapter.tokenize(PROMPTS)
        ids, mask = encoding["input_ids"], encoding["attention_mask"]
        full, _ = adapter.run_language_model(adapter.embed_tokens(ids), mask)
        split = ids.shape[1] - 3
        _, cache = adapter.run_language_model(adapter.embed_tokens(ids[:, :split]), mask[:, :split])
        tail, _ = adapter.run_language_model(adapter.embed_tokens(ids[:, split:]), mask, past_key_values=cache)
        torch.testing.assert_close(tail, full[:, split:], atol=1e-5, rtol=1e-4)

    def test_padding_does_not_change_a_prompt(self, adapter):
        alone = adapter.tokenize(PROMPTS[1:])
        batch = adapter.tokenize(PROMPTS)
        hidden_alone, _ = adapter.run_language_model(adapter.embed_tokens(alone["input_ids"]), alone["attention_mask"])
        hidden_batch, _ = adapter.run_language_model(adapter.embed_tokens(batch["input_ids"]), batch["attention_mask"])
        torch.testing.assert_close(hidden_batch[1, -1], hidden_alone[0, -1], atol=1e-5, rtol=1e-4)

    # ----------------------------------------------------------------- training plumbing
    def test_lora_targets_exist_and_sit_only_in_the_language_model(self, adapter, image_size):
        images = self.images(image_size)
        before = adapter.encode_images(images)
        clone = copy.deepcopy(adapter)
        get_peft_model(clone.language_model, LoraConfig(r=4, target_modules=clone.lora_target_modules))
        lora_layers = [m for m in clone.modules() if hasattr(m, "lora_A")]
        assert lora_layers, "no LoRA layer was created"
        in_language_model = {id(m) for m in clone.language_model.modules()}
        assert all(id(m) in in_language_model for m in lora_layers), "a LoRA layer sits outside the LM"
        torch.testing.assert_close(clone.encode_images(images), before, atol=0, rtol=0)

    def test_block_classes_are_modules_of_the_vlm(self, adapter):
        classes = adapter.block_classes
        assert classes, "no FSDP / checkpointing unit"
        present = {type(m) for m in adapter.modules()}
        assert classes <= present
        assert any(isinstance(m, tuple(classes)) for m in adapter.language_model.modules())

    def test_save_and_reload_gives_identical_features(self, adapter, image_size, tmp_path):
        adapter.save_pretrained(tmp_path)
        reloaded = type(adapter)(pretrained=str(tmp_path))
        images = self.images(image_size)
        assert torch.equal(reloaded.encode_images(images), adapter.encode_images(images))
        assert torch.equal(reloaded.tokenize(PROMPTS)["input_ids"], adapter.tokenize(PROMPTS)["input_ids"])

    def test_describe_names_an_importable_class(self, adapter):
        record = adapter.describe()
        module, _, name = record["class_path"].rpartition(".")
        assert getattr(importlib.import_module(module), name) is type(adapter)
        assert record["pretrained"] == adapter.pretrained
