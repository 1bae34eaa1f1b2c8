"""The real-checkpoint configs of every family.

Stage 3 (`configs/<family>/decoder.yaml`): each parses with the `vugen` parser, its geometry is consistent, its
reducer reads as many channels as the family's vision features have, its adapter is the one in
`configs/<family>/adapter.yaml`, and every family trains with the same recipe.

Stage 2 (`configs/<family>/sampler.yaml`) and its latent cache (`configs/<family>/cache.yaml`): each parses (the
`vugen` parser; `vugen cache-latents`' function parser), both use the family's adapter, the sampler reads the decoder
stage's export and the caches the cache config writes, the cache encodes with that export's reducer at the decoder's
image size, and every family's sampler trains with the same recipe."""

from __future__ import annotations

import copy
import importlib
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from transformers import AutoConfig

from tests.test_configs import ROOT, ParseOnlyCLI
from vugen.commands.cache_latents import cache_latents
from vugen.registry import get_adapter_class

FAMILIES = sorted(p.parent.name for p in ROOT.glob("configs/*/adapter.yaml"))


class VisionWidth(NamedTuple):
    """Where the width ``D`` of a family's ``feature_source="vision"`` features comes from."""

    model_type: str  # transformers model_type of the released checkpoint the adapter config names
    field: str  # vision_config field that holds D: the tower's own width, before any merger / projector
    checkpoint: int | None  # D from the checkpoint's config.json where transformers' default is another model's
    tiny: str  # tiny recipe (vugen_adapters.tiny) that shows the adapter reads `field`


WIDTHS = {
    # llava-1.5-7b: CLIP ViT-L/14-336 = LlavaConfig's default vision_config (hidden_states[-2], CLS dropped).
    "llava": VisionWidth("llava", "hidden_size", None, "llava_clip"),
    # Qwen2-VL: the ViT is `embed_dim` wide (1280 in every release); `hidden_size` is the merger's output width.
    "qwen2_vl": VisionWidth("qwen2_vl", "embed_dim", None, "qwen2_vl"),
    # Qwen2.5-VL: the default hidden_size is 3584 (the 7B LM's width), but every released ViT is 1280 wide
    # (Qwen2.5-VL-3B-Instruct config.json: vision_config.hidden_size 1280, out_hidden_size 2048).
    "qwen2_5_vl": VisionWidth("qwen2_5_vl", "hidden_size", 1280, "qwen2_5_vl"),
    # Qwen3-VL: the defaults are the 8B+ ViT (1152, depth 27); the 2B/4B ViT is 1024 wide, depth 24
    # (Qwen3-VL-2B-Instruct config.json: vision_config.hidden_size 1024, deepstack_visual_indexes [5, 11, 17]).
    "qwen3_vl": VisionWidth("qwen3_vl", "hidden_size", 1024, "qwen3_vl"),
    # Idefics3-8B: SigLIP so400m, 1152 = the default width (the defaults' 224 px / 32 px patches are not the
    # checkpoint's 364 px / 14 px, which the width does not depend on).
    "idefics3": VisionWidth("idefics3", "hidden_size", None, "idefics3"),
    # SmolVLM-Instruct (2.2B) is an `idefics3` checkpoint with SigLIP so400m at 384 px: 1152 (SmolVLM-256M/500M: 768).
    "smolvlm": VisionWidth("idefics3", "hidden_size", None, "smolvlm"),
    # PaliGemma-3B: SigLIP so400m = PaliGemmaConfig's default vision_config.
    "paligemma": VisionWidth("paligemma", "hidden_size", None, "paligemma"),
    # InternVL3-1B: InternViT-300M-448px = InternVLVisionConfig's defaults.
    "internvl": VisionWidth("internvl", "hidden_size", None, "internvl"),
    # Gemma 3 4B: Gemma3Config's default vision_config is SigLIP-base (768); the checkpoint's is so400m at 896 px
    # (gemma-3-4b-it config.json: vision_config.hidden_size 1152, image_size 896, patch_size 14).
    "gemma3": VisionWidth("gemma3", "hidden_size", 1152, "gemma3"),
}
# Family-specific settings of each config; everything else is the one recipe every family shares.
SAMPLER_FAMILY_KEYS = {"model.init_args.adapter"}
FAMILY_KEYS = {
    "model.init_args.adapter",
    "model.init_args.reducer.init_args.feature_dim",
    "model.init_args.decoder.init_args.image_size",
    "model.init_args.decoder.init_args.patch_size",
    "data.init_args.image_size",
}


class _Parsed(Exception):
    """Carries the parsed config out of the CLI, which then stops before instantiating anything."""


class CapturingCLI(ParseOnlyCLI):
    """The real `vugen` parser; hands back the parsed `fit` config instead of building the classes it names."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config.fit)


def parse_fit(*paths: Path) -> Namespace:
    """`vugen fit --config PATH ...` as the `vugen` parser reads it (defaults filled in, types checked)."""
    try:
        CapturingCLI(args=["fit", *(arg for path in paths for arg in ("--config", str(path)))])
    except _Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"the vugen parser never reached instantiation for {paths}")


@cache
def fit_config(family: str, config: str = "decoder.yaml") -> Namespace:
    """`configs/<family>/<config>` as `vugen fit` parses it."""
    return parse_fit(ROOT / "configs" / family / config)


@cache
def cache_config(family: str) -> Namespace:
    """`configs/<family>/cache.yaml` as `vugen cache-latents` parses it (defaults filled in, types checked)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(cache_latents)
    parser.add_argument("--config", action="config")
    return parser.parse_args(["--config", str(ROOT / "configs" / family / "cache.yaml")])


def adapter_node(family: str, config: str) -> dict[str, Any]:
    """The adapter node of `configs/<family>/<config>` as written: `model.init_args.adapter`, or the top-level
    `adapter` of a command config (`cache.yaml`)."""
    written = yaml.safe_load((ROOT / "configs" / family / config).read_text())
    return written["adapter"] if config == "cache.yaml" else written["model"]["init_args"]["adapter"]


def real_width(spec: VisionWidth) -> int:
    """D of the released checkpoint: the checkpoint's number where given, else the transformers default."""
    return spec.checkpoint or getattr(AutoConfig.for_model(spec.model_type).vision_config, spec.field)


def build(class_path: str, *args: Any, **init_args: Any) -> Any:
    """Instantiate `class_path` (as a config names it) with these arguments."""
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(*args, **init_args)


def recipe(family: str, config_name: str = "decoder.yaml") -> dict[str, Any]:
    """The parsed config without its family-specific settings, the family's name replaced in every path."""
    family_keys = SAMPLER_FAMILY_KEYS if config_name == "sampler.yaml" else FAMILY_KEYS
    config = copy.deepcopy(fit_config(family, config_name))
    for key in {*family_keys, "config"}:  # `config`: the file's own path
        del config[key]
    text = yaml.safe_dump(config.as_dict(), sort_keys=True).replace(f"outputs/{family}/", "outputs/<family>/")
    return yaml.safe_load(text)


def test_every_family_has_a_decoder_config():
    assert set(FAMILIES) == set(WIDTHS)
    assert all((ROOT / "configs" / family / "decoder.yaml").is_file() for family in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_config_geometry(family):
    model, data = fit_config(family).model.init_args, fit_config(family).data.init_args
    decoder, reducer = model.decoder.init_args, model.reducer.init_args
    assert model.decoder.class_path == "vugen.nn.PixelDecoder"
    assert model.reducer.class_path == "vugen.nn.DimensionReducer"
    assert decoder.image_size % decoder.patch_size == 0
    assert 224 <= decoder.image_size <= 448
    assert data.image_size == decoder.image_size
    assert reducer.latent_dim == decoder.latent_dim == 32
    # JiT's -0.8 logit-normal mean holds at 256 px; the stage shifts larger images by side / 256 (its noise scaling).
    assert model.time_shift is None
    adapter_size = model.adapter.init_args.get("image_size")
    assert adapter_size in (None, decoder.image_size)  # dynamic-resolution families encode at the decoder's size


@pytest.mark.parametrize("family", FAMILIES)
def test_reducer_reads_the_vision_feature_width(family):
    spec = WIDTHS[family]
    assert fit_config(family).model.init_args.reducer.init_args.feature_dim == real_width(spec)
    if spec.checkpoint is not None:  # hard-coded only where transformers' default describes another model
        assert getattr(AutoConfig.for_model(spec.model_type).vision_config, spec.field) != spec.checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_width_field_is_what_the_adapter_reads(family, tiny_checkpoint):
    """On a tiny model of the family, with the config's adapter settings, D is `vision_config.<field>`."""
    spec, node = WIDTHS[family], adapter_node(family, "decoder.yaml")
    settings = {k: v for k, v in node["init_args"].items() if k not in ("pretrained", "revision", "dtype")}
    adapter = get_adapter_class(node["class_path"])(pretrained=str(tiny_checkpoint(spec.tiny)), **settings)
    config = adapter.vlm.config
    width = getattr(config.vision_config, spec.field)
    assert width != config.get_text_config().hidden_size  # so the check tells the tower from the projector
    assert adapter.feature_dim == width


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_is_the_family_adapter_config(family):
    assert adapter_node(family, "decoder.yaml") == adapter_node(family, "adapter.yaml")
    assert fit_config(family).model.init_args.adapter.init_args.dtype == "bfloat16"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_every_family_trains_with_the_same_recipe(family):
    assert recipe(family) == recipe("llava")


@pytest.mark.parametrize("config_name", ["decoder.yaml", "sampler.yaml"])
def test_lr_schedule_warms_up_to_max_lr_over_a_1e_6_floor(config_name):
    config = fit_config("llava", config_name)
    model = config.model.init_args
    optimizer = build(model.optimizer.class_path, [torch.nn.Parameter(torch.zeros(1))], **model.optimizer.init_args)
    scheduler = build(model.lr_scheduler.class_path, optimizer, **model.lr_scheduler.init_args)
    group = optimizer.param_groups[0]
    assert model.lr_scheduler.init_args.total_steps == config.trainer.max_steps
    assert group["lr"] == pytest.approx(1e-6)
    assert group["min_lr"] == pytest.approx(1e-6)
    for _ in range(5000):  # both stages warm up over 5k steps (2.5% of 200k, 5% of 100k)
        optimizer.step()
        scheduler.step()
    assert group["lr"] == pytest.approx(1e-4)
    assert tuple(group["betas"]) == (0.9, 0.95)  # AdamW's betas are not cycled
    assert group["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------- stage 2: the sampler
def test_every_family_has_sampler_and_cache_configs():
    for family in FAMILIES:
        assert (ROOT / "configs" / family / "sampler.yaml").is_file(), family
        assert (ROOT / "configs" / family / "cache.yaml").is_file(), family


@pytest.mark.parametrize("family", FAMILIES)
def test_sampler_config_reads_the_family_adapter_decoder_export_and_cache(family):
    sampler, decoder = fit_config(family, "sampler.yaml"), fit_config(family, "decoder.yaml")
    model, data = sampler.model.init_args, sampler.data.init_args
    assert sampler.model.class_path == "vugen.stages.SamplerStage"
    assert adapter_node(family, "sampler.yaml") == adapter_node(family, "adapter.yaml")
    assert model.adapter == decoder.model.init_args.adapter  # so the cache's fingerprint matches the sampler's
    assert model.decoder_export == decoder.model.init_args.export_dir == f"outputs/{family}/decoder-stage"
    assert model.lr_scheduler.init_args.total_steps == sampler.trainer.max_steps
    assert sampler.data.class_path == "vugen.data.latent_cache.LatentCacheDataModule"
    assert data.cache_dir == cache_config(family).out_dir == f"outputs/{family}/latents/train"
    assert data.val_cache_dir == f"outputs/{family}/latents/val"  # the cache header's --split val --out_dir
    assert f"--out_dir {data.val_cache_dir}" in (ROOT / "configs" / family / "cache.yaml").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_config_encodes_with_the_decoder_export_at_the_decoder_size(family):
    cached, decoder = cache_config(family), fit_config(family, "decoder.yaml")
    assert adapter_node(family, "cache.yaml") == adapter_node(family, "adapter.yaml")
    assert cached.reducer_path == f"{decoder.model.init_args.export_dir}/reducer"
    assert cached.data.class_path == "vugen.data.image_text.ImageTextDataModule"
    data = cached.data.init_args
    assert data.image_size == decoder.data.init_args.image_size == decoder.model.init_args.decoder.init_args.image_size
    assert data.shards and data.caption_key  # stage 2 trains on captions (stage 3's data has caption_key null)
    assert (cached.split, cached.device) == ("train", None)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_every_family_samples_with_the_same_recipe(family):
    assert recipe(family, "sampler.yaml") == recipe("llava", "sampler.yaml")


def test_sampler_recipe():
    """The shared stage-2 recipe (checked on one family; the test above makes it every family's)."""
    config = fit_config("llava", "sampler.yaml")
    model, trainer = config.model.init_args, config.trainer
    assert (trainer.accelerator, trainer.strategy, trainer.precision) == ("gpu", "ddp", "bf16-mixed")
    assert "attn_implementation" not in adapter_node("llava", "sampler.yaml")["init_args"]  # sdpa: honours 4-D masks
    shape = {"lora_rank": 64, "lora_alpha": 64.0, "lora_dropout": 0.0, "lora_scope": "image_tokens"}
    shape |= {"image_attention": "bidirectional", "head": "mlp", "head_width": 1024, "head_depth": 3}
    shape |= {"latent_patch_size": 1}  # one latent token per LM token: the released families' geometry as measured
    assert model.latent_sampler.as_dict() == shape
    assert model.prompt_dropout == 0.1
    assert (model.time_schedule, model.time_mean, model.time_std, model.time_shift) == ("logit_normal", 0.0, 1.0, None)
    sampling = {"solver": "euler", "steps": 50, "guidance_scale": 4.0, "guidance_interval": None, "time_shift": None}
    assert model.sampling.as_dict() == sampling  # no sampling shift: the training shift
    assert model.image_size is None  # the decoder export's: the cache's token grid
    assert model.activation_checkpointing is True
    callbacks = {c.class_path: c.init_args for c in trainer.callbacks}
    assert callbacks["vugen.callbacks.EMA"].decay == 0.9999
    checkpoint = callbacks["lightning.pytorch.callbacks.ModelCheckpoint"]
    assert checkpoint.every_n_train_steps > 0 and checkpoint.save_last is True and checkpoint.save_top_k == -1
    # not the decoder stage's folder: its last.ckpt would be overwritten
    decoder_checkpoints = {c.class_path: c.init_args for c in fit_config("llava").trainer.callbacks}
    assert checkpoint.dirpath != decoder_checkpoints["lightning.pytorch.callbacks.ModelCheckpoint"].dirpath
    assert trainer.logger.class_path == "lightning.pytorch.loggers.TensorBoardLogger"


def test_sampler_config_switches_to_fsdp2_with_the_trainer_config():
    config = parse_fit(ROOT / "configs/llava/sampler.yaml", ROOT / "configs/trainer/fsdp.yaml")
    strategy = config.trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert strategy.init_args.data_parallel_size == config.trainer.devices
    assert config.model.init_args == fit_config("llava", "sampler.yaml").model.init_args  # only the trainer changes
