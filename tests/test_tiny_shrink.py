"""The generic config shrink of `vugen tiny ARCH` (tiny.shrink) on real default configs: the rules that keep what a
config class validates (per-layer overrides on the shrunk layers, tied sizes, pyramid stages, list-valued sizes)."""

from __future__ import annotations

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vugen_adapters.tiny.shrink import IMAGE_SIZE, PATCH_SIZE, TEXT_WIDTH, VISION_WIDTH, shrink_config_dict

VOCAB = 300


def _shrunk(arch: str) -> dict:
    return shrink_config_dict(CONFIG_MAPPING[arch]().to_dict(), VOCAB)


def test_per_layer_overrides_follow_their_layer_kind_onto_the_shrunk_depth():
    """Gemma 4's full-attention layers (5, 11, ...) override head_dim: the override lands on the shrunk full layer."""
    text = _shrunk("gemma4")["text_config"]
    assert text["layer_types"] == ["sliding_attention", "full_attention"]
    assert text["per_layer_config"] == {"1": {"head_dim": TEXT_WIDTH // 4}}
    CONFIG_MAPPING["gemma4"].from_dict(_shrunk("gemma4"))  # validates the layer indices


def test_sizes_equal_in_the_deep_config_stay_equal():
    shrunk = _shrunk("dots3_note")["text_config"]  # plain multi-head attention (128 heads, 128 kv heads)
    assert shrunk["num_key_value_heads"] == shrunk["num_attention_heads"]
    audio = _shrunk("apertus1p5")["audio_config"]  # WavTokenizer: codebook_dim = hidden_size
    assert audio["codebook_dim"] == audio["hidden_size"] == VISION_WIDTH


def test_mla_query_head_stays_the_sum_of_its_parts():
    shrunk = _shrunk("mistral4")  # head_dim 128 = qk_nope 64 + qk_rope 64
    assert shrunk["head_dim"] == shrunk["qk_nope_head_dim"] + shrunk["qk_rope_head_dim"]


def test_pyramid_keeps_a_layer_a_stage():
    audio = _shrunk("muse_spark")["audio_config"]
    assert audio["num_hidden_layers"] == len(audio["depths"]) == len(audio["hidden_sizes"]) == 4
    assert audio["depths"] == [1] * 4 and max(audio["hidden_sizes"]) == VISION_WIDTH


@pytest.mark.parametrize(
    ("arch", "path", "expected"),
    [
        ("gemma3n", ("text_config", "intermediate_size"), [2 * TEXT_WIDTH] * 2),  # one per layer
        ("molmo2", ("vision_config", "image_size"), [IMAGE_SIZE] * 2),  # [height, width]
        ("kosmos-2.5", ("vision_config", "patch_embed_hidden_size"), 3 * PATCH_SIZE**2),  # a flattened patch
        ("t5gemma2", ("encoder", "text_config", "hidden_size"), TEXT_WIDTH),  # a text model under "encoder"
        ("hunyuan_vl", ("vision_config", "max_image_size"), 2 * IMAGE_SIZE),  # sizes the position table (8M)
        # one layer of each block kind, attention included (two layers held only mamba and MoE)
        ("nemotron_h_omni", ("text_config", "layers_block_type"), ["linear_attention", "moe", "full_attention", "mlp"]),
    ],
)
def test_size_fields(arch, path, expected):
    value = _shrunk(arch)
    for key in path:
        value = value[key]
    assert value == expected


def test_a_tower_initialised_to_be_loaded_gets_a_random_init_that_sees_its_input():
    """SAM sub-configs initialise at std 1e-10 (weights meant to be loaded): a tiny tower that small returns the same
    tokens for every image. The shrink raises such ranges to the usual 0.02 and leaves the usual ones alone."""
    sam = _shrunk("unlimited_ocr")["vision_config"]["sam_config"]
    assert CONFIG_MAPPING["unlimited_ocr"]().vision_config.sam_config.initializer_range < 1e-8  # the negative control
    assert sam["initializer_range"] == 0.02
    text = _shrunk("unlimited_ocr")["text_config"]
    assert text["initializer_range"] == CONFIG_MAPPING["unlimited_ocr"]().text_config.initializer_range
