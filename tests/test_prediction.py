"""Prediction with Lightning: prompt sets (:class:`PromptDataModule`), the prediction writers' layouts and sidecar,
:class:`PipelinePredictor` under ``Trainer.predict`` and ``vugen predict``, and the exporters built on them: the bytes
of the exporters they replace (images generated directly with ``pipe.sample([prompt] * n, seeds)`` and saved as PNG),
whatever the batch size or the number of processes (2 DDP processes: a subprocess, as Lightning's launcher re-runs
the command line)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from PIL import Image
from torch.utils.data import SequentialSampler
from torchvision.utils import make_grid

from tests.cli_harness import demo_config
from tests.crafted_files import trained_checkpoint
from tests.fixtures_bundle import TINY_SAMPLER, make_stage
from tests.test_configs import ParseOnlyCLI
from tests.test_distributed import launch_env
from tests.test_generate_cli import DPG_PROMPTS, GENEVAL_LINES, tree
from vugen.callbacks import SIDECAR_FILE, DPGBenchWriter, GenEvalWriter
from vugen.cli import main, run
from vugen.commands.benchmarks import export_geneval
from vugen.data.image_io import to_pil
from vugen.data.prompts import PromptDataModule, image_seeds, read_prompt_set
from vugen.pipeline import VugenPipeline
from vugen.prediction import PipelinePredictor

ROOT = Path(__file__).resolve().parents[1]
VUGEN = Path(sys.executable).parent / "vugen"
QUIET = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def pipe(bundle) -> VugenPipeline:
    return VugenPipeline.from_pretrained(bundle)


@pytest.fixture
def metadata(tmp_path) -> Path:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(GENEVAL_LINES) + "\n")
    return path


def png(image: Image.Image) -> bytes:
    """The bytes ``image.save("x.png")`` writes, as the exporters did."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_geneval(pipe: VugenPipeline, lines: list[str], n: int, seed: int, **overrides) -> dict[str, bytes]:
    """The files the GenEval exporter wrote before prediction (no sidecar): each prompt's ``n`` images as one
    ``pipe.sample`` call with seeds ``seed + i * n + k``, 8-bit PNGs, a one-row grid and the metadata line as is."""
    files = {}
    for i, line in enumerate(lines):
        images = pipe.sample([json.loads(line)["prompt"]] * n, image_seeds(seed, i, n), **overrides).cpu()
        files[f"{i:05d}/metadata.jsonl"] = (line + "\n").encode()
        for k, image in enumerate(to_pil(images)):
            files[f"{i:05d}/samples/{k:04d}.png"] = png(image)
        files[f"{i:05d}/grid.png"] = png(to_pil(make_grid(images, nrow=n)[None])[0])
    return files


def without_sidecar(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name != SIDECAR_FILE}


# ---------------------------------------------------------------------------------------------------- prompt sets
def test_prompt_sets_of_each_kind_give_prompts_seeds_and_records(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("  a red circle \n\n\ttwo  words\n")
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text(GENEVAL_LINES[0] + "\n\n" + GENEVAL_LINES[2] + "\n")
    folder = tmp_path / "dpg"
    folder.mkdir()
    for name, prompt in DPG_PROMPTS.items():
        (folder / f"{name}.txt").write_text(f" {prompt}\n")
    (folder / "notes.md").write_text("not a prompt")

    expected = {
        "list": (["a cat", " a dog "], [None, None], ["a cat", " a dog "]),
        "text": (["a red circle", "two  words"], [None, None], str(text.resolve())),
        "jsonl": (
            ["a photo of a bench", "a photo of a cat and a dog"],
            [GENEVAL_LINES[0], GENEVAL_LINES[2]],
            str(jsonl.resolve()),
        ),
        "dpg_folder": ([DPG_PROMPTS[k] for k in sorted(DPG_PROMPTS)], sorted(DPG_PROMPTS), str(folder.resolve())),
    }
    sources = {"list": ["a cat", " a dog "], "text": str(text), "jsonl": str(jsonl), "dpg_folder": str(folder)}
    for kind, source in sources.items():
        data = PromptDataModule(source, images_per_prompt=3, seed=10, batch_size=2)
        prompts, records, origin = expected[kind]
        assert data.prompt_set.format == kind
        assert data.prompts == prompts and data.prompt_set.records == records
        assert data.prompt_set.source == origin
        first, *rest = list(data.predict_dataloader())
        assert (
            first
            == {
                "indices": [0, 1],
                "prompts": prompts[:2],
                "seeds": [[10, 11, 12], [13, 14, 15]],  # seed + i * n + k
                "records": records[:2],
            }
        )
        assert [batch["indices"] for batch in rest] == ([[2]] if len(prompts) == 3 else [])
    assert data.sampling_record() == {
        "prompts": str(folder.resolve()),
        "prompt_format": "dpg_folder",
        "num_prompts": 3,
        "images_per_prompt": 3,
        "seed": 10,
        "seed_rule": "image k of prompt i uses seed + i * images_per_prompt + k",
    }


def bad_sets(tmp_path: Path) -> list[tuple[object, type, str]]:
    """(prompts, error, message) of every bad prompt set."""
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text(GENEVAL_LINES[0] + "\n\n{not json\n")
    (tmp_path / "no_prompt.jsonl").write_text(GENEVAL_LINES[0] + '\n{"tag": "x"}\n')
    (tmp_path / "number.jsonl").write_text('{"prompt": 3}\n')
    (tmp_path / "list.jsonl").write_text('["a cat"]\n')
    (tmp_path / "blank.jsonl").write_text("\n")
    (tmp_path / "no_txt").mkdir()
    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "a.txt").write_text("a cat")
    (tmp_path / "dpg" / "b.txt").write_text(" \n")
    return [
        (str(tmp_path / "missing.txt"), FileNotFoundError, f"prompts: no such file or folder {tmp_path}/missing.txt"),
        (str(tmp_path / "empty.txt"), ValueError, f"{tmp_path}/empty.txt holds no prompt"),
        (str(tmp_path / "bad.jsonl"), ValueError, f"{tmp_path}/bad.jsonl: line 3 is not JSON"),
        (str(tmp_path / "no_prompt.jsonl"), ValueError, f"{tmp_path}/no_prompt.jsonl: line 2 is not a JSON object "),
        (str(tmp_path / "number.jsonl"), ValueError, f"{tmp_path}/number.jsonl: line 1 is not a JSON object with"),
        (str(tmp_path / "list.jsonl"), ValueError, f"{tmp_path}/list.jsonl: line 1 is not a JSON object with a"),
        (str(tmp_path / "blank.jsonl"), ValueError, f"{tmp_path}/blank.jsonl holds no prompts"),
        (str(tmp_path / "no_txt"), FileNotFoundError, f"{tmp_path}/no_txt: no <id>.txt prompt files"),
        (str(tmp_path / "dpg"), ValueError, f"{tmp_path}/dpg/b.txt is empty"),
        ([], ValueError, "prompts: the list of prompts is empty"),
        (["a cat", 3], ValueError, "prompts: item 1 is not a string: 3"),
    ]


def test_bad_prompt_sets_fail_in_one_line_naming_the_file_and_line(tmp_path):
    for prompts, error, message in bad_sets(tmp_path):
        with pytest.raises(error) as raised:
            read_prompt_set(prompts)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), (prompts, raised.value)
    for argument in ("images_per_prompt", "batch_size"):
        with pytest.raises(ValueError, match=f"{argument} must be a positive integer, got 0"):
            PromptDataModule(["a cat"], **{argument: 0})


def test_a_bad_prompt_set_is_one_line_from_the_command_before_the_bundle_loads(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(GENEVAL_LINES[0] + "\n{not json\n")
    with pytest.raises(SystemExit) as exited:
        main(["export-geneval", str(tmp_path / "no-bundle"), str(tmp_path / "bad.jsonl"), str(tmp_path / "out")])
    assert exited.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"vugen export-geneval: error: {tmp_path}/bad.jsonl: line 2 is not JSON")
    assert not (tmp_path / "out").exists()


def test_processes_share_the_prompts_without_repeats_and_need_one_each():
    """Lightning's predict sampler under DDP: rank r of W takes prompts r, r + W, ...; none is padded in twice."""
    data = PromptDataModule(["a", "b", "c"])
    ranks = [list(UnrepeatedDistributedSamplerWrapper(SequentialSampler(data.dataset()), 2, r, False)) for r in (0, 1)]
    assert ranks == [[0, 2], [1]]
    data.trainer = Trainer(accelerator="cpu", devices=4, strategy="ddp", logger=False)  # not launched
    with pytest.raises(ValueError, match="3 prompts for 4 processes: each process needs at least one prompt"):
        data.predict_dataloader()


# ---------------------------------------------------------------------------------------------------- writers
def test_dpg_tiles_are_the_four_images_exactly(tmp_path):
    images = torch.rand(4, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    DPGBenchWriter(str(tmp_path)).write_prompt(0, "a cat", "whoops7", images)
    grid = np.asarray(Image.open(tmp_path / "whoops7.png"))
    assert grid.shape == (32, 48, 3)  # no padding: the scorer crops fixed tiles
    for k, image in enumerate(to_pil(images)):
        row, column = divmod(k, 2)
        assert np.array_equal(grid[row * 16 : (row + 1) * 16, column * 24 : (column + 1) * 24], np.asarray(image))


def test_writers_refuse_what_their_layout_cannot_hold(bundle, tmp_path, metadata):
    predictor = PipelinePredictor(str(bundle))
    folder = tmp_path / "dpg"
    folder.mkdir()
    (folder / "a.txt").write_text("a cat")
    cases = [
        (predictor, DPGBenchWriter, PromptDataModule(str(metadata), 4), "the prompts must be a folder of <id>.txt"),
        (predictor, DPGBenchWriter, PromptDataModule(str(folder), 2), "set images_per_prompt: 4, got 2"),
        (predictor, GenEvalWriter, BoringDataModule(), "predict with one as the datamodule, got BoringDataModule"),
        (BoringModel(), GenEvalWriter, PromptDataModule(["a"]), "needs BoringModel.generation_record() -> dict"),
    ]
    for module, writer, data, message in cases:
        trainer = Trainer(callbacks=[writer(str(tmp_path / "out"))], **QUIET)
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            trainer.predict(module, datamodule=data)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- with a bundle
def test_export_geneval_writes_the_bytes_of_the_exporter_it_replaces(bundle, pipe, tmp_path, metadata):
    export_geneval(str(bundle), str(metadata), str(tmp_path / "out"), n=2, seed=100, steps=1)

    files = tree(tmp_path / "out")
    reference = reference_geneval(pipe, GENEVAL_LINES, n=2, seed=100, steps=1)
    assert without_sidecar(files) == reference
    # Negative controls: the images depend on the seeds and the settings, so equal bytes are no accident.
    first = "00000/samples/0000.png"
    assert reference_geneval(pipe, GENEVAL_LINES[:1], n=2, seed=101, steps=1)[first] != files[first]
    assert reference_geneval(pipe, GENEVAL_LINES[:1], n=2, seed=100)[first] != files[first]
    sidecar = json.loads(files[SIDECAR_FILE])
    assert sidecar == {
        "benchmark": "geneval",
        "grid": True,
        "prompts": str(metadata.resolve()),
        "prompt_format": "jsonl",
        "num_prompts": 3,
        "images_per_prompt": 2,
        "seed": 100,
        "seed_rule": "image k of prompt i uses seed + i * images_per_prompt + k",
        "bundle": str(bundle.resolve()),
        "bundle_vugen_json_sha256": PipelinePredictor(str(bundle)).bundle_sha256,
        "image_size": pipe.image_size,
        "sampling": {**pipe.sampling.to_dict(), "steps": 1},
        "decoder_sampling": pipe.decoder_sampling.to_dict(),
    }

    # Trainer.predict by hand, batches of 2 prompts: the same files, sidecar included.
    predictor = PipelinePredictor(str(bundle), steps=1)
    trainer = Trainer(callbacks=[GenEvalWriter(str(tmp_path / "batched"))], **QUIET)
    data = PromptDataModule(str(metadata), images_per_prompt=2, seed=100, batch_size=2)
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    assert tree(tmp_path / "batched") == files


def test_vugen_predict_writes_the_demo_config_layout_with_a_bundle(bundle, pipe, tmp_path):
    """``vugen predict`` (LightningCLI) with ``configs/demo/predict.yaml``: a YAML list of prompts, GenEval layout."""
    config = yaml.safe_load((ROOT / "configs/demo/predict.yaml").read_text())
    prompts = config["data"]["init_args"]["prompts"][:3]
    config["data"]["init_args"].update(prompts=prompts, images_per_prompt=2, seed=3)
    config["trainer"]["callbacks"][0]["init_args"]["out_dir"] = str(tmp_path / "out")
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(config))

    args = ["predict", "--config", str(tmp_path / "predict.yaml"), "--model", "vugen.prediction.PipelinePredictor"]
    args += ["--model.bundle", str(bundle), "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    run([*args, "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])

    lines = [json.dumps({"prompt": prompt}) for prompt in prompts]  # a list's prompts get a minimal metadata line
    assert without_sidecar(tree(tmp_path / "out")) == reference_geneval(pipe, lines, n=2, seed=3)
    sidecar = json.loads((tmp_path / "out" / SIDECAR_FILE).read_text())
    assert (
        sidecar["prompts"] == prompts
        and sidecar["prompt_format"] == "list"
        and sidecar["sampling"] == pipe.sampling.to_dict()
    )


def test_the_predict_config_layers_over_the_sampler_config():
    """`vugen predict --config configs/demo/sampler.yaml --config configs/demo/predict.yaml`: the sampler stage, the
    prompts and the GenEval writer alone (the training callbacks are replaced)."""
    parsed = []

    class Capture(ParseOnlyCLI):
        def before_instantiate_classes(self) -> None:
            parsed.append(self.config.predict)
            raise StopIteration

    configs = ["--config", str(ROOT / "configs/demo/sampler.yaml"), "--config", str(ROOT / "configs/demo/predict.yaml")]
    with pytest.raises(StopIteration):
        Capture(args=["predict", *configs])
    (config,) = parsed
    assert config.model.class_path == "vugen.stages.SamplerStage"
    assert config.data.class_path == "vugen.data.prompts.PromptDataModule"
    assert [c.class_path for c in config.trainer.callbacks] == ["vugen.callbacks.GenEvalWriter"]
    assert config.return_predictions is False


# ---------------------------------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_ddp_processes_write_the_bytes_of_one(bundle, tmp_path, metadata):
    """`vugen export-geneval` and `vugen generate` with ``--devices 2`` (Lightning starts the second process, gloo):
    3 prompts, so rank 0 takes prompts 0 and 2 and rank 1 prompt 1; generate's grid is read back after both wrote."""
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\na blue square\na green triangle\n")
    commands = {
        "geneval": lambda out: ["export-geneval", str(bundle), str(metadata), str(out), "--n", "2", "--seed", "5"],
        "generate": lambda out: (
            ["generate", "--bundle", str(bundle), "--prompts", str(text), "--out", str(out)]
            + ["--num_images_per_prompt", "2", "--seed", "5"]
        ),
    }
    ddp = ["--accelerator", "cpu", "--devices", "2"]
    launches = {
        name: subprocess.Popen(
            [str(VUGEN), *command(tmp_path / f"{name}-2"), *ddp],
            cwd=tmp_path,
            env=launch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, command in commands.items()
    }
    try:  # the one-process references meanwhile, in this process
        for name, command in commands.items():
            run(command(tmp_path / f"{name}-1"))
        outputs = {name: launch.communicate(timeout=300)[0] for name, launch in launches.items()}
    finally:
        for launch in launches.values():
            launch.kill()
    for name, launch in launches.items():
        assert launch.returncode == 0, outputs[name][-4000:]
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[name]  # two processes ran
        assert tree(tmp_path / f"{name}-2") == tree(tmp_path / f"{name}-1")
    assert len(tree(tmp_path / "geneval-1")) == 1 + 3 * 4  # the sidecar; per prompt its metadata, 2 images, a grid
    assert len(tree(tmp_path / "generate-1")) == 1 + 3 * 2 + 1  # the sidecar, 2 images per prompt, the grid


# ---------------------------------------------------------------------------------------------------- with a checkpoint
@pytest.fixture(scope="module")
def sampler_run(pretrained, decoder_export, tmp_path_factory) -> dict[str, Path]:
    """A trained sampler checkpoint, its bundle (``vugen export``), and the demo's sampler + predict configs pointed
    at them: 3 held-out prompts, 2 images each, GenEval layout."""
    root = tmp_path_factory.mktemp("predict-stage")
    checkpoint = trained_checkpoint(make_stage(pretrained, decoder_export), root / "sampler.ckpt")
    arguments = {key: value.to_dict() for key, value in TINY_SAMPLER.items()}
    sampler_config = demo_config("sampler", root, pretrained, decoder_export=str(decoder_export), **arguments)
    predict = yaml.safe_load((ROOT / "configs/demo/predict.yaml").read_text())
    prompts = predict["data"]["init_args"]["prompts"][:3]
    predict["data"]["init_args"].update(prompts=prompts, images_per_prompt=2, seed=0)
    predict["trainer"] |= {"enable_progress_bar": False}
    (root / "predict.yaml").write_text(yaml.safe_dump(predict))
    metadata = root / "heldout.jsonl"
    metadata.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    run(["export", str(checkpoint), str(root / "bundle")])
    return {"root": root, "checkpoint": checkpoint, "sampler": sampler_config, "metadata": metadata}


def predict_command(run: dict[str, Path], out: Path) -> list[str]:
    configs = ["--config", str(run["sampler"]), "--config", str(run["root"] / "predict.yaml")]
    writer_out = ["--trainer.callbacks.init_args.out_dir", str(out)]
    # The trainer's root: LightningCLI saves the run's config.yaml there (by default, the working directory).
    root = ["--trainer.default_root_dir", str(out.parent)]
    return ["predict", *configs, *writer_out, *root, "--ckpt_path", str(run["checkpoint"])]


def test_vugen_predict_on_a_sampler_checkpoint_writes_the_bytes_of_export_geneval(
    sampler_run, decoder_export, tmp_path
):
    """The issue's check: `vugen predict --config sampler.yaml --config predict.yaml --ckpt_path sampler.ckpt` (the
    stage's predict_step) writes the held-out GenEval layout byte for byte as `vugen export-geneval` does from the
    checkpoint's exported bundle (the sidecars differ only in where the weights came from)."""
    run(predict_command(sampler_run, tmp_path / "predict"))
    bundle = sampler_run["root"] / "bundle"
    run(["export-geneval", str(bundle), str(sampler_run["metadata"]), str(tmp_path / "export"), "--n", "2"])

    predicted, exported = tree(tmp_path / "predict"), tree(tmp_path / "export")
    assert sorted(predicted) == sorted(exported) and len(predicted) == 3 * 4 + 1  # samples, grid, metadata; sidecar
    assert without_sidecar(predicted) == without_sidecar(exported)
    assert len(set(without_sidecar(predicted).values())) == 3 * 4  # no two files alike: the check is not vacuous
    stage_sidecar, bundle_sidecar = json.loads(predicted[SIDECAR_FILE]), json.loads(exported[SIDECAR_FILE])
    assert stage_sidecar["source"] == {"stage": "SamplerStage", "decoder_export": str(decoder_export)}
    for key in ("sampling", "decoder_sampling", "image_size", "seed", "seed_rule", "images_per_prompt"):
        assert stage_sidecar[key] == bundle_sidecar[key], key


@pytest.mark.slow
def test_vugen_predict_on_two_ddp_processes_writes_the_bytes_of_one(sampler_run, tmp_path):
    """The same command with ``--trainer.devices 2 --trainer.strategy ddp`` (a subprocess: DDP re-runs the command
    line) writes the same files, sidecar included: rank 0 takes prompts 0 and 2, rank 1 prompt 1."""
    run(predict_command(sampler_run, tmp_path / "one"))
    command = [str(Path(sys.executable).parent / "vugen"), *predict_command(sampler_run, tmp_path / "two")]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
