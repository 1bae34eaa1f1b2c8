"""Stage 1: train the dimension reducer on the frozen VLM's own vision features.

The adapter encodes each batch of images into features ``[B, N, D]`` under ``no_grad``; the reducer maps them to
latents ``[B, N, d]`` and reconstructs them, trained on ``mse + cosine_weight * (1 - cos)``. Validation also
reports the explained variance of PCA at the same ``d`` on the same batch: the best *linear* reducer, the
baseline the learned one has to beat.

Checkpoints hold the reducer only (plus the PCA-done flag): the VLM is rebuilt from the adapter's configuration
recorded in the hyperparameters, so ``ReducerStage.load_from_checkpoint(path)`` works without the VLM's weights
in the file.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from vugen.nn.reducer import DimensionReducer, explained_variance, pca_explained_variance
from vugen_adapters.base import VLMAdapter

__all__ = ["ReducerStage"]

# What `load_from_checkpoint` uses to rebuild the module (and its adapter) from the recorded configuration;
# one of Lightning's allow-listed instantiators.
_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
_ADAPTER_PREFIX = "adapter."


class ReducerStage(LightningModule):
    """Stage 1: learn a reducer from a frozen VLM's vision features ``D`` to compact latents ``d``.

    Logs ``train/*`` (per step) and ``val/*`` (per validation run): ``loss``, ``mse``, ``cosine``,
    ``explained_variance`` and, on validation, ``pca_explained_variance``: PCA at the same ``d`` fitted on the
    same batch (an in-sample upper bound for any linear reducer). Per-batch values are averaged over batches.

    Args:
        adapter: The frozen VLM, e.g. ``{class_path: vugen_adapters.llava.LlavaAdapter, init_args: {pretrained:
            ...}}``. Its weights never train and are not written to checkpoints.
        latent_dim: ``d``, channels per latent token (``d < D``, the adapter's ``feature_dim``).
        hidden_dim: Width of the reducer's residual-MLP branches.
        num_blocks: Residual MLP blocks in the encoder and in the decoder branch.
        mlp_ratio: MLP expansion inside each residual block.
        noise_gamma: Training-time latent noise ``z + alpha * eps``, ``alpha ~ U[0, noise_gamma]``; 0 disables.
        normalize_latents: Per-token channel normalisation of the latents (LayerNorm without affine).
        cosine_weight: Weight of the ``1 - cos`` term of the reconstruction loss.
        pca_init: Before the first optimisation step, initialise the reducer as the PCA reducer of the features
            of the first training batch (rank 0's batch, broadcast to every rank under DDP). Deterministic for a
            given seed and data order; skipped when the module already holds a fitted or trained reducer (a
            resumed run, a reloaded checkpoint). Needs more than ``latent_dim`` tokens in that batch.
        optimizer: Builds the optimizer from the reducer's parameters (only the reducer trains), e.g.
            ``{class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3}}``.
        lr_scheduler: Optional scheduler built on that optimizer, stepped after every optimizer step
            (``ReduceLROnPlateau`` monitors ``train/loss``).
        export_dir: If set, the trained reducer is written there with ``save_pretrained`` at the end of ``fit``
            (what the later stages load with ``DimensionReducer.from_pretrained``).
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        latent_dim: int = 32,
        hidden_dim: int = 1024,
        num_blocks: int = 2,
        mlp_ratio: float = 2.0,
        noise_gamma: float = 0.1,
        normalize_latents: bool = True,
        cosine_weight: float = 1.0,
        pca_init: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(adapter, VLMAdapter):
            raise TypeError(
                f"adapter must be a VLMAdapter instance, got {type(adapter).__name__}. A checkpoint whose adapter "
                "cannot be rebuilt from its recorded configuration loads with load_from_checkpoint(path, adapter=...)"
            )
        self._record_hyperparameters(adapter, optimizer, lr_scheduler)
        self.adapter = adapter.requires_grad_(False)  # frozen whatever the adapter did
        self.reducer = DimensionReducer(
            feature_dim=adapter.feature_dim,
            latent_dim=latent_dim,
            hidden_dim=hidden_dim,
            num_blocks=num_blocks,
            mlp_ratio=mlp_ratio,
            noise_gamma=noise_gamma,
            normalize_latents=normalize_latents,
            cosine_weight=cosine_weight,
        )
        self.pca_init = pca_init
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.export_dir = export_dir
        # A checkpointed flag, so a resumed run or a reloaded reducer is never overwritten by a fresh PCA.
        self.register_buffer("pca_fitted", torch.tensor(False))

    def _record_hyperparameters(self, adapter: VLMAdapter, optimizer: Any, lr_scheduler: Any) -> None:
        """Save hyperparameters that rebuild this module, never the VLM itself.

        Under LightningCLI they are the parsed config (adapter and optimizer as ``class_path`` dicts). Built in
        Python, the adapter would be recorded (and deep-copied) as a module: it is replaced by its ``describe()``
        record, and the callables by their class path when they are a class or a ``functools.partial`` of one
        (any other callable is not recorded: ``load_from_checkpoint`` then uses the default).
        """
        self.save_hyperparameters(ignore=["adapter", "optimizer", "lr_scheduler"])
        if "_instantiator" in self.hparams:  # built by LightningCLI: the config records every argument
            self.save_hyperparameters()
            return
        records = {"adapter": _adapter_config(adapter), "_instantiator": _INSTANTIATOR}
        for name, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            config = _callable_config(value)
            if config is not None or value is None:
                records[name] = config
        self.save_hyperparameters(records)

    # ------------------------------------------------------------------ model
    def encode_features(self, images: Tensor) -> Tensor:
        """Frozen VLM features ``[B, N, D]`` of ``images`` (``[B, 3, H, W]`` in ``[0, 1]``), in the reducer's dtype."""
        with torch.no_grad():
            features = self.adapter.encode_images(images)
        return features.to(self.reducer.in_proj.weight.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Latents ``[B, N, d]`` of ``images`` (noisy in training mode, as the reducer adds its noise)."""
        return self.reducer.encode(self.encode_features(images))

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Fit the PCA initialisation on the first training batch (see ``pca_init``)."""
        if not self.pca_init or bool(self.pca_fitted):
            return
        self.reducer.init_from_pca(self.encode_features(_images(batch)))
        self._broadcast_reducer()
        self.pca_fitted.fill_(True)

    def _broadcast_reducer(self) -> None:
        """Give every rank rank 0's reducer: each fitted PCA on its own batch."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            for tensor in self.reducer.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Reconstruction loss of one batch; logs ``train/{loss,mse,cosine,explained_variance}``."""
        metrics, _ = self._shared_step(batch)
        self._log_metrics("train", metrics, batch_size=len(_images(batch)))
        return metrics["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/*`` and the PCA baseline ``val/pca_explained_variance`` at the same ``d``."""
        metrics, features = self._shared_step(batch)
        metrics["pca_explained_variance"] = pca_explained_variance(features, self.reducer.latent_dim)
        self._log_metrics("val", metrics, batch_size=len(features))

    def _shared_step(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        features = self.encode_features(_images(batch))
        _, reconstruction = self.reducer(features)
        metrics = self.reducer.reconstruction_loss(features, reconstruction)
        metrics["explained_variance"] = explained_variance(features, reconstruction.detach())
        return metrics, features

    def _log_metrics(self, split: str, metrics: dict[str, Tensor], batch_size: int) -> None:
        on_step = split == "train"
        for name, value in metrics.items():
            self.log(
                f"{split}/{name}",
                value.detach(),
                prog_bar=name == "loss",
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
            )

    def configure_optimizers(self) -> Any:
        """The configured optimizer over the reducer's parameters, and the scheduler if any."""
        optimizer = self.optimizer(self.reducer.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.lr_scheduler(optimizer), "interval": "step", "monitor": "train/loss"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_fit_end(self) -> None:
        """Export the trained reducer to ``export_dir`` when one is set (rank 0 only)."""
        if self.export_dir is not None and self.trainer.is_global_zero:
            rank_zero_info(f"reducer exported to {self.export_reducer(self.export_dir)}")

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen VLM's weights: the checkpoint keeps the reducer and the PCA flag."""
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(_ADAPTER_PREFIX)
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load everything but the adapter, whose weights come from ``pretrained`` and are never checkpointed.

        ``strict`` holds for the rest: a missing reducer tensor or an unknown key is an error.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not key.startswith(_ADAPTER_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__} (a different reducer shape, or another stage's "
                f"checkpoint?): missing {missing}, unexpected {result.unexpected_keys}"
            )
        return result._replace(missing_keys=missing)

    def export_reducer(self, directory: str | Path) -> Path:
        """Write the reducer with ``save_pretrained`` (``config.json`` + ``model.safetensors``).

        Args:
            directory: Output folder (created); reload with ``DimensionReducer.from_pretrained(directory)``.

        Returns:
            The folder.
        """
        directory = Path(directory)
        self.reducer.save_pretrained(directory)
        return directory


def _images(batch: dict[str, Any]) -> Tensor:
    images = batch.get("images") if isinstance(batch, dict) else None
    if not isinstance(images, Tensor) or images.ndim != 4:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"ReducerStage expects batches as dicts with 'images': float [B, 3, H, W] in [0, 1] "
            f"(e.g. ShapesDataModule), got {found}"
        )
    return images


def _adapter_config(adapter: VLMAdapter) -> dict[str, Any]:
    """The adapter as ``{class_path, init_args}`` from its ``describe()`` record (arguments its class accepts)."""
    record = adapter.describe()
    accepted = inspect.signature(type(adapter)).parameters
    return {"class_path": record["class_path"], "init_args": {k: v for k, v in record.items() if k in accepted}}


def _callable_config(value: Any) -> dict[str, Any] | None:
    """A class or a ``functools.partial`` of one as ``{class_path, init_args}``; None for anything else."""
    keywords: dict[str, Any] = {}
    if isinstance(value, functools.partial) and not value.args:
        value, keywords = value.func, dict(value.keywords)
    if not inspect.isclass(value):
        return None
    return {"class_path": f"{value.__module__}.{value.__qualname__}", "init_args": keywords}
