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
- ``sampler/generate_real`` and ``sampler/generate_real/ideal``: the same two at a released model's geometry
  (``--sampler-real-geometry``, :data:`GEOMETRIES`), a real prompt length and a real latent count, as images/s with
  the cache vs without (the ratio is the cache's speedup; the detail says what fraction of the ideal speedup
  ``T_full / T_img`` it reaches) and ``T_img / T_full``.
- ``sampler/train_throughput_real``: images/s of ``Trainer.fit`` on latent-cache batches vs on image batches (the
  tower and reducer run every step) at that geometry; the ratio is the latent cache's speedup.
  ``sampler/train_throughput_real/ideal``: the most the cache could give, ``(T_tower + T_step) / T_step``, from the
  measured forward time of the tower and reducer (``T_tower``, no grad, as the image batch runs them) and the measured
  step on latents (``T_step``). Its detail gives the FLOPs per image of both (``FlopCounterMode``) for
  ``docs/scaling.md``.

The VLM is the tiny offline LLaVA (``vugen_adapters.tiny``) with its language model and vision tower widened to the
preset's sizes (random weights); the LoRA and bridge are perturbed from their zero initialisation so that the
latents depend on them. Prompts are Shapes-style captions grown to ``prompt_tokens`` chat-templated tokens.

**Depth cuts.** The real rows' model takes minutes per step on a CPU at full depth, so it is built twice, with its
tower and its language model both cut to ``d1`` and to ``d2`` layers (``--sampler-real-depths``). Time is linear in
layers, ``T(L) = F + L * c``. Each compared loop (``generate`` cached and uncached, a Lightning step on latents and
on images) is timed whole at the shallow cut ``d1``: that holds its fixed part ``F`` (embeddings, bridge, flow head,
solver, cache handling, loss, optimizer, Lightning) and ``d1`` layers. The layers it lacks are added at per-layer
costs ``c``, each the median difference of samples timed one after the other at the two cuts, over ``d2 - d1``
(:func:`per_layer_cost` says why): for generation, those of the forwards it runs (per LM layer, the prompt pass and
one cached latent step per LM call, or one full-sequence step per LM call); for training, the step on latents' own
for the ``L_lm - d1`` LM layers of both sides (an LM layer does not know where its latents came from) and, for the
image step, the tower forward's for its ``L_tower - d1`` tower layers. So ``T_full = T(d1) + sum(extra * c)``, and
the ``±`` of a row is the spread of the timings at ``d1``. FLOPs scale the same way (exactly: they are linear in
depth). The quick preset runs the same code on the tiny LLaVA, whose full depth is the deeper cut.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
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
    count_flops,
    flag,
    interleaved,
    lightning_steps,
    median_iqr,
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
    "GEOMETRIES",
    "PRESETS",
    "Geometry",
    "SamplerBenchConfig",
    "build_real_stage",
    "build_stage",
    "make_prompts",
    "per_layer_cost",
    "rows",
    "scale_to_depth",
    "uncached_latents",
]

NAME = "sampler"
GUIDANCE_SCALE = 3.0  # SamplerStage's default: the CFG batch is twice the prompts
PERTURBATION = 0.05  # std of the noise added to the trainable weights (LoRA B and the head's output start at zero)
# Untimed Lightning steps first in each real-row fit: one, the least intervals_after takes (the first step has no start
# stamp), which also pays the fit's first-call allocations.
REAL_WARMUP_STEPS = 1
# Caption words of the Shapes data set, cycled to build prompts of a given token length.
_WORDS = (
    "a large red circle on the left of a small blue square at the top and a green triangle below the yellow "
    "square to the right of a magenta circle in the center with a cyan triangle above a white square"
).split()


@dataclass(frozen=True)
class Geometry:
    """A released VLM's shape for the real rows, with the stage-2 recipe of the shipped family configs on it.

    The tower is a SigLIP and the language model a Llama (Qwen2's layers but for its q/k/v biases, a rounding error
    in time and FLOPs), inside a LLaVA built from the tiny offline one (its tokenizer and processor).

    Args:
        name: What the detail column calls it.
        vision_width: The tower's hidden size.
        vision_heads: The tower's attention heads.
        vision_mlp: The tower's MLP width.
        vision_layers: The tower's full depth.
        image_size: Its input side in pixels.
        patch_size: Its patch side: ``(image_size // patch_size) ** 2`` feature tokens, and as many latent tokens.
        lm_width: The language model's hidden size.
        lm_heads: Its query heads.
        lm_kv_heads: Its key/value heads.
        lm_mlp: Its MLP width.
        lm_layers: Its full depth.
        latent_dim: Latent channels (the reducer's ``latent_dim``).
        reducer_width: The reducer's hidden width (two residual blocks, as the configs' decoder stage).
        lora_rank: LoRA rank (alpha equal: scale 1, as the configs).
        head_width: Width of the MLP flow head.
        head_depth: Residual blocks of the MLP flow head.
    """

    name: str
    vision_width: int
    vision_heads: int
    vision_mlp: int
    vision_layers: int
    image_size: int
    patch_size: int
    lm_width: int
    lm_heads: int
    lm_kv_heads: int
    lm_mlp: int
    lm_layers: int
    latent_dim: int
    reducer_width: int
    lora_rank: int
    head_width: int
    head_depth: int

    @property
    def grid(self) -> int:
        """Feature (and latent) tokens per side."""
        return self.image_size // self.patch_size

    def describe(self) -> str:
        """The sizes, for a row's detail."""
        return (
            f"{self.name}: ViT w{self.vision_width} x{self.vision_layers} @ {self.image_size}px/{self.patch_size} "
            f"({self.grid**2} tok), LM w{self.lm_width} x{self.lm_layers} ({self.lm_heads}/{self.lm_kv_heads} heads, "
            f"MLP {self.lm_mlp}), LoRA r{self.lora_rank}, head {self.head_width}x{self.head_depth}, d={self.latent_dim}"
        )


GEOMETRIES = {
    # SigLIP-so400m/14 at 384 px (LLaVA-OneVision's and SmolVLM's tower: 27 x 27 = 729 tokens of 1152) before the
    # language model of Qwen2-1.5B (Qwen2-VL-2B's), with the configs' recipe: d = 32, reducer 1024 wide, LoRA rank 64
    # on every projection, a 1024-wide 3-block flow head (configs/qwen2_vl/decoder.yaml and sampler.yaml).
    "so400m-384+qwen2-1.5b": Geometry(
        "SigLIP-so400m/14 + Qwen2-1.5B", 1152, 16, 4304, 27, 384, 14, 1536, 12, 2, 8960, 28, 32, 1024, 64, 1024, 3
    ),
    # The tiny LLaVA's own sizes at 2 layers: --quick runs the real rows' code in seconds.
    "tiny": Geometry("tiny LLaVA", 32, 4, 64, 2, 32, 4, 64, 4, 2, 128, 2, 8, 32, 4, 32, 1),
}


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
    real_geometry: str = flag("released VLM shape of the *_real rows", choices=tuple(GEOMETRIES))
    real_depths: tuple[int, ...] = flag("the two depth cuts timed in the *_real rows (tower and LM layers alike)")
    real_batch_size: int = flag("training batch of the *_real rows")
    real_prompt_tokens: int = flag("chat-templated prompt length of the *_real rows in tokens (at least)")
    real_sample_steps: int = flag("flow steps per generation in the *_real rows")
    real_calls: int = flag("timed steps (and forwards of each part) per run of the *_real rows")
    real_repeats: int = flag("interleaved runs of each side and depth cut in the *_real rows")

    def __post_init__(self) -> None:
        check_positive(self, NAME)
        geometry = GEOMETRIES[self.real_geometry]
        full = min(geometry.vision_layers, geometry.lm_layers)
        if len(self.real_depths) != 2 or not self.real_depths[0] < self.real_depths[1] <= full:
            raise ValueError(
                f"--sampler-real-depths must be two depths d1 < d2 <= {full} (the {geometry.name} tower's and "
                f"language model's layers), got {self.real_depths}"
            )
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


_REAL = "so400m-384+qwen2-1.5b"
PRESETS = {
    "quick": SamplerBenchConfig(
        64, 2, 4, 32, 2, 8, 32, 4, 24, 1, 2, "euler", 2, 2, 2, 1, 1, "tiny", (1, 2), 2, 48, 2, 5, 1
    ),
    "cpu": SamplerBenchConfig(
        256, 4, 8, 256, 4, 16, 256, 16, 96, 1, 20, "euler", 5, 4, 8, 2, 5, _REAL, (1, 2), 1, 128, 8, 2, 3
    ),
    "cuda": SamplerBenchConfig(
        1024, 12, 16, 512, 12, 32, 512, 16, 96, 8, 25, "euler", 10, 32, 20, 5, 3, _REAL, (4, 8), 8, 128, 10, 3, 3
    ),
}


def rows(settings: Settings, config: SamplerBenchConfig) -> list[Row]:
    """Measure generation with and without the prompt cache, and training steps (see the module docstring)."""
    with quiet_workspace() as tmp:
        progress(f"sampler: building the LLaVA (LM w{config.lm_width} d{config.lm_depth}) and the stage")
        stage = build_stage(tmp, config).to(settings.device)
        prompts = make_prompts(stage.adapter, config.prompts, config.prompt_tokens)
        generation = _generation_rows(stage, prompts, config, settings)
        batches = _training_batches(stage, config.batch_size, config.prompt_tokens, settings)
        _check_same_loss(stage, batches)
        small = [*generation, *_training_rows(stage, batches, config, settings)]
        del stage, batches  # freed before the real-size models
        return [*small, *_real_rows(tmp, config, settings)]


BENCHMARK = Benchmark(NAME, SamplerBenchConfig, PRESETS, rows)


# ---------------------------------------------------------------------------------------------------- setup
def build_stage(directory: Path, config: SamplerBenchConfig) -> SamplerStage:
    """A ``SamplerStage`` on the tiny LLaVA widened to ``config``, with a random decoder export, in ``directory``.

    The trainable LoRA and bridge weights are perturbed from their initialisation (seeded), so that sampled latents
    depend on the LoRA, the bridge and the prompt.
    """
    width, heads = config.lm_width, config.lm_heads
    text = {"hidden_size": width, "intermediate_size": 3 * width, "num_hidden_layers": config.lm_depth}
    text |= {"num_attention_heads": heads, "num_key_value_heads": heads // 2, "head_dim": width // heads}
    vision = {"hidden_size": config.vision_width, "intermediate_size": 4 * config.vision_width}
    vision |= {"num_hidden_layers": config.vision_depth}
    adapter = _widened_llava(directory, text, vision)
    reducer = DimensionReducer(adapter.feature_dim, config.latent_dim, hidden_dim=config.head_width, num_blocks=1)
    return _perturbed_stage(
        directory,
        adapter,
        reducer,
        latent_sampler=LatentSamplerConfig(lora_rank=config.lora_rank, head_width=config.head_width),
        sampling=SamplingConfig(solver=config.solver, steps=config.sample_steps, guidance_scale=GUIDANCE_SCALE),
    )


def build_real_stage(directory: Path, geometry: Geometry, depth: int, sampling: SamplingConfig) -> SamplerStage:
    """A ``SamplerStage`` at ``geometry`` with its tower and language model cut to ``depth`` layers, in ``directory``.

    The recipe is the shipped configs' but for prompt dropout, off: at a batch of one, a dropped prompt would shorten
    the whole sequence, which in a real batch (padded to its longest caption) it does not. Trainable weights are
    perturbed as in :func:`build_stage`.
    """
    g = geometry
    text = {"hidden_size": g.lm_width, "intermediate_size": g.lm_mlp, "num_hidden_layers": depth}
    text |= {
        "num_attention_heads": g.lm_heads,
        "num_key_value_heads": g.lm_kv_heads,
        "head_dim": g.lm_width // g.lm_heads,
    }
    vision = {"hidden_size": g.vision_width, "intermediate_size": g.vision_mlp, "num_hidden_layers": depth}
    vision |= {"num_attention_heads": g.vision_heads, "image_size": g.image_size, "patch_size": g.patch_size}
    adapter = _widened_llava(directory, text, vision, image_size=g.image_size)
    reducer = DimensionReducer(adapter.feature_dim, g.latent_dim, hidden_dim=g.reducer_width, num_blocks=2)
    latent_sampler = LatentSamplerConfig(
        lora_rank=g.lora_rank, lora_alpha=float(g.lora_rank), head_width=g.head_width, head_depth=g.head_depth
    )
    return _perturbed_stage(
        directory, adapter, reducer, latent_sampler, sampling, image_size=g.image_size, prompt_dropout=0.0
    )


def _widened_llava(
    directory: Path, text: Mapping[str, Any], vision: Mapping[str, Any], image_size: int | None = None
) -> LlavaAdapter:
    """The tiny LLaVA with its ``text_config`` and ``vision_config`` updated (random weights, seeded), loaded."""
    pretrained = build_tiny_vlm("llava", directory / "vlm")
    vlm_config = LlavaConfig.from_pretrained(pretrained)
    vlm_config.text_config.update(dict(text))
    vlm_config.vision_config.update(dict(vision))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(vlm_config).save_pretrained(pretrained)  # the tokenizer and processor stay
    return LlavaAdapter(str(pretrained), image_size=image_size)


def _perturbed_stage(
    directory: Path,
    adapter: LlavaAdapter,
    reducer: DimensionReducer,
    latent_sampler: LatentSamplerConfig,
    sampling: SamplingConfig,
    image_size: int | None = None,
    prompt_dropout: float = 0.1,
) -> SamplerStage:
    """The stage on ``adapter`` with a random 32 px decoder export (unused: no image is decoded), its trainable
    weights perturbed (seeded)."""
    decoder = PixelDecoder(reducer.latent_dim, patch_size=8, width=32, depth=1, num_heads=2, image_size=32)
    export = DecoderStage(adapter, decoder, reducer=reducer).export(directory / "decoder-export")
    stage = SamplerStage(
        adapter,
        str(export),
        image_size=image_size,
        latent_sampler=latent_sampler,
        prompt_dropout=prompt_dropout,
        sampling=sampling,
        optimizer=functools.partial(torch.optim.AdamW, lr=LEARNING_RATE),
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


def generation_pair(
    sampler: LatentSampler, prompts: list[str], sampling: SamplingConfig, settings: Settings
) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """``(cached, uncached)``: the latents of ``prompts`` (seeds 0, 1, ...) by ``generate`` (the prompt's KV cache
    reused at every flow step) and by :func:`uncached_latents` (the whole sequence every step), under the settings'
    autocast, without gradients."""
    seeds = list(range(len(prompts)))

    @torch.no_grad()
    def cached() -> Tensor:
        with settings.autocast():
            return sampler.generate(prompts, seeds, sampling)

    @torch.no_grad()
    def uncached() -> Tensor:
        with settings.autocast():
            return uncached_latents(sampler, prompts, seeds, sampling)

    return cached, uncached


def _generation_rows(
    stage: SamplerStage, prompts: list[str], config: SamplerBenchConfig, settings: Settings
) -> list[Row]:
    stage.eval()
    sampler, sampling = stage.latent_sampler, stage.sampling
    seeds = list(range(len(prompts)))
    prompt_tokens = stage.adapter.tokenize(prompts)["input_ids"].shape[1]
    cached, uncached = generation_pair(sampler, prompts, sampling, settings)

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
    return [generate, _ideal_row(stage, prompts, config, settings)]


def _check_same_latents(cached: Tensor, uncached: Tensor) -> None:
    error = (cached - uncached).abs().max().item()
    if error > 1e-3 * max(1.0, uncached.abs().max().item()):
        raise RuntimeError(
            f"the uncached reference no longer matches LatentSampler.generate (max abs difference {error:.3g});"
            " update benchmarks/sampler.py:uncached_latents"
        )


def _forward_parts(
    stage: SamplerStage, prompts: list[str], settings: Settings
) -> tuple[dict[str, Callable[[], Any]], Any]:
    """The forwards of the ideal ratio on the CFG batch as ``generate`` runs them, each under no_grad and autocast:
    ``prompt`` (the ``[prompt][BOI]`` pass), ``image`` (one cached latent step) and ``full`` (one full-sequence step);
    and the prompt's KV cache that ``image`` reuses."""
    sampler = stage.latent_sampler
    all_prompts = sampler.guided_prompts(prompts, stage.sampling)
    with torch.no_grad():
        prefix_embeds, prefix_mask = sampler.prefix(all_prompts)
    positions = positions_from_mask(prefix_mask, prefix_mask.shape[1])
    image_from = sampler.image_from(prefix_mask)

    @torch.no_grad()
    def prompt_pass() -> tuple[Tensor, Any]:
        with settings.autocast():
            return sampler.run(prefix_embeds, prefix_mask, positions, image_from)

    hidden, cache = prompt_pass()
    rows = torch.arange(len(all_prompts), device=prefix_embeds.device)
    shape = (len(all_prompts), sampler.bridge.num_tokens, sampler.bridge.latent_dim)
    z_t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(prefix_embeds)
    t = torch.full((len(all_prompts),), 0.5, device=z_t.device)

    @torch.no_grad()
    def latent_step() -> Tensor:
        with settings.autocast():
            return sampler._cached_velocity(z_t, t, rows, cache, prefix_mask, hidden[:, -1])

    @torch.no_grad()
    def full_step() -> Tensor:
        with settings.autocast():
            return sampler.velocity(z_t, t, prefix_embeds, prefix_mask)

    return {"prompt": prompt_pass, "image": latent_step, "full": full_step}, cache


def _repeated(fn: Callable[[], Any], calls: int, settings: Settings) -> Callable[[], list[float]]:
    """A run for :func:`~benchmarks.common.interleaved`: ``calls`` timed calls of ``fn``."""
    return lambda: [timed(fn, settings.device) for _ in range(calls)]


def _ideal_row(stage: SamplerStage, prompts: list[str], config: SamplerBenchConfig, settings: Settings) -> Row:
    """Forward times of a cached latent step and of a full-sequence step, on the CFG batch as ``generate`` runs them."""
    parts, cache = _forward_parts(stage, prompts, settings)
    parts["image"]()  # warm-up: first-call allocations
    parts["full"]()
    progress(f"sampler: forward times of the prompt, a cached latent step and a full step ({config.repeats} runs each)")
    runs = {name: _repeated(part, config.forward_calls, settings) for name, part in parts.items()}
    runs["copy"] = _repeated(lambda: copy.deepcopy(cache), config.forward_calls, settings)
    times = interleaved(runs, config.repeats)
    row = Row.from_samples(
        "sampler/generate/ideal",
        "ms/forward",
        [1e3 * t for t in times["image"]],
        [1e3 * t for t in times["full"]],
        compares="ideal cache / no cache: T_img / T_full, measured forwards",
    )
    prompt_ms, copy_ms = (1e3 * median_iqr(times[part])[0] for part in ("prompt", "copy"))
    reuse = "in place, cropped back" if prompt_cache_reusable(cache) else "on a copy"
    batch = len(stage.latent_sampler.guided_prompts(prompts, stage.sampling))
    detail = (
        f"ideal speedup T_full / T_img = {1 / row.ratio:.2f}x; T_full: the whole sequence, T_img: 1 cached latent "
        f"step (cache {reuse}; a copy costs {copy_ms:.2g} ms), T_prompt {prompt_ms:.3g} ms (once per generation); "
        f"batch {batch} (CFG)"
    )
    return dataclasses.replace(row, detail=detail)


# ---------------------------------------------------------------------------------------------------- training
def _training_batches(
    stage: SamplerStage, batch_size: int, prompt_tokens: int, settings: Settings
) -> dict[str, dict[str, Any]]:
    """The same samples as images and as latent-cache latents (what ``write_latent_cache`` stores)."""
    generator = torch.Generator().manual_seed(0)
    size = stage.latent_sampler.image_size
    images = torch.rand(batch_size, 3, size, size, generator=generator).to(settings.device)
    captions = make_prompts(stage.adapter, batch_size, prompt_tokens)
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


# ---------------------------------------------------------------------------------------------------- real geometry
def per_layer_cost(cuts: Mapping[int, Sequence[float]]) -> float:
    """The cost of one layer from paired samples at two depth cuts ``{d1: [...], d2: [...]}`` (the i-th of both timed
    one after the other): the median of their differences over ``d2 - d1`` (times or FLOPs: linear in depth).

    Differences of neighbours, not of each cut's median: the difference is multiplied by the ~27 layers a cut lacks,
    and another job on the machine slows the samples it overlaps, so two cuts timed at different moments can differ by
    more than their layers do; neighbours share the machine's state, and the median drops the pairs a burst split.
    """
    (d1, shallow), (d2, deep) = sorted(cuts.items())
    cost = median_iqr([(b - a) / (d2 - d1) for a, b in zip(shallow, deep, strict=True)])[0]
    return max(cost, 0.0)  # below 0 only from noise (a tiny model's layer costs less than a scheduler's hiccup)


def scale_to_depth(shallow: Sequence[float], *layers: tuple[int, float]) -> list[float]:
    """Samples timed at the shallow cut with the layers it lacks added: ``t + sum(extra * cost)`` over the
    ``(extra layers, per-layer cost)`` pairs (the tower's and the language model's, say)."""
    added = sum(extra * cost for extra, cost in layers)
    return [t + added for t in shallow]


def _cuts(times: Mapping[str, list[float]], part: str, depths: Sequence[int]) -> dict[int, list[float]]:
    """The samples of ``part`` at each depth cut, from runs named ``<part>@<depth>``."""
    return {depth: times[f"{part}@{depth}"] for depth in depths}


def _scaling(depths: Sequence[int], what: str, layers: int) -> str:
    d1, d2 = depths
    return f"{what} timed at depth {d1}, + {layers - d1} layer(s) at its per-layer cost (paired at depths {d1}, {d2})"


def _real_rows(directory: Path, config: SamplerBenchConfig, settings: Settings) -> list[Row]:
    """The ``*_real`` rows: both depth cuts of the configured geometry built, then generation and training timed."""
    geometry = GEOMETRIES[config.real_geometry]
    sampling = SamplingConfig(solver=config.solver, steps=config.real_sample_steps, guidance_scale=GUIDANCE_SCALE)
    stages = {}
    for depth in config.real_depths:
        progress(f"sampler: building {geometry.name} cut to {depth} layer(s) (tower and LM)")
        stages[depth] = build_real_stage(directory / f"real-{depth}", geometry, depth, sampling).to(settings.device)
    generation = _real_generation_rows(stages, geometry, config, settings)
    return [*generation, *_real_training_rows(stages, geometry, config, settings)]


def _real_generation_rows(
    stages: Mapping[int, SamplerStage], geometry: Geometry, config: SamplerBenchConfig, settings: Settings
) -> list[Row]:
    """``generate`` with and without the prompt cache at the shallow cut, and the forwards it runs at both cuts."""
    depths = config.real_depths
    shallow = stages[depths[0]]
    prompts = make_prompts(shallow.adapter, config.prompts, config.real_prompt_tokens)
    seeds = list(range(len(prompts)))
    cached, uncached = generation_pair(shallow.latent_sampler, prompts, shallow.sampling, settings)

    runs = {
        f"cached@{depths[0]}": _repeated(cached, 1, settings),
        f"uncached@{depths[0]}": _repeated(uncached, 1, settings),
    }
    parts = {}
    for depth, stage in stages.items():
        stage.eval()
        # One flow step of both sides in full precision: the check that they give the same latents, and the warm-up
        # of every shape the timed calls and forwards run (a step of a cut takes seconds on a CPU: no second one).
        one_step = stage.sampling.with_overrides(steps=1)
        with torch.no_grad():
            latents = stage.latent_sampler.generate(prompts, seeds, one_step)
            _check_same_latents(latents, uncached_latents(stage.latent_sampler, prompts, seeds, one_step))
        parts[depth], _ = _forward_parts(stage, prompts, settings)
    # Each forward at both cuts one after the other: per_layer_cost pairs them.
    for name in ("prompt", "image", "full"):
        runs |= {f"{name}@{depth}": _repeated(parts[depth][name], config.real_calls, settings) for depth in depths}
    progress(
        f"sampler: {geometry.name} generation with and without the prompt cache at depth {depths[0]}, and its "
        f"forwards at depths {depths[0]} and {depths[1]} ({config.real_repeats} runs each)"
    )
    times = interleaved(runs, config.real_repeats)
    return _real_generation_report(shallow, geometry, prompts, times, config)


def _real_generation_report(
    stage: SamplerStage,
    geometry: Geometry,
    prompts: list[str],
    times: Mapping[str, list[float]],
    config: SamplerBenchConfig,
) -> list[Row]:
    """The ``sampler/generate_real`` rows, scaled to full depth: a generation adds, per layer, the prompt pass and one
    cached latent step per LM call; the uncached one a full-sequence step per LM call."""
    depths, extra = config.real_depths, geometry.lm_layers - config.real_depths[0]
    cost = {part: per_layer_cost(_cuts(times, part, depths)) for part in ("prompt", "image", "full")}
    calls = 2 * config.real_sample_steps - 1 if config.solver == "heun" else config.real_sample_steps
    cached = scale_to_depth(times[f"cached@{depths[0]}"], (extra, cost["prompt"] + calls * cost["image"]))
    uncached = scale_to_depth(times[f"uncached@{depths[0]}"], (extra, calls * cost["full"]))
    count = len(prompts)
    generate = Row.from_samples(
        "sampler/generate_real",
        "images/s",
        [count / t for t in cached],
        [count / t for t in uncached],
        compares="LatentSampler.generate (prompt KV cache) / full sequence every step: speedup",
    )
    forwards = {part: scale_to_depth(times[f"{part}@{depths[0]}"], (extra, cost[part])) for part in cost}
    image, full, prompt = forwards["image"], forwards["full"], forwards["prompt"]
    ideal = Row.from_samples(
        "sampler/generate_real/ideal",
        "ms/forward",
        [1e3 * t for t in image],
        [1e3 * t for t in full],
        compares="ideal cache / no cache: T_img / T_full, measured forwards",
    )
    prompt_tokens = stage.adapter.tokenize(prompts)["input_ids"].shape[1]
    sizes = (
        f"{geometry.describe()}; P={prompt_tokens}+BOI N={stage.latent_sampler.bridge.num_tokens}; {count} prompt(s) "
        f"x CFG {GUIDANCE_SCALE:g}"
    )
    of_ideal = generate.ratio * ideal.ratio  # (T_uncached / T_cached) / (T_full / T_img)
    generate_detail = (
        f"speedup {generate.ratio:.3f}x = {of_ideal:.2f} of the ideal {1 / ideal.ratio:.3f}x; {sizes}; "
        f"{config.real_sample_steps} {config.solver} steps ({calls} LM calls, +1 prompt pass cached); "
        f"{_scaling(depths, 'generate', geometry.lm_layers)}: the forwards below; {config.real_repeats} runs"
    )
    ideal_detail = (
        f"ideal speedup T_full / T_img = {1 / ideal.ratio:.3f}x; T_prompt {1e3 * median_iqr(prompt)[0]:.4g} ms "
        f"(once per generation); batch {2 * count} (CFG); {_scaling(depths, 'each forward', geometry.lm_layers)}; "
        f"{config.real_calls} x {config.real_repeats} forwards per cut"
    )
    return [dataclasses.replace(generate, detail=generate_detail), dataclasses.replace(ideal, detail=ideal_detail)]


def _real_training_rows(
    stages: Mapping[int, SamplerStage], geometry: Geometry, config: SamplerBenchConfig, settings: Settings
) -> list[Row]:
    """Lightning steps on latents at both cuts and on images at the shallow one, the tower's forward at both cuts;
    FLOPs of the step and of the tower counted at both cuts."""
    depths = config.real_depths
    batches = {
        depth: _training_batches(stage, config.real_batch_size, config.real_prompt_tokens, settings)
        for depth, stage in stages.items()
    }
    _check_same_loss(stages[depths[0]], batches[depths[0]])
    fits, towers = {}, {}
    flops: dict[str, dict[int, list[float]]] = {"step": {}, "tower": {}}
    for depth, stage in stages.items():
        towers[depth] = _tower_forward(stage, batches[depth]["images"]["images"], settings)
        # Counting runs each once: the warm-up of the tower's timed forwards (the fits warm themselves up).
        flops["step"][depth] = [float(_step_flops(stage, batches[depth]["latents"], settings))]
        flops["tower"][depth] = [float(count_flops(towers[depth]))]
        fits[depth] = functools.partial(
            lightning_steps, stage, warmup_steps=REAL_WARMUP_STEPS, train_steps=config.real_calls, settings=settings
        )
    # Each part at both cuts one after the other (per_layer_cost pairs them); the image step at the shallow cut only:
    # the layers it lacks are the latent step's and the tower's.
    runs: dict[str, Callable[[], list[float]]] = {
        **{f"latents@{depth}": functools.partial(fits[depth], batches[depth]["latents"]) for depth in depths},
        f"images@{depths[0]}": functools.partial(fits[depths[0]], batches[depths[0]]["images"]),
        **{f"tower@{depth}": _repeated(towers[depth], config.real_calls, settings) for depth in depths},
    }
    captions = batches[depths[0]]["latents"]["captions"]
    prompt_tokens = stages[depths[0]].adapter.tokenize(captions)["input_ids"].shape[1]
    progress(
        f"sampler: {geometry.name} training steps on latents at depths {depths[0]} and {depths[1]} and on images at "
        f"depth {depths[0]}, and the tower's forward at both ({config.real_repeats} runs each)"
    )
    times = interleaved(runs, config.real_repeats)
    return _real_training_report(times, flops, geometry, prompt_tokens, config)


def _tower_forward(stage: SamplerStage, images: Tensor, settings: Settings) -> Callable[[], Tensor]:
    """What an image batch adds to a step: the frozen tower's features and their latents, under no_grad, as
    ``SamplerStage.target_latents`` computes them."""
    dtype = stage.reducer.in_proj.weight.dtype

    @torch.no_grad()
    def tower() -> Tensor:
        with settings.autocast():
            return stage.reducer.encode(stage.vlm_features(images, dtype))

    return tower


def _step_flops(stage: SamplerStage, batch: dict[str, Any], settings: Settings) -> int:
    """FLOPs of a training step's forward and backward on ``batch`` (the AdamW update's are negligible)."""
    stage.train()

    def step() -> None:
        with settings.autocast():
            loss = stage.loss(batch, drop_prompts=False)
        loss.backward()

    flops = count_flops(step)
    stage.zero_grad(set_to_none=True)
    return flops


def _real_training_report(
    times: Mapping[str, list[float]],
    flops: Mapping[str, dict[int, list[float]]],
    geometry: Geometry,
    prompt_tokens: int,
    config: SamplerBenchConfig,
) -> list[Row]:
    """The ``sampler/train_throughput_real`` rows, scaled to full depth: both steps add the LM layers at the latent
    step's per-layer cost; the image step adds the tower's layers at the tower forward's."""
    depths = config.real_depths
    lm = (geometry.lm_layers - depths[0], per_layer_cost(_cuts(times, "latents", depths)))
    tower_layers = (geometry.vision_layers - depths[0], per_layer_cost(_cuts(times, "tower", depths)))
    latents = scale_to_depth(times[f"latents@{depths[0]}"], lm)
    images = scale_to_depth(times[f"images@{depths[0]}"], lm, tower_layers)
    tower = scale_to_depth(times[f"tower@{depths[0]}"], tower_layers)
    batch = config.real_batch_size
    throughput = Row.from_samples(
        "sampler/train_throughput_real",
        "images/s",
        [batch / t for t in latents],
        [batch / t for t in images],
        compares="latent cache / images (speedup; Lightning fit both)",
    )
    ideal = Row.from_samples(
        "sampler/train_throughput_real/ideal",
        "images/s",
        [batch / t for t in latents],
        [batch / (t + median_iqr(tower)[0]) for t in latents],
        compares="ideal cache / images: (T_tower + T_step) / T_step, measured",
    )
    step_ms, tower_ms, images_ms = (1e3 * median_iqr(part)[0] for part in (latents, tower, images))
    step_flops = scale_to_depth(flops["step"][depths[0]], (lm[0], per_layer_cost(flops["step"])))[0] / batch
    tower_flops = scale_to_depth(flops["tower"][depths[0]], (tower_layers[0], per_layer_cost(flops["tower"])))[0]
    tower_flops /= batch
    throughput_detail = (
        f"speedup {throughput.ratio:.3f}x = {throughput.ratio / ideal.ratio:.2f} of the ideal {ideal.ratio:.3f}x; "
        f"{geometry.describe()}; B={batch}, P={prompt_tokens}+BOI N={geometry.grid**2}; full-depth ms/step "
        f"{step_ms:.4g} on latents, {images_ms:.4g} on {geometry.image_size}px images; "
        f"{_scaling(depths, 'each step', geometry.lm_layers)} of the step on latents, the image step + "
        f"{tower_layers[0]} tower layers at the tower's; {config.real_calls} steps x {config.real_repeats} runs"
    )
    achieved = step_flops * batch / step_ms / 1e6  # GFLOP/s
    ideal_detail = (
        f"T_tower {tower_ms:.4g} ms (ViT x{geometry.vision_layers} + reducer forward, no grad; "
        f"{_scaling(depths, 'tower', geometry.vision_layers)}), T_step {step_ms:.4g} ms (fit on latents), per batch "
        f"of {batch}; GFLOP/image at full depth (FlopCounterMode at both cuts, scaled alike): step "
        f"{step_flops / 1e9:.4g} (forward + backward), tower {tower_flops / 1e9:.4g}; the step on latents achieves "
        f"{achieved:.3g} GFLOP/s here"
    )
    return [
        dataclasses.replace(throughput, detail=throughput_detail),
        dataclasses.replace(ideal, detail=ideal_detail),
    ]
