"""Text to image (and image to text): :class:`VugenPipeline`, the components of a trained vugen model and how they
generate.

Diffusers-style: the pipeline holds components, the VLM adapter (inside the latent sampler), the
:class:`~vugen.generation.LatentSampler`, the frozen reducer and pixel decoder, and two
:class:`~vugen.generation.SamplingConfig` (the latent sampler's, the decoder's); generation is plain module calls,
no training code. Its bundle format is :mod:`vugen.bundle`. ``SamplerStage.pipeline()`` builds one over a stage's
modules (shared, not copied); :meth:`VugenPipeline.from_pretrained` loads a bundle, from a folder or the Hugging
Face Hub, and :meth:`VugenPipeline.push_to_hub` shares one there (:mod:`vugen.bundle_hub`).

One model, both directions: :meth:`VugenPipeline.describe` asks the same VLM about images through its own processor,
chat template and ``generate`` (``VLMAdapter.answer``); with ``lora_scope="image_tokens"`` (the default) the LoRA is
inactive there, so the answers are exactly the base VLM's.

Seeds: image ``k`` of prompt ``i`` uses seed ``seed + i * n + k`` (``n`` images per prompt) everywhere (the pipeline
call, ``vugen generate``, ``vugen predict``, the benchmark exports), so an image does not depend on batching or on the
rank count (:func:`vugen.data.prompts.image_seeds`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from vugen.adapter import VLMAdapter
from vugen.bundle import bundle_record, load_bundle, save_bundle
from vugen.bundle_hub import bundle_folder, push_bundle
from vugen.data.image_io import to_pil
from vugen.data.prompts import image_seeds
from vugen.generation import LatentSampler, SamplingConfig, decode_latents
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer

__all__ = ["VugenPipeline"]

Images = Sequence[Image.Image | Tensor] | Tensor
"""Images to describe: PIL images or ``[3, H, W]`` tensors in ``[0, 1]``, or one ``[B, 3, H, W]`` tensor."""


class VugenPipeline:
    """Text -> images: prompt tokens through the VLM's language model with LoRA, flow matching in the reducer's
    latent space, then the pixel decoder; and images -> text with the VLM itself (:meth:`describe`).

    Args:
        latent_sampler: The trained latent sampler (it holds the VLM adapter).
        reducer: The frozen reducer that defines the latent space.
        decoder: The frozen pixel decoder.
        sampling: The latent sampler's default sampling settings (overridable per call).
        decoder_sampling: The pixel decoder's sampling settings.
    """

    def __init__(
        self,
        latent_sampler: LatentSampler,
        reducer: DimensionReducer,
        decoder: PixelDecoder,
        sampling: SamplingConfig,
        decoder_sampling: SamplingConfig,
    ) -> None:
        dims = {latent_sampler.bridge.latent_dim, reducer.latent_dim, decoder.latent_dim}
        if len(dims) != 1:
            raise ValueError(
                f"latent_dim differs: latent sampler {latent_sampler.bridge.latent_dim}, reducer {reducer.latent_dim}, "
                f"decoder {decoder.latent_dim}"
            )
        self.latent_sampler, self.reducer, self.decoder = latent_sampler, reducer, decoder
        self.sampling, self.decoder_sampling = sampling, decoder_sampling

    @property
    def adapter(self) -> VLMAdapter:
        """The VLM (with the latent sampler's LoRA layers, inactive outside generation by default)."""
        return self.latent_sampler.adapter

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.latent_sampler.image_size

    def components(self) -> dict[str, nn.Module]:
        """The modules, by name."""
        return {"latent_sampler": self.latent_sampler, "reducer": self.reducer, "decoder": self.decoder}

    def to(self, device: str | torch.device) -> VugenPipeline:
        """Move every module to ``device``; returns the pipeline."""
        for module in self.components().values():
            module.to(device)
        return self

    # ------------------------------------------------------------------ generation
    def __call__(
        self, prompts: str | list[str], seed: int = 0, num_images_per_prompt: int = 1, **overrides: Any
    ) -> list[Image.Image]:
        """Generate images, all in one batch.

        Args:
            prompts: A prompt or a list of prompts.
            seed: Image ``k`` of prompt ``i`` uses seed ``seed + i * num_images_per_prompt + k``, i.e. the ``j``-th
                returned image uses ``seed + j``.
            num_images_per_prompt: Images per prompt.
            overrides: Sampling settings for this call (``steps``, ``guidance_scale``, ``solver``, ...); None keeps
                the pipeline's.

        Returns:
            ``len(prompts) * num_images_per_prompt`` RGB images, the images of each prompt next to each other.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = num_images_per_prompt
        seeds = [s for i in range(len(prompts)) for s in image_seeds(seed, i, n)]
        return to_pil(self.sample([p for p in prompts for _ in range(n)], seeds, **overrides))

    def sample(self, prompts: list[str], seeds: list[int], **overrides: Any) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``, one per prompt with its own seed (one batch), in eval mode.

        Args:
            prompts: The prompts.
            seeds: One seed per prompt: the image depends only on its prompt, its seed and the settings.
            overrides: Sampling settings for this call (see :meth:`SamplingConfig.with_overrides`).
        """
        with _eval_mode(self.components().values()), torch.no_grad():
            latents = self.latent_sampler.generate(prompts, seeds, self.sampling.with_overrides(**overrides))
            return self.decode(latents, seeds)

    def decode(self, latents: Tensor, seeds: list[int]) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from latents ``[B, N, d]``; image ``i``'s decoder noise depends on
        ``seeds[i]`` only."""
        size, grid = (self.image_size, self.image_size), self.latent_sampler.latent_grid
        images = []
        for latent, seed in zip(latents, seeds, strict=True):
            generator = torch.Generator().manual_seed(int(seed))
            images.append(decode_latents(self.decoder, latent[None], grid, size, self.decoder_sampling, generator))
        return torch.cat(images)

    # ------------------------------------------------------------------ understanding
    def describe(self, images: Images, prompts: str | Sequence[str], max_new_tokens: int = 64) -> list[str]:
        """Answers about images: the VLM's greedy answers through its own processor, chat template and ``generate``
        (``adapter.answer``), in eval mode.

        With ``lora_scope="image_tokens"`` (the default) the LoRA is inactive outside image generation, so these are
        exactly the base VLM's answers, token for token. With ``lora_scope="all"`` they are the answers of the VLM
        with the LoRA.

        Args:
            images: PIL images or ``[3, H, W]`` tensors in ``[0, 1]`` (or one ``[B, 3, H, W]`` tensor).
            prompts: One prompt for every image, or one per image.
            max_new_tokens: Most tokens per answer.

        Returns:
            One answer per image, special tokens dropped and whitespace stripped.
        """
        with _eval_mode(self.components().values()):
            return self.adapter.answer(images, _prompt_per_image(images, prompts), max_new_tokens)

    def describe_ids(self, images: Images, prompts: str | Sequence[str], max_new_tokens: int = 64) -> list[list[int]]:
        """The token ids of :meth:`describe`'s answers (``adapter.answer_ids``), without the stop token."""
        with _eval_mode(self.components().values()):
            return self.adapter.answer_ids(images, _prompt_per_image(images, prompts), max_new_tokens)

    # ------------------------------------------------------------------ saving and loading
    def config(self) -> dict[str, Any]:
        """The ``vugen.json`` record (without the weight hashes): base VLM, latent sampler and sampling settings."""
        return bundle_record(self)

    def save_pretrained(self, directory: str | Path, agree: Callable[[bool], bool] | None = None) -> Path | None:
        """Write the bundle to ``directory`` atomically (an existing bundle there is replaced whole, or kept on error).

        Under FSDP2 call it on every rank (the bridge and LoRA shards are gathered); only global rank 0 writes.

        Args:
            directory: The bundle folder.
            agree: Under several processes, ``decision -> decision of all ranks`` for the finiteness check.

        Returns:
            The folder on the rank that wrote it, else None.
        """
        return save_bundle(self, directory, agree)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        metrics: Mapping[str, float] | None = None,
        metrics_dataset: str | None = None,
        allow_local_vlm: bool = False,
    ) -> str | None:
        """Save the bundle to a temporary folder and upload it to the Hugging Face Hub as one commit, with a model
        card naming the base VLM, the recipe and ``metrics`` (:func:`vugen.bundle_hub.push_bundle`, whose arguments
        these are). A pipeline whose VLM is a local folder is refused unless ``allow_local_vlm``.

        Under FSDP2 call it on every rank, as :meth:`save_pretrained`; global rank 0 uploads.

        Returns:
            The URL of the commit (or of the pull request); None on the ranks that did not upload.
        """
        with tempfile.TemporaryDirectory(prefix="vugen-push-") as staging:
            folder = self.save_pretrained(Path(staging) / "bundle")
            if folder is None:  # a rank that did not write (FSDP2): global rank 0 uploads
                return None
            return push_bundle(
                folder,
                repo_id,
                revision=revision,
                private=private,
                token=token,
                commit_message=commit_message,
                create_pr=create_pr,
                metrics=metrics,
                metrics_dataset=metrics_dataset,
                allow_local_vlm=allow_local_vlm,
            )

    @classmethod
    def from_pretrained(
        cls,
        bundle: str | Path,
        adapter_overrides: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
    ) -> VugenPipeline:
        """Load a bundle written by :meth:`save_pretrained`, from a folder or from the Hugging Face Hub by repo id
        (downloaded once into the local cache, read from there offline: :func:`vugen.bundle_hub.bundle_folder`).
        The VLM is rebuilt from its recorded ``pretrained`` (a relative local folder is found relative to the bundle
        folder). Modules are frozen and in eval mode.

        Before any weight is read, every bundle file's sha256 is checked against ``vugen.json``, every weight file's
        tensor names and shapes (its safetensors header) against its config, and the VLM's content fingerprint
        against the recorded one; a mismatch raises :class:`~vugen.bundle.BundleError` naming the file, the tensors,
        or the recorded and found VLM (see :func:`vugen.bundle.load_bundle`).

        Args:
            bundle: The bundle folder, or a Hub repo id (``org/name``).
            adapter_overrides: Replace recorded adapter arguments, e.g. ``{"pretrained": "/local/copy",
                "dtype": "bfloat16"}``. A ``pretrained`` named here whose contents differ from the recorded VLM's
                gives a warning, not an error.
            trust_remote_code: Let the VLM checkpoint run its own code. Never taken from the bundle.
            revision: For a repo id: a branch, tag or commit sha (pin a commit for reproducible loads).
            cache_dir: For a repo id: the Hugging Face cache (default: ``HF_HUB_CACHE``).
            token: For a repo id: a Hub token (default: the logged-in one, or ``HF_TOKEN``).

        Raises:
            HubBundleError: No such repo or revision, or not in the cache while offline (one line naming it).
        """
        folder = bundle_folder(bundle, revision, cache_dir=cache_dir, token=token)
        return cls(**load_bundle(folder, adapter_overrides, trust_remote_code))


def _prompt_per_image(images: Images, prompts: str | Sequence[str]) -> list[str]:
    """``prompts`` as a list, one prompt repeated for every image (the adapter checks that the counts match)."""
    return [prompts] * len(images) if isinstance(prompts, str) else list(prompts)


@contextlib.contextmanager
def _eval_mode(modules: Any) -> Iterator[None]:
    """Eval mode inside, each module's own mode restored after (a pipeline may share a training stage's modules)."""
    modes = [(module, module.training) for module in modules]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)
