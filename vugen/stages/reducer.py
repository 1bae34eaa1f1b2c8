"""Stage 1: train the dimension reducer on the frozen VLM's own vision features.

The adapter encodes each batch of images into features ``[B, N, D]`` under ``no_grad``; the reducer maps them to
latents ``[B, N, d]`` and reconstructs them, trained on ``mse + cosine_weight * (1 - cos)``. Validation also
reports the explained variance of PCA at the same ``d`` on the same batch: the best *linear* reducer, the
baseline the learned one has to beat.

Checkpoints hold the reducer only (plus the PCA-done flag), see :mod:`vugen.stages.base`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from vugen.adapter import VLMAdapter
from vugen.data.batches import batch_images
from vugen.nn.reducer import DimensionReducer, explained_variance, pca_explained_variance
from vugen.stages.base import AdapterStage, check_reads_adapter

__all__ = ["ReducerStage"]


class ReducerStage(AdapterStage):
    """Stage 1: learn a reducer from a frozen VLM's vision features ``D`` to compact latents ``d``.

    Logs ``train/*`` (per step) and ``val/*`` (per validation run): ``loss``, ``mse``, ``cosine``,
    ``explained_variance`` and, on validation, ``pca_explained_variance``: PCA at the same ``d`` fitted on the
    same batch (an in-sample upper bound for any linear reducer). Per-batch values are averaged over batches.

    Args:
        adapter: The frozen VLM, e.g. ``{class_path: vugen_adapters.llava.LlavaAdapter, init_args: {pretrained:
            ...}}``. Its weights never train and are not written to checkpoints.
        reducer: The reducer to train, e.g. ``{class_path: vugen.nn.DimensionReducer, init_args: {feature_dim:
            1152, latent_dim: 32}}``: its ``feature_dim`` must be the adapter's (the error says which), its
            ``latent_dim`` is ``d < D``, the rest its architecture and loss (see :class:`~vugen.nn.DimensionReducer`).
        pca_init: Before the first optimisation step, initialise the reducer as the PCA reducer of the features
            of the first training batch (rank 0's batch, broadcast to every rank under DDP). Deterministic for a
            given seed and data order; skipped when the module already holds a fitted or trained reducer (a
            resumed run, a reloaded checkpoint). Needs more than ``latent_dim`` tokens in that batch.
        optimizer: Builds the optimizer from the reducer's parameters (only the reducer trains), e.g.
            ``{class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3}}``.
        lr_scheduler: Optional scheduler built on that optimizer, stepped after every optimizer step
            (``ReduceLROnPlateau`` monitors ``train/loss``).
        export_dir: If set, the trained reducer is written there with ``save_pretrained`` at the end of a ``fit``
            that ran at least one optimizer step (what the later stages load with
            ``DimensionReducer.from_pretrained``), with a ``training.json`` record of what trained it.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        reducer: DimensionReducer,
        pca_init: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(adapter, optimizer, lr_scheduler)
        self.record_hyperparameters(adapter=adapter, reducer=reducer, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.reducer = check_reads_adapter(reducer, adapter, "ReducerStage reducer")
        self.enable_pca_init(pca_init)
        self.export_dir = export_dir

    # ------------------------------------------------------------------ model
    def encode_features(self, images: Tensor) -> Tensor:
        """Frozen VLM features ``[B, N, D]`` of ``images`` (``[B, 3, H, W]`` in ``[0, 1]``), in the reducer's dtype."""
        return self.vlm_features(images, self.reducer.in_proj.weight.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Latents ``[B, N, d]`` of ``images`` (noisy in training mode, as the reducer adds its noise)."""
        return self.reducer.encode(self.encode_features(images))

    # ------------------------------------------------------------------ training
    def fsdp_units(self) -> list[torch.nn.Module]:
        """The reducer's children (its ``encode``/``decode`` are methods; FSDP2 hooks ``forward``)."""
        return list(self.reducer.children())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Reconstruction loss of one batch; logs ``train/{loss,mse,cosine,explained_variance}``."""
        metrics, features = self._shared_step(batch)
        self.log_metrics("train", metrics, batch_size=len(features))
        return metrics["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/*`` and the PCA baseline ``val/pca_explained_variance`` at the same ``d``."""
        metrics, features = self._shared_step(batch)
        metrics["pca_explained_variance"] = pca_explained_variance(features, self.reducer.latent_dim)
        self.log_metrics("val", metrics, batch_size=len(features))

    def _shared_step(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        features = self.encode_features(batch_images(batch, "ReducerStage"))
        _, reconstruction = self.reducer(features)
        metrics = self.reducer.reconstruction_loss(features, reconstruction)
        metrics["explained_variance"] = explained_variance(features, reconstruction.detach())
        return metrics, features

    def on_fit_end(self) -> None:
        """Export the trained reducer to ``export_dir`` when one is set and this fit trained it (gathered on all
        ranks, written by rank 0); a fit without an optimizer step leaves an earlier export as it was."""
        if self.export_dir is not None:
            self.export_after_fit(self.export_dir, self.export_reducer, "reducer")

    # ------------------------------------------------------------------ export
    def export_reducer(self, directory: str | Path) -> Path | None:
        """Write the reducer with ``save_pretrained`` (``config.json`` + ``model.safetensors``) and ``training.json``
        (what trained it, see :mod:`vugen.stages.training_record`).

        Under FSDP2 call it on every rank (it gathers the shards); only global rank 0 writes.

        Args:
            directory: Output folder, written atomically (replaced whole, or left as it was on error); reload with
                ``DimensionReducer.from_pretrained(directory)``.

        Returns:
            The folder on the rank that wrote it, else None.

        Raises:
            NonFiniteError: The reducer holds NaN or Inf; nothing is written.
        """
        return self.export_modules(
            directory, "the reducer", {"reducer": self.reducer}, lambda folder, reducer: reducer.save_pretrained(folder)
        )
