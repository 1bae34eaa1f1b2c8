"""`VugenPipeline` with the tiny LLaVA: exact save/load round trips, the bundle layout (a decoder export, the LoRA
folder, vugen.json, model card), atomic saves, and load-time checks that name what is wrong (describing images:
tests/test_describe.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from tests.fixtures_bundle import IMAGE_SIZE, lora_on_every_token, make_stage
from vugen.bundle import BundleError
from vugen.decoder_export import read_decoder_export
from vugen.fingerprint import vlm_fingerprint
from vugen.generation import SamplingConfig
from vugen.nn import PixelDecoder
from vugen.pipeline import VugenPipeline
from vugen_adapters.llava import LlavaAdapter

PROMPTS = ["a large red circle on the left", "a small blue square"]
SEEDS = [3, 11]
BUNDLE_ENTRIES = ["README.md", "bridge", "decoder", "lora", "reducer", "sampling.json", "vugen.json"]


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "lora_scope": "all",
            "image_attention": "causal",
            "head": "linear",
            "latent_patch_size": 2,
            "sampling": SamplingConfig(solver="heun", steps=2, time_shift=2.0),
        },
    ],
    ids=["default", "all-causal-linear-patched-heun"],
)
def test_save_and_load_generate_identical_images(pretrained, decoder_export, tmp_path, settings):
    stage = make_stage(pretrained, decoder_export, **settings)
    expected = stage.pipeline().sample(PROMPTS, SEEDS)
    assert expected.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and expected.min() >= 0 and expected.max() <= 1

    stage.pipeline().save_pretrained(tmp_path / "bundle")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == BUNDLE_ENTRIES
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left
    loaded = VugenPipeline.from_pretrained(tmp_path / "bundle")

    assert torch.equal(loaded.sample(PROMPTS, SEEDS), expected)
    assert loaded.latent_sampler.record() == stage.latent_sampler.record()
    assert loaded.sampling == stage.sampling and loaded.decoder_sampling == stage.decoder_sampling
    assert not any(module.training for component in loaded.components().values() for module in component.modules())


def test_call_returns_pil_images_with_one_seed_per_image(stage):
    pipe = stage.pipeline()
    images = pipe(PROMPTS, seed=5, num_images_per_prompt=2, steps=1, guidance_scale=1.0)

    expected = pipe.sample([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [5, 6, 7, 8], steps=1, guidance_scale=1.0)
    assert len(images) == 4
    for image, reference in zip(images, expected, strict=True):
        assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
        pixels = np.asarray(image).astype(np.float64) / 255
        assert np.abs(pixels - reference.permute(1, 2, 0).double().numpy()).max() <= 1 / 255
    # Image k of prompt i depends on its own seed only: alone in a batch it is the same picture.
    alone = pipe.sample([PROMPTS[1]], [8], steps=1, guidance_scale=1.0)
    torch.testing.assert_close(alone[0], expected[3], atol=1e-5, rtol=0)
    assert not torch.allclose(expected[2], expected[3], atol=1e-2)  # other seed, other image


def test_the_bundle_is_a_decoder_export(stage, bundle):
    reducer, decoder, sampling = read_decoder_export(bundle)
    for loaded, original in ((reducer, stage.reducer), (decoder, stage.decoder)):
        assert loaded.config == original.config
        state = original.state_dict()
        assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())
    assert sampling == stage.decoder_sampling


def test_the_lora_folder_holds_a_peft_config_and_weights_of_the_language_model(pretrained, decoder_export, tmp_path):
    stage = make_stage(pretrained, decoder_export, lora_scope="all")  # LoRA on every token, as plain peft applies it
    stage.pipeline().save_pretrained(tmp_path / "bundle")
    base = LlavaAdapter(str(pretrained))
    embeds = stage.adapter.embed_tokens(stage.adapter.tokenize(PROMPTS)["input_ids"])
    mask = stage.adapter.tokenize(PROMPTS)["attention_mask"]
    base_hidden, _ = base.run_language_model(embeds, mask)

    peft_model = lora_on_every_token(base.language_model, tmp_path / "bundle" / "lora")

    ours = dict(stage.adapter.language_model.named_parameters())
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(theirs) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
    assert all(torch.equal(p, ours[n]) for n, p in theirs.items())
    with torch.no_grad():
        lora_hidden, _ = base.run_language_model(embeds, mask)  # the peft-wrapped LM, in place
        expected, _ = stage.adapter.run_language_model(embeds, mask)
    torch.testing.assert_close(lora_hidden, expected)
    assert not torch.allclose(lora_hidden, base_hidden, atol=1e-3)  # the LoRA does something
    assert "(`lora_scope: all`)" in (tmp_path / "bundle" / "lora" / "README.md").read_text()


def test_vugen_json_and_model_card_record_the_base_vlm_and_settings(stage, bundle, pretrained):
    record = json.loads((bundle / "vugen.json").read_text())
    assert record["format"] == "vugen.pipeline" and record["format_version"] == 4
    assert record["adapter"]["class_path"] == "vugen_adapters.llava.LlavaAdapter"
    assert record["adapter"]["init_args"]["pretrained"] == str(pretrained)
    assert record["adapter"]["init_args"]["revision"] is None
    assert record["latent_sampler"] == {
        "latent_dim": 8,
        "image_size": IMAGE_SIZE,
        "lora_rank": 4,
        "lora_alpha": 32.0,
        "lora_dropout": 0.0,
        "lora_scope": "image_tokens",
        "image_attention": "bidirectional",
        "head": "mlp",
        "head_width": 32,
        "head_depth": 1,
        "latent_patch_size": 1,
    }
    assert record["sampling"] == {
        "solver": "euler",
        "steps": 2,
        "guidance_scale": 2.0,
        "guidance_interval": None,
        "time_shift": None,
    }
    assert record["vlm"] == vlm_fingerprint(pretrained)  # its contents, checked on load
    hashed = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    hashed = [name for name in hashed if name not in ("vugen.json", "README.md")]  # the card is free to edit
    assert sorted(record["sha256"]) == hashed and len([n for n in hashed if n.endswith(".safetensors")]) == 4
    assert {"lora/README.md", "lora/scoped_lora_config.json"} <= set(hashed)
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest

    card = ModelCard.load(bundle / "README.md")
    assert card.data.base_model is None  # a local folder is no Hub id (tests/test_bundle_push.py: a Hub VLM's)
    assert f"Image generation for the VLM `{pretrained}`" in card.text
    assert card.data.library_name == "vugen" and card.data.pipeline_tag == "text-to-image"
    assert {"vugen", "text-to-image"} <= set(card.data.tags)
    sampling = stage.decoder_sampling
    assert f"| pixel decoder | {sampling.steps} {sampling.solver} steps |" in card.text
    understanding = card.text[card.text.index("## Understanding") :]
    assert 'pipe.describe(images, "Describe the image.")' in understanding
    assert "exactly the base VLM's answers, token for token" in understanding and "lora/README.md" in understanding
    lora_config = json.loads((bundle / "lora" / "scoped_lora_config.json").read_text())
    assert lora_config["r"] == 4 and lora_config["base_model_name_or_path"] == str(pretrained)


def test_an_interrupted_save_leaves_the_old_bundle_loadable(stage, pretrained, decoder_export, tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    stage.pipeline().save_pretrained(target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):  # the LoRA weights are written after the reducer, decoder and bridge
        raise OSError("No space left on device")

    monkeypatch.setattr("vugen.bundle.save_file", disk_full)
    other = make_stage(pretrained, decoder_export, seed=1)
    with pytest.raises(OSError, match="No space left"):
        other.pipeline().save_pretrained(target)

    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # the staging folder is gone
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    kept = VugenPipeline.from_pretrained(target).sample(PROMPTS, SEEDS)
    assert torch.equal(kept, stage.pipeline().sample(PROMPTS, SEEDS))
    assert (
        kept - other.pipeline().sample(PROMPTS, SEEDS)
    ).abs().max() > 0.05  # LoRA and bridge weights show in the images


def _drop_tensor(file: Path, key: str) -> None:
    state = load_file(file)
    del state[key]
    save_file(state, file)
    _rehash(file)


def _rehash(file: Path) -> None:
    """Record ``file``'s new sha256 in its bundle's vugen.json: a bundle written inconsistently, which the header
    checks behind the sha256 check still catch."""
    bundle = next(parent for parent in file.parents if (parent / "vugen.json").is_file())
    _edit_json(
        bundle / "vugen.json", ("sha256", str(file.relative_to(bundle))), hashlib.sha256(file.read_bytes()).hexdigest()
    )


def _edit_json(file: Path, path: tuple[str, ...], value) -> None:
    record = json.loads(file.read_text())
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    file.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("corrupt", "error", "message"),
    [
        (
            lambda b: _drop_tensor(b / "bridge" / "model.safetensors", "boi"),
            BundleError,
            r"bridge/model\.safetensors does not match its configuration: missing tensors \['boi'\]",
        ),
        (
            lambda b: (
                _edit_json(b / "bridge" / "config.json", ("head_width",), 16),
                _rehash(b / "bridge" / "config.json"),
            ),
            BundleError,
            r"head\.in_proj\.weight: \[32, 64\] in the file, \[16, 64\] expected",
        ),
        (
            lambda b: _drop_tensor(
                b / "lora" / "adapter_model.safetensors", "base_model.model.layers.1.mlp.up_proj.lora_B.weight"
            ),
            BundleError,
            r"missing tensors \['base_model\.model\.layers\.1\.mlp\.up_proj\.lora_B\.weight'\]",
        ),
        (
            lambda b: _edit_json(b / "vugen.json", ("latent_sampler", "lora_rank"), 8),
            BundleError,
            r"layers\.0\.self_attn\.q_proj\.lora_A\.weight: \[4, 64\] in the file, \[8, 64\] expected",
        ),
        (
            lambda b: _edit_json(b / "vugen.json", ("latent_sampler", "head_width"), 16),
            BundleError,
            r"bridge/config\.json is .*'head_width': 32.* but vugen\.json and the VLM give .*'head_width': 16",
        ),
        (
            lambda b: _edit_json(b / "vugen.json", ("latent_sampler", "lora_rnak"), 4),
            BundleError,
            r"vugen\.json: latent_sampler: unknown setting 'lora_rnak'; LatentSamplerConfig has lora_rank, ",
        ),
        (
            lambda b: _edit_json(b / "vugen.json", ("sampling", "stpes"), 4),
            BundleError,
            r"vugen\.json: sampling: unknown setting 'stpes'; SamplingConfig has solver, steps, ",
        ),
        (
            lambda b: _edit_json(b / "vugen.json", ("sampling", "solver"), "rk4"),
            BundleError,
            r"vugen\.json: sampling: sampling solver must be one of euler, heun, sde, got 'rk4'",
        ),
        (lambda b: (b / "vugen.json").unlink(), FileNotFoundError, r"vugen\.json is missing"),
        (lambda b: shutil.rmtree(b / "lora"), BundleError, r"incomplete vugen bundle: missing lora"),
        (lambda b: (b / "decoder" / "config.json").unlink(), FileNotFoundError, r"decoder/config\.json is missing"),
    ],
    ids=[
        "bridge-tensor",
        "bridge-shape",
        "lora-tensor",
        "lora-rank",
        "bridge-vs-vugen-json",
        "latent-sampler-key",
        "sampling-key",
        "sampling-solver",
        "vugen-json",
        "lora-folder",
        "decoder-config",
    ],
)
def test_loading_a_damaged_bundle_names_what_is_wrong(bundle_copy, corrupt, error, message):
    corrupt(bundle_copy)
    with pytest.raises(error, match=message):
        VugenPipeline.from_pretrained(bundle_copy)


def test_a_bundle_from_before_a_bridge_setting_existed_loads_with_its_default(bundle_copy, stage):
    """Bundles written before ``patch_size`` have no such key in bridge/config.json: 1, the default, is meant."""
    config_file = bundle_copy / "bridge" / "config.json"
    record = json.loads(config_file.read_text())
    del record["patch_size"]
    config_file.write_text(json.dumps(record))
    _rehash(config_file)
    assert torch.equal(
        VugenPipeline.from_pretrained(bundle_copy).sample(PROMPTS, SEEDS), stage.pipeline().sample(PROMPTS, SEEDS)
    )


def test_trust_remote_code_comes_from_the_caller_not_the_bundle(bundle_copy):
    _edit_json(bundle_copy / "vugen.json", ("adapter", "init_args", "trust_remote_code"), True)
    assert VugenPipeline.from_pretrained(bundle_copy).adapter.describe()["trust_remote_code"] is False
    trusted = VugenPipeline.from_pretrained(bundle_copy, trust_remote_code=True)
    assert trusted.adapter.describe()["trust_remote_code"] is True


def test_adapter_overrides_replace_recorded_arguments(bundle, pretrained, tmp_path):
    moved = Path(shutil.copytree(pretrained, tmp_path / "vlm"))
    pipe = VugenPipeline.from_pretrained(bundle, adapter_overrides={"pretrained": str(moved)})
    assert pipe.adapter.describe()["pretrained"] == str(moved)
    with pytest.raises(ValueError, match=r"adapter_overrides: \['pretrainde'\] not accepted \(LlavaAdapter takes"):
        VugenPipeline.from_pretrained(bundle, adapter_overrides={"pretrainde": str(moved)})
    with pytest.raises(ValueError, match="latent_dim differs: latent sampler 8, reducer 8, decoder 4"):
        components = {**pipe.components(), "sampling": pipe.sampling, "decoder_sampling": pipe.decoder_sampling}
        VugenPipeline(
            **{**components, "decoder": PixelDecoder(latent_dim=4, patch_size=4, width=8, depth=1, num_heads=1)}
        )


def test_sampling_overrides_are_checked_per_call(stage):
    pipe = stage.pipeline()
    with pytest.raises(
        ValueError, match=r"sampling override: unknown setting 'stpes'; SamplingConfig has solver, steps"
    ):
        pipe(PROMPTS[0], stpes=1)
    with pytest.raises(ValueError, match=r"sampling steps must be an integer >= 1, got 0"):
        pipe.sample(PROMPTS[:1], [0], steps=0)
    one_step = pipe.sample(PROMPTS[:1], [0], steps=1, solver="heun")
    assert not torch.equal(one_step, pipe.sample(PROMPTS[:1], [0]))  # the override changes the images
    assert pipe.sampling == stage.sampling  # and only for that call
