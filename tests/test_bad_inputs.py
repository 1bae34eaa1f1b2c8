"""Bad input through the `vugen` command, as a user meets it: one line naming what is wrong, a non-zero exit, no
traceback, nothing lost. Each case runs the real console script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from PIL import Image

from tests.cli_harness import assert_one_line_error, demo_config, error_line_in_process, run_vugen
from tests.crafted_files import (
    asks_for_remote_code,
    edited_checkpoint,
    marker_module,
    remote_code_vlm,
    trained_checkpoint,
)
from tests.fixtures_bundle import IMAGE_SIZE, TINY_SAMPLER, make_decoder_export, make_stage
from tests.helpers import QUIET_TRAINER, replace_vlm_weights
from vugen.data.latent_writer import write_latent_cache
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage, ReducerStage
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
        "fit",
        "--config",
        reducer_config,
        "--model.init_args.reducer.init_args.latent_dim",
        "999",
        cwd=reducer_config.parent,
    )
    line = assert_one_line_error(result, "latent_dim", "999", code=1)
    assert "Union" not in line and "Namespace" not in line


def test_unknown_adapter_name_lists_the_registered_ones(reducer_config):
    result = run_vugen(
        "fit", "--config", reducer_config, "--model.init_args.adapter.class_path", "lava", cwd=reducer_config.parent
    )
    assert_one_line_error(result, "unknown adapter 'lava'", "llava", "qwen2_vl", code=2)


def test_traceback_flag_shows_the_trace(reducer_config):
    args = ("fit", "--config", reducer_config, "--model.init_args.reducer.init_args.latent_dim", "999")
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

    tiny = {key: value.to_dict() for key, value in TINY_SAMPLER.items()}  # the config's record of them
    config_file = demo_config("sampler", tmp_path, vlm, decoder_export=str(export), **tiny)
    config = yaml.safe_load(config_file.read_text())
    config["trainer"] |= {"max_steps": 1, "limit_val_batches": 0, "callbacks": [], "enable_checkpointing": False}
    config["data"]["init_args"] |= {"cache_dir": str(cache), "val_cache_dir": None, "batch_size": 2}
    config_file.write_text(yaml.safe_dump(config))
    result = run_vugen("fit", "--config", config_file, cwd=tmp_path)
    assert_one_line_error(result, f"latent cache {cache}", "adapter VLM differs", "model.safetensors changed", code=1)


# ---- non-finite training and exports
def test_a_diverging_fit_stops_in_one_line_and_writes_nothing_non_finite(reducer_config, tmp_path):
    """lr 1e30 makes the tiny reducer's loss NaN at its second step: the run stops there, naming the checkpoint of
    the validation after its first step. Before the guard: exit 0, NaN checkpoints and a NaN export."""
    args = ["--model.init_args.optimizer.init_args.lr", "1e30", "--model.init_args.export_dir", tmp_path / "export"]
    args += ["--trainer.max_steps", "6", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.default_root_dir", tmp_path, "--trainer.enable_progress_bar", "false"]
    result = run_vugen("fit", "--config", reducer_config, *args, "--data.init_args.batch_size", "8", cwd=tmp_path)
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=1.ckpt"
    assert_one_line_error(
        result,
        "ReducerStage: the training loss is NaN or Inf at step 1",
        f"last good checkpoint: {checkpoint}",
        "lower learning rate",
        code=1,
    )
    assert not (tmp_path / "export").exists()
    assert [path.name for path in tmp_path.rglob("*.ckpt")] == [checkpoint.name]
    weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(bool(value.isfinite().all()) for value in weights.values() if value.is_floating_point())


def test_a_fit_without_training_batches_keeps_the_trained_export(tiny_checkpoint, reducer_config, tmp_path):
    """8 images in batches of 32 (drop_last): `Trainer.fit` stops with "No training batches"; the export trained
    before is left byte for byte. Before: the untrained reducer replaced it."""
    export = tmp_path / "export"
    adapter = LlavaAdapter(str(tiny_checkpoint("llava")))
    reducer = DimensionReducer(adapter.feature_dim, latent_dim=8, hidden_dim=128)
    trained = ReducerStage(adapter, reducer, export_dir=str(export))
    Trainer(max_steps=2, **QUIET_TRAINER).fit(trained, ShapesDataModule(train_size=16, val_size=8, batch_size=8))
    before = {path.name: path.read_bytes() for path in export.iterdir()}
    images = tmp_path / "images"
    images.mkdir()
    for index in range(8):
        Image.new("RGB", (32, 32), (30 * index, 0, 0)).save(images / f"{index}.png")
    config = yaml.safe_load(reducer_config.read_text())
    config["data"] = {
        "class_path": "vugen.data.image_text.ImageTextDataModule",
        "init_args": {"root": str(images), "image_size": 32, "batch_size": 32, "num_workers": 0},
    }
    config["model"]["init_args"]["export_dir"] = str(export)
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    result = run_vugen("fit", "--config", "fit.yaml", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No training batches" in result.stdout + result.stderr
    assert f"ReducerStage: no optimizer step ran in this fit; {export} left as it was" in result.stdout + result.stderr
    assert {path.name: path.read_bytes() for path in export.iterdir()} == before


def test_export_refuses_a_checkpoint_with_nan_weights(pretrained, decoder_export, tmp_path):
    """`vugen export` names the first bad tensor of the checkpoint and writes no bundle. Before: a NaN bundle."""
    trainer = Trainer(max_steps=1, **QUIET_TRAINER | {"limit_val_batches": 0})
    trainer.fit(make_stage(pretrained, decoder_export), ShapesDataModule(image_size=16, train_size=2, batch_size=2))
    trainer.save_checkpoint(tmp_path / "sampler.ckpt")
    checkpoint = torch.load(tmp_path / "sampler.ckpt", weights_only=True)
    checkpoint["state_dict"]["latent_sampler.bridge.in_proj.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    result = run_vugen("export", "nan.ckpt", "bundle", cwd=tmp_path)
    assert_one_line_error(
        result,
        "refusing to export the training weights of nan.ckpt",
        "latent_sampler.bridge.in_proj.weight holds NaN",
        code=1,
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["nan.ckpt", "sampler.ckpt"]


# ---- remote code and class paths from files
@pytest.fixture(scope="module")
def sampler_checkpoint(pretrained, decoder_export, tmp_path_factory):
    """A sampler-stage checkpoint after one training step on the tiny LLaVA."""
    return trained_checkpoint(make_stage(pretrained, decoder_export), tmp_path_factory.mktemp("sampler") / "s.ckpt")


@pytest.fixture
def remote_code_checkpoint(sampler_checkpoint, pretrained, tmp_path_factory):
    """(checkpoint, marker): the sampler checkpoint, edited so that its adapter loads a VLM folder that ships
    modelling code (writing ``marker`` when run) with ``trust_remote_code: true``."""
    directory = tmp_path_factory.mktemp("remote-code")
    folder = remote_code_vlm(pretrained, directory / "vlm", directory / "remote-code-ran")
    checkpoint = edited_checkpoint(sampler_checkpoint, directory / "crafted.ckpt", asks_for_remote_code(folder))
    return checkpoint, directory / "remote-code-ran"


def _sampler_config(directory, pretrained, decoder_export):
    """The demo sampler config on the tiny LLaVA, trained on Shapes images (no latent cache needed)."""
    config = demo_config("sampler", directory, pretrained, decoder_export=str(decoder_export))
    settings = yaml.safe_load(config.read_text())
    settings["data"] = {"class_path": "vugen.data.shapes_datamodule.ShapesDataModule", "init_args": {"image_size": 16}}
    settings["trainer"].update(max_steps=1, limit_val_batches=0, callbacks=[])  # were it to train: one step
    config.write_text(yaml.safe_dump(settings))
    return config


def test_export_does_not_take_trust_remote_code_from_the_checkpoint(remote_code_checkpoint, tmp_path):
    checkpoint, marker = remote_code_checkpoint
    result = run_vugen("export", checkpoint, tmp_path / "bundle", cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path)})
    assert_one_line_error(result, "ships its own modelling code", "--trust_remote_code true", code=1)
    assert not marker.exists() and not (tmp_path / "bundle").exists()


def test_export_runs_remote_code_when_the_user_asks(remote_code_checkpoint, tmp_path):
    checkpoint, marker = remote_code_checkpoint
    args = ("export", checkpoint, tmp_path / "bundle", "--trust_remote_code", "true")
    result = run_vugen(*args, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "remote code ran"
    record = json.loads((tmp_path / "bundle" / "vugen.json").read_text())
    assert record["adapter"]["init_args"]["trust_remote_code"] is True


def test_fit_ckpt_path_does_not_take_trust_remote_code_from_the_checkpoint(
    remote_code_checkpoint, pretrained, decoder_export, tmp_path
):
    checkpoint, marker = remote_code_checkpoint
    config = _sampler_config(tmp_path, pretrained, decoder_export)
    result = run_vugen("fit", "--config", config, "--ckpt_path", checkpoint, cwd=tmp_path)
    assert_one_line_error(result, "ships its own modelling code", code=1)
    assert not marker.exists()


@pytest.mark.parametrize("class_path", ["vugen_evil_adapter.Evil", "os.system"])
def test_generate_refuses_a_bundle_adapter_that_is_not_registered(bundle, class_path, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    record = json.loads((copy / "vugen.json").read_text())
    record["adapter"]["class_path"] = class_path
    (copy / "vugen.json").write_text(json.dumps(record))
    marker_module(tmp_path, "vugen_evil_adapter", tmp_path / "imported")  # importable from the working directory
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = run_vugen("generate", "--bundle", copy, "--prompt", "a red circle", "--out", "out", cwd=tmp_path, env=env)
    assert_one_line_error(
        result, "vugen.json: adapter.class_path", f"{class_path!r} is not a registered adapter", code=1
    )
    assert not (tmp_path / "imported").exists() and not (tmp_path / "out").exists()


@pytest.fixture
def no_traceback(monkeypatch):
    monkeypatch.delenv("VUGEN_TRACEBACK", raising=False)  # errors print their line, as for a user


def test_export_names_a_truncated_checkpoint(sampler_checkpoint, tmp_path):
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(sampler_checkpoint.read_bytes()[: sampler_checkpoint.stat().st_size // 2])
    result = run_vugen("export", truncated, tmp_path / "bundle", cwd=tmp_path)
    assert_one_line_error(result, f"{truncated}: truncated or not a checkpoint", code=1)


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_names_a_missing_truncated_or_foreign_file(
    subcommand, sampler_checkpoint, pretrained, decoder_export, tmp_path, capsys, no_traceback
):
    config = _sampler_config(tmp_path, pretrained, decoder_export)
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(sampler_checkpoint.read_bytes()[: sampler_checkpoint.stat().st_size // 2])
    line = error_line_in_process(capsys, subcommand, "--config", config, "--ckpt_path", truncated)
    reason = "truncated or not a checkpoint (not the zip archive that torch.save writes)"
    assert line == f"vugen {subcommand}: error: {truncated}: {reason}"
    line = error_line_in_process(capsys, subcommand, "--config", config, "--ckpt_path", tmp_path / "none.ckpt")
    assert line.endswith(f"{tmp_path / 'none.ckpt'}: no such checkpoint file")
    reducer_config = demo_config("reducer", tmp_path, pretrained)
    line = error_line_in_process(capsys, subcommand, "--config", reducer_config, "--ckpt_path", sampler_checkpoint)
    assert line.endswith(
        f"{sampler_checkpoint}: written by SamplerStage; --ckpt_path with this config needs a ReducerStage "
        "checkpoint (vugen fit --config ...reducer.yaml)"
    )


def test_export_names_a_decoder_stage_checkpoint(pretrained, decoder_export, tmp_path, capsys, no_traceback):
    reducer = DimensionReducer.from_pretrained(decoder_export / "reducer")
    decoder = PixelDecoder.from_pretrained(decoder_export / "decoder")
    stage = DecoderStage(LlavaAdapter(str(pretrained)), decoder, reducer=reducer)
    checkpoint = trained_checkpoint(stage, tmp_path / "d.ckpt")
    assert error_line_in_process(capsys, "export", checkpoint, tmp_path / "bundle") == (
        f"vugen export: error: {checkpoint}: written by DecoderStage; vugen export needs a SamplerStage checkpoint "
        "(vugen fit --config ...sampler.yaml)"
    )
