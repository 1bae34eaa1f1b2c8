"""After stage 3: distil the pixel decoder into a one-step (or few-step) student.

The teacher is a trained decoder-stage export (``reducer/``, ``decoder/``, ``sampling.json``). Per batch, it decodes
the batch's latents from fresh noise ``eps`` with its multi-step sampler (``teacher_sampling``, e.g. 10 Heun steps, 19
network calls): a coupling ``(eps, x_teacher)`` of its sampling ODE. The student starts as a copy of the teacher and
learns the straight path between the two, ``x_t = t * x_teacher + (1 - t) * eps``, predicting ``x_teacher`` (reflow:
Liu, Gong and Liu 2022, "Flow Straight and Fast", arXiv 2209.03003), at exactly the times its own Euler sampler
evaluates (``sampling.steps`` with its time shift). With one step that is ``t = 0`` only: the student regresses the
teacher's ODE solution on its starting noise, the one-step knowledge distillation of Luhman and Luhman 2021
(arXiv 2101.02388). With more steps each of its evaluation times is trained on the point of the straight path its
own earlier steps lead to.

Why this method (measured, docs/real_images.md): a teacher trained with logit-normal times barely sees ``t = 0``, so
its own one-step output is far behind its 10 Heun steps on Shapes (32.0 vs 39.5 dB); training the student only where
it will be evaluated spends every step there. The export has the same layout as the decoder stage's, with the
student's ``sampling.json`` (``euler``, its step count), so the latent sampler, ``vugen export`` and bundles take it
as they take the teacher's; its reducer is the teacher's, unchanged, so latents and cached latents stay valid.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from vugen.adapter import VLMAdapter
from vugen.data.batches import batch_images
from vugen.decoder_export import read_decoder_export
from vugen.diffusion import Prediction, flow_matching_loss, interpolate, time_grid
from vugen.generation import SamplingConfig, decode_latents, pixel_shift
from vugen.hub import local_folder_or_hub_id
from vugen.stages.base import check_reads_adapter
from vugen.stages.reconstructing import ReconstructingStage

__all__ = ["DecoderDistillStage", "teacher_settings"]


class DecoderDistillStage(ReconstructingStage):
    """Train a few-step student of a trained pixel decoder; the reducer and the teacher stay frozen.

    Logs ``train/loss`` per step, ``val/{loss,psnr}`` (the student's PSNR, sampled as it will be) and, in ``vugen
    test``, the student's ``test/{psnr,ssim,haarpsi,...}``, comparable with the teacher's ``DecoderStage`` test.

    Args:
        adapter: The frozen VLM the teacher's reducer reads (the decoder stage's adapter).
        teacher_export: The decoder stage's export folder (its ``export_dir``) or a Hub id: the teacher decoder and
            the reducer, both frozen.
        teacher_sampling: How the teacher decodes its targets; None uses its ``sampling.json``, whose
            ``time_shift`` also stands in for an unset one here. The targets are as good as this: e.g.
            ``{solver: heun, steps: 10}``.
        sampling: The student's sampling, exported as its ``sampling.json``: Euler (the times it trains at are the
            Euler grid's), ``steps`` 1 or a few, no guidance. Its ``time_shift`` defaults to the teacher's.
        loss_space: Space of the regression error (``"x"``: plain pixel MSE, what PSNR measures).
        sample_seed: Seed of the noise of reconstructions (validation, test).
        lpips_weights: Local file of the LPIPS trunk weights for ``test``.
        fid_weights: Local file of the Inception weights for ``test``'s rFID.
        require_metric_weights: Fail ``test`` when a metric's weights are missing instead of skipping the metric.
        activation_checkpointing: Recompute the student's block activations in the backward pass.
        compile: ``torch.compile`` each student block.
        optimizer: Builds the optimizer over the student's parameters.
        lr_scheduler: Optional scheduler on that optimizer, stepped after every optimizer step.
        export_dir: If set, a ``fit`` that ran at least one optimizer step ends by writing the teacher's reducer, the
            student as ``decoder/`` and the student's ``sampling.json`` there (atomically), with ``training.json``.
    """

    # The teacher and the reducer come back from `teacher_export`; checkpoints hold the student (`decoder.`).
    rebuilt_prefixes = ("adapter.", "teacher.", "reducer.")

    def __init__(
        self,
        adapter: VLMAdapter,
        teacher_export: str,
        teacher_sampling: SamplingConfig | None = None,
        sampling: SamplingConfig = SamplingConfig(solver="euler", steps=1),  # noqa: B008 (frozen: shared safely)
        loss_space: Prediction = "x",
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
        self.record_hyperparameters(adapter=adapter, optimizer=optimizer, lr_scheduler=lr_scheduler)
        local_folder_or_hub_id(teacher_export, "DecoderDistillStage teacher_export")  # a mistyped folder fails at once
        reducer, teacher, teacher_export_sampling = read_decoder_export(teacher_export)
        self.reducer = check_reads_adapter(reducer, adapter, f"teacher_export={teacher_export!r}").requires_grad_(False)
        self.decoder = copy.deepcopy(teacher).requires_grad_(True).train()  # the student starts as the teacher
        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher_sampling = teacher_settings(teacher_sampling, teacher_export_sampling)
        self.sampling = _student_sampling(sampling, self.teacher_sampling)
        self.train_reducer = False
        self.loss_space = loss_space
        self.init_reconstruction(
            sample_seed, lpips_weights, fid_weights, require_metric_weights, activation_checkpointing, compile,
            export_dir,
        )  # fmt: skip

    def train(self, mode: bool = True) -> DecoderDistillStage:
        """Only the student trains: the teacher and the reducer stay in eval mode (clean latents, no dropout)."""
        super().train(mode)
        self.teacher.eval()
        self.reducer.eval()
        return self

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The student's regression on the teacher's result from the same noise; logs ``train/loss``."""
        images = batch_images(batch, type(self).__name__)
        latents, grid = self.encode(images)
        loss = self.distillation_loss(latents, grid, tuple(images.shape[-2:]))
        self.log_metrics("train", {"loss": loss}, batch_size=len(images))
        return loss

    def validation_loss(self, images: Tensor, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        """The distillation loss on a validation batch."""
        return self.distillation_loss(latents, grid, tuple(images.shape[-2:]))

    def distillation_loss(self, latents: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        """Mean squared error (in ``loss_space``) of the student's prediction of the teacher's sample.

        Args:
            latents: Clean reducer latents ``[B, N, d]``.
            grid: Their token grid.
            image_size: The images' ``(H, W)``.
        """
        eps = torch.randn(len(latents), self.decoder.in_channels, *image_size, device=latents.device)
        eps = eps.to(self.param_dtype)
        with torch.no_grad():
            target = decode_latents(self.teacher, latents, grid, image_size, self.teacher_sampling, noise=eps)
        target = (target * 2 - 1).to(self.param_dtype)
        t = self.student_times(len(latents), eps[0].numel(), latents.device)
        pred = self.decoder(interpolate(target, eps, t), t, latents, grid)
        return flow_matching_loss(pred, target, eps, t, self.decoder.prediction, loss_space=self.loss_space)

    def student_times(self, batch: int, pixels: int, device: torch.device) -> Tensor:
        """One of the student's Euler evaluation times per sample, uniformly (``0`` only, for one step)."""
        grid = time_grid(self.sampling.steps, pixel_shift(self.sampling.time_shift, pixels), device=device)[:-1]
        index = torch.randint(len(grid), (batch,), device=device)
        return grid[index].to(self.param_dtype)


def teacher_settings(given: SamplingConfig | None, exported: SamplingConfig) -> SamplingConfig:
    """How the teacher samples: ``given`` (its time shift, when None, the export's: the shift it was trained with),
    else its export's ``sampling.json``."""
    if given is None:
        return exported
    return given.with_overrides(time_shift=given.time_shift or exported.time_shift)


def _student_sampling(sampling: SamplingConfig, teacher: SamplingConfig) -> SamplingConfig:
    """The student's sampling settings, checked: Euler without guidance, the teacher's time shift by default."""
    if sampling.solver != "euler":
        raise ValueError(
            f"DecoderDistillStage sampling.solver must be 'euler' (the student trains at the Euler grid's times), "
            f"got {sampling.solver!r}"
        )
    if sampling.guidance_scale != 1.0:
        raise ValueError(
            "DecoderDistillStage sampling.guidance_scale must be 1: the teacher's guidance is in its targets, got "
            f"{sampling.guidance_scale}"
        )
    return sampling.with_overrides(time_shift=sampling.time_shift or teacher.time_shift)
