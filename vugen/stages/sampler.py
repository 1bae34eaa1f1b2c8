"""Stage 2: train the latent sampler. The VLM's language model, tuned with LoRA, learns to generate reduced latents
by flow matching.

The model is a :class:`~vugen.generation.LatentSampler` (LoRA scoped to the image tokens + a latent bridge; its
docstring describes the sequence and why the VLM's understanding stays exact); this stage adds what training needs:
the flow-matching loss in z-space, prompt dropout for classifier-free guidance, caption checks, activation
checkpointing and FSDP2 units. ``predict`` generates images (:meth:`SamplerStage.predict_step`, over a
:class:`~vugen.data.prompts.PromptDataModule`) with the same code as the pipeline.

The reducer and the pixel decoder come from the decoder stage's export (``reducer/``, ``decoder/``,
``sampling.json``, see :mod:`vugen.decoder_export`) and stay frozen. Batches carry ``images`` (encoded on the fly by
the frozen VLM and reducer) or ``latents`` (from :mod:`vugen.data.latent_cache`: the vision tower never runs), plus
``captions``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vugen.adapter import VLMAdapter
from vugen.data.batches import batch_images
from vugen.data.prompts import PromptBatch
from vugen.decoder_export import read_decoder_export
from vugen.diffusion import Schedule, flow_matching_inputs, flow_matching_loss, sample_timesteps
from vugen.generation import LORA_ADAPTER_NAME, LatentSampler, LatentSamplerConfig, SamplingConfig
from vugen.pipeline import VugenPipeline
from vugen.prediction import predict_images
from vugen.stages.base import AdapterStage

__all__ = ["SamplerStage"]


class SamplerStage(AdapterStage):
    """Stage 2: LoRA on the VLM's language model + a latent bridge, trained to generate reduced latents from text.

    Logs ``train/loss`` per step and ``val/loss`` per validation run. ``predict`` returns generated images per prompt
    (see :meth:`predict_step`).

    Args:
        adapter: The VLM, e.g. ``{class_path: vugen_adapters.llava.LlavaAdapter, init_args: {pretrained: ...}}``.
            Its weights stay frozen; LoRA layers are added inside its language model only.
        decoder_export: The decoder stage's export folder (``reducer/``, ``decoder/``, ``sampling.json``): the frozen
            reducer defines the latent space, the decoder turns sampled latents into images.
        image_size: Side of the generated images (default: the decoder's nominal ``image_size``); sets the latent
            token grid through the adapter.
        latent_sampler: The latent sampler's LoRA (``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_scope``:
            ``image_tokens`` keeps the VLM's understanding exactly the base model's), attention in the latent block
            (``image_attention``) and flow head (``head``, ``head_width``, ``head_depth``): see
            :class:`~vugen.generation.LatentSamplerConfig`. Saved in the bundle.
        prompt_dropout: Probability of training on the empty prompt, for classifier-free guidance.
        time_schedule: Training-time distribution: ``"logit_normal"`` or ``"uniform"``.
        time_mean: Mean of the logit of ``t`` (``t = 1`` is data).
        time_std: Standard deviation of the logit of ``t``.
        time_shift: Time shift for training, and for sampling unless ``sampling`` sets its own; None uses RAE's
            ``sqrt(N * d / 4096)``, at least 1.
        sampling: How images are generated (``vugen predict``, the exported bundle's default): ``solver``,
            ``steps``, ``guidance_scale``, ``guidance_interval``, ``time_shift``.
        activation_checkpointing: Recompute the language model blocks' activations in the backward pass (LoRA
            gradients flow through every block): less memory for a little more compute.
        compile: ``torch.compile`` each block of the language model (after activation checkpointing wraps it) for
            training; ``predict`` keeps them eager.
        optimizer: Builds the optimizer over the LoRA and bridge parameters.
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
        latent_sampler: LatentSamplerConfig = LatentSamplerConfig(),  # noqa: B008 (frozen: shared safely)
        prompt_dropout: float = 0.1,
        time_schedule: Schedule = "logit_normal",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float | None = None,
        sampling: SamplingConfig = SamplingConfig(guidance_scale=3.0),  # noqa: B008 (frozen: shared safely)
        activation_checkpointing: bool = False,
        compile: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        allow_empty_captions: bool = False,
    ) -> None:
        super().__init__(adapter, optimizer, lr_scheduler)
        self.record_hyperparameters(adapter=adapter, optimizer=optimizer, lr_scheduler=lr_scheduler)
        if not 0 <= prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout}")
        self.decoder_export = str(decoder_export)
        self.reducer, self.decoder, self.decoder_sampling = read_decoder_export(decoder_export)
        self.reducer.requires_grad_(False).eval()
        self.decoder.requires_grad_(False).eval()
        image_size = image_size or self.decoder.base_grid[0] * self.decoder.patch_size
        self.latent_sampler = LatentSampler(adapter, self.reducer.latent_dim, image_size, latent_sampler)
        self.prompt_dropout = prompt_dropout
        self.time_schedule, self.time_mean, self.time_std = time_schedule, time_mean, time_std
        self.time_shift = time_shift
        self.sampling = sampling.with_overrides(time_shift=sampling.time_shift or time_shift)
        self.activation_checkpointing, self.compile_blocks = activation_checkpointing, compile
        self.allow_empty_captions = allow_empty_captions
        self._captions_seen = self._empty_captions_warned = False  # per fit: see on_fit_start

    # The VLM's frozen weights and the frozen reducer and decoder are rebuilt from the configuration; checkpoints hold
    # the LoRA layers (inside the VLM) and the bridge.
    rebuilt_prefixes = ("latent_sampler.adapter.", "reducer.", "decoder.")

    def hold_adapter(self, adapter: VLMAdapter) -> None:
        """The latent sampler holds the adapter (it injects LoRA into it): see :attr:`adapter`."""

    @property
    def adapter(self) -> VLMAdapter:
        """The VLM, held by the latent sampler."""
        return self.latent_sampler.adapter

    def pipeline(self) -> VugenPipeline:
        """A text-to-image pipeline over this stage's modules (shared, not copied): save it as a bundle with
        ``save_pretrained``, or generate with it."""
        return VugenPipeline(self.latent_sampler, self.reducer, self.decoder, self.sampling, self.decoder_sampling)

    def shift(self) -> float:
        """The training time shift: ``time_shift``, else the latent sampler's default rule."""
        return float(self.time_shift) if self.time_shift is not None else self.latent_sampler.default_shift()

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
        bridge = self.latent_sampler.bridge
        expected = (bridge.num_tokens, bridge.latent_dim)
        if latents.ndim != 3 or tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)} but the sampler expects [B, {expected[0]}, {expected[1]}] "
                f"(token grid {bridge.grid} at image_size {self.latent_sampler.image_size}, latent_dim of "
                f"{self.decoder_export})"
            )
        return latents

    def loss(self, batch: dict[str, Any], drop_prompts: bool) -> Tensor:
        """The flow-matching loss of a batch in z-space (v-prediction)."""
        sampler = self.latent_sampler
        z = self.target_latents(batch).to(sampler.bridge.in_proj.weight.dtype)
        captions = list(batch["captions"])
        if drop_prompts and self.prompt_dropout > 0:
            dropped = torch.rand(len(captions)) < self.prompt_dropout
            captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist(), strict=True)]
        eps = torch.randn_like(z)
        t = sample_timesteps(len(z), self.time_schedule, self.time_mean, self.time_std, self.shift(), device=z.device)
        z_t, _ = flow_matching_inputs(z, eps, t, "v")
        prefix_embeds, prefix_mask = sampler.prefix(captions)
        pred = sampler.velocity(z_t, t, prefix_embeds, prefix_mask)
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
        """Activation checkpointing and compilation of the language model's blocks, then FSDP2 sharding (see the base).

        The bridge is called through ``embed``, ``begin_image`` and ``velocity``, never ``forward``: under FSDP2 those
        methods gather its parameters. Idempotent: Lightning may call it more than once.
        """
        block_types = tuple(self.adapter.block_classes)
        blocks = [m for m in self.adapter.language_model.modules() if block_types and isinstance(m, block_types)]
        for block in blocks:
            if self.activation_checkpointing and not hasattr(block, "_vugen_checkpointed"):
                self._checkpoint(block)
            if self.compile_blocks and self._fitting() and getattr(block, "_compiled_call_impl", None) is None:
                block.compile()
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        bridge = self.latent_sampler.bridge
        sharded_before = isinstance(bridge, FSDPModule)
        super().configure_model()
        if not sharded_before:  # registering twice would wrap the methods twice
            for method in ("embed", "begin_image", "velocity"):
                register_fsdp_forward_method(bridge, method)  # a no-op unless the bridge is now sharded

    def _fitting(self) -> bool:
        """Whether blocks are configured for training: in a ``fit``, or outside a Trainer (predict and generation
        run the prompt's KV cache through the blocks, shapes that change every call: they stay eager)."""
        return self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING

    def _checkpoint(self, block: nn.Module) -> None:
        """Make ``block`` recompute its activations in the backward pass whenever gradients are on.

        The recomputation runs after :meth:`LatentSampler.run` has returned, so it restores the LoRA mask of its own
        call; and the
        block gets no KV cache (training runs whole sequences), so a recomputed block never appends to a cache twice.
        """
        forward = block.forward

        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            kwargs = without_cache(kwargs)
            sampler = self.latent_sampler
            lora_mask = sampler.lora_mask

            def run(*inputs: Any) -> Any:
                previous, sampler.lora_mask = sampler.lora_mask, lora_mask
                try:
                    return forward(*inputs, **kwargs)
                finally:
                    sampler.lora_mask = previous

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
        bridge = self.latent_sampler.bridge
        return [*lora, *bridge.children(), bridge]

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        """The images ``[P, n, 3, H, W]`` of a :class:`~vugen.data.prompts.PromptDataModule` batch with
        :meth:`pipeline`, one prompt's images at a time, as ``vugen export-geneval`` makes them from the exported
        bundle (see :func:`vugen.prediction.predict_images`)."""
        return predict_images(self.pipeline(), batch)

    def generation_record(self) -> dict[str, Any]:
        """What the prediction writers record beside the images: the generation settings and their source."""
        pipeline = self.pipeline()
        return {
            "source": {"stage": type(self).__name__, "decoder_export": self.decoder_export},
            "image_size": pipeline.image_size,
            "sampling": pipeline.sampling.to_dict(),
            "decoder_sampling": pipeline.decoder_sampling.to_dict(),
        }


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
