"""Bad input to adapters fails early, naming the path or argument and what was expected."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vugen_adapters.auto import AutoAdapter
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.source import RemoteCodeRefused


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    return LlavaAdapter(str(tiny_checkpoint("llava")))


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*holds no VLM: config.json is missing"):
        AutoAdapter(str(tmp_path))


def test_missing_local_folder_is_named():
    with pytest.raises(FileNotFoundError, match="no such folder './no/such/vlm'"):
        AutoAdapter("./no/such/vlm")


def test_remote_code_is_refused_with_how_to_opt_in(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint("llava"), tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeRefused, match="trust_remote_code: true.*pin `revision`"):
        AutoAdapter(str(folder))


def test_a_text_only_model_is_not_a_vlm(tmp_path):
    tiny = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(tiny).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an image-text-to-text VLM.*family adapter"):
        AutoAdapter(str(tmp_path))


def test_weights_without_processor_are_named(tiny_checkpoint, tmp_path):
    folder = tmp_path / "no-processor"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint("llava") / name, folder / name)
    with pytest.raises(OSError, match="no usable image processor or tokenizer"):
        AutoAdapter(str(folder))


@pytest.mark.parametrize(
    "argument, value, message",
    [("feature_source", "pixels", "feature_source must be"), ("dtype", "float8", "dtype must be one of")],
)
def test_bad_arguments_are_named(tiny_checkpoint, argument, value, message):
    with pytest.raises(ValueError, match=message):
        AutoAdapter(str(tiny_checkpoint("llava")), **{argument: value})


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 1, 32, 32), (2, 4, 32, 32)])
def test_encode_images_names_the_expected_shape(llava, shape):
    with pytest.raises(ValueError, match=r"float images \[B, 3, H, W\]"):
        llava.encode_images(torch.rand(shape))


def test_tokenize_wants_a_list(llava):
    with pytest.raises(ValueError, match="non-empty list"):
        llava.tokenize("a red circle")


def test_fixed_size_encoders_resize_other_sizes(llava):
    assert llava.token_grid(64, 48) == (8, 8)
    assert llava.encode_images(torch.rand(1, 3, 64, 48)).shape == (1, 64, 32)


def test_auto_refuses_window_ordered_tokens(tiny_checkpoint):
    auto = AutoAdapter(str(tiny_checkpoint("qwen2_5_vl")))
    assert auto.encode_images(torch.rand(1, 3, 32, 32)).shape[1] == 16  # one window: raster order is readable
    with pytest.raises(ValueError, match="span several attention windows.*qwen2_5_vl"):
        auto.encode_images(torch.rand(1, 3, 64, 64))


def test_dynamic_resolution_needs_a_multiple_of_patch_times_merge(tiny_checkpoint):
    auto = AutoAdapter(str(tiny_checkpoint("qwen2_vl")))
    with pytest.raises(ValueError, match="images of 36x36 px.*multiples of 16 px"):
        auto.encode_images(torch.rand(1, 3, 36, 36))
