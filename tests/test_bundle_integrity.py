"""A bundle knows its VLM by content and its own files by sha256, with the tiny LLaVA: a relative VLM folder is
recorded relative to the bundle (it loads from any working directory, and after the bundle and the VLM move
together); other weights at the recorded path are refused naming both paths; a changed or truncated bundle file is
named before anything is read; bundles of versions 1 to 3 still load."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from tests.fixtures_bundle import make_stage
from tests.helpers import replace_vlm_weights
from vugen.bundle import BundleError, check_weights
from vugen.pipeline import VugenPipeline

PROMPTS, SEEDS = ["a large red circle on the left"], [3]


@pytest.fixture
def project(pretrained, decoder_export, tmp_path, monkeypatch) -> tuple[Path, torch.Tensor]:
    """A project folder as `make demo` leaves it (``tiny-llava/``, ``bundle/``), the bundle saved from inside it with
    relative paths as a config gives them; and the images the saved stage generates."""
    root = tmp_path / "project"
    shutil.copytree(pretrained, root / "tiny-llava")
    monkeypatch.chdir(root)
    stage = make_stage(Path("tiny-llava"), decoder_export)
    stage.pipeline().save_pretrained("bundle")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root, stage.pipeline().sample(PROMPTS, SEEDS)


def flip_byte(file: Path, fraction: float = 0.5) -> None:
    """Same size, one byte changed at ``fraction`` of the file (in the tensor data for a weights file)."""
    data = bytearray(file.read_bytes())
    data[int(len(data) * fraction)] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def test_a_relative_vlm_folder_is_found_from_any_working_directory_and_after_a_move(project, tmp_path):
    root, expected = project
    record = json.loads((root / "bundle" / "vugen.json").read_text())
    assert record["adapter"]["init_args"]["pretrained"] == "../tiny-llava"
    assert record["vlm"]["kind"] == "local" and "model.safetensors" in record["vlm"]["files"]

    loaded = VugenPipeline.from_pretrained(root / "bundle")  # the working directory is another folder
    assert loaded.adapter.pretrained == str((root / "tiny-llava").resolve())
    assert torch.equal(loaded.sample(PROMPTS, SEEDS), expected)

    moved = Path(shutil.move(root, tmp_path / "archive" / "project-2"))  # bundle and VLM move together
    assert torch.equal(VugenPipeline.from_pretrained(moved / "bundle").sample(PROMPTS, SEEDS), expected)


def test_other_weights_at_the_recorded_path_are_refused_naming_both(project, pretrained, tmp_path):
    root, expected = project
    vlm = (root / "tiny-llava").resolve()
    replace_vlm_weights(vlm)
    with pytest.raises(BundleError) as error:
        VugenPipeline.from_pretrained(root / "bundle")
    message = str(error.value)
    assert "\n" not in message
    assert "vugen.json was made with the VLM '../tiny-llava' (" in message
    assert f"but the VLM at '{vlm}' differs: model.safetensors changed contents. Pass adapter_overrides=" in message

    # A copy of the VLM the bundle was made with, wherever it is: silently the same VLM.
    original = shutil.copytree(pretrained, tmp_path / "vlm-copy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = VugenPipeline.from_pretrained(root / "bundle", adapter_overrides={"pretrained": str(original)})
    assert torch.equal(pipe.sample(PROMPTS, SEEDS), expected)
    # Another VLM named explicitly is the caller's choice: a warning, and it loads.
    with pytest.warns(UserWarning, match="model.safetensors changed contents; loading it anyway"):
        VugenPipeline.from_pretrained(root / "bundle", adapter_overrides={"pretrained": str(vlm)})

    shutil.rmtree(vlm)
    with pytest.raises(BundleError, match=r"differs: nothing is there \(no such file or folder"):
        VugenPipeline.from_pretrained(root / "bundle")


@pytest.mark.parametrize(
    ("damage", "name"),
    [
        (flip_byte, "decoder/model.safetensors"),
        (flip_byte, "lora/adapter_model.safetensors"),
        (truncate, "bridge/model.safetensors"),
        (truncate, "reducer/model.safetensors"),
        (lambda file: file.write_text(file.read_text().replace("1", "2")), "sampling.json"),
        (lambda file: file.write_text(file.read_text().replace('"r": 4', '"r": 8')), "lora/scoped_lora_config.json"),
    ],
    ids=["decoder-flipped", "lora-flipped", "bridge-truncated", "reducer-truncated", "sampling-json", "lora-config"],
)
def test_a_damaged_bundle_file_is_named_before_it_is_read(bundle, tmp_path, damage, name):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    damage(copy / name)
    with pytest.raises(BundleError) as error:
        VugenPipeline.from_pretrained(copy)
    message = str(error.value)
    assert message.startswith(f"{copy / name} was changed or damaged after the bundle was written") and "\n" not in (
        message
    )


def test_an_unreadable_safetensors_file_is_named(bundle, tmp_path):
    file = tmp_path / "model.safetensors"
    shutil.copy(bundle / "bridge" / "model.safetensors", file)
    truncate(file)
    with pytest.raises(BundleError, match=rf"^{file} is not a readable safetensors file, truncated or damaged"):
        check_weights(file, {})


def as_version_3(bundle: Path) -> None:
    """What vugen wrote before format 4: the LoRA folder a plain peft adapter folder (``adapter_config.json``, which
    peft loads onto every token), without its README."""
    lora = bundle / "lora"
    (lora / "scoped_lora_config.json").rename(lora / "adapter_config.json")
    (lora / "README.md").unlink()
    record = json.loads((bundle / "vugen.json").read_text())
    record["sha256"]["lora/adapter_config.json"] = record["sha256"].pop("lora/scoped_lora_config.json")
    del record["sha256"]["lora/README.md"]
    (bundle / "vugen.json").write_text(json.dumps(record | {"format_version": 3}))


def as_version_2(bundle: Path) -> None:
    """What vugen wrote before format 3: one ``sampler`` record of the stage's arguments (``sampler`` and
    ``sample_steps`` for the solver and its steps, no ``latent_dim``), ``sampler`` in ``sampling.json`` too."""
    as_version_3(bundle)
    record = json.loads((bundle / "vugen.json").read_text())
    sampler = {key: value for key, value in record.pop("latent_sampler").items() if key != "latent_dim"}
    sampling = record.pop("sampling")
    old_names = {"solver": "sampler", "steps": "sample_steps"}
    record["sampler"] = sampler | {old_names.get(key, key): value for key, value in sampling.items()}
    decoder_sampling = json.loads((bundle / "sampling.json").read_text())
    decoder_sampling = {("sampler" if key == "solver" else key): value for key, value in decoder_sampling.items()}
    (bundle / "sampling.json").write_text(json.dumps(decoder_sampling, indent=2) + "\n")
    record["sha256"]["sampling.json"] = hashlib.sha256((bundle / "sampling.json").read_bytes()).hexdigest()
    (bundle / "vugen.json").write_text(json.dumps(record | {"format_version": 2}))


def as_version_1(bundle: Path) -> None:
    """What vugen wrote before format 2: no VLM fingerprint, sha256 of the weight files only."""
    as_version_2(bundle)
    record = json.loads((bundle / "vugen.json").read_text())
    del record["vlm"]
    record["sha256"] = {name: digest for name, digest in record["sha256"].items() if name.endswith(".safetensors")}
    (bundle / "vugen.json").write_text(json.dumps(record | {"format_version": 1}))


@pytest.mark.parametrize("version", [as_version_1, as_version_2, as_version_3], ids=["v1", "v2", "v3"])
def test_an_older_bundle_still_loads_and_generates_the_same_images(bundle, stage, tmp_path, version):
    old = Path(shutil.copytree(bundle, tmp_path / "old"))
    version(old)
    assert (old / "lora" / "adapter_config.json").is_file()
    legacy = json.loads((old / "vugen.json").read_text())["format_version"] < 3
    assert ("sampler" in json.loads((old / "sampling.json").read_text())) == legacy  # the old name of the solver
    loaded = VugenPipeline.from_pretrained(old)
    assert loaded.latent_sampler.config == stage.latent_sampler.config
    assert (loaded.sampling, loaded.decoder_sampling) == (stage.sampling, stage.decoder_sampling)
    assert torch.equal(loaded.sample(PROMPTS, SEEDS), stage.pipeline().sample(PROMPTS, SEEDS))


def test_a_version_1_bundle_still_loads_and_its_weights_are_checked(bundle, stage, tmp_path):
    old = Path(shutil.copytree(bundle, tmp_path / "v1"))
    as_version_1(old)
    assert torch.equal(
        VugenPipeline.from_pretrained(old).sample(PROMPTS, SEEDS), stage.pipeline().sample(PROMPTS, SEEDS)
    )
    flip_byte(old / "bridge" / "model.safetensors")
    with pytest.raises(BundleError, match=r"bridge/model\.safetensors was changed or damaged"):
        VugenPipeline.from_pretrained(old)
