"""TensorBoard grids of inputs and reconstructions of a fixed batch with a fixed seed, comparable across runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from vugen.data.batches import batch_images
from vugen.errors import check_positive

__all__ = ["ReconstructionGrid", "reconstruction_grid"]


def reconstruction_grid(images: Tensor, reconstructions: Tensor, padding: int = 2) -> Tensor:
    """Three rows: ``images``, ``reconstructions`` and their absolute difference.

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        reconstructions: Same shape; clamped to ``[0, 1]``.
        padding: Pixels between and around the tiles (``torchvision.utils.make_grid``).

    Returns:
        ``[3, 3 * H + 4 * padding, B * W + (B + 1) * padding]`` in ``[0, 1]``.
    """
    if reconstructions.shape != images.shape:
        raise ValueError(
            f"reconstructions must have the images' shape {tuple(images.shape)}, got {tuple(reconstructions.shape)}"
        )
    reconstructions = reconstructions.clamp(0, 1)
    rows = torch.cat([images, reconstructions, (images - reconstructions).abs()])
    return make_grid(rows.float(), nrow=len(images), padding=padding)


class ReconstructionGrid(Callback):
    """Log ``inputs / reconstructions / |difference|`` grids of a fixed batch to every TensorBoard logger.

    The LightningModule must have ``reconstruct(images: Tensor, generator: torch.Generator) -> Tensor`` (images and
    result float ``[B, 3, H, W]`` in ``[0, 1]``). It is called under ``no_grad`` in eval mode (each submodule's mode
    restored after) with a generator seeded with ``seed``, so grids compare across steps and runs. The images are
    the first ``num_images`` samples of the ``split`` dataloader's dataset, read once in order (independent of
    shuffling and of the trainer's own iteration), batches being dicts with ``"images"`` or image tensors.

    Logged at the end of every ``every_n_validations``-th validation (not the sanity check) under ``tag``, and at
    the end of testing under ``f"{tag}/test"`` on the first test images, at ``trainer.global_step``. Every rank
    computes the reconstructions (a sharded model's forward is collective); global rank 0 logs.

    Args:
        num_images: Images per row.
        every_n_validations: Log every n-th validation run.
        seed: Seed of the generator handed to ``reconstruct``.
        tag: TensorBoard tag.
        split: Dataloader the fixed validation-time images come from: ``"val"`` or ``"train"``.
    """

    def __init__(
        self,
        num_images: int = 8,
        every_n_validations: int = 1,
        seed: int = 0,
        tag: str = "reconstructions",
        split: Literal["val", "train"] = "val",
    ) -> None:
        check_positive("ReconstructionGrid num_images", num_images)
        check_positive("ReconstructionGrid every_n_validations", every_n_validations)
        if split not in ("val", "train"):
            raise ValueError(f"ReconstructionGrid split must be 'val' or 'train', got {split!r}")
        self.num_images, self.every_n_validations = num_images, every_n_validations
        self.seed, self.tag, self.split = seed, tag, split
        self._images: dict[str, Tensor] = {}  # fixed images per split, on CPU
        self._validations = 0
        self._said_no_logger = False

    @property
    def state_key(self) -> str:
        """Tells grids with different tags apart in a checkpoint."""
        return self._generate_state_key(tag=self.tag)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check that the module implements ``reconstruct``."""
        if not callable(getattr(pl_module, "reconstruct", None)):
            raise TypeError(
                f"ReconstructionGrid needs {type(pl_module).__name__}.reconstruct(images: Tensor, generator: "
                "torch.Generator) -> Tensor (images [B, 3, H, W] in [0, 1]); the module has no such method"
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the grid of every ``every_n_validations``-th validation run."""
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            loader = trainer.val_dataloaders if self.split == "val" else trainer.train_dataloader
            self._log(trainer, pl_module, self.tag, self.split, loader)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the grid of the first test images under ``f"{tag}/test"``."""
        self._log(trainer, pl_module, f"{self.tag}/test", "test", trainer.test_dataloaders)

    def state_dict(self) -> dict[str, Any]:
        """The count of validation runs, so ``every_n_validations`` keeps its phase on resume."""
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the count of validation runs."""
        self._validations = int(state_dict["validations"])

    def grid(self, pl_module: LightningModule, images: Tensor) -> Tensor:
        """The grid (see ``reconstruction_grid``) of ``pl_module.reconstruct`` on ``images``, on CPU.

        Runs under ``no_grad`` with the module in eval mode, restoring every submodule's mode after.
        """
        images = images.to(pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                reconstructions = pl_module.reconstruct(images, generator)
        finally:
            for module, training in modes.items():
                module.training = training
        return reconstruction_grid(images, reconstructions).cpu()

    def _log(self, trainer: Trainer, pl_module: LightningModule, tag: str, split: str, loader: Any) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            if not self._said_no_logger:
                rank_zero_info("ReconstructionGrid: the trainer has no TensorBoardLogger, no grids are logged")
                self._said_no_logger = True
            return
        if split not in self._images:
            if loader is None:
                rank_zero_info(f"ReconstructionGrid: no {split} dataloader in this run, no grid logged")
                return
            self._images[split] = self._first_images(loader)
        grid = self.grid(pl_module, self._images[split])
        if trainer.is_global_zero:
            for logger in loggers:
                logger.experiment.add_image(tag, grid, trainer.global_step)

    def _first_images(self, loader: Iterable[Any]) -> Tensor:
        """The first ``num_images`` images of ``loader`` (of the first one, given several), on CPU."""
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if isinstance(loader, DataLoader):
            # A fresh in-order loader over the same data: no shuffling, no workers, no RNG draws, and the trainer's
            # own (possibly persistent or stateful) iterator is left alone.
            loader = DataLoader(loader.dataset, batch_size=self.num_images, collate_fn=loader.collate_fn)
        batch = next(iter(loader))
        images = batch if isinstance(batch, Tensor) and batch.ndim == 4 else batch_images(batch, "ReconstructionGrid")
        return images[: self.num_images].detach().cpu()
