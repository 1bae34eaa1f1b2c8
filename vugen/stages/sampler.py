"""Stage 2: the latent sampler. The VLM's language model, tuned with LoRA, generates reduced latents by flow matching.

Sequence per sample: ``[prompt tokens][BOI][latent tokens]``, where a latent token is ``in_proj(z_t) + position + time``
(:class:`vugen.nn.LatentBridge`). The hidden states at the latent tokens become velocities; the loss is the flow-
matching MSE in z-space. Attention is causal over the prompt and, by default, bidirectional inside the latent block
(a 4-D attention mask: works with the eager and sdpa attention of transformers' decoder LMs; FlashAttention ignores
custom masks, so use ``image_attention: causal`` there).

**Understanding is preserved exactly.** With ``lora_scope: image_tokens`` (default), a forward hook on every LoRA
``lora_B`` multiplies its output by the latent-block mask of the current call, and by zero whenever the sampler is not
running: prompt tokens, the prompt's KV cache and every ordinary use of the VLM see the base model bit for bit.

The reducer and the pixel decoder come from the decoder stage's export (``DecoderStage.export``: ``reducer/``,
``decoder/``, ``sampling.json``) and stay frozen. Batches carry ``images`` (encoded on the fly by the frozen VLM and
reducer) or ``latents`` (from :mod:`vugen.data.latent_cache`: the vision tower never runs), plus ``captions``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vugen.adapter import VLMAdapter, positions_from_mask
from vugen.data.batches import batch_images
from vugen.diffusion import (
    Method,
    Schedule,
    classifier_free_guidance,
    flow_matching_inputs,
    flow_matching_loss,
    resolution_shift,
    sample,
    sample_timesteps,
)
from vugen.nn.latent_bridge import LatentBridge
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer
from vugen.stages.base import AdapterStage
from vugen.stages.decoder import SAMPLING_FILE, decode_latents, sampling_settings

__all__ = ["SamplerStage"]

LORA_ADAPTER_NAME = "default"


class SamplerStage(AdapterStage):
    """Stage 2: LoRA on the VLM's language model + a latent bridge, trained to generate reduced latents from text.

    Logs ``train/loss`` per step and ``val/loss`` per validation run.

    Args:
        adapter: The VLM, e.g. ``{class_path: vugen_adapters.llava.LlavaAdapter, init_args: {pretrained: ...}}``.
            Its weights stay frozen; LoRA layers are added inside its language model only.
        decoder_export: The decoder stage's export folder (``reducer/``, ``decoder/``, ``sampling.json``): the frozen
            reducer defines the latent space, the decoder turns sampled latents into images.
        image_size: Side of the generated images (default: the decoder's nominal ``image_size``); sets the latent
            token grid through the adapter.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha`` (scaling ``alpha / r``).
        lora_dropout: Dropout on the LoRA input.
        lora_scope: ``image_tokens`` (LoRA acts only at the BOI and latent positions, so the VLM's understanding is
            exactly the base model's) or ``all`` (every token, prompts included).
        image_attention: ``bidirectional`` inside the latent block (a 4-D mask) or ``causal`` throughout.
        head: The bridge's velocity head: ``mlp`` (adaLN MLP flow head) or ``linear``.
        head_width: Width of the MLP head.
        head_depth: Residual blocks of the MLP head.
        prompt_dropout: Probability of training on the empty prompt, for classifier-free guidance.
        time_schedule: Training-time distribution: ``"logit_normal"`` or ``"uniform"``.
        time_mean: Mean of the logit of ``t`` (``t = 1`` is data).
        time_std: Standard deviation of the logit of ``t``.
        time_shift: Time shift for training and sampling; None uses RAE's ``sqrt(N * d / 4096)``, at least 1.
        sampler: ``"euler"``, ``"heun"`` or ``"sde"`` for generation.
        sample_steps: Integration steps for generation.
        guidance_scale: Classifier-free guidance scale (1 = none).
        guidance_interval: Optional ``[t_lo, t_hi]`` where guidance applies.
        optimizer: Builds the optimizer over the LoRA and bridge parameters.
        activation_checkpointing: Recompute the language model blocks' activations in the backward pass (LoRA
            gradients flow through every block): less memory for a little more compute.
        lr_scheduler: Optional scheduler on that optimizer, stepped after every optimizer step.
        allow_empty_captions: Train on empty (or whitespace-only) captions without a word, e.g. a deliberately
            unconditional sampler. By default a fit whose first training batch has only empty captions stops with a
            ``ValueError`` (usually ``caption_key: null`` or an image folder without a metadata file), and empty
            captions in any later batch are warned about once per fit. Prompt dropout's deliberate empty prompts are
            never counted: captions are checked before it.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        decoder_export: str,
        image_size: int | None = None,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        lora_scope: Literal["image_tokens", "all"] = "image_tokens",
        image_attention: Literal["bidirectional", "causal"] = "bidirectional",
        head: Literal["linear", "mlp"] = "mlp",
        head_width: int = 512,
        head_depth: int = 2,
        prompt_dropout: float = 0.1,
        time_schedule: Schedule = "logit_normal",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float | None = None,
        sampler: Method = "euler",
        sample_steps: int = 25,
        guidance_scale: float = 3.0,
        guidance_interval: tuple[float, float] | None = None,
        activation_checkpointing: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        allow_empty_captions: bool = False,
    ) -> None:
        super().__init__(adapter, optimizer, lr_scheduler)
        self.record_hyperparameters(adapter=adapter, optimizer=optimizer, lr_scheduler=lr_scheduler)
        if lora_scope not in ("image_tokens", "all") or image_attention not in ("bidirectional", "causal"):
            raise ValueError(
                f"lora_scope must be 'image_tokens' or 'all' and image_attention 'bidirectional' or 'causal', "
                f"got {lora_scope!r} and {image_attention!r}"
            )
        if not 0 <= prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout}")
        self.decoder_export = str(decoder_export)
        self.reducer, self.decoder, self.decoder_sampling = load_decoder_export(decoder_export)
        self.reducer.requires_grad_(False).eval()
        self.decoder.requires_grad_(False).eval()
        self.image_size = image_size or self.decoder.base_grid[0] * self.decoder.patch_size
        grid = adapter.token_grid(self.image_size, self.image_size)
        self.bridge = LatentBridge(
            self.reducer.latent_dim, adapter.hidden_size, *grid, head=head, head_width=head_width, head_depth=head_depth
        )
        self.lora_config = LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=adapter.lora_target_modules
        )
        inject_adapter_in_model(self.lora_config, adapter.language_model, adapter_name=LORA_ADAPTER_NAME)
        self.lora_scope, self.image_attention = lora_scope, image_attention
        self._lora_mask: Tensor | None = None  # [B, S, 1] of the running call; None = LoRA off (image_tokens scope)
        if lora_scope == "image_tokens":
            for lora_b in self.lora_b_layers():
                lora_b.register_forward_hook(self._scope_lora)
        self.prompt_dropout = prompt_dropout
        self.time_schedule, self.time_mean, self.time_std = time_schedule, time_mean, time_std
        self.time_shift = time_shift
        self.sampling = sampling_settings(sampler, sample_steps, guidance_scale, guidance_interval, time_shift)
        self.activation_checkpointing = activation_checkpointing
        self.allow_empty_captions = allow_empty_captions
        self._captions_seen = self._empty_captions_warned = False  # per fit: see on_fit_start

    rebuilt_prefixes = ("adapter.", "reducer.", "decoder.")  # checkpoints hold LoRA + bridge only

    # ------------------------------------------------------------------ LoRA scope
    def lora_b_layers(self) -> list[nn.Module]:
        """Every LoRA ``lora_B`` projection inside the language model."""
        return [m.lora_B[LORA_ADAPTER_NAME] for m in self.adapter.language_model.modules() if hasattr(m, "lora_B")]

    def _scope_lora(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if self._lora_mask is None:
            return torch.zeros_like(output)
        return output * self._lora_mask.to(output.dtype)

    def _run(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, image_from: int, cache: Any = None):
        """Run the LM with LoRA active from sequence position ``image_from`` on; returns (hidden, cache)."""
        mask = torch.zeros(embeds.shape[0], embeds.shape[1], 1, device=embeds.device)
        mask[:, image_from:] = 1
        self._lora_mask = mask
        try:
            return self.adapter.run_language_model(embeds, attention_mask, position_ids, past_key_values=cache)
        finally:
            self._lora_mask = None

    # ------------------------------------------------------------------ sequences
    @property
    def latent_grid(self) -> tuple[int, int]:
        """The latent token grid ``(gh, gw)``."""
        return self.bridge.grid

    def shift(self) -> float:
        """The time shift: ``time_shift``, else RAE's ``sqrt(N * d / 4096)`` but at least 1.

        Below 1 the shift would move training times towards the data end, starving the high-noise start of sampling,
        where the prompt decides colour and layout (measured on the demo's 64 x 8 latents: RAE's 0.35 puts 90 % of
        training times above t = 0.44).
        """
        if self.time_shift is not None:
            return float(self.time_shift)
        return max(1.0, resolution_shift(self.bridge.num_tokens * self.bridge.latent_dim))

    def prefix(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Embeddings ``[B, P + 1, H]`` and attention mask ``[B, P + 1]`` of ``[prompt][BOI]``."""
        tokens = self.adapter.tokenize(prompts)
        embeds = self.adapter.embed_tokens(tokens["input_ids"])
        embeds = torch.cat([embeds, self.bridge.begin_image(len(prompts), embeds.dtype)], dim=1)
        ones = torch.ones(len(prompts), 1, dtype=tokens["attention_mask"].dtype, device=embeds.device)
        return embeds, torch.cat([tokens["attention_mask"], ones], dim=1)

    def attention_mask(self, prefix_mask: Tensor, num_queries: int) -> Tensor:
        """The mask for ``num_queries`` tokens at the end of ``[prefix][latents]``: 2-D (causal) or 4-D.

        4-D: ``[B, 1, Q, K]`` bool, True = attend; causal over the prefix, bidirectional in the latent block.
        """
        b, p = prefix_mask.shape
        n = self.bridge.num_tokens
        full = torch.cat([prefix_mask, prefix_mask.new_ones(b, n)], dim=1)
        if self.image_attention == "causal":
            return full
        total = p + n
        keys = full.bool()[:, None, :].expand(b, total, total)
        allowed = torch.ones(total, total, dtype=torch.bool, device=full.device).tril()
        allowed[p:, p:] = True  # the latent block sees itself whole
        allowed = allowed[None] & keys
        allowed |= torch.eye(total, dtype=torch.bool, device=full.device)  # padded rows attend to themselves
        return allowed[:, None, total - num_queries :, :]

    def velocity(self, z_t: Tensor, t: Tensor, prefix_embeds: Tensor, prefix_mask: Tensor) -> Tensor:
        """Velocities ``[B, N, d]`` of the whole sequence (training: no cache)."""
        latents = self.bridge.embed(z_t.to(prefix_embeds.dtype), t)
        embeds = torch.cat([prefix_embeds, latents], dim=1)
        full = torch.cat([prefix_mask, prefix_mask.new_ones(latents.shape[:2])], dim=1)
        positions = positions_from_mask(full, embeds.shape[1])
        hidden, _ = self._run(
            embeds, self.attention_mask(prefix_mask, embeds.shape[1]), positions, self._image_from(prefix_mask)
        )
        n, boi = latents.shape[1], prefix_mask.shape[1] - 1
        return self.bridge.velocity(hidden[:, -n:], t, hidden[:, boi])

    def _image_from(self, prefix_mask: Tensor) -> int:
        """Where LoRA starts: the BOI token (all positions with ``lora_scope: all``)."""
        return 0 if self.lora_scope == "all" else prefix_mask.shape[1] - 1

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        """Refuse a stale latent cache (made by another reducer or adapter) before training on it."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "check_fingerprint"):
            datamodule.check_fingerprint(self.adapter, self.reducer)

    def target_latents(self, batch: dict[str, Any]) -> Tensor:
        """The clean latents of a batch: its ``latents`` (cache) or the frozen reducer's latents of its ``images``."""
        if "latents" in batch:
            latents = batch["latents"]
        else:
            features = self.vlm_features(batch_images(batch, "SamplerStage"), self.reducer.in_proj.weight.dtype)
            with torch.no_grad():
                latents = self.reducer.eval().encode(features)
        expected = (self.bridge.num_tokens, self.bridge.latent_dim)
        if latents.ndim != 3 or tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)} but the sampler expects [B, {expected[0]}, {expected[1]}] "
                f"(token grid {self.latent_grid} at image_size {self.image_size}, latent_dim of {self.decoder_export})"
            )
        return latents

    def loss(self, batch: dict[str, Any], drop_prompts: bool) -> Tensor:
        """The flow-matching loss of a batch in z-space (v-prediction)."""
        z = self.target_latents(batch).to(self.bridge.in_proj.weight.dtype)
        captions = list(batch["captions"])
        if drop_prompts and self.prompt_dropout > 0:
            dropped = torch.rand(len(captions)) < self.prompt_dropout
            captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist(), strict=True)]
        eps = torch.randn_like(z)
        t = sample_timesteps(len(z), self.time_schedule, self.time_mean, self.time_std, self.shift(), device=z.device)
        z_t, _ = flow_matching_inputs(z, eps, t, "v")
        prefix_embeds, prefix_mask = self.prefix(captions)
        pred = self.velocity(z_t, t, prefix_embeds, prefix_mask)
        return flow_matching_loss(pred.float(), z.float(), eps.float(), t, "v", loss_space="v")

    def on_fit_start(self) -> None:
        """Check the captions of this fit's first training batch, and warn about empty ones again once."""
        self._captions_seen = self._empty_captions_warned = False

    def check_captions(self, captions: list[str]) -> None:
        """Refuse a fit whose first training batch has only empty captions; warn once per fit about any empty one.

        Called on the data's captions, before prompt dropout empties some on purpose. Nothing with
        ``allow_empty_captions``.

        Raises:
            ValueError: Every caption of the fit's first training batch is empty or whitespace.
        """
        first, self._captions_seen = not self._captions_seen, True
        empty = sum(not caption.strip() for caption in captions)
        if self.allow_empty_captions or not empty:
            return
        if first and empty == len(captions):
            raise ValueError(
                f"SamplerStage: all {empty} captions of the first training batch are empty, so the sampler would "
                "learn no text conditioning: the data yields no captions (ImageTextDataModule with caption_key: "
                "null, an image folder without a metadata file, or a latent cache written from such data). Fix the "
                "data's caption key or captions, or set allow_empty_captions: true for an unconditional sampler"
            )
        if not self._empty_captions_warned:
            self._empty_captions_warned = True
            rank_zero_warn(
                f"SamplerStage: {empty} of {len(captions)} captions of a training batch are empty or whitespace "
                "(before prompt dropout): those images train as unconditional samples. Check the data's caption key "
                "and captions, or set allow_empty_captions: true if intended (warned once per fit)"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Flow-matching loss with prompt dropout; logs ``train/loss``. Checks the captions first (see
        :meth:`check_captions`)."""
        self.check_captions(list(batch["captions"]))
        loss = self.loss(batch, drop_prompts=True)
        self.log_metrics("train", {"loss": loss}, batch_size=len(batch["captions"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/loss`` (no prompt dropout)."""
        self.log_metrics("val", {"loss": self.loss(batch, drop_prompts=False)}, batch_size=len(batch["captions"]))

    def configure_model(self) -> None:
        """Activation checkpointing of the language model's blocks, then FSDP2 sharding (see the base).

        The bridge is called through ``embed``, ``begin_image`` and ``velocity``, never ``forward``: under FSDP2 those
        methods gather its parameters. Idempotent: Lightning may call it more than once.
        """
        if self.activation_checkpointing:
            block_types = tuple(self.adapter.block_classes)
            for block in self.adapter.language_model.modules():
                if block_types and isinstance(block, block_types) and not hasattr(block, "_vugen_checkpointed"):
                    self._checkpoint(block)
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        sharded_before = isinstance(self.bridge, FSDPModule)
        super().configure_model()
        if not sharded_before:  # registering twice would wrap the methods twice
            for method in ("embed", "begin_image", "velocity"):
                register_fsdp_forward_method(self.bridge, method)  # a no-op unless the bridge is now sharded

    def _checkpoint(self, block: nn.Module) -> None:
        """Make ``block`` recompute its activations in the backward pass whenever gradients are on.

        The recomputation runs after :meth:`_run` has returned, so it restores the LoRA mask of its own call; and the
        block gets no KV cache (training runs whole sequences), so a recomputed block never appends to a cache twice.
        """
        forward = block.forward

        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            kwargs = without_cache(kwargs)
            lora_mask = self._lora_mask

            def run(*inputs: Any) -> Any:
                previous, self._lora_mask = self._lora_mask, lora_mask
                try:
                    return forward(*inputs, **kwargs)
                finally:
                    self._lora_mask = previous

            return checkpoint(run, *args, use_reentrant=False)

        block.forward = checkpointed
        block._vugen_checkpointed = True

    def fsdp_units(self) -> list[nn.Module]:
        """Each LoRA projection (its own unit, as peft + FSDP2 need), the bridge's children, then the bridge (its own
        parameters: ``boi``, ``pos_embed``)."""
        lora = [
            m
            for layer in self.adapter.language_model.modules()
            if hasattr(layer, "lora_A")
            for m in (layer.lora_A[LORA_ADAPTER_NAME], layer.lora_B[LORA_ADAPTER_NAME])
        ]
        return [*lora, *self.bridge.children(), self.bridge]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_latents(self, prompts: list[str], seeds: list[int], **overrides: Any) -> Tensor:
        """Sample latents ``[B, N, d]`` for ``prompts``, one seed per prompt (its noise depends on nothing else).

        The prompt's KV cache is computed once (the base model's at the prompt tokens, LoRA only at BOI) and reused
        at every flow step.

        Args:
            prompts: The prompts.
            seeds: One seed per prompt.
            overrides: Replace any of ``sampler``, ``steps``, ``guidance_scale``, ``guidance_interval``,
                ``time_shift`` for this call.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
        settings = {**self.sampling, **overrides}
        prefix_embeds, prefix_mask = self.prefix(self.guided_prompts(prompts, settings))
        positions = positions_from_mask(prefix_mask, prefix_mask.shape[1])
        prefix_hidden, cache = self._run(prefix_embeds, prefix_mask, positions, self._image_from(prefix_mask))
        context = prefix_hidden[:, -1]  # the BOI token's state

        def velocity(z_t: Tensor, t: Tensor, rows: Tensor) -> Tensor:
            return self._cached_velocity(z_t, t, rows, cache, prefix_mask, context)

        return self.integrate(velocity, seeds, settings)

    @staticmethod
    def guided_prompts(prompts: list[str], settings: dict[str, Any]) -> list[str]:
        """The prompts, then as many empty prompts when the settings' guidance is on (the rows of :meth:`integrate`)."""
        return prompts + [""] * len(prompts) if float(settings["guidance_scale"]) != 1.0 else prompts

    def integrate(
        self, velocity: Callable[[Tensor, Tensor, Tensor], Tensor], seeds: list[int], settings: dict[str, Any]
    ) -> Tensor:
        """Latents ``[B, N, d]`` integrated from each seed's noise with the settings' sampler and guidance.

        Args:
            velocity: ``velocity(z_t, t, rows)`` for the rows of :meth:`guided_prompts` (prompt ``i`` is row ``i``, its
                empty prompt row ``B + i``).
            seeds: One seed per prompt: prompt ``i`` starts from ``randn`` seeded with ``seeds[i]``.
            settings: ``sampler``, ``steps``, ``guidance_scale``, ``guidance_interval``, ``time_shift``.
        """
        b, scale = len(seeds), float(settings["guidance_scale"])
        weight = self.bridge.in_proj.weight
        shape = (self.bridge.num_tokens, self.bridge.latent_dim)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        noise = noise.to(device=weight.device, dtype=weight.dtype)
        rows = torch.arange(2 * b if scale != 1.0 else b, device=noise.device)
        interval = tuple(settings["guidance_interval"]) if settings["guidance_interval"] else None
        guided = classifier_free_guidance(velocity, rows[:b], rows[b:] if scale != 1.0 else None, scale, interval)
        shift = settings["time_shift"] if settings["time_shift"] is not None else self.shift()
        return sample(guided, noise, steps=int(settings["steps"]), method=settings["sampler"], shift=float(shift))

    def _cached_velocity(
        self, z_t: Tensor, t: Tensor, rows: Tensor, cache: Any, prefix_mask: Tensor, context: Tensor
    ) -> Tensor:
        """Velocities of the latent block for the prompts ``rows``, on a copy of their prompt cache."""
        cache = copy.deepcopy(cache)
        if len(rows) != prefix_mask.shape[0] or not torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            cache.batch_select_indices(rows)
        mask = prefix_mask[rows]
        embeds = self.bridge.embed(z_t, t)
        full = torch.cat([mask, mask.new_ones(embeds.shape[:2])], dim=1)
        positions = positions_from_mask(full, full.shape[1])[:, -embeds.shape[1] :]
        hidden, _ = self._run(embeds, self.attention_mask(mask, embeds.shape[1]), positions, 0, cache=cache)
        return self.bridge.velocity(hidden, t, context[rows])

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], **overrides: Any) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` for ``prompts``: sampled latents, then the frozen pixel decoder."""
        latents = self.generate_latents(prompts, seeds, **overrides)
        images = []
        for latent, seed in zip(latents, seeds, strict=True):  # per prompt: its decoder noise depends on its seed only
            generator = torch.Generator().manual_seed(int(seed))
            size = (self.image_size, self.image_size)
            images.append(
                decode_latents(self.decoder, latent[None], self.latent_grid, size, self.decoder_sampling, generator)
            )
        return torch.cat(images)


# The names transformers' decoder layers have taken the KV cache under (``cache`` from 5.24 on); the model hands the
# layers a cache even in training because the adapters call it with ``use_cache=True``.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block call's keyword arguments with its KV cache set to None and ``use_cache`` to False.

    Only arguments the call carries change: adding one it lacks (``past_key_values`` next to 5.24's ``cache``) would
    make transformers warn, or fail on a layer without that parameter.
    """
    kwargs = {name: None if name in CACHE_ARGUMENTS else value for name, value in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def load_decoder_export(directory: str | Path) -> tuple[DimensionReducer, PixelDecoder, dict[str, Any]]:
    """The reducer, decoder and sampling settings of a ``DecoderStage`` export, each checked to exist."""
    directory = Path(directory)
    missing = [name for name in ("reducer", "decoder", SAMPLING_FILE) if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a decoder-stage export (DecoderStage export_dir): missing {', '.join(missing)}"
        )
    reducer = DimensionReducer.from_pretrained(directory / "reducer")
    decoder = PixelDecoder.from_pretrained(directory / "decoder")
    if reducer.latent_dim != decoder.latent_dim:
        raise ValueError(
            f"{directory}: reducer latent_dim={reducer.latent_dim} but decoder latent_dim={decoder.latent_dim}"
        )
    return reducer, decoder, json.loads((directory / SAMPLING_FILE).read_text())
