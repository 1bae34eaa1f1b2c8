"""The adapter conformance suite: every adapter passes it unchanged (peft's `PeftCommonTester` pattern).

Shipped with vugen so third-party adapters can run it too (it needs pytest, a dev extra). The checks themselves are
plain functions in :mod:`vugen.conformance` (what ``vugen check`` runs on a user's checkpoint); each test here calls
one of them.

Use it by subclassing `AdapterConformance` in a `Test*` class that provides two fixtures:
`adapter` (the adapter under test) and `image_size` (a side in pixels the adapter accepts).
"""

from __future__ import annotations

import pytest

from vugen import conformance
from vugen.conformance import PROMPTS

__all__ = ["PROMPTS", "AdapterConformance"]


class AdapterConformance:
    """Behaviour every `VLMAdapter` must show. Subclasses provide the `adapter` and `image_size` fixtures."""

    # ----------------------------------------------------------------- vision
    def test_feature_shape_matches_grid_and_dim(self, adapter, image_size):
        conformance.check_feature_shape(adapter, image_size)

    @pytest.mark.parametrize("axis", [3, 2], ids=["columns", "rows"])
    def test_tokens_are_in_raster_order(self, adapter, image_size, axis):
        conformance.check_raster_order(adapter, image_size, axes=(axis,))

    def test_encoding_is_deterministic(self, adapter, image_size):
        conformance.check_deterministic_encoding(adapter, image_size)

    def test_vlm_is_frozen_and_in_eval_mode(self, adapter, image_size):
        conformance.check_frozen(adapter, image_size)

    # ----------------------------------------------------------------- language
    def test_tokenize_left_pads_and_applies_template(self, adapter, image_size):
        conformance.check_tokenize(adapter, image_size)

    def test_embeddings_have_hidden_size(self, adapter, image_size):
        conformance.check_embeddings(adapter, image_size)

    def test_gradients_reach_inputs_not_the_vlm(self, adapter, image_size):
        conformance.check_gradients(adapter, image_size)

    def test_kv_cache_gives_the_same_hidden_states(self, adapter, image_size):
        conformance.check_kv_cache(adapter, image_size)

    def test_padding_does_not_change_a_prompt(self, adapter, image_size):
        conformance.check_padding(adapter, image_size)

    def test_positions_are_the_language_models_own(self, adapter, image_size):
        conformance.check_positions(adapter, image_size)

    def test_latent_attention_mask_is_obeyed_with_and_without_cache(self, adapter, image_size):
        conformance.check_latent_attention(adapter, image_size)

    # ----------------------------------------------------------------- training plumbing
    def test_lora_targets_exist_and_sit_only_in_the_language_model(self, adapter, image_size):
        conformance.check_lora_targets(adapter, image_size)

    def test_block_classes_are_modules_of_the_vlm(self, adapter, image_size):
        conformance.check_block_classes(adapter, image_size)

    def test_save_and_reload_gives_identical_features(self, adapter, image_size, tmp_path):
        conformance.check_save_and_reload(adapter, image_size, tmp_path)

    def test_describe_names_an_importable_class(self, adapter, image_size):
        conformance.check_describe(adapter, image_size)
