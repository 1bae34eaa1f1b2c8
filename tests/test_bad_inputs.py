"""Bad input through the `vugen` command, as a user meets it: one line naming what is wrong, a non-zero exit, no
traceback, nothing lost. Each case runs the real console script in a subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.cli_harness import assert_one_line_error, demo_config, run_vugen
from tests.fixtures_bundle import IMAGE_SIZE, TINY_SAMPLER, make_decoder_export
from tests.helpers import replace_vlm_weights
from vugen.data.latent_writer import write_latent_cache
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.nn import DimensionReducer
from vugen_adapters.llava import LlavaAdapter


@pytest.fixture(scope="module")
def reducer_config(tiny_checkpoint, tmp_path_factory):
    return demo_config("reducer", tmp_path_factory.mktemp("bad-inputs"), tiny_checkpoint("llava"))


# ---------------------------------------------------------------------------------------------------- configs
def test_unknown_config_key_names_it(reducer_config):
    result = run_vugen(
        "fit", "--config", reducer_config, "--model.init_args.latent_dimm", "4", cwd=reducer_config.parent
    )
    assert_one_line_error(result, "model", "latent_dimm", code=2)


def test_missing_config_file_names_it(tmp_path):
    result = run_vugen("fit", "--config", "no-such.yaml", cwd=tmp_path)
    assert_one_line_error(result, "no-such.yaml", "does not exist", code=2)


def test_an_adapter_argument_error_is_its_own_message(reducer_config):
    result = run_vugen(
        "fit", "--config", reducer_config, "--model.init_args.latent_dim", "999", cwd=reducer_config.parent
    )
    line = assert_one_line_error(result, "latent_dim", "999", code=1)
    assert "Union" not in line and "Namespace" not in line


def test_unknown_adapter_name_lists_the_registered_ones(reducer_config):
    result = run_vugen(
        "fit", "--config", reducer_config, "--model.init_args.adapter.class_path", "lava", cwd=reducer_config.parent
    )
    assert_one_line_error(result, "unknown adapter 'lava'", "llava", "qwen2_vl", code=2)


def test_traceback_flag_shows_the_trace(reducer_config):
    args = ("fit", "--config", reducer_config, "--model.init_args.latent_dim", "999")
    result = run_vugen(*args, "--traceback", cwd=reducer_config.parent)
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "latent_dim must satisfy" in result.stderr


# ---- fingerprints and bundle integrity
def test_generate_from_a_bundle_with_a_damaged_weight_file_names_it(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    weights = copy / "lora" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: the header still reads, the LoRA would be quietly wrong
    weights.write_bytes(bytes(data))
    result = run_vugen(
        "generate", "--bundle", copy, "--prompt", "a red circle", "--out", tmp_path / "out", cwd=tmp_path
    )
    assert_one_line_error(result, f"{weights} was changed or damaged", "sha256", code=1)
    assert not list(tmp_path.rglob("*.png"))


def test_fitting_the_sampler_on_a_cache_of_other_vlm_weights_names_the_change(tiny_checkpoint, tmp_path):
    vlm = Path(shutil.copytree(tiny_checkpoint("llava"), tmp_path / "tiny-llava"))
    adapter = LlavaAdapter(str(vlm))
    export = make_decoder_export(adapter, tmp_path / "decoder-stage")
    reducer = DimensionReducer.from_pretrained(export / "reducer")
    data = ShapesDataModule(image_size=IMAGE_SIZE, train_size=4, batch_size=4)
    cache = write_latent_cache(data, adapter, reducer, tmp_path / "latents", progress=False)
    replace_vlm_weights(vlm)  # same path, same size, other weights: the cached latents are stale

    config_file = demo_config("sampler", tmp_path, vlm, decoder_export=str(export), **TINY_SAMPLER)
    config = yaml.safe_load(config_file.read_text())
    config["trainer"] |= {"max_steps": 1, "limit_val_batches": 0, "callbacks": [], "enable_checkpointing": False}
    config["data"]["init_args"] |= {"cache_dir": str(cache), "val_cache_dir": None, "batch_size": 2}
    config_file.write_text(yaml.safe_dump(config))
    result = run_vugen("fit", "--config", config_file, cwd=tmp_path)
    assert_one_line_error(result, f"latent cache {cache}", "adapter VLM differs", "model.safetensors changed", code=1)
