"""Text -> reduced latents -> pixels: the inference side of vugen, shared by the sampler stage and the pipeline.

- :class:`SamplingConfig`: how a flow is integrated (solver, steps, guidance, time shift); frozen, validated, saved
  in bundles and decoder exports (``sampling.json``), overridable per call.
- :class:`LatentSampler`: the VLM's language model with LoRA and a :class:`~vugen.nn.LatentBridge`, as a
  flow-matching generator of reduced latents, shaped by a :class:`LatentSamplerConfig` (LoRA, attention, flow head).
  The sampler stage trains it; the pipeline generates with it.
- :func:`decode_latents`: reduced latents -> images with the pixel decoder.

Sequence per sample: ``[prompt tokens][BOI][latent tokens]``, where a latent token is ``in_proj(z_t) + position +
time``. The hidden states at the latent tokens become velocities. Attention is causal over the prompt and, by
default, bidirectional inside the latent block (:func:`~vugen.adapter.latent_attention_mask`, a 4-D bool mask that
adapters obey as given; ``AutoAdapter`` fits it to the eager and sdpa attention of transformers' decoder LMs and to
their sliding-window layers; FlashAttention ignores custom masks, so use ``image_attention="causal"`` there).

**Understanding is preserved exactly.** With ``lora_scope="image_tokens"`` (default), a forward hook on every LoRA
``lora_B`` multiplies its output by the latent-block mask of the current call, and by zero whenever the latent
sampler is not running: prompt tokens, the prompt's KV cache and every ordinary use of the VLM see the base model bit
for bit.

Nothing here imports training code (Lightning, the stages): inference depends only on the models below it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn

from vugen.adapter import VLMAdapter, latent_attention_mask, positions_from_mask
from vugen.diffusion import (
    METHODS,
    Method,
    as_velocity_fn,
    classifier_free_guidance,
    resolution_shift,
    sample,
)
from vugen.nn.latent_bridge import LatentBridge
from vugen.nn.pixel_decoder import PixelDecoder

__all__ = [
    "LORA_ADAPTER_NAME",
    "LatentSampler",
    "LatentSamplerConfig",
    "SamplingConfig",
    "decode_latents",
    "prompt_cache_reusable",
]

LORA_ADAPTER_NAME = "default"  # peft's adapter name inside the language model
LoraScope = Literal["image_tokens", "all"]
ImageAttention = Literal["bidirectional", "causal"]
_BASE_PIXELS = 3 * 256 * 256  # no time shift for the pixel decoder at 256x256 RGB (JiT's reference resolution)


@dataclass(frozen=True)
class _Settings:  # a dataclass too: jsonargparse then reads its subclasses as plain (class_path-free) dataclasses
    """What the frozen settings dataclasses share: a checked JSON reading and the JSON record."""

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any], source: str | None = None) -> Any:
        """The settings of a JSON record (``vugen.json``, ``sampling.json``), every key checked.

        Raises:
            ValueError: Naming ``source`` and an unknown key, or a bad value.
        """
        source = source or f"{cls.__name__} settings"
        if not isinstance(settings, Mapping):
            raise ValueError(f"{source}: expected an object of {cls.__name__} settings, got {type(settings).__name__}")
        _check_keys(cls, settings, source)
        try:
            return cls(**settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (tuples as lists)."""
        record = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}


@dataclass(frozen=True)
class SamplingConfig(_Settings):
    """How a flow is integrated from noise to data. Frozen: derive variants with :meth:`with_overrides`.

    Args:
        solver: ``"euler"``, ``"heun"`` or ``"sde"``.
        steps: Integration steps.
        guidance_scale: Classifier-free guidance scale (1 = none).
        guidance_interval: Optional ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <= 1`` where guidance applies.
        time_shift: Time shift of the step grid; None: the model's own rule (the latent sampler's
            ``sqrt(N * d / 4096)`` at least 1, the pixel decoder's resolution shift).
    """

    solver: Method = "euler"
    steps: int = 25
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    time_shift: float | None = None

    def __post_init__(self) -> None:
        if self.solver not in METHODS:
            raise ValueError(f"sampling solver must be one of {', '.join(METHODS)}, got {self.solver!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampling steps must be an integer >= 1, got {self.steps!r}")
        interval = self.guidance_interval
        if interval is not None:
            if len(interval) != 2 or not 0 <= float(interval[0]) <= float(interval[1]) <= 1:
                raise ValueError(f"guidance_interval must be [t_lo, t_hi] within [0, 1], got {interval!r}")
            object.__setattr__(self, "guidance_interval", (float(interval[0]), float(interval[1])))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.time_shift is not None and not float(self.time_shift) > 0:
            raise ValueError(f"time_shift must be > 0 (or None), got {self.time_shift!r}")

    def with_overrides(self, **overrides: Any) -> SamplingConfig:
        """This config with the given settings replaced; None means "keep" (so optional arguments pass through).

        Raises:
            ValueError: An unknown setting, naming it and the known ones.
        """
        _check_keys(SamplingConfig, overrides, "sampling override")
        given = {key: value for key, value in overrides.items() if value is not None}
        return dataclasses.replace(self, **given) if given else self


@dataclass(frozen=True)
class LatentSamplerConfig(_Settings):
    """The shape of a :class:`LatentSampler`: its LoRA, its attention in the latent block, its flow head.

    Args:
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha`` (scaling ``alpha / r``).
        lora_dropout: Dropout on the LoRA input.
        lora_scope: ``image_tokens`` (LoRA acts only at the BOI and latent positions, so the VLM's understanding is
            exactly the base model's) or ``all`` (every token, prompts included).
        image_attention: ``bidirectional`` inside the latent block (a 4-D mask) or ``causal`` throughout.
        head: The bridge's velocity head: ``mlp`` (adaLN MLP flow head) or ``linear``.
        head_width: Width of the MLP head.
        head_depth: Residual blocks of the MLP head.
        latent_patch_size: Side of the square of latent tokens one LM token carries (the bridge's ``patch_size``):
            2 makes the latent block 4x shorter, so each step costs less; it divides the latent token grid.
    """

    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_scope: LoraScope = "image_tokens"
    image_attention: ImageAttention = "bidirectional"
    head: Literal["linear", "mlp"] = "mlp"
    head_width: int = 512
    head_depth: int = 2
    latent_patch_size: int = 1

    def __post_init__(self) -> None:
        if self.lora_scope not in ("image_tokens", "all") or self.image_attention not in ("bidirectional", "causal"):
            raise ValueError(
                f"lora_scope must be 'image_tokens' or 'all' and image_attention 'bidirectional' or 'causal', "
                f"got {self.lora_scope!r} and {self.image_attention!r}"
            )
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {self.head!r}")


def _check_keys(cls: type, settings: Mapping[str, Any], source: str) -> None:
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown setting {unknown[0]!r}; {cls.__name__} has {', '.join(known)}")


class LatentSampler(nn.Module):
    """The VLM's language model, with LoRA, as a flow-matching generator of reduced latents.

    The constructor's arguments other than ``adapter`` are what a bundle records (:attr:`record`).

    Args:
        adapter: The frozen VLM. LoRA layers are injected into its language model (and belong to this module).
        latent_dim: ``d``, channels per reduced latent token (the reducer's ``latent_dim``).
        image_size: Side of the generated images; sets the latent token grid through the adapter.
        config: LoRA, attention and flow-head settings.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        latent_dim: int,
        image_size: int,
        config: LatentSamplerConfig = LatentSamplerConfig(),  # noqa: B008 (frozen: shared safely)
    ) -> None:
        super().__init__()
        if config.image_attention == "bidirectional" and not adapter.bidirectional_latents:
            raise ValueError(
                f"latent_sampler.image_attention: {type(adapter).__name__}'s language model takes no bidirectional "
                "mask (layers that take none: linear attention, state-space, convolution or chunked attention; or a "
                "[B, S] padding mask only), so latent tokens cannot attend to each other both ways; set "
                "image_attention: causal"
            )
        self.adapter, self.latent_dim, self.image_size, self.config = adapter, latent_dim, image_size, config
        grid = adapter.token_grid(image_size, image_size)
        self.bridge = LatentBridge(
            latent_dim,
            adapter.hidden_size,
            *grid,
            head=config.head,
            head_width=config.head_width,
            head_depth=config.head_depth,
            patch_size=config.latent_patch_size,
        )
        self.lora_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=adapter.lora_target_modules,
        )
        # Through a holder without a `config`: given a transformers model, peft remaps the names of some MoE models'
        # MLPs (DeepSeek-V3, Mixtral, ...: `gate_proj`, `down_proj`) onto their fused expert parameters, for adapters
        # of transformers 4, and LoRA on a parameter is a weight parametrisation that acts on every token, outside the
        # image-token scope. Held, the targets stay the modules named.
        holder = nn.ModuleDict({"language_model": adapter.language_model})
        inject_adapter_in_model(self.lora_config, holder, adapter_name=LORA_ADAPTER_NAME)
        adapter.language_model.peft_config = holder.peft_config  # where peft's state-dict helpers read it
        self.lora_mask: Tensor | None = None  # [B, S, 1] of the running call; None = LoRA off (image_tokens scope)
        if config.lora_scope == "image_tokens":
            for lora_b in self.lora_b_layers():
                lora_b.register_forward_hook(self._scope_lora)

    def record(self) -> dict[str, Any]:
        """What rebuilds this module on the same adapter: ``LatentSampler(adapter, latent_dim=..., image_size=...,
        config=LatentSamplerConfig(**rest))``, JSON-ready."""
        return {"latent_dim": self.latent_dim, "image_size": self.image_size, **self.config.to_dict()}

    # ------------------------------------------------------------------ LoRA scope
    def lora_b_layers(self) -> list[nn.Module]:
        """Every LoRA ``lora_B`` projection inside the language model."""
        return [m.lora_B[LORA_ADAPTER_NAME] for m in self.adapter.language_model.modules() if hasattr(m, "lora_B")]

    def _scope_lora(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self.lora_mask is None:
            return torch.zeros_like(output)
        mask = self.lora_mask.to(output.dtype)  # [B, T, 1] over the tokens of this call
        if output.ndim == 2:  # layers that flatten [B, T, D] to [B * T, D] first (OPT's MLP in BLIP-2)
            return output * mask.reshape(-1, 1)
        past = output.shape[-2] - mask.shape[1]
        if past > 0:  # a layer run on the cached tokens too (MLA's kv_b_proj expands the cached latent KV): the
            mask = F.pad(mask, (0, 0, past, 0))  # cache holds the prompt, outside the scope
        # layers run on [B, heads, T, D] (MLA's kv_b_proj in DeepSeek-V3 and kin)
        return output * mask.reshape(mask.shape[0], *[1] * (output.ndim - 3), mask.shape[1], 1)

    def run(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, image_from: int, cache: Any = None):
        """Run the LM with LoRA active from sequence position ``image_from`` on; returns (hidden, cache)."""
        mask = torch.zeros(embeds.shape[0], embeds.shape[1], 1, device=embeds.device)
        mask[:, image_from:] = 1
        self.lora_mask = mask
        try:
            return self.adapter.run_language_model(embeds, attention_mask, position_ids, past_key_values=cache)
        finally:
            self.lora_mask = None

    # ------------------------------------------------------------------ sequences
    @property
    def latent_grid(self) -> tuple[int, int]:
        """The latent token grid ``(gh, gw)``."""
        return self.bridge.grid

    def default_shift(self) -> float:
        """RAE's time shift ``sqrt(N * d / 4096)``, but at least 1.

        Below 1 the shift would move training times towards the data end, starving the high-noise start of sampling,
        where the prompt decides colour and layout (measured on the demo's 64 x 8 latents: RAE's 0.35 puts 90 % of
        training times above t = 0.44).
        """
        return max(1.0, resolution_shift(self.bridge.num_tokens * self.bridge.latent_dim))

    def prefix(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Embeddings ``[B, P + 1, H]`` and attention mask ``[B, P + 1]`` of ``[prompt][BOI]``."""
        tokens = self.adapter.tokenize(prompts)
        embeds = self.adapter.embed_tokens(tokens["input_ids"])
        embeds = torch.cat([embeds, self.bridge.begin_image(len(prompts), embeds.dtype)], dim=1)
        ones = torch.ones(len(prompts), 1, dtype=tokens["attention_mask"].dtype, device=embeds.device)
        return embeds, torch.cat([tokens["attention_mask"], ones], dim=1)

    def attention_mask(self, prefix_mask: Tensor, num_queries: int) -> Tensor:
        """The mask for ``num_queries`` tokens at the end of ``[prefix][latents]``: 2-D (causal) or 4-D
        (:func:`~vugen.adapter.latent_attention_mask`: causal over the prefix, bidirectional in the latent block)."""
        n = self.bridge.sequence_length
        if self.config.image_attention == "causal":
            return torch.cat([prefix_mask, prefix_mask.new_ones(prefix_mask.shape[0], n)], dim=1)
        return latent_attention_mask(prefix_mask, n, num_queries)

    def image_from(self, prefix_mask: Tensor) -> int:
        """Where LoRA starts: the BOI token (all positions with ``lora_scope="all"``)."""
        return 0 if self.config.lora_scope == "all" else prefix_mask.shape[1] - 1

    def velocity(self, z_t: Tensor, t: Tensor, prefix_embeds: Tensor, prefix_mask: Tensor) -> Tensor:
        """Velocities ``[B, N, d]`` of the whole sequence ``[prefix][z_t]`` (training: no cache)."""
        latents = self.bridge.embed(z_t.to(prefix_embeds.dtype), t)
        embeds = torch.cat([prefix_embeds, latents], dim=1)
        full = torch.cat([prefix_mask, prefix_mask.new_ones(latents.shape[:2])], dim=1)
        positions = positions_from_mask(full, embeds.shape[1])
        mask = self.attention_mask(prefix_mask, embeds.shape[1])
        hidden, _ = self.run(embeds, mask, positions, self.image_from(prefix_mask))
        n, boi = latents.shape[1], prefix_mask.shape[1] - 1
        return self.bridge.velocity(hidden[:, -n:], t, hidden[:, boi])

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], sampling: SamplingConfig) -> Tensor:
        """Sample latents ``[B, N, d]`` for ``prompts``, one seed per prompt (its noise depends on nothing else).

        The prompt's KV cache is computed once (the base model's at the prompt tokens, LoRA only at BOI) and reused
        at every flow step.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
        prefix_embeds, prefix_mask = self.prefix(self.guided_prompts(prompts, sampling))
        positions = positions_from_mask(prefix_mask, prefix_mask.shape[1])
        prefix_hidden, cache = self.run(prefix_embeds, prefix_mask, positions, self.image_from(prefix_mask))
        context = prefix_hidden[:, -1]  # the BOI token's state

        def velocity(z_t: Tensor, t: Tensor, rows: Tensor) -> Tensor:
            return self._cached_velocity(z_t, t, rows, cache, prefix_mask, context)

        return self.integrate(velocity, seeds, sampling)

    @staticmethod
    def guided_prompts(prompts: list[str], sampling: SamplingConfig) -> list[str]:
        """The prompts, then as many empty prompts when guidance is on (the rows of :meth:`integrate`)."""
        return prompts + [""] * len(prompts) if sampling.guidance_scale != 1.0 else prompts

    def integrate(
        self, velocity: Callable[[Tensor, Tensor, Tensor], Tensor], seeds: list[int], sampling: SamplingConfig
    ) -> Tensor:
        """Latents ``[B, N, d]`` integrated from each seed's noise with the configured solver and guidance.

        Args:
            velocity: ``velocity(z_t, t, rows)`` for the rows of :meth:`guided_prompts` (prompt ``i`` is row ``i``, its
                empty prompt row ``B + i``).
            seeds: One seed per prompt: prompt ``i`` starts from ``randn`` seeded with ``seeds[i]``.
            sampling: Solver, steps, guidance and time shift.
        """
        b, scale = len(seeds), sampling.guidance_scale
        weight = self.bridge.in_proj.weight
        shape = (self.bridge.num_tokens, self.bridge.latent_dim)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        noise = noise.to(device=weight.device, dtype=weight.dtype)
        rows = torch.arange(2 * b if scale != 1.0 else b, device=noise.device)
        unconditional = rows[b:] if scale != 1.0 else None
        guided = classifier_free_guidance(velocity, rows[:b], unconditional, scale, sampling.guidance_interval)
        shift = sampling.time_shift if sampling.time_shift is not None else self.default_shift()
        return sample(guided, noise, steps=sampling.steps, method=sampling.solver, shift=float(shift))

    def _cached_velocity(
        self, z_t: Tensor, t: Tensor, rows: Tensor, cache: Any, prefix_mask: Tensor, context: Tensor
    ) -> Tensor:
        """Velocities of the latent block for the prompts ``rows`` on their prompt cache.

        With every row, a cache of full-attention layers that ``crop`` puts back as it was (transformers'
        ``is_croppable``) is used in place and cropped back to the prompt after the call. Any other is deep-copied, as
        the block's keys and values must not stay for the next step: a subset of rows, a cache type of an adapter's
        own, and sliding-window layers (the block can push the prompt out of their window, which no crop undoes).
        """
        every_row = len(rows) == prefix_mask.shape[0] and torch.equal(rows, torch.arange(len(rows), device=rows.device))
        in_place = every_row and prompt_cache_reusable(cache)
        if not in_place:
            cache = copy.deepcopy(cache)
            if not every_row:
                cache.batch_select_indices(rows)
        prompt_length = cache.get_seq_length() if in_place else 0
        mask = prefix_mask[rows]
        embeds = self.bridge.embed(z_t, t)
        full = torch.cat([mask, mask.new_ones(embeds.shape[:2])], dim=1)
        positions = positions_from_mask(full, full.shape[1])[:, -embeds.shape[1] :]
        try:
            hidden, _ = self.run(embeds, self.attention_mask(mask, embeds.shape[1]), positions, 0, cache=cache)
        finally:
            if in_place and cache.get_seq_length() > prompt_length:
                cache.crop(prompt_length - cache.get_seq_length())  # a negative count: the tokens to remove
        return self.bridge.velocity(hidden, t, context[rows])


def prompt_cache_reusable(cache: Any) -> bool:
    """Whether a prompt's KV cache can serve every flow step in place, cropped back after each: ``crop`` restores it
    whatever is appended (transformers >= 5.24's ``is_croppable``) and no layer has a sliding window. An older
    transformers, or a cache type of an adapter's own, gives False: :class:`LatentSampler` then copies it per step."""
    sliding = getattr(cache, "is_sliding", None)
    return bool(getattr(cache, "is_croppable", False)) and isinstance(sliding, list) and not any(sliding)


@torch.no_grad()
def decode_latents(
    decoder: PixelDecoder,
    latents: Tensor,
    latent_grid: tuple[int, int],
    image_size: tuple[int, int],
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Sample images ``[B, 3, H, W]`` in ``[0, 1]`` from reducer latents with a pixel decoder.

    Args:
        decoder: The pixel decoder.
        latents: Reducer latents ``[B, N, d]``.
        latent_grid: Their token grid ``(gh, gw)``.
        image_size: Output ``(H, W)``, multiples of the decoder's patch size.
        sampling: The decoder's sampling settings (a decoder export's ``sampling.json``).
        generator: Generator of the starting noise (and of the SDE noise); its device is the noise's.
        noise: The starting noise ``[B, 3, H, W]`` itself, instead of drawing it (a distillation pairs a student's
            input with the teacher's result from the same noise).
    """
    b = latents.shape[0]
    shape = (b, decoder.in_channels, *image_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else latents.device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    noise = noise.to(device=latents.device, dtype=decoder.latent_proj.weight.dtype)

    def model_fn(x_t: Tensor, t: Tensor, cond: tuple[Tensor, Tensor]) -> Tensor:
        return decoder(x_t, t, cond[0], latent_grid, drop_cond=cond[1])

    # The unconditional branch drops the condition inside the decoder (its null latent), so no parameter is read
    # outside its forward: that keeps FSDP2-sharded parameters gathered when used.
    keep = torch.zeros(b, dtype=torch.bool, device=latents.device)
    guided = classifier_free_guidance(
        model_fn, (latents, keep), (latents, ~keep), sampling.guidance_scale, sampling.guidance_interval
    )
    x = sample(
        as_velocity_fn(guided, decoder.prediction),
        noise,
        steps=sampling.steps,
        method=sampling.solver,
        shift=pixel_shift(sampling.time_shift, noise[0].numel()),
        generator=generator,
    )
    return ((x.float() + 1) / 2).clamp(0, 1)


def pixel_shift(time_shift: float | None, pixels: int) -> float:
    """The pixel decoder's time shift: ``time_shift``, else the resolution shift relative to 256x256 RGB."""
    return float(time_shift) if time_shift is not None else resolution_shift(pixels, base_dim=_BASE_PIXELS)
