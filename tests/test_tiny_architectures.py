"""`vugen tiny ARCH DIR` for the architectures of transformers' image-text-to-text mapping (tiny.architecture).

A sample covering different traps is built, saved, reloaded with the Auto classes and run through its own processor
and a full forward with labels (which fails unless the processor writes as many image tokens as the vision path
emits). The whole survey is slow.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vugen.cli import main
from vugen_adapters.tiny import ARCHITECTURES, TINY_FAMILIES, TinyBuildError, build_tiny_vlm
from vugen_adapters.tiny.shrink import shrink_config_dict
from vugen_adapters.tiny.survey import survey
from vugen_adapters.tiny.verify import verify_tiny_checkpoint

# model_type -> the trap it covers; none of them has a hand-written recipe.
SAMPLE = {
    "glm4v": "Qwen-style packed patches, M-RoPE sections from the modeling code, vision start/end tokens",
    "lfm2_vl": "pixel-shuffle connector, hybrid conv/attention LM (layer_types), processor tile and patch sizes",
    "aya_vision": "pixel shuffle; the processor expands <image> into another token (<|IMG_PATCH|>)",
    "llava_next": "tiled images: grid pinpoints in multiples of the tiny image, CLIP's CLS counted",
    "qwen3_vl_moe": "MoE LM (experts, experts per token), deepstack layer indices, interleaved M-RoPE",
    "ovis2": "visual-tokenizer indicator token ids (a list field)",
    "shieldgemma2": "Gemma3 pooling: image_seq_length measured from the vision path (boi token as placeholder)",
    "idefics2": "perceiver resampler sub-config, image_seq_len measured from the model",
    "git": "no chat template on the processor class: the tokenizer's; no get_image_features",
    "blip-2": "image token field unset by default; the processor puts the query tokens before the prompt itself",
    "pp_chart2table": "the processor expands nothing: the prompt holds every image token (not the template's "
    "repeated <|im_end|>)",
    "minimax_m3_vl": "special tokens spelled as class constants (]<]image[>[), not as <|...|> literals",
    "kimi_k25": "MLA language model: one key per query head (multi-head attention stays multi-head)",
    "pix2struct": "encoder-decoder reading the image alone: the text is the decoder's input and target",
    "gemma4": "per-layer config overrides re-keyed onto the shrunk layers; a text-only default gets its vision config",
    "chameleon": "VQ image codes reach the LM by name: vocabulary_map is the tiny tokenizer's vocabulary",
}
TEXT_WIDTH_BOUND = 64
PARAMETER_BOUND = 2_000_000


@pytest.mark.parametrize("arch", SAMPLE)
def test_architecture_builds_reloads_and_runs_with_its_processor(arch, tmp_path):
    assert arch in ARCHITECTURES and arch not in TINY_FAMILIES
    directory = build_tiny_vlm(arch, tmp_path / arch)
    check = verify_tiny_checkpoint(directory)
    assert math.isfinite(check.loss) and check.loss > 0
    assert check.parameters < PARAMETER_BOUND, "the shrink left a real-size part"
    config = AutoConfig.from_pretrained(directory)
    text = config.get_text_config()
    assert text.hidden_size <= TEXT_WIDTH_BOUND and text.num_hidden_layers <= 4
    assert text.vocab_size < 1000  # the tiny tokenizer's, not the real vocabulary


def test_token_ids_point_into_the_tiny_vocabulary(tmp_path):
    """The real Qwen ids (151655, ...) would index past the tiny embedding: every id field is rewired."""
    directory = build_tiny_vlm("glm4v", tmp_path / "glm4v")
    config = json.loads((directory / "config.json").read_text())
    vocab = config["text_config"]["vocab_size"]
    ids = {key: value for key, value in config.items() if key.endswith("_token_id")}
    assert ids and all(0 <= value < vocab for value in ids.values()), ids


def test_shrink_keeps_multi_head_attention_multi_head():
    """DeepSeek-V3's MLA expands its latent into one key per query head: 128/128 heads shrink to 4/4, while a
    grouped-query model (Mistral: 32/8) still gets fewer key-value heads."""
    mla = shrink_config_dict(CONFIG_MAPPING["deepseek_v3"]().to_dict(), vocab_size=300)
    assert mla["num_key_value_heads"] == mla["num_attention_heads"] == 4
    grouped = shrink_config_dict(CONFIG_MAPPING["mistral"]().to_dict(), vocab_size=300)
    assert grouped["num_key_value_heads"] < grouped["num_attention_heads"]


def test_image_processor_keeps_a_whole_size_image_as_one_tower_tile(tmp_path):
    """What vugen's AutoAdapter relies on: LFM2-VL's image processor, with resizing and splitting off, leaves an image
    of its own size (32 px) as one tile of 8x8 patches. A minimum token count above one tile's (the real 64) would
    upscale it to 64 px (16x16 patches)."""
    directory = build_tiny_vlm("lfm2_vl", tmp_path / "lfm2_vl")
    processor = AutoImageProcessor.from_pretrained(directory)
    side = processor.size["height"]
    image = torch.rand(3, side, side)
    inputs = processor(images=[image], do_rescale=False, do_image_splitting=False, return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [[side // 4, side // 4]]
    assert processor.max_num_patches >= (side // 4) ** 2


def test_build_is_seeded(tmp_path):
    first = build_tiny_vlm("lfm2_vl", tmp_path / "a", seed=3)
    second = build_tiny_vlm("lfm2_vl", tmp_path / "b", seed=3)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_unknown_name_is_one_line_naming_the_choices(tmp_path):
    with pytest.raises(TinyBuildError) as error:
        build_tiny_vlm("not_a_vlm", tmp_path / "x")
    message = str(error.value)
    assert "\n" not in message and "'not_a_vlm'" in message
    assert "image-text-to-text" in message and "glm4v" in message and "llava_clip" in message
    assert not (tmp_path / "x").exists()


def test_architecture_that_cannot_be_built_says_why_in_one_line(tmp_path):
    """mistral4 maps to a text-only causal LM: refused, with the reason, before anything is written."""
    with pytest.raises(TinyBuildError, match=r"^mistral4: .*reads no image") as error:
        build_tiny_vlm("mistral4", tmp_path / "m")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "m").exists()


def test_vugen_tiny_command_takes_an_architecture(tmp_path, capsys):
    main(["tiny", "glm4v", str(tmp_path / "tiny")])
    assert capsys.readouterr().out.strip().endswith("tiny")
    assert AutoConfig.from_pretrained(tmp_path / "tiny").model_type == "glm4v"


# Verified in the survey of this commit (of 100; `python -m vugen_adapters.tiny.survey`).
SURVEY_VERIFIED_AT_LEAST = 72


@pytest.mark.slow
def test_survey_of_every_architecture_does_not_regress():
    rows = survey(verbose=False)
    assert len(rows) == len(ARCHITECTURES)
    verified = sum(row.verified for row in rows)
    assert verified >= SURVEY_VERIFIED_AT_LEAST, [row.arch for row in rows if not row.verified]
    assert all("\n" not in row.reason for row in rows)
