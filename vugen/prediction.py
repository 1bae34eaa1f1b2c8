"""Text-to-image prediction with Lightning: the predict step shared by everything that generates images
(:func:`predict_images`) and :class:`PipelinePredictor`, a LightningModule over a saved bundle.

``Trainer.predict`` with a :class:`~vugen.data.prompts.PromptDataModule` and a writer of
:mod:`vugen.callbacks.prediction_writers` generates a prompt set across processes: each prompt's ``n`` images are one
``sample`` call with the prompt's own seeds, so every image is the same whatever the batch size or the number of
processes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from vugen.bundle import CONFIG_FILE, sha256_of
from vugen.bundle_hub import bundle_folder
from vugen.data.prompts import PromptBatch
from vugen.diffusion import Method
from vugen.hub import local_folder_or_hub_id
from vugen.pipeline import VugenPipeline

__all__ = ["ImageSampler", "PipelinePredictor", "predict_images"]


class ImageSampler(Protocol):
    """Anything that generates one image per (prompt, seed) pair."""

    def sample(self, prompts: list[str], seeds: list[int]) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``, image ``j`` from ``prompts[j]`` and ``seeds[j]``."""
        ...


def predict_images(sampler: ImageSampler, batch: PromptBatch) -> Tensor:
    """The images of every prompt of ``batch``: ``[P, n, 3, H, W]`` in ``[0, 1]``, on the CPU.

    One ``sampler.sample`` call per prompt with its ``n`` seeds (the benchmark exporters' batches), so an image never
    depends on which prompts share its batch or process.
    """
    images = [
        sampler.sample([prompt] * len(seeds), list(seeds)).cpu()
        for prompt, seeds in zip(batch["prompts"], batch["seeds"], strict=True)
    ]
    return torch.stack(images)


class PipelinePredictor(LightningModule):
    """Predicts images of prompts with a saved bundle (``VugenPipeline.from_pretrained``), for ``Trainer.predict``.

    ``vugen predict --model vugen.prediction.PipelinePredictor --model.bundle DIR --data PromptDataModule ...`` or
    the ``vugen export-geneval`` / ``export-dpg`` / ``generate`` commands. The pipeline follows the module to the
    trainer's device.

    Args:
        bundle: A bundle folder (``vugen export``, ``VugenPipeline.save_pretrained``) or a Hub repo id
            (``org/name``: downloaded into the local Hugging Face cache once, see :mod:`vugen.bundle_hub`).
        steps: Flow-matching steps (default: the bundle's).
        guidance_scale: Classifier-free guidance scale (default: the bundle's; 1 = none).
        solver: The ODE / SDE solver, ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        trust_remote_code: Let the VLM checkpoint run its own modelling code. Never taken from the bundle.
        revision: For a Hub repo id: a branch, tag or commit sha.
    """

    def __init__(
        self,
        bundle: str,
        steps: int | None = None,
        guidance_scale: float | None = None,
        solver: Method | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        hub = local_folder_or_hub_id(bundle, "bundle") is None
        self.folder = bundle_folder(bundle, revision)  # a Hub id's snapshot in the local cache
        # recorded: a Hub id as given with the commit it resolved to (the snapshot's name), a folder's absolute path
        self.bundle = str(bundle) if hub else str(self.folder.resolve())
        self.bundle_revision = self.folder.name if hub else None
        self.bundle_sha256 = sha256_of(self.folder / CONFIG_FILE)  # before loading: loading checks files against it
        self.pipeline = VugenPipeline.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        given = {"steps": steps, "guidance_scale": guidance_scale, "solver": solver}
        self.overrides = {key: value for key, value in given.items() if value is not None}
        self.sampling = self.pipeline.sampling.with_overrides(**self.overrides)  # a bad setting fails here, at once

    def on_predict_start(self) -> None:
        """Move the pipeline to the device the trainer put this module on."""
        self.pipeline.to(self.device)

    def sample(self, prompts: list[str], seeds: list[int]) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` with the pipeline and this module's settings."""
        return self.pipeline.sample(prompts, seeds, **self.overrides)

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        """The images of each prompt of ``batch``, ``[P, n, 3, H, W]`` on the CPU (:func:`predict_images`)."""
        return predict_images(self, batch)

    def generation_record(self) -> dict[str, Any]:
        """What the prediction writers record: the bundle (path, sha256 of its ``vugen.json``), image size, and the
        sampling settings used (the bundle's, with this module's overrides)."""
        return {
            "bundle": self.bundle,
            **({"bundle_revision": self.bundle_revision} if self.bundle_revision else {}),
            "bundle_vugen_json_sha256": self.bundle_sha256,
            "image_size": self.pipeline.image_size,
            "sampling": self.sampling.to_dict(),
            "decoder_sampling": self.pipeline.decoder_sampling.to_dict(),
        }
