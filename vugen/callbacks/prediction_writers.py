"""Prediction writers: ``Trainer.predict`` images written in the layouts the GenEval and DPG-Bench scorers read, or as a
plain folder of PNGs, with a sidecar recording how they were made.

Each writer is a Lightning ``BasePredictionWriter`` (``write_interval="batch"``): every process writes the images of
its own prompts as their batch ends. The module's ``predict_step`` returns, per batch, the images of each prompt
``[P, n, 3, H, W]`` in ``[0, 1]`` (:func:`vugen.prediction.predict_images`); the prompts come from a
:class:`~vugen.data.prompts.PromptDataModule`. The module also reports its generation settings through
``generation_record() -> dict`` (:class:`vugen.prediction.PipelinePredictor`, ``SamplerStage``).

Layouts (``OUT`` is ``out_dir``):

- :class:`GenEvalWriter` (``djghosh13/geneval``): ``OUT/<index:05d>/metadata.jsonl`` (the prompt's line of
  ``evaluation_metadata.jsonl`` as it is; ``{"prompt": ...}`` for prompts from elsewhere),
  ``OUT/<index:05d>/samples/<k:04d>.png`` and optionally ``OUT/<index:05d>/grid.png`` (one row).
- :class:`DPGBenchWriter` (``TencentQQGYLab/ELLA``): ``OUT/<id>.png`` for ``dpg_bench/prompts/<id>.txt``, its 4 images
  tiled 2x2 without padding (the scorer crops tiles of ``--resolution`` pixels, ``--pic-num 4``).
- :class:`ImageFolderWriter` (``vugen generate``): ``OUT/<index:05d>-<slug>-<k>.png`` and optionally ``OUT/grid.png``
  (one row per prompt when ``n > 1``, else rows of 8).

Once every process has written its images, global rank 0 writes ``OUT/vugen_sampling.json`` (:data:`SIDECAR_FILE`):
the layout, the prompt set, images per prompt, seed and seed rule, number of prompts, and the module's
``generation_record()``. It is written last (a stale one is removed at the start), so its presence marks a complete
prediction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

from vugen.data.image_io import to_pil
from vugen.data.prompts import PromptDataModule

__all__ = ["DPG_IMAGES", "SIDECAR_FILE", "DPGBenchWriter", "GenEvalWriter", "ImageFolderWriter", "slug"]

SIDECAR_FILE = "vugen_sampling.json"
DPG_IMAGES = 4  # the DPG-Bench scorer's --pic-num, tiled 2x2


class _ImageWriter(BasePredictionWriter):
    """Writes each prompt's images as its batch ends, then the sidecar on global rank 0 (see the module docstring)."""

    benchmark: str | None = None

    def __init__(self, out_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the datamodule and the module before anything runs; create ``out_dir``."""
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        name = type(self).__name__
        if not isinstance(trainer.datamodule, PromptDataModule):
            raise TypeError(
                f"{name} writes the prompts of a vugen.data.prompts.PromptDataModule: predict with one as the "
                f"datamodule, got {type(trainer.datamodule).__name__}"
            )
        if not callable(getattr(pl_module, "generation_record", None)):
            raise TypeError(
                f"{name} needs {type(pl_module).__name__}.generation_record() -> dict (the settings recorded in "
                f"{SIDECAR_FILE}); the module has no such method"
            )
        self.prepare(trainer.datamodule)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def prepare(self, data: PromptDataModule) -> None:
        """Raise if this layout cannot hold ``data``'s prompts; note what writing them needs."""

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the sidecar of an earlier prediction: the new one marks this prediction complete."""
        if trainer.is_global_zero:
            (self.out_dir / SIDECAR_FILE).unlink(missing_ok=True)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Tensor,
        batch_indices: Sequence[int] | None,
        batch: dict[str, list[Any]],
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write the images of every prompt of the batch."""
        count = len(batch["indices"])
        if not isinstance(prediction, Tensor) or prediction.ndim != 5 or len(prediction) != count:
            shape = tuple(prediction.shape) if isinstance(prediction, Tensor) else type(prediction).__name__
            raise ValueError(
                f"{type(self).__name__}: predict_step must return the images of each prompt, [{count}, n, 3, H, W] "
                f"in [0, 1], got {shape}"
            )
        for index, prompt, record, images in zip(
            batch["indices"], batch["prompts"], batch["records"], prediction, strict=True
        ):
            self.write_prompt(index, prompt, record, images)

    def write_prompt(self, index: int, prompt: str, record: str | None, images: Tensor) -> None:
        """Write the images ``[n, 3, H, W]`` of prompt ``index``."""
        raise NotImplementedError

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After every process wrote its images: global rank 0 finishes the layout and writes the sidecar."""
        trainer.strategy.barrier("vugen-prediction-writer")
        if not trainer.is_global_zero:
            return
        data: PromptDataModule = trainer.datamodule
        self.finish(data)
        sidecar = {"benchmark": self.benchmark, **self.settings(), **data.sampling_record()}
        sidecar |= pl_module.generation_record()
        (self.out_dir / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")

    def finish(self, data: PromptDataModule) -> None:
        """Write what needs every prompt's images (global rank 0, after all processes wrote theirs)."""

    def settings(self) -> dict[str, Any]:
        """The writer's own settings, for the sidecar."""
        return {}


class GenEvalWriter(_ImageWriter):
    """GenEval's layout: ``OUT/<index:05d>/metadata.jsonl``, ``samples/<k:04d>.png`` and ``grid.png``.

    ``metadata.jsonl`` holds the prompt's line of a ``.jsonl`` prompt set as it is (GenEval's
    ``evaluation_metadata.jsonl``: the scorer reads its tag and objects), or ``{"prompt": ...}`` for prompts from a
    list, text file or folder (enough for ShapeEval, not for GenEval's scorer).

    Args:
        out_dir: Output folder (created).
        grid: Also write each prompt's ``grid.png`` (its images in one row, 2-pixel padding).
    """

    benchmark = "geneval"

    def __init__(self, out_dir: str, grid: bool = True) -> None:
        super().__init__(out_dir)
        self.grid = grid
        self._keeps_lines = False

    def prepare(self, data: PromptDataModule) -> None:
        """Keep the JSONL lines of a ``.jsonl`` prompt set."""
        self._keeps_lines = data.prompt_set.format == "jsonl"

    def write_prompt(self, index: int, prompt: str, record: str | None, images: Tensor) -> None:
        """``<index:05d>/metadata.jsonl``, ``samples/<k:04d>.png`` and ``grid.png``."""
        folder = self.out_dir / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        line = record if self._keeps_lines else json.dumps({"prompt": prompt})
        (folder / "metadata.jsonl").write_text(line + "\n")
        for k, image in enumerate(to_pil(images)):
            image.save(folder / "samples" / f"{k:04d}.png")
        if self.grid:
            to_pil(make_grid(images, nrow=len(images))[None])[0].save(folder / "grid.png")

    def settings(self) -> dict[str, Any]:
        return {"grid": self.grid}


class DPGBenchWriter(_ImageWriter):
    """DPG-Bench's layout: ``OUT/<id>.png``, the prompt's 4 images tiled 2x2 without padding.

    The prompts must be DPG-Bench's ``dpg_bench/prompts`` folder (``<id>.txt`` files) with 4 images per prompt; score
    with the scorer's ``--resolution`` set to the image size recorded in the sidecar.

    Args:
        out_dir: Output folder (created).
    """

    benchmark = "dpg_bench"

    def prepare(self, data: PromptDataModule) -> None:
        """Require a folder of ``<id>.txt`` prompts, 4 images each."""
        if data.prompt_set.format != "dpg_folder":
            raise ValueError(
                "DPGBenchWriter names each image after its prompt file: the prompts must be a folder of <id>.txt "
                f"files (DPG-Bench's dpg_bench/prompts), got a {data.prompt_set.format} prompt set"
            )
        if data.images_per_prompt != DPG_IMAGES:
            raise ValueError(
                f"DPGBenchWriter tiles {DPG_IMAGES} images per prompt 2x2 (the scorer's --pic-num 4): set "
                f"images_per_prompt: {DPG_IMAGES}, got {data.images_per_prompt}"
            )

    def write_prompt(self, index: int, prompt: str, record: str | None, images: Tensor) -> None:
        """``<id>.png``: the 4 images, 2x2, no padding."""
        to_pil(make_grid(images, nrow=2, padding=0)[None])[0].save(self.out_dir / f"{record}.png")

    def settings(self) -> dict[str, Any]:
        return {"grid": "2x2"}


class ImageFolderWriter(_ImageWriter):
    """``vugen generate``'s layout: ``OUT/<index:05d>-<slug>-<k>.png`` and ``OUT/grid.png``.

    Args:
        out_dir: Output folder (created).
        grid: Also write ``grid.png`` of every image (one row per prompt when ``n > 1``, else rows of 8; 2-pixel
            padding), read back from the PNGs once every process has written its own.
    """

    def __init__(self, out_dir: str, grid: bool = True) -> None:
        super().__init__(out_dir)
        self.grid = grid

    def image_path(self, index: int, prompt: str, k: int) -> Path:
        """The file of image ``k`` of prompt ``index``."""
        return self.out_dir / f"{index:05d}-{slug(prompt)}-{k}.png"

    def image_paths(self, data: PromptDataModule) -> list[Path]:
        """The file of every image of ``data``'s prompts, in order."""
        n = data.images_per_prompt
        return [self.image_path(index, prompt, k) for index, prompt in enumerate(data.prompts) for k in range(n)]

    def write_prompt(self, index: int, prompt: str, record: str | None, images: Tensor) -> None:
        """``<index:05d>-<slug>-<k>.png`` per image."""
        for k, image in enumerate(to_pil(images)):
            image.save(self.image_path(index, prompt, k))

    def finish(self, data: PromptDataModule) -> None:
        """``grid.png`` of every image, from the PNGs (8-bit already: the tiles are the files' pixels exactly)."""
        if not self.grid:
            return
        images = []
        for path in self.image_paths(data):
            with Image.open(path) as image:
                images.append(pil_to_tensor(image.convert("RGB")))
        n = data.images_per_prompt
        to_pil_image(make_grid(torch.stack(images), nrow=n if n > 1 else 8)).save(self.out_dir / "grid.png")

    def settings(self) -> dict[str, Any]:
        return {"grid": self.grid}


def slug(prompt: str, limit: int = 48) -> str:
    """A file-name-safe short form of ``prompt``: lower-case words joined by ``-``, at most ``limit`` characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "prompt"
