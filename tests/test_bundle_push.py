"""A bundle's whole life on the Hub, through the real huggingface_hub client against a local stub of the Hub's HTTP
API (tests/hub_stub.py; never the network): the tiny VLM on the Hub, a sampler over it by repo id, the pipeline
pushed with its metrics, then loaded back by repo id from an empty cache (bundle and VLM downloaded) with the same
pixels, and again with the Hub gone (`HF_HUB_OFFLINE=1`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from tests.fixtures_bundle import make_stage
from tests.hub_stub import HubStub
from vugen.bundle_hub import HubBundleError
from vugen.cli import main
from vugen.pipeline import VugenPipeline

pytest_plugins = ["tests.hub_stub"]

VLM_REPO, BUNDLE_REPO = "vugen-tests/tiny-llava", "vugen-tests/tiny-llava-vugen"
PROMPTS = ["a red circle", "two blue squares"]
METRICS = {"shapeeval/accuracy": 0.5, "psnr": 21.25}


@pytest.fixture
def pushed(hub_stub: HubStub, pretrained, decoder_export) -> tuple[VugenPipeline, str]:
    """The tiny LLaVA uploaded as ``VLM_REPO``, a sampler over it by repo id, its pipeline pushed as
    ``BUNDLE_REPO``; returns the pipeline and the commit URL."""
    HfApi().create_repo(VLM_REPO)
    HfApi().upload_folder(folder_path=str(pretrained), repo_id=VLM_REPO)
    pipe = make_stage(VLM_REPO, decoder_export).pipeline()  # the adapter downloads the VLM from the stub
    url = pipe.push_to_hub(BUNDLE_REPO, metrics=METRICS, metrics_dataset="Shapes held-out", commit_message="v1")
    return pipe, url


def test_a_pushed_bundle_loads_back_by_repo_id_with_the_same_pixels(pushed, hub_stub):
    pipe, url = pushed
    expected = pipe.sample(PROMPTS, [0, 1])
    commit = hub_stub.commit_requests[-1]
    assert commit.commit_message == "v1" and commit.authorization == f"Bearer {hub_stub.token}"
    assert url.endswith(hub_stub.repos[BUNDLE_REPO].branches["main"])  # the URL names the new commit
    files = set(hub_stub.repos[BUNDLE_REPO].files())
    assert {"vugen.json", "README.md", "sampling.json", "lora/adapter_model.safetensors"} <= files
    assert read_config_of(hub_stub)["adapter"]["init_args"]["pretrained"] == VLM_REPO  # recorded as a Hub id

    shutil.rmtree(constants.HF_HUB_CACHE)  # a new machine: nothing cached, bundle and VLM come from the Hub
    loaded = VugenPipeline.from_pretrained(BUNDLE_REPO)
    assert torch.equal(loaded.sample(PROMPTS, [0, 1]), expected)

    hub_stub.stop()  # the Hub gone: the cache alone serves both, offline
    constants.HF_HUB_OFFLINE = True  # restored by the stub fixture's monkeypatch
    offline = VugenPipeline.from_pretrained(BUNDLE_REPO)
    assert torch.equal(offline.sample(PROMPTS, [0, 1]), expected)


def test_the_hub_shows_the_card_with_the_base_vlm_and_the_metrics(pushed, hub_stub):
    card = ModelCard(hub_stub.repos[BUNDLE_REPO].files()["README.md"].decode())
    assert card.data.library_name == "vugen" and card.data.base_model == VLM_REPO
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == METRICS
    assert f"VugenPipeline.from_pretrained('{BUNDLE_REPO}')" in card.text and "| psnr | 21.25 |" in card.text


def test_a_second_push_is_a_new_commit_and_the_first_stays_loadable(pushed, hub_stub, decoder_export):
    pipe, _ = pushed
    first = hub_stub.repos[BUNDLE_REPO].branches["main"]
    other = make_stage(VLM_REPO, decoder_export, seed=1).pipeline()  # other LoRA and bridge weights
    other.push_to_hub(BUNDLE_REPO)

    assert hub_stub.repos[BUNDLE_REPO].branches["main"] != first
    latest = VugenPipeline.from_pretrained(BUNDLE_REPO).sample(PROMPTS, [0, 1])
    pinned = VugenPipeline.from_pretrained(BUNDLE_REPO, revision=first).sample(PROMPTS, [0, 1])
    assert torch.equal(latest, other.sample(PROMPTS, [0, 1]))
    assert torch.equal(pinned, pipe.sample(PROMPTS, [0, 1])) and not torch.equal(pinned, latest)


def test_a_missing_repo_or_revision_is_one_line_naming_it(hub_stub, pushed):
    with pytest.raises(HubBundleError, match=r"^bundle 'vugen-tests/nope': no such model repo on the Hugging Face"):
        VugenPipeline.from_pretrained("vugen-tests/nope")
    with pytest.raises(HubBundleError, match=rf"^bundle '{BUNDLE_REPO}': the Hub repo has no revision 'v9'$"):
        VugenPipeline.from_pretrained(BUNDLE_REPO, revision="v9")
    with pytest.raises(HubBundleError, match=rf"^bundle '{VLM_REPO}': the Hub repo holds no vugen.json"):
        VugenPipeline.from_pretrained(VLM_REPO)  # a repo, but no bundle


def test_vugen_push_uploads_a_folder_with_its_metrics_file(pushed, hub_stub, tmp_path, capsys):
    pipe, _ = pushed
    folder = pipe.save_pretrained(tmp_path / "bundle")
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))

    main(["push", str(folder), "vugen-tests/from-the-cli", "--metrics", str(tmp_path / "metrics.json"),
          "--metrics_dataset", "Shapes held-out", "--private", "true"])  # fmt: skip

    printed = capsys.readouterr().out.strip().splitlines()[-1]
    repo = hub_stub.repos["vugen-tests/from-the-cli"]
    assert printed.startswith(f"vugen push: {folder} is on the Hub as vugen-tests/from-the-cli: {hub_stub.url}/")
    assert printed.endswith(repo.branches["main"]) and repo.private  # the commit's URL
    uploaded = {name: content for name, content in repo.files().items() if name != "README.md"}
    local = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    local.pop("README.md")
    assert uploaded.keys() - {".gitattributes"} == local.keys()
    assert all(uploaded[name] == content for name, content in local.items())  # byte for byte
    assert (folder / "README.md").read_text() != repo.files()["README.md"].decode()  # the card for the Hub, not ours


def read_config_of(hub_stub: HubStub) -> dict:
    """The pushed bundle's ``vugen.json``, as the stub holds it."""
    return json.loads(hub_stub.repos[BUNDLE_REPO].files()["vugen.json"])
