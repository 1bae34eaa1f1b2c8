"""Fixtures of a trained-looking latent sampler on the tiny LLaVA and its saved bundle, shared by the pipeline and
command tests (registered in conftest.py via ``pytest_plugins``), with the helpers that build them.

The fixtures are module-scoped: each test module that uses them builds its own stage and bundle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from vugen.adapter import VLMAdapter
from vugen.generation import LatentSamplerConfig, SamplingConfig
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage
from vugen.stages.sampler import SamplerStage
from vugen_adapters.llava import LlavaAdapter

IMAGE_SIZE = 16
TINY_SAMPLER = {
    "latent_sampler": LatentSamplerConfig(lora_rank=4, head_width=32, head_depth=1),
    "sampling": SamplingConfig(steps=2, guidance_scale=2.0),
}


def perturb(parameters: Iterable[nn.Parameter], seed: int) -> None:
    """Add noise to freshly initialised weights, so that zero-initialised layers (LoRA B, adaLN gates, output heads)
    do something: without it the images would not depend on the latents, nor the latents on the LoRA."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def make_decoder_export(adapter: VLMAdapter, directory: Path) -> Path:
    """A decoder-stage export with random weights (the sampler only needs its shapes to be right)."""
    torch.manual_seed(0)
    decoder = PixelDecoder(latent_dim=8, patch_size=4, width=32, depth=1, num_heads=2, image_size=IMAGE_SIZE)
    reducer = DimensionReducer(adapter.feature_dim, 8, hidden_dim=32, num_blocks=1)
    perturb([*decoder.parameters(), *reducer.parameters()], seed=0)
    return DecoderStage(adapter, decoder, reducer=reducer).export(directory)


def sampler_arguments(base: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """``SamplerStage`` arguments: ``base`` with ``kwargs``, where the :class:`LatentSamplerConfig` fields among them
    (``lora_scope="all"``, ``head="linear"``, ...) replace those of ``base["latent_sampler"]``."""
    fields = {field.name for field in dataclasses.fields(LatentSamplerConfig)}
    shape = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
    config = dataclasses.replace(base.get("latent_sampler", LatentSamplerConfig()), **shape)
    return base | {"latent_sampler": config} | kwargs


def make_stage(
    pretrained: Path,
    decoder_export: Path,
    seed: int = 0,
    adapter_class: type[VLMAdapter] = LlavaAdapter,
    **kwargs,
) -> SamplerStage:
    """A sampler stage on a fresh tiny VLM (LLaVA by default) whose LoRA and bridge are random (``kwargs``: see
    :func:`sampler_arguments`)."""
    arguments = sampler_arguments(TINY_SAMPLER, **kwargs)
    stage = SamplerStage(adapter_class(str(pretrained)), str(decoder_export), **arguments)
    perturb([p for p in stage.parameters() if p.requires_grad], seed)
    return stage.eval()


def lora_on_every_token(language_model: nn.Module, lora_folder: Path) -> PeftModel:
    """A bundle's LoRA put on ``language_model`` (in place) by plain peft, from its config and weights files: what a
    user who loads ``lora/`` by hand gets, the LoRA acting on every token."""
    config = LoraConfig(**LoraConfig.from_json_file(lora_folder / "scoped_lora_config.json"))
    model = PeftModel(language_model, config)
    loaded = set_peft_model_state_dict(model, load_file(lora_folder / "adapter_model.safetensors"))
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    return model


@pytest.fixture(scope="module")
def pretrained(tiny_checkpoint) -> Path:
    """The saved tiny LLaVA."""
    return tiny_checkpoint("llava")


@pytest.fixture(scope="module")
def decoder_export(pretrained, tmp_path_factory) -> Path:
    """A random decoder-stage export for the tiny LLaVA (:func:`make_decoder_export`)."""
    return make_decoder_export(LlavaAdapter(str(pretrained)), tmp_path_factory.mktemp("decoder") / "export")


@pytest.fixture(scope="module")
def stage(pretrained, decoder_export) -> SamplerStage:
    """A random sampler stage in eval mode (:func:`make_stage` with seed 0)."""
    return make_stage(pretrained, decoder_export)


@pytest.fixture(scope="module")
def bundle(stage, tmp_path_factory) -> Path:
    """The bundle of ``stage``, saved once per module (copy it before changing it)."""
    return stage.pipeline().save_pretrained(tmp_path_factory.mktemp("bundle") / "bundle")
