"""`vugen generate`, `vugen export` and the GenEval / DPG-Bench exporters with the tiny LLaVA: file names and
layouts file by file, pixels against the pipeline, seeds, and the sampling sidecar (several processes:
tests/test_prediction.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import CLI
from lightning.pytorch import Trainer
from PIL import Image
from safetensors.torch import load_file

from tests.fixtures_bundle import IMAGE_SIZE, make_stage
from tests.helpers import QUIET_TRAINER
from vugen.callbacks import EMA
from vugen.commands.benchmarks import export_dpg, export_geneval
from vugen.commands.export import export
from vugen.commands.generate import generate
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.distributed import resolve_rank
from vugen.pipeline import VugenPipeline
from vugen.stages.sampler import SamplerStage

GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"}',
    '{"tag": "two_object",  "prompt": "a photo of a cat and a dog", "include": []}',
]
DPG_PROMPTS = {"partiprompts12": "A red bicycle leaning on a wall.", "whoops7": "A snowman on a beach.", "a3": "Sky."}


@pytest.fixture(scope="module")
def pipe(bundle) -> VugenPipeline:
    return VugenPipeline.from_pretrained(bundle)


def pixels(path: Path) -> np.ndarray:
    """An image file as floats in [0, 1], ``[H, W, 3]``."""
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255


def assert_same_image(array: np.ndarray, tensor: torch.Tensor) -> None:
    """8-bit pixels equal a ``[3, H, W]`` image in [0, 1] up to quantisation."""
    assert array.shape == (tensor.shape[1], tensor.shape[2], 3)
    assert np.abs(array - tensor.permute(1, 2, 0).double().numpy()).max() <= 1 / 255


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- generate
def test_generate_writes_one_png_per_image_and_a_grid(bundle, pipe, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("A red circle!\n\n  two  words \n")

    out = str(tmp_path / "out")
    files = generate(bundle=str(bundle), out=out, prompts=str(prompt_file), seed=7, num_images_per_prompt=2)

    names = ["00000-a-red-circle-0.png", "00000-a-red-circle-1.png", "00001-two-words-0.png", "00001-two-words-1.png"]
    assert [f.name for f in files] == [*names, "grid.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*names, "grid.png", "vugen_sampling.json"])
    expected = pipe.sample(["A red circle!"] * 2 + ["two  words"] * 2, [7, 8, 9, 10])  # seed + i * n + k
    for name, image in zip(names, expected, strict=True):
        assert_same_image(pixels(tmp_path / "out" / name), image)
    grid = pixels(tmp_path / "out" / "grid.png")  # 2 rows (prompts) x 2 columns (images), 2-pixel padding
    step = IMAGE_SIZE + 2
    assert grid.shape == (2 + 2 * step, 2 + 2 * step, 3)
    for index, name in enumerate(names):
        row, column = divmod(index, 2)
        tile = grid[2 + row * step : 2 + row * step + IMAGE_SIZE, 2 + column * step : 2 + column * step + IMAGE_SIZE]
        assert np.array_equal(tile, pixels(tmp_path / "out" / name))


def test_generate_needs_exactly_one_prompt_source(bundle, tmp_path):
    for given in ({}, {"prompt": "a cat", "prompts": str(tmp_path / "p.txt")}):
        with pytest.raises(ValueError, match="give exactly one of --prompt .* and --prompts"):
            generate(bundle=str(bundle), out=str(tmp_path / "out"), **given)
    with pytest.raises(FileNotFoundError, match="prompts: no such file or folder .*missing.txt"):
        generate(bundle=str(bundle), out=str(tmp_path / "out"), prompts=str(tmp_path / "missing.txt"))


def test_generate_parses_its_command_line(bundle, pipe, tmp_path):
    out = tmp_path / "out"
    args = ["--bundle", str(bundle), "--out", str(out), "--prompt", "a blue square", "--steps", "1", "--cfg", "1.0"]
    args += ["--seed", "4", "--solver", "heun", "--batch_size", "1"]

    CLI(generate, args=args)

    assert sorted(p.name for p in out.iterdir()) == ["00000-a-blue-square-0.png", "grid.png", "vugen_sampling.json"]
    expected = pipe.sample(["a blue square"], [4], steps=1, guidance_scale=1.0, solver="heun")
    assert_same_image(pixels(out / "00000-a-blue-square-0.png"), expected[0])
    assert (expected - pipe.sample(["a blue square"], [4])).abs().max() > 2 / 255  # the options were used


# ---------------------------------------------------------------------------------------------------- export
def test_export_turns_a_sampler_checkpoint_into_a_bundle(pretrained, decoder_export, tmp_path):
    stage = make_stage(pretrained, decoder_export)
    data = ShapesDataModule(image_size=IMAGE_SIZE, train_size=2, val_size=2, batch_size=2)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(stage, datamodule=data)
    trainer.save_checkpoint(tmp_path / "sampler.ckpt")

    assert export(str(tmp_path / "sampler.ckpt"), str(tmp_path / "bundle")) == tmp_path / "bundle"

    reloaded = SamplerStage.load_from_checkpoint(tmp_path / "sampler.ckpt", map_location="cpu").eval()
    expected = reloaded.pipeline().sample(["a red circle"], [0])
    assert torch.equal(VugenPipeline.from_pretrained(tmp_path / "bundle").sample(["a red circle"], [0]), expected)
    assert torch.equal(stage.eval().pipeline().sample(["a red circle"], [0]), expected)  # the weights as trained


def test_export_takes_the_ema_averages_when_the_checkpoint_has_them(pretrained, decoder_export, tmp_path):
    """The bundle gets the EMA callback's averages (``auto`` and ``ema``) or the training weights (``training``)."""
    stage = make_stage(pretrained, decoder_export)
    ema = EMA(decay=0.5, warmup=False, apply_at_end=False)  # the model keeps its training weights after fit
    data = ShapesDataModule(image_size=IMAGE_SIZE, train_size=6, val_size=2, batch_size=2)
    trainer = Trainer(max_steps=3, callbacks=[ema], **QUIET_TRAINER | {"limit_val_batches": 0})
    trainer.fit(stage, datamodule=data)
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    prefix = "latent_sampler.bridge."
    averages = {name.removeprefix(prefix): value for name, value in ema.averages.items() if name.startswith(prefix)}
    trained = {name: p.detach() for name, p in stage.latent_sampler.bridge.named_parameters()}
    assert not torch.equal(averages["in_proj.weight"], trained["in_proj.weight"])

    for weights, expected in (("auto", averages), ("ema", averages), ("training", trained)):
        bundle = export(str(tmp_path / "ema.ckpt"), str(tmp_path / weights), weights=weights)
        saved = load_file(bundle / "bridge" / "model.safetensors")
        assert saved.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(saved[name], value), (weights, name)

    trainer = Trainer(max_steps=1, **QUIET_TRAINER | {"limit_val_batches": 0})
    trainer.fit(make_stage(pretrained, decoder_export), datamodule=data)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="plain.ckpt holds no EMA averages"):
        export(str(tmp_path / "plain.ckpt"), str(tmp_path / "none"), weights="ema")
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------------- GenEval
def test_geneval_export_writes_its_layout_file_by_file(bundle, pipe, tmp_path, capsys):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("\n".join(GENEVAL_LINES) + "\n")

    export_geneval(str(bundle), str(metadata), str(tmp_path / "out"), n=2, seed=100, steps=1)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"vugen export-geneval: wrote 6 images of 3 prompts to {tmp_path / 'out'}/ (GenEval's layout: "
        "<index>/samples/<k>.png, <index>/grid.png; the settings used in vugen_sampling.json)"
    )

    out = tmp_path / "out"
    expected_files = {"vugen_sampling.json"} | {
        f"{i:05d}/{name}" for i in range(3) for name in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")
    }
    assert set(tree(out)) == expected_files | {f"{i:05d}/grid.png" for i in range(3)}
    for i, line in enumerate(GENEVAL_LINES):
        assert (out / f"{i:05d}" / "metadata.jsonl").read_text() == line + "\n"  # the line as is
        prompt = json.loads(line)["prompt"]
        images = pipe.sample([prompt] * 2, [100 + 2 * i, 101 + 2 * i], steps=1)
        for k in range(2):
            assert_same_image(pixels(out / f"{i:05d}" / "samples" / f"{k:04d}.png"), images[k])
        assert pixels(out / f"{i:05d}" / "grid.png").shape == (IMAGE_SIZE + 4, 2 * IMAGE_SIZE + 6, 3)

    sidecar = json.loads((out / "vugen_sampling.json").read_text())
    assert sidecar["benchmark"] == "geneval" and sidecar["images_per_prompt"] == 2 and sidecar["seed"] == 100
    assert sidecar["sampling"] == {**pipe.sampling.to_dict(), "steps": 1} and sidecar["image_size"] == IMAGE_SIZE
    assert sidecar["bundle"] == str(bundle.resolve())
    assert sidecar["bundle_vugen_json_sha256"] == hashlib.sha256((bundle / "vugen.json").read_bytes()).hexdigest()
    assert sidecar["seed_rule"] == "image k of prompt i uses seed + i * images_per_prompt + k"


# ---------------------------------------------------------------------------------------------------- DPG-Bench
def test_dpg_export_writes_2x2_grids_named_like_the_prompts(bundle, pipe, tmp_path, capsys):
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    for name, prompt in DPG_PROMPTS.items():
        (prompts_dir / f"{name}.txt").write_text(prompt + "\n")

    export_dpg(str(bundle), str(prompts_dir), str(tmp_path / "one"), seed=9)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"vugen export-dpg: wrote 3 2x2 grids of 4 images to {tmp_path / 'one'}/ (DPG-Bench's layout: <id>.png; the "
        "settings used in vugen_sampling.json)"
    )
    CLI(export_dpg, args=[str(bundle), str(prompts_dir), str(tmp_path / "two"), "--seed", "9", "--accelerator", "cpu"])

    assert sorted(tree(tmp_path / "one")) == ["a3.png", "partiprompts12.png", "vugen_sampling.json", "whoops7.png"]
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    for i, name in enumerate(sorted(DPG_PROMPTS)):  # prompt i in file-name order
        grid = pixels(tmp_path / "one" / f"{name}.png")
        assert grid.shape == (2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3)  # no padding: the scorer crops fixed tiles
        images = pipe.sample([DPG_PROMPTS[name]] * 4, [9 + 4 * i + k for k in range(4)])
        for k, image in enumerate(images):
            row, column = divmod(k, 2)
            tile = grid[row * IMAGE_SIZE : (row + 1) * IMAGE_SIZE, column * IMAGE_SIZE : (column + 1) * IMAGE_SIZE]
            assert_same_image(tile, image)
    sidecar = json.loads((tmp_path / "one" / "vugen_sampling.json").read_text())
    assert sidecar["benchmark"] == "dpg_bench" and sidecar["images_per_prompt"] == 4 and sidecar["grid"] == "2x2"


def test_ranks_come_from_the_arguments_or_the_environment(monkeypatch, tmp_path, bundle):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank(None, None) == (3, 4)
    assert resolve_rank(0, 2) == (0, 2)
    with pytest.raises(ValueError, match="0 <= rank < world_size, got rank=2, world_size=2"):
        resolve_rank(2, 2)
    with pytest.raises(FileNotFoundError, match="no <id>.txt prompt files"):
        export_dpg(str(bundle), str(tmp_path), str(tmp_path / "out"))
    metadata = tmp_path / "bad.jsonl"
    metadata.write_text('{"tag": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 1 is not a JSON object with a string 'prompt'"):
        export_geneval(str(bundle), str(metadata), str(tmp_path / "out"))
