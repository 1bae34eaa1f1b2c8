"""Text to image with a trained latent sampler: :class:`VugenPipeline` and the sampling helpers it shares with the
commands and the benchmark exporters.

The bundle it saves and loads is :mod:`vugen.bundle` (format, checks); the ``vugen generate`` / ``vugen export``
commands are :mod:`vugen.commands`. Both modules' public names remain importable from here.

Seeds: image ``k`` of prompt ``i`` uses seed ``seed + i * n + k`` (``n`` images per prompt) everywhere (the pipeline
call, ``vugen generate``, the benchmark exporters), so an image does not depend on batching or on the rank count.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import to_dtype, to_pil_image

from vugen.bundle import (
    CONFIG_FILE,
    BundleError,
    bundle_config,
    check_weights,
    load_bundle,
    read_config,
    save_bundle,
)
from vugen.diffusion import Method
from vugen.stages.sampler import SamplerStage

__all__ = [
    "CONFIG_FILE",
    "BundleError",
    "VugenPipeline",
    "check_weights",
    "image_seeds",
    "read_config",
    "sampling_overrides",
    "to_pil",
]


class VugenPipeline:
    """Text -> images with a :class:`~vugen.stages.sampler.SamplerStage` (kept in eval mode).

    Generation is the stage's own (:meth:`SamplerStage.generate`): prompt tokens through the VLM's language model
    with LoRA, flow matching in the reducer's latent space, then the pixel decoder.

    Args:
        stage: A trained latent-sampler stage; it is switched to eval mode.
    """

    def __init__(self, stage: SamplerStage) -> None:
        if not isinstance(stage, SamplerStage):
            raise TypeError(f"VugenPipeline needs a SamplerStage, got {type(stage).__name__}")
        self.stage = stage.eval()

    @classmethod
    def from_stage(cls, stage: SamplerStage) -> VugenPipeline:
        """The pipeline of a trained stage (shares its modules; the stage is switched to eval mode)."""
        return cls(stage)

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.stage.image_size

    @property
    def sampling(self) -> dict[str, Any]:
        """The latent sampler's default settings: ``sampler``, ``steps``, ``guidance_scale``, ... ."""
        return dict(self.stage.sampling)

    def to(self, device: str | torch.device) -> VugenPipeline:
        """Move every module to ``device``; returns the pipeline."""
        self.stage.to(device)
        return self

    # ------------------------------------------------------------------ generation
    def __call__(
        self,
        prompts: str | list[str],
        seed: int = 0,
        num_images_per_prompt: int = 1,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: Method | None = None,
    ) -> list[Image.Image]:
        """Generate images, all in one batch.

        Args:
            prompts: A prompt or a list of prompts.
            seed: Image ``k`` of prompt ``i`` uses seed ``seed + i * num_images_per_prompt + k``, i.e. the ``j``-th
                returned image uses ``seed + j``.
            num_images_per_prompt: Images per prompt.
            steps: Flow-matching steps (default: the bundle's).
            guidance_scale: Classifier-free guidance scale (default: the bundle's; 1 = none).
            sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).

        Returns:
            ``len(prompts) * num_images_per_prompt`` RGB images, the images of each prompt next to each other.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = num_images_per_prompt
        seeds = [s for i in range(len(prompts)) for s in image_seeds(seed, i, n)]
        images = self.sample([p for p in prompts for _ in range(n)], seeds, steps, guidance_scale, sampler)
        return to_pil(images)

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: Method | None = None,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``, one per prompt with its own seed (one batch).

        Args:
            prompts: The prompts.
            seeds: One seed per prompt: the image depends only on its prompt, its seed and the settings.
            steps: Flow-matching steps (default: the bundle's).
            guidance_scale: Classifier-free guidance scale (default: the bundle's).
            sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        """
        return self.stage.generate(prompts, seeds, **sampling_overrides(steps, guidance_scale, sampler))

    # ------------------------------------------------------------------ saving
    def config(self) -> dict[str, Any]:
        """The ``vugen.json`` record (without the weight hashes): base VLM and sampler settings."""
        return bundle_config(self.stage)

    def save_pretrained(self, directory: str | Path) -> Path | None:
        """Write the bundle to ``directory`` atomically (an existing bundle there is replaced whole, or kept on error).

        Under FSDP2 call it on every rank (the bridge and LoRA shards are gathered); only global rank 0 writes.

        Args:
            directory: The bundle folder.

        Returns:
            The folder on the rank that wrote it, else None.
        """
        return save_bundle(self.stage, directory)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        adapter_overrides: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> VugenPipeline:
        """Load a bundle written by :meth:`save_pretrained`; the VLM is rebuilt from its recorded ``pretrained`` (a
        relative local folder is found relative to the bundle folder).

        Before any weight is read, every bundle file's sha256 is checked against ``vugen.json``, every weight file's
        tensor names and shapes (its safetensors header) against its config, and the VLM's content fingerprint
        against the recorded one; a mismatch raises :class:`BundleError` naming the file, the tensors, or the
        recorded and found VLM (see :func:`vugen.bundle.load_bundle`).

        Args:
            directory: The bundle folder.
            adapter_overrides: Replace recorded adapter arguments, e.g. ``{"pretrained": "/local/copy",
                "dtype": "bfloat16"}``. A ``pretrained`` named here whose contents differ from the recorded VLM's
                gives a warning, not an error.
            trust_remote_code: Let the VLM checkpoint run its own code. Never taken from the bundle.
        """
        return cls(load_bundle(directory, adapter_overrides, trust_remote_code))


def image_seeds(seed: int, prompt_index: int, n: int) -> list[int]:
    """Seeds of the ``n`` images of prompt ``prompt_index``: ``seed + prompt_index * n + k``."""
    return [seed + prompt_index * n + k for k in range(n)]


def sampling_overrides(
    steps: int | None = None, guidance_scale: float | None = None, sampler: Method | None = None
) -> dict[str, Any]:
    """The sampler settings that are given (not None), as :meth:`SamplerStage.generate` overrides."""
    given = {"steps": steps, "guidance_scale": guidance_scale, "sampler": sampler}
    return {key: value for key, value in given.items() if value is not None}


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> RGB images (torchvision's float -> uint8 scaling)."""
    return [to_pil_image(to_dtype(image.detach().cpu(), torch.uint8, scale=True)) for image in images]
