"""`make demo` (vugen/demo.py) runs `vugen` command lines on the shipped configs: each one parses as the demo gives
it, and its latent-cache step writes both splits. The whole demo takes 15 minutes and is not run here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vugen import demo
from vugen.cli import run
from vugen.data.latent_cache import read_index
from vugen.nn import DimensionReducer
from vugen_adapters.llava import LlavaAdapter

ROOT = Path(__file__).resolve().parents[1]
GENEVAL = demo.export_geneval(demo.OUT / "heldout_single.jsonl", demo.OUT / "heldout" / "single")
# Each command line of the demo, with settings its parsed configuration must hold (dotted keys).
STEPS = {
    "tiny": (demo.TINY_VLM, {"family": "llava", "directory": "outputs/demo/tiny-llava"}),
    "fit reducer": (demo.fit("reducer.yaml"), {"model.class_path": "vugen.stages.ReducerStage"}),
    "fit decoder": (demo.fit("decoder.yaml"), {"model.class_path": "vugen.stages.DecoderStage"}),
    "test decoder": (demo.TEST_DECODER, {"ckpt_path": "outputs/demo/decoder.ckpt"}),
    "cache train": (demo.CACHE_TRAIN, {"split": "train", "out_dir": "outputs/demo/latents/train"}),
    "cache val": (demo.CACHE_VAL, {"split": "val", "out_dir": "outputs/demo/latents/val"}),
    "fit sampler": (demo.fit("sampler.yaml"), {"data.init_args.val_cache_dir": "outputs/demo/latents/val"}),
    "export": (demo.EXPORT, {"checkpoint": "outputs/demo/sampler.ckpt", "out": "outputs/demo/bundle"}),
    "export-geneval": (GENEVAL, {"bundle": "outputs/demo/bundle", "n": demo.IMAGES_PER_PROMPT}),
}


def lookup(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
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

    written = [run(demo.CACHE_TRAIN), run(demo.CACHE_VAL)]

    assert written == [demo.OUT / "latents" / "train", demo.OUT / "latents" / "val"]
    indexes = [read_index(folder) for folder in written]
    assert [(index["split"], index["num_samples"]) for index in indexes] == [("train", 8192), ("val", 256)]
