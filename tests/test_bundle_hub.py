"""Bundles by Hub repo id: found in a local Hugging Face cache offline (`HF_HUB_OFFLINE=1`), with the same images as
the folder; a missing repo id or revision is one line naming it; the model card the Hub shows; pushing refuses what
nobody could load. Uploads against a local stub of the Hub's HTTP API: tests/test_bundle_push.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants

from vugen.bundle import BundleError, read_config, sha256_of
from vugen.bundle_hub import HubBundleError, bundle_folder, push_bundle
from vugen.cli import main
from vugen.commands.push import read_metrics
from vugen.decoder_export import read_decoder_sampling
from vugen.model_card import model_card
from vugen.pipeline import VugenPipeline

REPO_ID = "vugen-tests/tiny-llava-vugen"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["a red circle", "two blue squares"]


def cache_snapshot(bundle: Path, cache: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """``bundle`` placed in a Hugging Face cache as ``snapshot_download`` leaves it: ``models--ORG--NAME`` with
    ``refs/main`` naming the commit and ``snapshots/COMMIT/`` holding the files (links to ``blobs/``)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        blob = repo / "blobs" / sha256_of(path)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(bundle)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * len(link.relative_to(repo).parts[1:])) / blob.relative_to(repo))
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, and the Hub unreachable by rule (``HF_HUB_OFFLINE=1``, as huggingface_hub reads
    it at import, so its constant too)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def images(stage) -> torch.Tensor:
    """The stage's own images of ``PROMPTS`` (seeds 0 and 1)."""
    return stage.pipeline().sample(PROMPTS, [0, 1])


def test_a_bundle_in_the_local_hub_cache_loads_by_repo_id_offline(bundle, images, offline_cache):
    snapshot = cache_snapshot(bundle, offline_cache)

    assert bundle_folder(REPO_ID) == snapshot
    pipe = VugenPipeline.from_pretrained(REPO_ID)
    assert torch.equal(pipe.sample(PROMPTS, [0, 1]), images)  # the same model, bit for bit
    assert torch.equal(VugenPipeline.from_pretrained(REPO_ID, revision=COMMIT).sample(PROMPTS, [0, 1]), images)


def test_a_damaged_file_in_the_cache_is_named_as_in_a_folder(bundle, offline_cache):
    snapshot = cache_snapshot(bundle, offline_cache)
    weights = (snapshot / "decoder" / "model.safetensors").resolve()
    weights.write_bytes(weights.read_bytes()[:-8])  # a half-written blob

    with pytest.raises(BundleError, match=r"decoder/model.safetensors was changed or damaged"):
        VugenPipeline.from_pretrained(REPO_ID)


def test_a_repo_id_not_in_the_cache_offline_is_one_line_naming_it(bundle, offline_cache):
    cache_snapshot(bundle, offline_cache)
    missing = "vugen-tests/no-such-bundle"
    with pytest.raises(HubBundleError) as raised:
        bundle_folder(missing)
    message = str(raised.value)
    assert message.startswith(f"bundle {missing!r} is not in the local Hugging Face cache ({offline_cache})")
    assert "HF_HUB_OFFLINE=1" in message and "\n" not in message


@pytest.mark.parametrize("revision", ["v2", "fedcba9876543210fedcba9876543210fedcba98"])
def test_a_revision_the_cache_does_not_hold_offline_is_named(bundle, offline_cache, revision):
    cache_snapshot(bundle, offline_cache)  # main is cached, this revision is not
    with pytest.raises(HubBundleError, match=rf"^bundle '{REPO_ID}' at revision '{revision}' is not in the local"):
        bundle_folder(REPO_ID, revision)


def test_a_cached_repo_without_a_bundle_is_named(offline_cache, tmp_path):
    other = tmp_path / "model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    cache_snapshot(other, offline_cache, repo_id="vugen-tests/a-plain-model")
    with pytest.raises(HubBundleError, match=r"'vugen-tests/a-plain-model': the Hub repo holds no vugen.json"):
        bundle_folder("vugen-tests/a-plain-model")


def test_a_local_folder_takes_no_revision_and_a_missing_one_is_named(bundle, tmp_path):
    assert bundle_folder(bundle) == bundle
    with pytest.raises(ValueError, match="is a local folder: revision='main' applies to a Hub id"):
        bundle_folder(bundle, "main")
    with pytest.raises(FileNotFoundError, match=r"bundle: no such folder '\./no-bundle'"):
        bundle_folder("./no-bundle")


def test_vugen_generate_takes_a_repo_id_and_says_what_it_wrote(bundle, images, offline_cache, tmp_path, capsys):
    cache_snapshot(bundle, offline_cache)
    out = tmp_path / "out"

    main(["generate", "--bundle", REPO_ID, "--prompt", PROMPTS[0], "--out", str(out), "--accelerator", "cpu"])

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == (
        f"vugen generate: wrote 1 image of 1 prompt to {out}/ (<index>-<slug>-<k>.png, grid.png; the settings used "
        "in vugen_sampling.json)"
    )
    sidecar = json.loads((out / "vugen_sampling.json").read_text())
    assert sidecar["bundle"] == REPO_ID and sidecar["bundle_revision"] == COMMIT  # the commit it resolved to
    assert sorted(p.name for p in out.iterdir()) == ["00000-a-red-circle-0.png", "grid.png", "vugen_sampling.json"]


def test_vugen_generate_names_a_missing_repo_id_in_one_line(offline_cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--bundle", "vugen-tests/nope", "--prompt", "x", "--out", str(tmp_path / "out")])
    assert exited.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("vugen generate: error: bundle 'vugen-tests/nope' is not in the local Hugging Face cache")
    assert "\n" not in error and not (tmp_path / "out").exists()  # nothing written


# ---------------------------------------------------------------------------------------------------- model card
def test_the_model_card_names_the_base_vlm_the_recipe_and_the_metrics(bundle):
    record = read_config(bundle)
    hub_record = record | {"vlm": {"kind": "hub"}, "adapter": {**record["adapter"], "init_args": {"pretrained": "o/v"}}}
    metrics = {"shapeeval/accuracy": 0.875, "fid": 12.5}

    decoder_sampling = read_decoder_sampling(bundle)
    card = model_card(hub_record, decoder_sampling, REPO_ID, metrics, "Shapes held-out")

    loaded = ModelCard(str(card))  # as the Hub parses it
    assert loaded.data.library_name == "vugen" and loaded.data.pipeline_tag == "text-to-image"
    assert loaded.data.base_model == "o/v"
    found = {result.metric_type: result.metric_value for result in loaded.data.eval_results}
    assert found == metrics and {r.dataset_name for r in loaded.data.eval_results} == {"Shapes held-out"}
    assert f"VugenPipeline.from_pretrained({REPO_ID!r})" in card.text
    assert "| shapeeval/accuracy | 0.875 |" in card.text and "| lora_rank | 4 |" in card.text
    steps = decoder_sampling.steps
    assert f"| pixel decoder | {steps} {decoder_sampling.solver} step{'s' * (steps != 1)} |" in card.text


def test_the_saved_card_has_no_base_model_for_a_local_vlm_and_metrics_need_a_dataset(bundle):
    card = ModelCard((bundle / "README.md").read_text())
    assert card.data.base_model is None and card.data.library_name == "vugen"  # a folder means nothing on the Hub
    with pytest.raises(ValueError, match="metrics_dataset: name what the metrics were measured on"):
        model_card(read_config(bundle), read_decoder_sampling(bundle), REPO_ID, {"fid": 1.0})


# ---------------------------------------------------------------------------------------------------- push checks
def test_pushing_a_bundle_whose_vlm_is_a_local_folder_is_refused_before_any_upload(bundle, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a request would fail loudly
    with pytest.raises(BundleError, match=r"its VLM is the local folder .* push anyway with allow_local_vlm=True"):
        push_bundle(bundle, REPO_ID)


def test_a_damaged_bundle_is_never_pushed(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    (copy / "bridge" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(BundleError, match=r"bridge/model.safetensors was changed or damaged"):
        push_bundle(copy, REPO_ID, allow_local_vlm=True)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"fid": 1.5, "clip": "high"}', "'clip' must be a finite number, got 'high'"),
        ("[1, 2]", "expected a JSON object of numbers by name, got list"),
        ('{"fid": NaN}', "'fid' must be a finite number, got nan"),
        ("{fid: 1}", "is not valid JSON"),
    ],
)
def test_a_bad_metrics_file_is_named(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"--metrics {path}.*{message}"):
        read_metrics(path)


def test_a_metrics_file_gives_floats_by_name(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"fid": 3, "acc": 0.5}')
    assert read_metrics(path) == {"fid": 3.0, "acc": 0.5}
