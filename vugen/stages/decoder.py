"""Stage 3: the VAE-free pixel diffusion decoder, trained jointly with the reducer (or on a frozen one).

Per batch: the frozen VLM encodes the images into features, the reducer maps them to latents ``z`` (with its
training noise), and the pixel decoder learns by flow matching to turn pure noise into the image given ``z``.
The diffusion loss reaches the reducer when it trains (``train_reducer``), optionally with the reducer's feature
reconstruction loss beside it (``feature_loss_weight``). VUGEN's recipe: train both jointly, then freeze the
reducer for the latent sampler.

Pixels live in ``[-1, 1]`` inside the diffusion and in ``[0, 1]`` outside (batches, reconstructions).
``vugen test`` reconstructs the test images (encode, then sample from noise) and reports PSNR, SSIM and, with
their weights available, LPIPS and rFID (see :class:`vugen.eval.ReconstructionMetrics`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from vugen.adapter import VLMAdapter
from vugen.data.batches import batch_images
from vugen.diffusion import Prediction, Schedule, flow_matching_inputs, flow_matching_loss, sample_timesteps
from vugen.generation import SamplingConfig, pixel_shift
from vugen.hub import local_folder_or_hub_id
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer, add_latent_noise
from vugen.stages.base import check_reads_adapter
from vugen.stages.reconstructing import ReconstructingStage

__all__ = ["DecoderStage"]


class DecoderStage(ReconstructingStage):
    """Stage 3: learn the pixel decoder ``(noise, z) -> image`` and, jointly, the reducer ``features -> z``.

    Logs ``train/{loss,diffusion,feature}`` per step, ``val/{loss,psnr}`` per validation run (PSNR of
    reconstructions sampled with the test settings) and ``test/{psnr,ssim,lpips,rfid}``.

    Args:
        adapter: The frozen VLM, e.g. ``{class_path: vugen_adapters.llava.LlavaAdapter, init_args: {pretrained:
            ...}}``. Its weights never train and are not written to checkpoints.
        decoder: The pixel decoder, e.g. ``{class_path: vugen.nn.PixelDecoder, init_args: {latent_dim: 32,
            patch_size: 16, width: 768, depth: 12}}``; its ``latent_dim`` must be the reducer's.
        reducer: A fresh reducer to train jointly (``feature_dim`` must be the adapter's ``feature_dim``).
            Give either this or ``reducer_path``.
        reducer_path: A reducer saved by stage 1 (``ReducerStage``'s ``export_dir``) or by this stage's export
            (its ``reducer/`` folder): a local folder or a Hub id, loaded with ``DimensionReducer.from_pretrained``.
        train_reducer: Train the reducer jointly with the decoder (VUGEN's first phase); False freezes it.
        feature_loss_weight: Weight of the reducer's feature reconstruction loss added to the diffusion loss
            when the reducer trains (keeps the latents informative about the VLM features); 0 disables it.
        latent_noise: Upper bound of extra noise on the decoder's conditioning in training: ``z + alpha * eps``,
            ``alpha ~ U[0, latent_noise]`` per image, on top of the reducer's own ``noise_gamma`` (which also shapes
            what the reducer learns). Makes the decoder tolerant to the latent sampler's errors, as RAE's
            noise-augmented decoder training does; the feature loss, validation, test and the latent cache stay
            clean. Latents are per-token normalised, so 1 is the scale of a latent. 0 disables it.
        pca_init: Initialise a fresh ``reducer`` as the PCA reducer of the first training batch's features (rank
            0's, broadcast); never applied to a loaded reducer or a resumed run.
        time_schedule: Training-time distribution: ``"logit_normal"`` or ``"uniform"``.
        time_mean: Mean of the logit of ``t`` (``t = 1`` is data; negative favours noisy times, JiT uses -0.8).
        time_std: Standard deviation of the logit of ``t``.
        time_shift: Time shift for training, and for sampling unless ``sampling`` sets its own; None scales with
            the image as RAE / JiT do, relative to a 256x256 RGB image: ``sqrt(C*H*W / (3*256*256))`` (1 at 256 px,
            1.75 at 448 px).
        loss_space: Space the diffusion error is measured in (``"v"``: JiT's x-prediction with v-loss).
        sampling: How reconstructions (validation, test, image grids) and generated images are decoded, exported as
            ``sampling.json``: ``solver``, ``steps``, ``guidance_scale`` (1 = none; needs ``cond_drop_prob > 0`` in
            the decoder to mean anything), ``guidance_interval``, ``time_shift``.
        sample_seed: Seed of the noise of reconstructions: the same images get the same reconstructions.
        lpips_weights: Local file of the LPIPS trunk weights (torchvision AlexNet state dict) for ``test``.
        fid_weights: Local file of the Inception weights for ``test``'s rFID.
        require_metric_weights: Fail ``test`` when a metric's weights are missing instead of skipping the metric.
        activation_checkpointing: Recompute the decoder blocks' activations in the backward pass (less memory).
        compile: ``torch.compile`` each decoder block (the LightningModule itself is never compiled).
        optimizer: Builds the optimizer over the parameters that train (decoder, and reducer when it trains).
        lr_scheduler: Optional scheduler on that optimizer, stepped after every optimizer step.
        export_dir: If set, a ``fit`` that ran at least one optimizer step ends by writing ``reducer/``,
            ``decoder/`` and ``sampling.json`` there (atomically), what the latent sampler and the pipeline load,
            with a ``training.json`` record of what trained them.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        decoder: PixelDecoder,
        reducer: DimensionReducer | None = None,
        reducer_path: str | None = None,
        train_reducer: bool = True,
        feature_loss_weight: float = 0.0,
        latent_noise: float = 0.0,
        pca_init: bool = True,
        time_schedule: Schedule = "logit_normal",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float | None = None,
        loss_space: Prediction = "v",
        sampling: SamplingConfig = SamplingConfig(solver="heun"),  # noqa: B008 (frozen: shared safely)
        sample_seed: int = 0,
        lpips_weights: str | None = None,
        fid_weights: str | None = None,
        require_metric_weights: bool = False,
        activation_checkpointing: bool = False,
        compile: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(adapter, optimizer, lr_scheduler)
        reducer = _resolve_reducer(reducer, reducer_path, adapter, decoder)
        self.record_hyperparameters(
            adapter=adapter, decoder=decoder, reducer=reducer, optimizer=optimizer, lr_scheduler=lr_scheduler
        )
        if feature_loss_weight < 0:
            raise ValueError(f"need feature_loss_weight >= 0, got {feature_loss_weight}")
        if not latent_noise >= 0:
            raise ValueError(f"need latent_noise >= 0, got {latent_noise}")
        self.decoder = decoder
        self.reducer = reducer.requires_grad_(train_reducer)
        self.train_reducer = train_reducer
        self.feature_loss_weight = float(feature_loss_weight)
        self.latent_noise = float(latent_noise)
        self.enable_pca_init(pca_init and reducer_path is None)
        self.time_schedule, self.time_mean, self.time_std, self.time_shift = (
            time_schedule,
            time_mean,
            time_std,
            time_shift,
        )
        self.loss_space = loss_space
        self.sampling = sampling.with_overrides(time_shift=sampling.time_shift or time_shift)
        self.init_reconstruction(
            sample_seed, lpips_weights, fid_weights, require_metric_weights, activation_checkpointing, compile,
            export_dir,
        )  # fmt: skip

    # ------------------------------------------------------------------ training
    def shift_for(self, images: Tensor) -> float:
        """The time shift used for images of this shape (``time_shift`` or the resolution shift)."""
        return pixel_shift(self.time_shift, images[0].numel())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Diffusion loss (plus the weighted feature loss); logs ``train/{loss,diffusion,feature}``."""
        images = batch_images(batch, "DecoderStage")
        features = self.vlm_features(images, self.param_dtype)
        latents = self.reducer.encode(features)
        grid = self.adapter.token_grid(images.shape[-2], images.shape[-1])
        drop = self.decoder.draw_drop_mask(len(images), device=images.device)
        condition = add_latent_noise(latents, self.latent_noise) if self.latent_noise > 0 else latents
        metrics = {"diffusion": self._diffusion_loss(images, condition, grid, drop)}
        loss = metrics["diffusion"]
        if self.train_reducer and self.feature_loss_weight > 0:
            metrics["feature"] = self.reducer.reconstruction_loss(features, self.reducer.decode(latents))["loss"]
            loss = loss + self.feature_loss_weight * metrics["feature"]
        metrics["loss"] = loss
        self.log_metrics("train", metrics, batch_size=len(images))
        return loss

    def _diffusion_loss(
        self, images: Tensor, latents: Tensor, grid: tuple[int, int], drop: Tensor | None = None
    ) -> Tensor:
        x = images.to(self.param_dtype) * 2 - 1
        eps = torch.randn_like(x)
        t = sample_timesteps(
            len(x), self.time_schedule, self.time_mean, self.time_std, self.shift_for(x), device=x.device
        )
        x_t, _ = flow_matching_inputs(x, eps, t, self.decoder.prediction)
        pred = self.decoder(x_t, t, latents, grid, drop_cond=drop)
        return flow_matching_loss(pred, x, eps, t, self.decoder.prediction, loss_space=self.loss_space)

    def validation_loss(self, images: Tensor, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        """The diffusion loss without condition dropout."""
        return self._diffusion_loss(images, latents, grid)


def _resolve_reducer(
    reducer: DimensionReducer | None, reducer_path: str | None, adapter: VLMAdapter, decoder: PixelDecoder
) -> DimensionReducer:
    """The reducer to use, checked against the adapter's feature width and the decoder's latent width."""
    if (reducer is None) == (reducer_path is None):
        raise ValueError(
            "DecoderStage needs exactly one of `reducer` (a fresh DimensionReducer to train jointly) and "
            f"`reducer_path` (a saved one), got reducer={type(reducer).__name__} and reducer_path={reducer_path!r}"
        )
    if reducer is None:
        local_folder_or_hub_id(reducer_path, "DecoderStage reducer_path")  # a mistyped folder fails at once
        reducer = DimensionReducer.from_pretrained(reducer_path)
    source = f"reducer_path={reducer_path!r}" if reducer_path else "reducer"
    check_reads_adapter(reducer, adapter, source)
    if reducer.latent_dim != decoder.latent_dim:
        raise ValueError(
            f"{source} has latent_dim={reducer.latent_dim} but the decoder expects latent_dim={decoder.latent_dim}"
        )
    return reducer
