"""One model, both directions, with the tiny LLaVA: the bundle of a trained sampler stage describes images exactly
as its base VLM does (its LoRA, non-zero, is inactive outside image generation), the same LoRA on every token would
change the answers, plain peft finds no adapter in the bundle's ``lora/`` folder, and ``vugen describe`` prints one
line per image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.cli_harness import error_line_in_process, run_vugen
from tests.crafted_files import trained_checkpoint
from tests.fixtures_bundle import lora_on_every_token, make_stage
from vugen.commands.export import export
from vugen.data.image_io import load_rgb, to_pil
from vugen.data.shapes import ShapesDataset
from vugen.pipeline import VugenPipeline

PROMPT = "Describe the image."
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def bundle(pretrained, decoder_export, tmp_path_factory) -> Path:
    """Stage 2 after a training step (its LoRA and bridge made non-zero first), exported as `vugen export` does."""
    folder = tmp_path_factory.mktemp("trained")
    checkpoint = trained_checkpoint(make_stage(pretrained, decoder_export), folder / "sampler.ckpt")
    return export(str(checkpoint), str(folder / "bundle"))


@pytest.fixture(scope="module")
def pipe(bundle) -> VugenPipeline:
    return VugenPipeline.from_pretrained(bundle)


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    data = ShapesDataset("val", 3, image_size=32, seed=5)
    return [data[i]["images"] for i in range(3)]


@pytest.fixture
def base(pipe, pretrained):
    """The base VLM loaded fresh by the bundle's adapter class from the same checkpoint."""
    return type(pipe.adapter)(str(pretrained))


def test_describe_gives_the_base_vlms_answers_token_for_token(pipe, bundle, base, images):
    weights = load_file(bundle / "lora" / "adapter_model.safetensors")
    lora_b = [value for key, value in weights.items() if "lora_B" in key]
    assert len(lora_b) == 14 and all(value.abs().min() > 0 for value in lora_b)  # 7 projections x 2 layers, all used

    ids = pipe.describe_ids(images, PROMPT, max_new_tokens=NEW_TOKENS)

    assert ids == base.answer_ids(images, [PROMPT] * 3, max_new_tokens=NEW_TOKENS)
    assert all(len(answer) >= 8 for answer in ids)  # long answers: every step of generate compared
    assert pipe.describe(images, PROMPT, NEW_TOKENS) == base.answer(images, [PROMPT] * 3, NEW_TOKENS)
    # The VLM's logits on image + prompt, with the LoRA loaded, are the base model's bit for bit.
    inputs = base.conversation(images, [PROMPT] * 3)
    with torch.no_grad():
        assert torch.equal(pipe.adapter.vlm(**inputs).logits, base.vlm(**inputs).logits)


def test_the_same_lora_on_every_token_changes_the_answers(pipe, bundle, base, images):
    """The negative control: if the bundle's LoRA did nothing, describing would match the base VLM trivially."""
    inputs = base.conversation(images, [PROMPT] * 3)
    with torch.no_grad():
        base_logits = base.vlm(**inputs).logits
        lora_on_every_token(base.language_model, bundle / "lora")  # what plain peft would do with lora/
        unscoped_logits = base.vlm(**inputs).logits

    assert (unscoped_logits - base_logits).abs().max() > 0.1
    assert base.answer_ids(images, [PROMPT] * 3, NEW_TOKENS) != pipe.describe_ids(images, PROMPT, NEW_TOKENS)


def test_describe_takes_one_prompt_per_image_and_pil_images_from_a_training_stage(stage, base, images):
    prompts = ["What colour is the shape?", "Where is the shape?", PROMPT]
    stage.train()  # a stage's pipeline during training: describe runs in eval mode and restores the modes
    try:
        ids = stage.pipeline().describe_ids(to_pil(torch.stack(images)), prompts, NEW_TOKENS)
        assert stage.latent_sampler.bridge.training
    finally:
        stage.eval()
    assert ids == base.answer_ids(images, prompts, NEW_TOKENS)
    with pytest.raises(ValueError, match="one image and one prompt"):
        stage.pipeline().describe(images, prompts[:2])


def test_plain_peft_finds_no_adapter_in_the_bundles_lora_folder(bundle, base):
    files = sorted(path.name for path in (bundle / "lora").iterdir())
    assert files == ["README.md", "adapter_model.safetensors", "scoped_lora_config.json"]
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(base.language_model, str(bundle / "lora"))
    readme = (bundle / "lora" / "README.md").read_text()
    assert "only on the BOI token and the latent image tokens" in readme
    assert "VugenPipeline.from_pretrained(BUNDLE)" in readme and "pipe.describe(" in readme
    assert "`pipe.adapter.vlm` is the base VLM as it is" in readme


def test_vugen_describe_prints_one_line_per_image(pipe, bundle, images, tmp_path):
    paths = [tmp_path / f"shape-{i}.png" for i in range(2)]
    for path, image in zip(paths, to_pil(torch.stack(images[:2])), strict=True):
        image.save(path)

    args = ["--bundle", bundle, "--image", paths[0], "--image", paths[1], "--prompt", PROMPT]
    result = run_vugen("describe", *args, "--max_new_tokens", NEW_TOKENS, "--device", "cpu", cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    answers = pipe.describe([load_rgb(path) for path in paths], PROMPT, NEW_TOKENS)
    assert result.stdout.splitlines() == [
        f"{path}: {' '.join(answer.splitlines())}" for path, answer in zip(paths, answers, strict=True)
    ]


@pytest.mark.parametrize("bad", ["image", "not-an-image", "bundle"])
def test_vugen_describe_names_a_missing_image_or_bundle(bundle, tmp_path, capsys, monkeypatch, bad):
    monkeypatch.delenv("VUGEN_TRACEBACK", raising=False)  # errors print their line, as for a user
    image = tmp_path / "shape.png"
    if bad == "not-an-image":
        image.write_text("not a PNG")
    else:
        to_pil(torch.zeros(1, 3, 8, 8))[0].save(image)
    folder = tmp_path / "no-bundle" if bad == "bundle" else bundle
    image = tmp_path / "missing.png" if bad == "image" else image

    line = error_line_in_process(capsys, "describe", "--bundle", folder, "--image", image, "--prompt", PROMPT)

    expected = {
        "image": f"--image {image}: no such file",
        "not-an-image": f"--image {image}: not a readable image (cannot identify image file",
        "bundle": f"bundle: no such folder '{folder}' (written as a path; a Hub id looks like 'org/name')",
    }[bad]
    assert line.startswith(f"vugen describe: error: {expected}")
