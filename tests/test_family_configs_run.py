"""Every family's shipped configs run, at the released model's geometry.

For each family in `configs/`: a random checkpoint at the geometry of the released checkpoint its configs name
(`vugen_adapters.tiny.released`: the released widths, heads, patch / merge / pixel-shuffle sizes, image size and
processor settings; tower and language model cut to 1-2 blocks, a tiny vocabulary), then the commands of the
configs' headers on it, through the real `vugen` CLI in this process: `vugen fit` of `decoder.yaml` (stages 1 + 3,
one optimizer step), `vugen cache-latents` of `cache.yaml` (4 images), `vugen fit` of `sampler.yaml` (stage 2, one
step), `vugen export` of its checkpoint and `vugen generate` of one image from the bundle.

The command lines change only what a one-step CPU run needs, never the geometry or the recipe: where it runs (CPU,
one process), fp32 instead of bf16 (bf16 weights and bf16-mixed are very slow on CPUs), how long (one step, no
validation, one sampler step, no snapshot of the one-step decoder run), batch size 1 without worker processes, no
logger or progress bar, the data (tar shards written here) and the VLM (`pretrained`).
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig

from tests.test_configs import ROOT
from tests.test_family_configs import FAMILIES, WIDTHS
from tests.test_image_text_data import write_shards
from vugen.callbacks import EMA
from vugen.cli import run
from vugen_adapters.tiny.released import RELEASED, build_released_geometry, released_config

# Feature tokens per side at each family's encoder input, as the decoder configs' headers state them.
TOKEN_GRID = {
    "gemma3": 64,  # 896 px / 14 px (the adapter upsamples the 448 px images)
    "idefics3": 26,  # one 364 px tile / 14 px
    "internvl": 32,  # 448 / 14
    "llava": 24,  # 336 / 14
    "paligemma": 16,  # 224 / 14
    "qwen2_5_vl": 32,  # 448 / 14
    "qwen2_vl": 32,  # 448 / 14
    "qwen3_vl": 28,  # 448 / 16
    "smolvlm": 27,  # one 384 px tile / 14 px
}
ONE_CPU_STEP = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]
ONE_PROCESS_LOADER = ["--data.init_args.batch_size=1", "--data.init_args.num_workers=0"]
NUM_IMAGES = 4


def local_vlm(node: str, pretrained: Path) -> list[str]:
    """The adapter at `node` reads the local checkpoint, in fp32."""
    return [f"--{node}.init_args.pretrained={pretrained}", f"--{node}.init_args.dtype=float32"]


def yaml_of(family: str, name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / family / name).read_text())


def test_every_family_config_has_its_released_geometry():
    assert set(RELEASED) == set(FAMILIES) == set(TOKEN_GRID)


@pytest.mark.parametrize("family", FAMILIES)
def test_released_geometry_is_the_one_the_configs_name(family):
    """The checkpoint is the adapter config's, and the tower is as wide as the config's reducer reads."""
    released, adapter = RELEASED[family], yaml_of(family, "adapter.yaml")["model"]["init_args"]["adapter"]
    assert released.checkpoint == adapter["init_args"]["pretrained"]
    decoder = yaml_of(family, "decoder.yaml")["model"]["init_args"]
    assert released.config["vision_config"][WIDTHS[family].field] == decoder["reducer"]["init_args"]["feature_dim"]


@pytest.mark.parametrize("family", FAMILIES)
def test_released_config_cuts_the_depth_only(family):
    """The config built from the data keeps every released tower field and the LM's widths; only depth changes."""
    released = RELEASED[family].config
    config = AutoConfig.for_model(**released_config(family, layers=1))
    vision, text = config.vision_config, config.get_text_config()
    for key, value in released["vision_config"].items():
        if key not in ("depth", "num_hidden_layers", "fullatt_block_indexes", "deepstack_visual_indexes"):
            assert getattr(vision, key) in (value, tuple(value) if isinstance(value, list) else value), key
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        if key in released["text_config"]:
            assert getattr(text, key) == released["text_config"][key], key
    depth = getattr(vision, "depth", None) or vision.num_hidden_layers
    assert (depth, text.num_hidden_layers) == RELEASED[family].min_layers


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_configs_run_at_the_released_geometry(family, tmp_path, monkeypatch):
    seconds: dict[str, float] = {}

    def timed(name: str, argv: list[str]):
        start = time.perf_counter()
        result = run(argv)
        seconds[name] = time.perf_counter() - start
        return result

    start = time.perf_counter()
    vlm = build_released_geometry(family, tmp_path / "vlm")
    seconds["checkpoint"] = time.perf_counter() - start
    (tmp_path / "data").mkdir()
    shards = write_shards(tmp_path / "data", num_shards=1, per_shard=NUM_IMAGES)
    monkeypatch.chdir(tmp_path)  # the configs write under outputs/<family>/, relative to the working directory
    configs, out = ROOT / "configs" / family, Path("outputs") / family
    image_size = yaml_of(family, "decoder.yaml")["data"]["init_args"]["image_size"]

    # stages 1 + 3
    data = [f"--data.init_args.shards={shards}", f"--data.init_args.val_shards={shards}", *ONE_PROCESS_LOADER]
    one_step_decoder = ["--model.init_args.sampling.steps=1", "--trainer.callbacks.init_args.save_last=false"]
    decoder_args = [*ONE_CPU_STEP, *local_vlm("model.init_args.adapter", vlm), *data, *one_step_decoder]
    cli = timed("decoder fit", ["fit", "--config", str(configs / "decoder.yaml"), *decoder_args])
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.dirpath.endswith(f"outputs/{family}/checkpoints") and not checkpoint.save_last
    assert any(isinstance(c, EMA) for c in cli.trainer.callbacks)
    assert cli.model.adapter.feature_dim == cli.model.reducer.feature_dim
    del cli
    gc.collect()
    training = json.loads((out / "decoder-stage" / "training.json").read_text())
    assert training["global_step"] == 1 and math.isfinite(training["metrics"]["train/loss"])

    # the latent cache
    cache_args = [*local_vlm("adapter", vlm), f"--data.init_args.shards={shards}", "--data.init_args.num_workers=0"]
    timed("cache", ["cache-latents", "--config", str(configs / "cache.yaml"), *cache_args, "--device=cpu"])
    index = json.loads((out / "latents" / "train" / "index.json").read_text())
    assert index["token_grid"] == [TOKEN_GRID[family]] * 2 and index["image_size"] == [image_size] * 2
    latents = load_file(out / "latents" / "train" / "latents-00000.safetensors")["latents"]
    assert latents.shape == (NUM_IMAGES, TOKEN_GRID[family] ** 2, 32) and torch.isfinite(latents).all()

    # stage 2 (the one cache also validates: no separate val split)
    sampler_args = [*ONE_CPU_STEP, *local_vlm("model.init_args.adapter", vlm), *ONE_PROCESS_LOADER]
    sampler_args.append(f"--data.init_args.val_cache_dir={out / 'latents' / 'train'}")
    cli = timed("sampler fit", ["fit", "--config", str(configs / "sampler.yaml"), *sampler_args])
    assert cli.trainer.global_step == 1 and math.isfinite(cli.trainer.callback_metrics["train/loss"].item())
    del cli
    gc.collect()

    # bundle and one image
    bundle = timed("export", ["export", str(out / "sampler-checkpoints" / "last.ckpt"), str(out / "bundle")])
    prompt = ["--prompt", "a large red circle on the left", "--steps=1", "--accelerator=cpu"]
    paths = timed("generate", ["generate", f"--bundle={bundle}", f"--out={out / 'samples'}", *prompt])
    with Image.open(paths[0]) as image:
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        assert len(set(image.getdata())) > 1  # decoded pixels, not a blank canvas
    print(f"{family}: " + ", ".join(f"{step} {value:.1f} s" for step, value in seconds.items()))
