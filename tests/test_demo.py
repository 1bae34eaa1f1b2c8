"""`make demo` (vugen/demo.py) runs `vugen` command lines on the shipped configs: each one parses as the demo gives
it, its latent-cache step writes both splits, and it refuses to share the decoder between VLMs of different vision
towers. The whole demo takes 15 minutes and is not run here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vugen import demo
from vugen.cli import run
from vugen.data.latent_cache import read_index
from vugen.nn import DimensionReducer
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.tiny import build_tiny_vlm

ROOT = Path(__file__).resolve().parents[1]
GENEVAL = demo.export_geneval("understands", demo.OUT / "heldout_single.jsonl", demo.OUT / "heldout" / "single")
TAUGHT = "outputs/demo/tiny-llava-understands"
# Each command line of the demo, with settings its parsed configuration must hold (dotted keys).
STEPS = {
    "tiny": (demo.TINY_VLM, {"family": "llava", "directory": "outputs/demo/tiny-llava"}),
    "tiny --understand": (
        demo.UNDERSTANDING_VLM,
        {"directory": TAUGHT, "understand": "shapes", "understand_recipe.heldout_ratio": 0.2},
    ),
    "fit reducer": (demo.fit("reducer.yaml"), {"model.class_path": "vugen.stages.ReducerStage"}),
    "fit decoder": (demo.fit("decoder.yaml"), {"model.class_path": "vugen.stages.DecoderStage"}),
    "test decoder": (demo.TEST_DECODER, {"ckpt_path": "outputs/demo/decoder.ckpt"}),
    "cache train": (demo.cache_latents("random", "train"), {"split": "train", "out_dir": "outputs/demo/latents/train"}),
    "cache val": (demo.cache_latents("random", "val"), {"split": "val", "out_dir": "outputs/demo/latents/val"}),
    "cache taught val": (
        demo.cache_latents("understands", "val"),
        {"adapter.init_args.pretrained": TAUGHT, "out_dir": "outputs/demo/latents-understands/val"},
    ),
    "fit sampler": (demo.fit_sampler("random"), {"data.init_args.val_cache_dir": "outputs/demo/latents/val"}),
    "fit taught sampler": (
        demo.fit_sampler("understands"),
        {
            "model.init_args.adapter.init_args.pretrained": TAUGHT,
            "model.init_args.decoder_export": "outputs/demo/decoder-stage",  # shared: the towers are the same
            "data.init_args.cache_dir": "outputs/demo/latents-understands/train",
            "data.init_args.val_cache_dir": "outputs/demo/latents-understands/val",
            "trainer.max_steps": yaml.safe_load((ROOT / "configs/demo/sampler.yaml").read_text())["trainer"][
                "max_steps"
            ],
            "trainer.callbacks.0.init_args.filename": "sampler-understands",  # beside, not over, sampler.ckpt
            "trainer.logger.init_args.name": "sampler-understands",
        },
    ),
    "export": (demo.export("random"), {"checkpoint": "outputs/demo/sampler.ckpt", "out": "outputs/demo/bundle"}),
    "export taught": (
        demo.export("understands"),
        {"checkpoint": "outputs/demo/sampler-understands.ckpt", "out": "outputs/demo/bundle-understands"},
    ),
    "export-geneval": (GENEVAL, {"bundle": "outputs/demo/bundle-understands", "n": demo.IMAGES_PER_PROMPT}),
}


def lookup(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[int(key)] if key.isdigit() else config[key]
    return config


@pytest.mark.parametrize("step", STEPS)
def test_demo_command_parses(step, monkeypatch, capsys):
    argv, expected = STEPS[step]
    monkeypatch.chdir(ROOT)  # the demo runs from a clone's root: its config paths are relative to it
    with pytest.raises(SystemExit) as stop:
        run([*argv, "--print_config"])  # parses the whole command line and its configs, runs nothing
    assert stop.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert {key: lookup(config, key) for key in expected} == expected


def test_demo_cache_step_writes_both_splits(tiny_checkpoint, tmp_path, monkeypatch):
    """The cache step as the demo runs it, in a folder laid out like a clone after stage 3 (a random reducer):
    the config's split, then the val split into the folder the sampler config reads, at the config's sizes."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    out = tmp_path / demo.OUT
    out.mkdir(parents=True)
    (out / "tiny-llava").symlink_to(tiny_checkpoint("llava"))
    feature_dim = LlavaAdapter(str(out / "tiny-llava")).feature_dim
    DimensionReducer(feature_dim, 8, hidden_dim=32, num_blocks=1).save_pretrained(out / "decoder-stage" / "reducer")
    monkeypatch.chdir(tmp_path)

    written = [run(demo.cache_latents("random", split)) for split in ("train", "val")]

    assert written == [demo.OUT / "latents" / "train", demo.OUT / "latents" / "val"]
    indexes = [read_index(folder) for folder in written]
    assert [(index["split"], index["num_samples"]) for index in indexes] == [("train", 8192), ("val", 256)]


def test_the_decoder_is_shared_only_between_vlms_of_one_vision_tower(tmp_path):
    """Two builds of one seed pass; another seed's tower (a negative control) stops the demo in one line."""
    paths = {name: build_tiny_vlm("llava", tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    demo._check_same_tower(paths["a"], paths["b"])
    with pytest.raises(SystemExit, match="another vision tower"):
        demo._check_same_tower(paths["a"], paths["c"])


def test_python_m_vugen_is_the_vugen_command():
    """The demo starts its side-by-side steps as `python -m vugen ...`."""
    done = subprocess.run([sys.executable, "-m", "vugen", "tiny", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--understand" in done.stdout
