"""The latent sampler on the tiny Gemma 3, whose language model alternates sliding-window (8 tokens) and full-attention
layers, with prompts and a latent block longer than the window: the prompt's KV cache gives the full pass's velocities,
generation equals integrating the full pass, and a bundle generates through `vugen generate` (bidirectional and causal
latent attention)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures_bundle import make_decoder_export, make_stage
from tests.test_generate_cli import assert_same_image, pixels
from vugen.adapter import positions_from_mask
from vugen.commands.generate import generate
from vugen.pipeline import VugenPipeline
from vugen.stages.sampler import SamplerStage
from vugen_adapters.gemma3 import Gemma3Adapter

PROMPTS = ["a large red circle on the left", "a small blue square to the left of a large yellow triangle"]


@pytest.fixture(scope="module")
def gemma3(tiny_checkpoint) -> Path:
    return tiny_checkpoint("gemma3")


@pytest.fixture(scope="module")
def decoder_export(gemma3, tmp_path_factory) -> Path:
    return make_decoder_export(Gemma3Adapter(str(gemma3)), tmp_path_factory.mktemp("decoder") / "export")


@pytest.fixture(scope="module", params=["bidirectional", "causal"])
def stage(request, gemma3, decoder_export) -> SamplerStage:
    return make_stage(gemma3, decoder_export, adapter_class=Gemma3Adapter, image_attention=request.param)


def test_the_prompt_cache_gives_the_full_pass_velocities(stage):
    sampler = stage.latent_sampler
    prefix, mask = sampler.prefix(PROMPTS)
    window = stage.adapter.language_model.config.sliding_window
    assert mask.sum(-1).min() > window and sampler.bridge.num_tokens > window
    z_t = torch.randn(2, sampler.bridge.num_tokens, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        full = sampler.velocity(z_t, t, prefix, mask)
        positions = positions_from_mask(mask, mask.shape[1])
        prefix_hidden, cache = sampler.run(prefix, mask, positions, sampler.image_from(mask))
        context = prefix_hidden[:, -1]
        cached = sampler._cached_velocity(z_t, t, torch.arange(2), cache, mask, context)
        again = sampler._cached_velocity(z_t, t, torch.arange(2), cache, mask, context)  # copied: the window
        one = sampler._cached_velocity(z_t[1:], t[1:], torch.tensor([1]), cache, mask, context)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    assert torch.equal(again, cached)
    torch.testing.assert_close(one, full[1:], atol=1e-5, rtol=1e-4)


def test_generation_equals_integrating_the_full_pass(stage):
    """With guidance (the empty prompts' rows of the same cache) and two Heun steps."""
    sampler, sampling = stage.latent_sampler, stage.sampling.with_overrides(solver="heun")
    assert sampling.guidance_scale != 1.0
    prefix, mask = sampler.prefix(sampler.guided_prompts(PROMPTS, sampling))

    def full_pass(z_t: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return sampler.velocity(z_t, t, prefix[rows], mask[rows])

    with torch.no_grad():
        expected = sampler.integrate(full_pass, [0, 1], sampling)
    torch.testing.assert_close(sampler.generate(PROMPTS, [0, 1], sampling), expected, atol=1e-5, rtol=1e-4)


def test_vugen_generate_writes_the_bundles_images(stage, tmp_path):
    bundle = stage.pipeline().save_pretrained(tmp_path / "bundle")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS))
    files = generate(bundle=str(bundle), out=str(tmp_path / "out"), prompts=str(prompt_file), seed=3)
    expected = VugenPipeline.from_pretrained(bundle).sample(PROMPTS, [3, 4])
    torch.testing.assert_close(expected, stage.pipeline().sample(PROMPTS, [3, 4]), atol=1e-5, rtol=0)
    for file, image in zip(files[:2], expected, strict=True):
        assert_same_image(pixels(file), image)
