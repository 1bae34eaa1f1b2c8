"""Every family's shipped configs run, at the released model's geometry.

For each family in `configs/`: a random checkpoint at the geometry of the released checkpoint its configs name
(`vugen_adapters.tiny.released`: the released widths, heads, patch / merge / pixel-shuffle sizes, image size and
processor settings; tower and language model cut to 1-2 blocks, a tiny vocabulary), then the commands of the
configs' headers on it, through the real `vugen` CLI in this process: `vugen fit` of `decoder.yaml` (stages 1 + 3,
one optimizer step), `vugen cache-latents` of `cache.yaml` (2 images), `vugen fit` of `sampler.yaml` (stage 2, one
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from vugen_adapters.tiny.released import build_released_geometry, released_config
from vugen_adapters.tiny.released_checkpoints import RELEASED

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
NUM_IMAGES = 2


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


class FamilyRun:
    """The commands of one family's config headers, in the working directory, each timed and its output checked."""

    def __init__(self, family: str, vlm: Path, shards: str) -> None:
        self.family, self.vlm, self.shards = family, vlm, shards
        self.configs, self.out = ROOT / "configs" / family, Path("outputs") / family
        self.image_size = yaml_of(family, "decoder.yaml")["data"]["init_args"]["image_size"]
        self.seconds: dict[str, tuple[float, float]] = {}  # step -> (wall, CPU): CPU time is the machine's load aside

    def timed(self, name: str, step: Callable[..., Any], *args: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = step(*args)
        self.seconds[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return result

    def fit(self, name: str, config: str, *overrides: str) -> Any:
        """`vugen fit --config configs/<family>/<config>` for one CPU step on the local VLM; returns the CLI."""
        argv = ["fit", "--config", str(self.configs / config), *ONE_CPU_STEP, *ONE_PROCESS_LOADER, *overrides]
        return self.timed(name, run, [*argv, *local_vlm("model.init_args.adapter", self.vlm)])

    def decoder_stage(self) -> None:
        """Stages 1 + 3: one step, then the export the cache and the sampler read."""
        data = [f"--data.init_args.shards={self.shards}", f"--data.init_args.val_shards={self.shards}"]
        one_step = ["--model.init_args.sampling.steps=1", "--trainer.callbacks.init_args.save_last=false"]
        cli = self.fit("decoder fit", "decoder.yaml", *data, *one_step)
        checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
        assert checkpoint.dirpath.endswith(f"outputs/{self.family}/checkpoints") and not checkpoint.save_last
        assert any(isinstance(c, EMA) for c in cli.trainer.callbacks)
        assert cli.model.adapter.feature_dim == cli.model.reducer.feature_dim
        training = json.loads((self.out / "decoder-stage" / "training.json").read_text())
        assert training["global_step"] == 1 and math.isfinite(training["metrics"]["train/loss"])

    def latent_cache(self) -> None:
        """`vugen cache-latents` of the train split, at the family's feature-token grid."""
        data = [f"--data.init_args.shards={self.shards}", "--data.init_args.num_workers=0"]
        argv = ["cache-latents", "--config", str(self.configs / "cache.yaml"), *data, "--device=cpu"]
        self.timed("cache", run, [*argv, *local_vlm("adapter", self.vlm)])
        cache, grid = self.out / "latents" / "train", TOKEN_GRID[self.family]
        index = json.loads((cache / "index.json").read_text())
        assert index["token_grid"] == [grid, grid] and index["image_size"] == [self.image_size] * 2
        latents = load_file(cache / "latents-00000.safetensors")["latents"]
        assert latents.shape == (NUM_IMAGES, grid * grid, 32) and torch.isfinite(latents).all()

    def sampler_stage(self) -> None:
        """Stage 2, one step; the train cache also validates (no val split cached)."""
        cli = self.fit(
            "sampler fit", "sampler.yaml", f"--data.init_args.val_cache_dir={self.out / 'latents' / 'train'}"
        )
        assert cli.trainer.global_step == 1 and math.isfinite(cli.trainer.callback_metrics["train/loss"].item())

    def generation(self) -> None:
        """`vugen export` of the sampler's last checkpoint, then `vugen generate` of one image (one sampler step)."""
        checkpoint, bundle, samples = (
            self.out / "sampler-checkpoints" / "last.ckpt",
            self.out / "bundle",
            self.out / "samples",
        )
        self.timed("export", run, ["export", str(checkpoint), str(bundle)])
        prompt = ["--prompt", "a large red circle on the left", "--steps=1", "--accelerator=cpu"]
        paths = self.timed("generate", run, ["generate", f"--bundle={bundle}", f"--out={samples}", *prompt])
        with Image.open(paths[0]) as image:
            assert image.size == (self.image_size, self.image_size) and image.mode == "RGB"
        record = json.loads((samples / "vugen_sampling.json").read_text())  # written last: a complete run
        assert record["image_size"] == self.image_size and record["sampling"]["steps"] == 1

    def report(self) -> str:
        steps = (f"{step} {wall:.1f} s ({cpu:.1f} s CPU)" for step, (wall, cpu) in self.seconds.items())
        return f"{self.family}: {', '.join(steps)}"


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("family", FAMILIES)
def test_family_configs_run_at_the_released_geometry(family, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shards = write_shards(tmp_path / "data", num_shards=1, per_shard=NUM_IMAGES)
    monkeypatch.chdir(tmp_path)  # the configs write under outputs/<family>/, relative to the working directory
    steps = FamilyRun(family, tmp_path / "vlm", shards)
    steps.timed("checkpoint", build_released_geometry, family, steps.vlm)
    for stage in (steps.decoder_stage, steps.latent_cache, steps.sampler_stage, steps.generation):
        stage()
        gc.collect()  # the stages' models, before the next one loads its own
    print(steps.report())
