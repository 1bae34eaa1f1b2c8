"""What the stages that own a reducer and a pixel decoder share: encoding, decoding, reconstruction metrics, export.

:class:`~vugen.stages.DecoderStage` trains the decoder (and the reducer) by flow matching;
:class:`~vugen.stages.DecoderDistillStage` trains a few-step student of a trained decoder. Both are scored the same
way (``val/psnr``, ``vugen test``'s reconstruction metrics) and export the same layout (:mod:`vugen.decoder_export`),
so whatever reads a decoder export (the latent sampler, bundles, the pipeline) takes either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from vugen.data.batches import batch_images
from vugen.decoder_export import write_decoder_export
from vugen.generation import SamplingConfig, decode_latents
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer
from vugen.stages.base import AdapterStage

__all__ = ["ReconstructingStage", "mean_psnr"]


class ReconstructingStage(AdapterStage):
    """Base of the stages that hold ``self.reducer`` and ``self.decoder`` and are judged by reconstruction.

    A subclass's ``__init__`` sets ``reducer``, ``decoder``, ``train_reducer`` (whether the reducer's gradients flow)
    and ``sampling`` (how images are decoded and exported), calls :meth:`init_reconstruction` with the arguments they
    share, and implements ``training_step`` and :meth:`validation_loss`.
    """

    reducer: DimensionReducer
    decoder: PixelDecoder
    train_reducer: bool
    sampling: SamplingConfig
    sample_seed: int
    metric_settings: dict[str, Any]
    activation_checkpointing: bool
    compile_blocks: bool
    export_dir: str | None

    def init_reconstruction(
        self,
        sample_seed: int,
        lpips_weights: str | None,
        fid_weights: str | None,
        require_metric_weights: bool,
        activation_checkpointing: bool,
        compile: bool,
        export_dir: str | None,
    ) -> None:
        """Keep the ``__init__`` arguments the reconstructing stages share (see :class:`DecoderStage` for each); no
        metrics until ``test`` starts (their backbones are only needed there)."""
        self.sample_seed = sample_seed
        self.metric_settings = {
            "lpips_weights": lpips_weights,
            "fid_weights": fid_weights,
            "require_weights": require_metric_weights,
        }
        self.activation_checkpointing, self.compile_blocks = activation_checkpointing, compile
        self.export_dir = export_dir
        self.metrics: torch.nn.Module | None = None

    # ------------------------------------------------------------------ model
    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the decoder computes in (features and pixels are cast to it)."""
        return self.decoder.latent_proj.weight.dtype

    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Latents ``[B, N, d]`` of ``images`` and their token grid (noisy while the reducer is in train mode)."""
        features = self.vlm_features(images, self.param_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_reducer):
            latents = self.reducer.encode(features)
        return latents, self.adapter.token_grid(images.shape[-2], images.shape[-1])

    @torch.no_grad()
    def decode(
        self,
        latents: Tensor,
        latent_grid: tuple[int, int],
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> Tensor:
        """Sample images ``[B, 3, H, W]`` in ``[0, 1]`` from latents with the stage's sampling settings.

        Args:
            latents: Reducer latents ``[B, N, d]`` (e.g. from the latent sampler).
            latent_grid: Their token grid ``(gh, gw)``.
            image_size: Output ``(H, W)``, multiples of the decoder's patch size.
            generator: Generator of the starting noise (and of the SDE noise); its device is the noise's.
            overrides: Sampling settings for this call (see :meth:`SamplingConfig.with_overrides`).
        """
        sampling = self.sampling.with_overrides(**overrides)
        return decode_latents(self.decoder, latents, latent_grid, image_size, sampling, generator)

    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Encode ``images`` (``[B, 3, H, W]`` in ``[0, 1]``) and decode them again (reducer noise off)."""
        was_training = self.reducer.training
        self.reducer.eval()
        try:
            with torch.no_grad():
                latents, grid = self.encode(images)
        finally:
            self.reducer.train(was_training)
        return self.decode(latents, grid, tuple(images.shape[-2:]), generator=generator)

    # ------------------------------------------------------------------ training
    def configure_model(self) -> None:
        """Activation checkpointing and compilation of the decoder blocks, then FSDP2 sharding (see the base).

        Idempotent: Lightning may call it more than once.
        """
        self.decoder.gradient_checkpointing = self.activation_checkpointing
        if self.compile_blocks:
            for block in self.decoder.blocks:
                if getattr(block, "_compiled_call_impl", None) is None:
                    block.compile()
        super().configure_model()

    def fsdp_units(self) -> list[torch.nn.Module]:
        """Each decoder block, then the decoder, then the reducer's children."""
        return [*self.decoder.blocks, self.decoder, *self.reducer.children()]

    def validation_loss(self, images: Tensor, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        """The training objective on a validation batch (clean latents), logged as ``val/loss``."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/loss`` (:meth:`validation_loss`) and ``val/psnr`` of reconstructions."""
        images = batch_images(batch, type(self).__name__)
        latents, grid = self.encode(images)
        reconstructions = self.reconstruct(images, self._generator(batch_idx))
        metrics = {"loss": self.validation_loss(images, latents, grid), "psnr": mean_psnr(reconstructions, images)}
        self.log_metrics("val", metrics, batch_size=len(images))

    def _generator(self, batch_idx: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.sample_seed + batch_idx)

    # ------------------------------------------------------------------ test
    def on_test_start(self) -> None:
        """Build the reconstruction metrics once and say which ones are skipped and why."""
        from vugen.eval import ReconstructionMetrics  # the metric backbones are only needed for `test`

        if self.metrics is None:
            self.metrics = ReconstructionMetrics(**self.metric_settings).to(self.device)
        for reason in self.metrics.skipped.values():
            rank_zero_info(reason)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reconstruct the batch and accumulate the metrics."""
        images = batch_images(batch, type(self).__name__)
        self.metrics.update(self.reconstruct(images, self._generator(batch_idx)), images)

    def on_test_epoch_end(self) -> None:
        """Log ``test/<metric>`` over the whole test set (synchronised across ranks by torchmetrics)."""
        for name, value in self.metrics.compute().items():
            self.log(f"test/{name}", value, rank_zero_only=True)
        self.metrics.reset()

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        """Export reducer and decoder to ``export_dir`` when one is set and this fit trained them (gathered on all
        ranks, rank 0 writes); a fit without an optimizer step leaves an earlier export as it was."""
        if self.export_dir is not None:
            self.export_after_fit(self.export_dir, self.export, "reducer and decoder")

    def export(self, directory: str | Path) -> Path | None:
        """Write ``reducer/``, ``decoder/`` (``save_pretrained`` each), ``sampling.json`` and ``training.json`` (what
        trained them, see :mod:`vugen.stages.training_record`), atomically.

        Under FSDP2 call it on every rank (it gathers the shards); only global rank 0 writes.

        Args:
            directory: Output folder, replaced whole (or left as it was on error).

        Returns:
            The folder on the rank that wrote it, else None.

        Raises:
            NonFiniteError: The reducer or the decoder holds NaN or Inf; nothing is written.
        """
        modules = {"reducer": self.reducer, "decoder": self.decoder}

        def write(folder: Path, reducer: DimensionReducer, decoder: PixelDecoder) -> None:
            write_decoder_export(folder, reducer, decoder, self.sampling)

        return self.export_modules(directory, "the reducer and decoder", modules, write)


def mean_psnr(reconstructions: Tensor, images: Tensor) -> Tensor:
    """Mean over images of the per-image PSNR in dB (``[0, 1]`` pixels); capped at 100 dB for exact copies."""
    mse = (reconstructions.float() - images.float()).pow(2).flatten(1).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()
