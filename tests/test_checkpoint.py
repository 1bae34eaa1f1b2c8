"""Stage checkpoints as untrusted files (vugen.checkpoint, AdapterStage.load_from_checkpoint): a damaged, missing or
foreign file is named in one line; nothing a checkpoint records imports a module or turns trust_remote_code on.

The crafted checkpoints are real sampler-stage checkpoints (one training step on the tiny LLaVA) whose recorded
configuration is edited; a class path they name points at a module that writes a marker file when imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.crafted_files import (
    asks_for_remote_code,
    edited_checkpoint,
    marker_module,
    remote_code_vlm,
    trained_checkpoint,
)
from tests.fixtures_bundle import TINY_SAMPLER
from vugen.checkpoint import CheckpointError, checked_hyperparameters
from vugen.registry import UnregisteredAdapterError
from vugen.stages import DecoderStage
from vugen.stages.sampler import SamplerStage
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.source import RemoteCodeRefused

EVIL = "vugen_test_evil"  # the marker module's name


@pytest.fixture(scope="module")
def checkpoint(pretrained, decoder_export, tmp_path_factory) -> Path:
    """A sampler-stage checkpoint after one step, built in Python (the decoder export given as a Path)."""
    stage = SamplerStage(LlavaAdapter(str(pretrained)), decoder_export, **TINY_SAMPLER)
    return trained_checkpoint(stage, tmp_path_factory.mktemp("checkpoint") / "sampler.ckpt")


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """Where the importable module ``vugen_test_evil`` writes when anything imports it."""
    marker = tmp_path / "imported"
    marker_module(tmp_path, EVIL, marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop(EVIL, None)


def test_a_stage_records_its_class_and_plain_data_only(checkpoint, decoder_export):
    hyperparameters = torch.load(checkpoint, weights_only=True)["hyper_parameters"]  # no pickled Path
    assert hyperparameters["_class_path"] == "vugen.stages.sampler.SamplerStage"
    assert hyperparameters["decoder_export"] == str(decoder_export)


# ---------------------------------------------------------------------------------------------------- reading
def _truncated(path: Path, checkpoint: Path) -> None:
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])


DAMAGES = {
    "missing": (lambda path, checkpoint: None, "no such checkpoint file"),
    "a folder": (lambda path, checkpoint: path.mkdir(), "is a folder, not a checkpoint file"),
    "a distributed folder": (
        lambda path, checkpoint: (path.mkdir(), torch.save({}, path / "meta.pt")),
        "is a distributed checkpoint folder (FSDP2), not a checkpoint file",
    ),
    "truncated": (_truncated, "truncated or not a checkpoint"),
    "text": (lambda path, checkpoint: path.write_text("not a checkpoint"), "truncated or not a checkpoint"),
    "a pickled object": (
        lambda path, checkpoint: torch.save({"state_dict": {}, "hyper_parameters": {"p": Path("x")}}, path),
        "holds a pickled Python object (pathlib.PosixPath)",
    ),
    "bare weights": (lambda path, checkpoint: torch.save({"w": torch.zeros(2)}, path), "not a Lightning checkpoint"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_missing_file_is_named(damage, checkpoint, tmp_path):
    make, message = DAMAGES[damage]
    path = tmp_path / "run.ckpt"
    make(path, checkpoint)
    with pytest.raises((CheckpointError, FileNotFoundError)) as raised:
        SamplerStage.load_from_checkpoint(path)
    assert str(raised.value).startswith(str(path)) and message in str(raised.value)


def test_another_stages_checkpoint_names_its_writer(checkpoint):
    with pytest.raises(CheckpointError) as raised:
        DecoderStage.load_from_checkpoint(checkpoint)
    assert str(raised.value) == (
        f"{checkpoint}: written by SamplerStage; DecoderStage.load_from_checkpoint needs a DecoderStage checkpoint "
        "(vugen fit --config ...decoder.yaml)"
    )


def test_a_checkpoint_without_its_writer_missing_what_the_stage_needs_is_refused(checkpoint, tmp_path):
    def older(hyperparameters):  # as written before stages recorded _class_path, by another stage
        del hyperparameters["_class_path"], hyperparameters["decoder_export"]

    path = edited_checkpoint(checkpoint, tmp_path / "old.ckpt", older)
    with pytest.raises(CheckpointError, match="records no decoder_export, so another stage wrote it"):
        SamplerStage.load_from_checkpoint(path)


# ---------------------------------------------------------------------------------------------------- remote code
def test_a_checkpoint_cannot_turn_trust_remote_code_on(checkpoint, pretrained, tmp_path):
    marker = tmp_path / "remote-code-ran"
    folder = remote_code_vlm(pretrained, tmp_path / "vlm", marker)
    path = edited_checkpoint(checkpoint, tmp_path / "crafted.ckpt", asks_for_remote_code(folder))
    with pytest.raises(RemoteCodeRefused, match="ships its own modelling code"):
        SamplerStage.load_from_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- class paths
def test_an_unregistered_adapter_is_refused_before_it_is_imported(checkpoint, pretrained, marker, tmp_path):
    def unregistered(hyperparameters):
        hyperparameters["adapter"]["class_path"] = f"{EVIL}.Evil"

    path = edited_checkpoint(checkpoint, tmp_path / "crafted.ckpt", unregistered)
    with pytest.raises(UnregisteredAdapterError) as raised:
        SamplerStage.load_from_checkpoint(path)
    assert str(raised.value).startswith(f"{path}: hyper_parameters.adapter.class_path: '{EVIL}.Evil' is not a")
    assert "SamplerStage.load_from_checkpoint(path, adapter=...)" in str(raised.value)
    assert not marker.exists() and EVIL not in sys.modules

    loaded = SamplerStage.load_from_checkpoint(path, adapter=LlavaAdapter(str(pretrained)))  # the way out
    assert isinstance(loaded.adapter, LlavaAdapter) and not marker.exists()


@pytest.mark.parametrize(
    "key, value, where",
    [
        ("optimizer", {"class_path": f"{EVIL}.Evil"}, "optimizer.class_path"),
        ("optimizer", f"{EVIL}.run", "optimizer"),  # a callable by import path
        (
            "lr_scheduler",
            {"class_path": "torch.optim.lr_scheduler.LambdaLR", "init_args": {"lr_lambda": f"{EVIL}.run"}},
            "lr_scheduler.init_args.lr_lambda",
        ),
    ],
    ids=["optimizer-class", "optimizer-callable", "scheduler-argument"],
)
def test_other_class_paths_must_be_vugens_or_torchs(checkpoint, marker, tmp_path, key, value, where):
    path = edited_checkpoint(
        checkpoint, tmp_path / "crafted.ckpt", lambda hyperparameters: hyperparameters.update({key: value})
    )
    with pytest.raises(CheckpointError, match=f"hyper_parameters.{where}: vugen does not import"):
        SamplerStage.load_from_checkpoint(path)
    assert not marker.exists() and EVIL not in sys.modules


def test_a_recorded_torch_optimizer_is_rebuilt(checkpoint, tmp_path):
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.25}}
    path = edited_checkpoint(
        checkpoint, tmp_path / "sgd.ckpt", lambda hyperparameters: hyperparameters.update(optimizer=sgd)
    )
    optimizer = SamplerStage.load_from_checkpoint(path).configure_optimizers()
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["lr"] == 0.5
    assert optimizer.defaults["momentum"] == 0.25


def test_an_hparams_file_is_checked_like_the_checkpoint(checkpoint, marker, tmp_path):
    hyperparameters = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    hyperparameters["adapter"]["class_path"] = f"{EVIL}.Evil"
    (tmp_path / "hparams.yaml").write_text(yaml.safe_dump(hyperparameters))
    with pytest.raises(UnregisteredAdapterError, match=f"'{EVIL}.Evil' is not a registered adapter"):
        SamplerStage.load_from_checkpoint(checkpoint, hparams_file=tmp_path / "hparams.yaml")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- the rules
def test_the_adapter_record_gets_the_callers_trust_remote_code():
    recorded = {"adapter": {"class_path": "llava", "init_args": {"pretrained": "x", "trust_remote_code": True}}}
    for caller in (False, True):
        adapter = checked_hyperparameters(recorded, "f.ckpt", caller)["adapter"]
        assert adapter == {
            "class_path": "vugen_adapters.llava.LlavaAdapter",
            "init_args": {"pretrained": "x", "trust_remote_code": caller},
        }
    assert checked_hyperparameters(recorded, "f.ckpt", None)["adapter"]["init_args"] == {"pretrained": "x"}
    assert recorded["adapter"]["init_args"]["trust_remote_code"] is True  # the record itself is left alone


def test_class_paths_the_caller_chose_are_accepted_without_import():
    recorded = {
        "adapter": {"class_path": "not_installed.MyAdapter", "init_args": {"trust_remote_code": True}},
        "decoder": {"class_path": "not_installed.MyDecoder"},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}},
    }
    trusted = {"not_installed.MyAdapter", "not_installed.MyDecoder"}
    replaced = checked_hyperparameters(recorded, "f.ckpt", None, trusted=trusted)
    assert replaced == {"adapter": {"class_path": "not_installed.MyAdapter", "init_args": {}}}
    with pytest.raises(CheckpointError, match=r"f.ckpt: hyper_parameters.decoder.class_path: .*vugen.\*"):
        checked_hyperparameters(recorded, "f.ckpt", None, trusted={"not_installed.MyAdapter"})
    assert checked_hyperparameters(recorded, "f.ckpt", False, given={"adapter", "decoder"}) == {}
