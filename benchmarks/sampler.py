"""Stage 2 (``SamplerStage``): the prompt KV cache, the latent cache, and Lightning against plain PyTorch, each
against its reference in the same run.

Rows:

- ``sampler/generate/<solver>/<steps>``: ms per image of ``LatentSampler.generate`` (the stage's latent sampler),
  which runs the prompt once and reuses its KV cache at every flow step, vs :func:`uncached_latents`: the same solver
  loop and guidance re-running the whole ``[prompt][BOI][latents]`` sequence through ``LatentSampler.velocity`` at
  every step (the latents of both are checked equal first). Classifier-free guidance doubles the batch of both.
- ``sampler/generate/ideal``: the lowest ratio the cache can give, ``T_img / T_full``, from forward times measured
  now: ``T_full`` one velocity of the whole ``[prompt][BOI][latents]`` sequence (the uncached side's step), ``T_img``
  one cached latent step (the cache reused in place and cropped back where transformers allows, else copied, as
  ``generate`` does). Its inverse is the ideal speedup, in the detail column with ``T_prompt`` (the ``[prompt][BOI]``
  pass, run once per generation). ``generate``'s ratio over this one is how close the cache comes to its ideal.
- ``sampler/train_step``: ms per optimizer step of ``Trainer.fit`` vs a plain PyTorch loop (``SamplerStage.loss``,
  backward, AdamW step, zero_grad) on one in-memory latent-cache batch: what Lightning adds around the same work.
- ``sampler/train_throughput``: samples/s of ``Trainer.fit`` on latent-cache batches (``latents``) vs on image
  batches (``images``: the frozen vision tower and reducer run every step); the ratio is the latent cache's speedup.
  The two batches hold the same samples (their losses are checked equal first).

The VLM is the tiny offline LLaVA (``vugen_adapters.tiny``) with its language model and vision tower widened to the
preset's sizes (random weights); the LoRA and bridge are perturbed from their zero initialisation so that the
latents depend on them. Prompts are Shapes-style captions grown to ``prompt_tokens`` chat-templated tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import LlavaConfig, LlavaForConditionalGeneration

from benchmarks.common import (
    LEARNING_RATE,
    TARGET_RATIO,
    Benchmark,
    Row,
    Settings,
    check_positive,
    flag,
    interleaved,
    lightning_steps,
    plain_steps,
    progress,
    quiet_workspace,
    timed,
    train_step_row,
)
from vugen.adapter import positions_from_mask
from vugen.diffusion import METHODS
from vugen.generation import LatentSampler, LatentSamplerConfig, SamplingConfig, prompt_cache_reusable
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage
from vugen.stages.sampler import SamplerStage
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.tiny import build_tiny_vlm

__all__ = [
    "BENCHMARK",
    "PRESETS",
    "SamplerBenchConfig",
    "build_stage",
    "make_prompts",
    "rows",
    "uncached_latents",
]

NAME = "sampler"
GUIDANCE_SCALE = 3.0  # SamplerStage's default: the CFG batch is twice the prompts
PERTURBATION = 0.05  # std of the noise added to the trainable weights (LoRA B and the head's output start at zero)
# Caption words of the Shapes data set, cycled to build prompts of a given token length.
_WORDS = (
    "a large red circle on the left of a small blue square at the top and a green triangle below the yellow "
    "square to the right of a magenta circle in the center with a cyan triangle above a white square"
).split()


@dataclass(frozen=True)
class SamplerBenchConfig:
    """Sizes and repeat counts of the sampler benchmark (each field is a ``--sampler-<field>`` flag)."""

    lm_width: int = flag("language model hidden size")
    lm_depth: int = flag("language model layers")
    lm_heads: int = flag("language model attention heads (half as many key/value heads)")
    vision_width: int = flag("vision tower hidden size")
    vision_depth: int = flag("vision tower layers")
    latent_dim: int = flag("latent channels, below the vision tower's width")
    head_width: int = flag("width of the bridge's MLP flow head (reducer hidden width too)")
    lora_rank: int = flag("LoRA rank")
    prompt_tokens: int = flag("chat-templated prompt length in tokens (at least)")
    prompts: int = flag("prompts per generation call")
    sample_steps: int = flag("flow steps per generation")
    solver: str = flag("ODE solver of generation", choices=METHODS[:2])
    forward_calls: int = flag("timed forwards of each part per run, for the ideal ratio")
    batch_size: int = flag("training batch")
    train_steps: int = flag("timed optimizer steps per run")
    warmup_steps: int = flag("untimed optimizer steps first in each run")
    repeats: int = flag("interleaved runs of each side")

    def __post_init__(self) -> None:
        check_positive(self, NAME)
        if self.lm_heads % 2 or self.lm_width % self.lm_heads:
            raise ValueError(
                f"--sampler-lm-heads ({self.lm_heads}) must be even and divide --sampler-lm-width ({self.lm_width})"
            )
        if self.vision_width % 4:
            raise ValueError(f"--sampler-vision-width ({self.vision_width}) must be a multiple of 4 (4 heads)")
        if self.latent_dim >= self.vision_width:
            raise ValueError(
                f"--sampler-latent-dim ({self.latent_dim}) must be below --sampler-vision-width ({self.vision_width})"
            )


PRESETS = {
    "quick": SamplerBenchConfig(64, 2, 4, 32, 2, 8, 32, 4, 24, 1, 2, "euler", 2, 2, 2, 1, 1),
    "cpu": SamplerBenchConfig(256, 4, 8, 256, 4, 16, 256, 16, 96, 1, 20, "euler", 5, 4, 8, 2, 5),
    "cuda": SamplerBenchConfig(1024, 12, 16, 512, 12, 32, 512, 16, 96, 8, 25, "euler", 10, 32, 20, 5, 3),
}


def rows(settings: Settings, config: SamplerBenchConfig) -> list[Row]:
    """Measure generation with and without the prompt cache, and training steps (see the module docstring)."""
    with quiet_workspace() as tmp:
        progress(f"sampler: building the LLaVA (LM w{config.lm_width} d{config.lm_depth}) and the stage")
        stage = build_stage(tmp, config).to(settings.device)
        prompts = make_prompts(stage.adapter, config.prompts, config.prompt_tokens)
        generation = _generation_rows(stage, prompts, config, settings)
        batches = _training_batches(stage, config, settings)
        _check_same_loss(stage, batches)
        return [*generation, *_training_rows(stage, batches, config, settings)]


BENCHMARK = Benchmark(NAME, SamplerBenchConfig, PRESETS, rows)


# ---------------------------------------------------------------------------------------------------- setup
def build_stage(directory: Path, config: SamplerBenchConfig) -> SamplerStage:
    """A ``SamplerStage`` on the tiny LLaVA widened to ``config``, with a random decoder export, in ``directory``.

    The trainable LoRA and bridge weights are perturbed from their initialisation (seeded), so that sampled latents
    depend on the LoRA, the bridge and the prompt.
    """
    pretrained = build_tiny_vlm("llava", directory / "vlm")
    vlm_config = LlavaConfig.from_pretrained(pretrained)
    width, heads = config.lm_width, config.lm_heads
    text = {"hidden_size": width, "intermediate_size": 3 * width, "num_hidden_layers": config.lm_depth}
    text |= {"num_attention_heads": heads, "num_key_value_heads": heads // 2, "head_dim": width // heads}
    vision = {"hidden_size": config.vision_width, "intermediate_size": 4 * config.vision_width}
    vision |= {"num_hidden_layers": config.vision_depth}
    vlm_config.text_config.update(text)
    vlm_config.vision_config.update(vision)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(vlm_config).save_pretrained(pretrained)  # the tokenizer and processor stay
    adapter = LlavaAdapter(str(pretrained))
    reducer = DimensionReducer(adapter.feature_dim, config.latent_dim, hidden_dim=config.head_width, num_blocks=1)
    decoder = PixelDecoder(config.latent_dim, patch_size=8, width=32, depth=1, num_heads=2, image_size=32)
    export = DecoderStage(adapter, decoder, reducer=reducer).export(directory / "decoder-export")
    optimizer = functools.partial(torch.optim.AdamW, lr=LEARNING_RATE)
    stage = SamplerStage(
        adapter,
        str(export),
        latent_sampler=LatentSamplerConfig(lora_rank=config.lora_rank, head_width=config.head_width),
        sampling=SamplingConfig(solver=config.solver, steps=config.sample_steps, guidance_scale=GUIDANCE_SCALE),
        optimizer=optimizer,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in stage.parameters():
            if parameter.requires_grad:
                parameter.add_(PERTURBATION * torch.randn(parameter.shape, generator=generator))
    return stage


def make_prompts(adapter: LlavaAdapter, count: int, tokens: int) -> list[str]:
    """``count`` different Shapes-style captions, each the shortest of at least ``tokens`` chat-templated tokens."""
    if tokens > adapter.max_prompt_tokens:
        raise ValueError(f"prompts of {tokens} tokens: the adapter truncates at {adapter.max_prompt_tokens}")
    result = []
    for start in range(count):
        words: list[str] = []
        while len(words) < 10 * tokens:  # the tiny BPE never needs more than a few tokens per word
            words.append(_WORDS[(5 * start + len(words)) % len(_WORDS)])
            prompt = " ".join(words)
            if adapter.tokenize([prompt])["input_ids"].shape[1] >= tokens:
                break
        result.append(prompt)
    return result


def _describe(stage: SamplerStage, prompt_tokens: int) -> str:
    lm = stage.adapter.vlm.config.text_config
    vision = stage.adapter.vlm.config.vision_config
    return (
        f"LM w{lm.hidden_size} d{lm.num_hidden_layers}, ViT w{vision.hidden_size} d{vision.num_hidden_layers}; "
        f"P={prompt_tokens}+BOI N={stage.latent_sampler.bridge.num_tokens}"
    )


# ---------------------------------------------------------------------------------------------------- generation
def uncached_latents(sampler: LatentSampler, prompts: list[str], seeds: list[int], sampling: SamplingConfig) -> Tensor:
    """What ``sampler.generate(prompts, seeds, sampling)`` computes, without the prompt cache.

    The same noise, solver loop and classifier-free guidance, but every flow step runs the whole
    ``[prompt][BOI][latents]`` sequence through ``LatentSampler.velocity``.

    Returns:
        Latents ``[B, N, d]``.
    """
    prefix_embeds, prefix_mask = sampler.prefix(sampler.guided_prompts(prompts, sampling))

    def velocity(z_t: Tensor, t: Tensor, rows: Tensor) -> Tensor:
        return sampler.velocity(z_t, t, prefix_embeds[rows], prefix_mask[rows])

    return sampler.integrate(velocity, seeds, sampling)


def _generation_rows(
    stage: SamplerStage, prompts: list[str], config: SamplerBenchConfig, settings: Settings
) -> list[Row]:
    stage.eval()
    sampler, sampling = stage.latent_sampler, stage.sampling
    seeds = list(range(len(prompts)))
    prompt_tokens = stage.adapter.tokenize(prompts)["input_ids"].shape[1]

    @torch.no_grad()
    def cached() -> Tensor:
        with settings.autocast():
            return sampler.generate(prompts, seeds, sampling)

    @torch.no_grad()
    def uncached() -> Tensor:
        with settings.autocast():
            return uncached_latents(sampler, prompts, seeds, sampling)

    progress(f"sampler: generation with and without the prompt cache ({config.repeats} runs each)")
    with torch.no_grad():  # in full precision: bf16 rounds the cached and the full sequence differently
        _check_same_latents(
            sampler.generate(prompts, seeds, sampling), uncached_latents(sampler, prompts, seeds, sampling)
        )
    cached()  # warm-up of both sides: first-call allocations and kernel selection
    uncached()
    times = interleaved(
        {
            "cached": lambda: [timed(cached, settings.device)],
            "uncached": lambda: [timed(uncached, settings.device)],
        },
        config.repeats,
    )
    count, steps, solver = len(prompts), config.sample_steps, config.solver
    calls = 2 * steps - 1 if solver == "heun" else steps
    generate = Row.from_samples(
        f"sampler/generate/{solver}/{steps}",
        "ms/image",
        [1e3 * t / count for t in times["cached"]],
        [1e3 * t / count for t in times["uncached"]],
        compares="LatentSampler.generate (prompt KV cache) / full sequence every step",
        target=TARGET_RATIO,  # the cache must never cost time
        detail=(
            f"{_describe(stage, prompt_tokens)}; {count} prompt(s) x CFG {GUIDANCE_SCALE:g}; {calls} LM calls x "
            f"{config.repeats} runs"
        ),
    )
    return [generate, _ideal_row(stage, prompts, prompt_tokens, config, settings)]


def _check_same_latents(cached: Tensor, uncached: Tensor) -> None:
    error = (cached - uncached).abs().max().item()
    if error > 1e-3 * max(1.0, uncached.abs().max().item()):
        raise RuntimeError(
            f"the uncached reference no longer matches LatentSampler.generate (max abs difference {error:.3g});"
            " update benchmarks/sampler.py:uncached_latents"
        )


@torch.no_grad()
def _ideal_row(
    stage: SamplerStage, prompts: list[str], prompt_tokens: int, config: SamplerBenchConfig, settings: Settings
) -> Row:
    """Forward times of a cached latent step and of a full-sequence step, on the CFG batch as ``generate`` runs them."""
    sampler = stage.latent_sampler
    all_prompts = sampler.guided_prompts(prompts, stage.sampling)
    prefix_embeds, prefix_mask = sampler.prefix(all_prompts)
    positions = positions_from_mask(prefix_mask, prefix_mask.shape[1])
    image_from = sampler.image_from(prefix_mask)

    def prompt_pass() -> tuple[Tensor, Any]:
        with settings.autocast():
            return sampler.run(prefix_embeds, prefix_mask, positions, image_from)

    hidden, cache = prompt_pass()
    rows = torch.arange(len(all_prompts), device=prefix_embeds.device)
    shape = (len(all_prompts), sampler.bridge.num_tokens, sampler.bridge.latent_dim)
    z_t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(prefix_embeds)
    t = torch.full((len(all_prompts),), 0.5, device=z_t.device)

    def latent_step() -> Tensor:
        with settings.autocast():
            return sampler._cached_velocity(z_t, t, rows, cache, prefix_mask, hidden[:, -1])

    def full_step() -> Tensor:
        with settings.autocast():
            return sampler.velocity(z_t, t, prefix_embeds, prefix_mask)

    latent_step()  # warm-up: first-call allocations
    full_step()
    progress(f"sampler: forward times of the prompt, a cached latent step and a full step ({config.repeats} runs each)")
    times = interleaved(
        {
            "prompt": lambda: [timed(prompt_pass, settings.device) for _ in range(config.forward_calls)],
            "image": lambda: [timed(latent_step, settings.device) for _ in range(config.forward_calls)],
            "full": lambda: [timed(full_step, settings.device) for _ in range(config.forward_calls)],
            "copy": lambda: [timed(lambda: copy.deepcopy(cache), settings.device) for _ in range(config.forward_calls)],
        },
        config.repeats,
    )
    row = Row.from_samples(
        "sampler/generate/ideal",
        "ms/forward",
        [1e3 * t for t in times["image"]],
        [1e3 * t for t in times["full"]],
        compares="ideal cache / no cache: T_img / T_full, measured forwards",
    )
    prompt_ms, copy_ms = (1e3 * float(torch.tensor(times[part]).median()) for part in ("prompt", "copy"))
    reuse = "in place, cropped back" if prompt_cache_reusable(cache) else "on a copy"
    detail = (
        f"ideal speedup T_full / T_img = {1 / row.ratio:.2f}x; T_full: the whole sequence, T_img: 1 cached latent "
        f"step (cache {reuse}; a copy costs {copy_ms:.2g} ms), T_prompt {prompt_ms:.3g} ms (once per generation); "
        f"batch {len(all_prompts)} (CFG)"
    )
    return dataclasses.replace(row, detail=detail)


# ---------------------------------------------------------------------------------------------------- training
def _training_batches(stage: SamplerStage, config: SamplerBenchConfig, settings: Settings) -> dict[str, dict[str, Any]]:
    """The same samples as images and as latent-cache latents (what ``write_latent_cache`` stores)."""
    generator = torch.Generator().manual_seed(0)
    size = stage.latent_sampler.image_size
    images = torch.rand(config.batch_size, 3, size, size, generator=generator).to(settings.device)
    captions = make_prompts(stage.adapter, config.batch_size, config.prompt_tokens)
    with torch.no_grad():
        latents = stage.reducer.eval().encode(stage.adapter.encode_images(images))
    return {"images": {"images": images, "captions": captions}, "latents": {"latents": latents, "captions": captions}}


def _check_same_loss(stage: SamplerStage, batches: dict[str, dict[str, Any]]) -> None:
    """Fail unless the image batch gives the latent batch's loss (in full precision, where the latents encoded on the
    fly equal the cached ones), so the throughput rows compare the same work."""
    stage.train()

    def loss(name: str) -> Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return stage.training_step(batches[name], 0)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is skipped
        got, expected = loss("images"), loss("latents")
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
        raise RuntimeError(
            f"image batches no longer give the loss of their cached latents: {got.item()} vs {expected.item()}; "
            "update benchmarks/sampler.py"
        )


def _training_rows(
    stage: SamplerStage, batches: dict[str, dict[str, Any]], config: SamplerBenchConfig, settings: Settings
) -> list[Row]:
    progress(f"sampler: training steps, Lightning on latents and on images vs plain loop ({config.repeats} runs each)")
    fit_steps = functools.partial(
        lightning_steps, stage, warmup_steps=config.warmup_steps, train_steps=config.train_steps, settings=settings
    )
    loss = functools.partial(stage.loss, batches["latents"], drop_prompts=True)
    times = interleaved(
        {
            "latents": lambda: fit_steps(batches["latents"]),
            "plain": lambda: plain_steps(stage, loss, config.warmup_steps, config.train_steps, settings),
            "images": lambda: fit_steps(batches["images"]),
        },
        config.repeats,
    )
    prompt_tokens = stage.adapter.tokenize(batches["latents"]["captions"])["input_ids"].shape[1]
    runs = f"{config.train_steps} steps x {config.repeats} runs"
    sizes = f"{_describe(stage, prompt_tokens)}; B={config.batch_size}; {runs}"
    compares = "Lightning fit / plain loop (latent batches)"
    step = train_step_row("sampler/train_step", times["latents"], times["plain"], compares, sizes)
    throughput = Row.from_samples(
        "sampler/train_throughput",
        "samples/s",
        [config.batch_size / t for t in times["latents"]],
        [config.batch_size / t for t in times["images"]],
        compares="latent cache / images (speedup; Lightning fit both)",
        detail=f"{sizes}; images: {stage.latent_sampler.image_size}px through the ViT + reducer each step",
    )
    return [step, throughput]
