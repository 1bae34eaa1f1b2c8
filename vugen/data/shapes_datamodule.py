"""LightningDataModule over the built-in procedural Shapes dataset (no files, no downloads)."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from vugen.data.resumable import ResumableDataLoader
from vugen.data.shapes import ShapesDataset, check_image_size
from vugen.errors import check_positive


class ShapesDataModule(LightningDataModule):
    """Captioned Shapes images for every stage, rendered on the fly and deterministic from ``seed``.

    ``fit`` uses the ``train`` and ``val`` splits, ``test`` the ``test`` split (or ``heldout``, see ``test_split``)
    and ``predict`` the ``heldout`` split (compositions never seen in training). Batches are
    ``{"images": float32 [B, 3, H, W] in [0, 1], "captions": list[str]}``.
    """

    def __init__(
        self,
        image_size: int = 32,
        train_size: int = 4096,
        val_size: int = 256,
        test_size: int = 256,
        heldout_size: int = 256,
        two_object_ratio: float = 0.3,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        test_split: Literal["test", "heldout"] = "test",
    ) -> None:
        """Configure the Shapes splits and loaders.

        Args:
            image_size: Image side in pixels; >= 16 and a multiple of 8.
            train_size: Number of training images per epoch.
            val_size: Number of validation images.
            test_size: Number of test images.
            heldout_size: Number of held-out-composition images, served by ``predict_dataloader``.
            two_object_ratio: Fraction of images with two objects and a spatial relation, in [0, 1].
            batch_size: Images per batch; at most ``train_size`` (the training loader drops the last
                incomplete batch).
            num_workers: DataLoader worker processes (0 renders in the main process).
            seed: Base seed of the rendering and of the training shuffle order.
            test_split: What ``test`` evaluates: the ``test`` split (compositions seen in training, other
                images) or the ``heldout`` split (compositions never seen in training).
        """
        super().__init__()
        check_image_size(image_size)
        for name, value in (
            ("train_size", train_size),
            ("val_size", val_size),
            ("test_size", test_size),
            ("heldout_size", heldout_size),
            ("batch_size", batch_size),
        ):
            check_positive(name, value)
        if batch_size > train_size:
            raise ValueError(f"batch_size ({batch_size}) must not exceed train_size ({train_size})")
        if not 0.0 <= two_object_ratio <= 1.0:
            raise ValueError(f"two_object_ratio must be in [0, 1], got {two_object_ratio!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if test_split not in ("test", "heldout"):
            raise ValueError(f"test_split must be 'test' or 'heldout', got {test_split!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.save_hyperparameters()
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.test_split = test_split
        self._sizes = {"train": train_size, "val": val_size, "test": test_size, "heldout": heldout_size}
        self._two_object_ratio = two_object_ratio

    def dataset(self, split: str) -> ShapesDataset:
        """The dataset of ``split`` (one of ``train``, ``val``, ``test``, ``heldout``); cheap to build."""
        if split not in self._sizes:
            raise ValueError(f"split must be one of {tuple(self._sizes)}, got {split!r}")
        return ShapesDataset(split, self._sizes[split], self.image_size, self._two_object_ratio, self.seed)

    def _loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), **self._loader_options())

    def train_dataloader(self) -> ResumableDataLoader:
        """Training batches shuffled in an order fixed by ``seed`` and the epoch, resumable mid-epoch; the last
        incomplete batch is dropped."""
        return ResumableDataLoader(
            self.dataset("train"), shuffle=True, seed=self.seed, drop_last=True, **self._loader_options()
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches of ``test_split`` in a fixed order."""
        return self._loader(self.test_split)

    def predict_dataloader(self) -> DataLoader:
        """Held-out-composition batches (the ``heldout`` split) in a fixed order."""
        return self._loader("heldout")
