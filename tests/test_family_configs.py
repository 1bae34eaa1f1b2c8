"""The real-checkpoint stage-3 configs (`configs/<family>/decoder.yaml`): each parses with the `vugen` parser, its
geometry is consistent, its reducer reads as many channels as the family's vision features have, its adapter is the
one in `configs/<family>/adapter.yaml`, and every family trains with the same recipe."""

from __future__ import annotations

import copy
import importlib
from functools import cache
from typing import Any, NamedTuple

import pytest
import torch
import yaml
from jsonargparse import Namespace
from transformers import AutoConfig

from tests.test_configs import ROOT, ParseOnlyCLI
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
# Family-specific settings; everything else is the one recipe every family shares.
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


@cache
def fit_config(family: str) -> Namespace:
    """`configs/<family>/decoder.yaml` as `vugen fit` parses it (defaults filled in, types checked)."""
    path = ROOT / "configs" / family / "decoder.yaml"
    try:
        CapturingCLI(args=["fit", "--config", str(path)])
    except _Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"the vugen parser never reached instantiation for {path}")


def adapter_node(family: str, config: str) -> dict[str, Any]:
    """The `model.init_args.adapter` node of `configs/<family>/<config>` as written."""
    return yaml.safe_load((ROOT / "configs" / family / config).read_text())["model"]["init_args"]["adapter"]


def real_width(spec: VisionWidth) -> int:
    """D of the released checkpoint: the checkpoint's number where given, else the transformers default."""
    return spec.checkpoint or getattr(AutoConfig.for_model(spec.model_type).vision_config, spec.field)


def build(class_path: str, *args: Any, **init_args: Any) -> Any:
    """Instantiate `class_path` (as a config names it) with these arguments."""
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(*args, **init_args)


def recipe(family: str) -> dict[str, Any]:
    """The parsed config without its family-specific settings, the family's name replaced in every path."""
    config = copy.deepcopy(fit_config(family))
    for key in {*FAMILY_KEYS, "config"}:  # `config`: the file's own path
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


def test_lr_schedule_warms_up_to_max_lr_over_a_1e_6_floor():
    config = fit_config("llava")
    model = config.model.init_args
    optimizer = build(model.optimizer.class_path, [torch.nn.Parameter(torch.zeros(1))], **model.optimizer.init_args)
    scheduler = build(model.lr_scheduler.class_path, optimizer, **model.lr_scheduler.init_args)
    group = optimizer.param_groups[0]
    assert model.lr_scheduler.init_args.total_steps == config.trainer.max_steps
    assert group["lr"] == pytest.approx(1e-6)
    assert group["min_lr"] == pytest.approx(1e-6)
    for _ in range(int(0.025 * config.trainer.max_steps)):
        optimizer.step()
        scheduler.step()
    assert group["lr"] == pytest.approx(1e-4)
    assert tuple(group["betas"]) == (0.9, 0.95)  # AdamW's betas are not cycled
    assert group["weight_decay"] == 0.0
