"""The checks of ``vugen check`` above the adapter contract: the VLM's understanding with the latent sampler's scoped
LoRA in place, and a few-step smoke of every stage of the recipe on tiny modules.

They need the inference and training layers (:class:`~vugen.generation.LatentSampler`, the stages, the commands), so
they live here rather than in :mod:`vugen.conformance`; they are :class:`~vugen.check_runner.Check` records all the
same, run by :func:`vugen.check_runner.run_checks`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch import nn

from vugen.adapter import VLMAdapter
from vugen.check_runner import Check, expect
from vugen.commands.cache_latents import cache_latents
from vugen.commands.export import export
from vugen.commands.generate import generate
from vugen.conformance import PROMPTS, random_images
from vugen.data.image_io import to_pil
from vugen.data.latent_cache import LatentCacheDataModule, LatentCacheDataset
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.generation import LatentSampler, LatentSamplerConfig, SamplingConfig
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage
from vugen.stages.sampler import SamplerStage

__all__ = ["UNDERSTANDING", "RecipeSmoke", "check_understanding_preserved"]

LATENT_DIM = 8


def smoke_latent_dim(adapter: VLMAdapter) -> int:
    """The smoke's latent channels: `LATENT_DIM`, or half the features' where they are that narrow (a VQ tokenizer's
    4-channel latent grid: the reducer must reduce)."""
    return max(1, min(LATENT_DIM, adapter.feature_dim // 2))


TINY_LORA = LatentSamplerConfig(lora_rank=4, lora_alpha=4.0, head_width=32, head_depth=1)


def tiny_lora(adapter: VLMAdapter) -> LatentSamplerConfig:
    """`TINY_LORA`, causal where the adapter's language model takes no bidirectional mask (`bidirectional_latents`)."""
    return TINY_LORA if adapter.bidirectional_latents else dataclasses.replace(TINY_LORA, image_attention="causal")


GENERATE_PROMPT = "a large red circle on the left"
# Lightning's advice that does not apply to a few steps on a handful of images.
_INAPPLICABLE_ADVICE = (
    "does not have many workers",
    "no `val_dataloader`",
    "module\\(s\\) in eval mode",
    "smaller than the logging interval",
    "Total length of .* across ranks is zero",
)


# ---------------------------------------------------------------------------------------------------- understanding
def check_understanding_preserved(adapter: VLMAdapter, image_size: int) -> None:
    """With the latent sampler's scoped LoRA attached (random, non-zero weights), the language model gives the base
    model's hidden states bit for bit on text and on image + text inputs; with LoRA switched on they change.

    Image + text: the adapter's own image features (mapped to the language model's width by a fixed random
    projection when they are narrower or wider: the language model sees them as any non-text tokens) after the
    prompt. The LM head holds no LoRA (the ``lora_targets`` check), so equal hidden states mean equal logits.
    Runs on a copy: the adapter itself is left without LoRA.
    """
    clone = copy.deepcopy(adapter)
    inputs = _understanding_inputs(clone, image_size)
    base = [_hidden(clone, *pair) for pair in inputs]
    sampler = LatentSampler(clone, LATENT_DIM, image_size, tiny_lora(clone))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in sampler.lora_b_layers():  # lora_B starts at zero: random weights make LoRA visible if it leaks
            layer.weight.copy_(0.1 * torch.randn(layer.weight.shape, generator=generator))
    for name, (embeds, mask), expected in zip(("text", "image + text"), inputs, base, strict=True):
        expect(
            torch.equal(_hidden(clone, embeds, mask), expected),
            f"on {name} inputs the language model differs from the base model while the latent sampler's LoRA is "
            "attached: a LoRA layer outside the sampler's scope (lora_B hook) reaches it",
        )
    sampler.lora_mask = torch.ones(*inputs[0][0].shape[:2], 1, device=inputs[0][0].device)
    try:
        changed = not torch.equal(_hidden(clone, *inputs[0]), base[0])
    finally:
        sampler.lora_mask = None
    expect(changed, "the latent sampler's LoRA, switched on, does not change the language model: it cannot learn")


UNDERSTANDING = Check("understanding", check_understanding_preserved, "lora_target_modules", needs=("embeddings",))
"""The understanding check as a :class:`~vugen.check_runner.Check`."""


def _understanding_inputs(adapter: VLMAdapter, image_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(embeddings, mask) of the prompts, and of the prompts followed by image tokens."""
    encoding = adapter.tokenize(PROMPTS)
    text, mask = adapter.embed_tokens(encoding["input_ids"]), encoding["attention_mask"]
    with torch.no_grad():
        features = adapter.encode_images(random_images(image_size, len(PROMPTS)).to(adapter.device)).float()
    generator = torch.Generator().manual_seed(1)
    projection = torch.randn(features.shape[-1], adapter.hidden_size, generator=generator).to(features.device)
    image = features @ projection
    image = (image / image.std().clamp_min(1e-6) * text.float().std()).to(text.dtype)
    with_image = torch.cat([text, image], dim=1)
    return [(text, mask), (with_image, torch.cat([mask, mask.new_ones(image.shape[:2])], dim=1))]


@torch.no_grad()
def _hidden(adapter: VLMAdapter, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return adapter.run_language_model(embeds, mask)[0]


# ---------------------------------------------------------------------------------------------------- stage smoke
class RecipeSmoke:
    """A few optimizer steps of each stage of the recipe on tiny modules and Shapes images, then a bundle and one
    generated image: the decoder stage (reducer + pixel decoder, exported), the latent cache, the sampler stage (a
    checkpoint), ``vugen export`` and ``vugen generate``. Each step is a :class:`~vugen.check_runner.Check` that needs
    the one before it.

    Args:
        workdir: Folder for everything written (exports, cache, checkpoint, bundle, image).
        steps: Optimizer steps per stage.
        accelerator: Lightning accelerator (``auto``: a GPU when there is one).
        trust_remote_code: Passed on to the commands that rebuild the VLM (export, generate).
    """

    def __init__(
        self, workdir: str | Path, steps: int = 2, accelerator: str = "auto", trust_remote_code: bool = False
    ) -> None:
        self.workdir, self.steps = Path(workdir), steps
        self.accelerator, self.trust_remote_code = accelerator, trust_remote_code
        self.sampler: SamplerStage | None = None

    def checks(self) -> tuple[Check, ...]:
        """The smoke's steps, in order, each needing the one before."""
        return (
            Check("decoder_stage", self.decoder_stage, "encode_images / token_grid", needs=("features",)),
            Check("cache_latents", self.cache_latents, "encode_images", needs=("decoder_stage",)),
            Check(
                "sampler_stage",
                self.sampler_stage,
                "run_language_model / tokenize / lora_target_modules",
                needs=("cache_latents", "embeddings"),
            ),
            Check("export", self.export, "init_config / describe (rebuilt from its record)", needs=("sampler_stage",)),
            Check("generate", self.generate, "run_language_model (KV cache) / tokenize", needs=("export",)),
        )

    @property
    def decoder_export(self) -> Path:
        return self.workdir / "decoder-stage"

    @property
    def latents(self) -> Path:
        return self.workdir / "latents"

    @property
    def checkpoint(self) -> Path:
        return self.workdir / "sampler.ckpt"

    @property
    def bundle(self) -> Path:
        return self.workdir / "bundle"

    def data(self, image_size: int) -> ShapesDataModule:
        """Four Shapes images of ``image_size`` px, two per batch."""
        sizes = {"train_size": 4, "val_size": 2, "test_size": 2, "heldout_size": 2}
        return ShapesDataModule(image_size=image_size, batch_size=2, seed=0, **sizes)

    def decoder_stage(self, adapter: VLMAdapter, image_size: int) -> None:
        """A few steps of the decoder stage (a fresh reducer trained jointly with a tiny pixel decoder), exported."""
        latent_dim = smoke_latent_dim(adapter)
        reducer = DimensionReducer(adapter.feature_dim, latent_dim, hidden_dim=32, num_blocks=1)
        decoder = PixelDecoder(
            latent_dim, patch_size=_patch_size(image_size), width=32, depth=1, num_heads=2, image_size=image_size
        )
        rows, cols = adapter.token_grid(image_size, image_size)
        stage = DecoderStage(
            adapter,
            decoder,
            reducer=reducer,
            # PCA of the first batch (2 images) needs more tokens than latent channels: a fixed 2x2 grid has 8
            pca_init=2 * rows * cols > latent_dim,
            sampling=SamplingConfig(steps=2),
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
            export_dir=str(self.decoder_export),
        )
        self._fit(stage, "decoder stage", {"reducer": reducer, "decoder": decoder}, datamodule=self.data(image_size))
        written = sorted(p.name for p in self.decoder_export.iterdir()) if self.decoder_export.is_dir() else []
        expect({"reducer", "decoder", "sampling.json"} <= set(written), f"decoder-stage export holds {written}")

    def cache_latents(self, adapter: VLMAdapter, image_size: int) -> None:
        """``vugen cache-latents`` of the Shapes images through the exported reducer."""
        data = self.data(image_size)
        folder = cache_latents(
            adapter=adapter,
            reducer_path=str(self.decoder_export / "reducer"),
            data=data,
            out_dir=str(self.latents),
            device=str(adapter.device),
            progress=False,
        )
        cached = LatentCacheDataset(folder)
        rows, cols = adapter.token_grid(image_size, image_size)
        latents = torch.stack([cached[i]["latents"] for i in range(len(cached))])
        expected = (len(data.dataset("train")), rows * cols, smoke_latent_dim(adapter))
        expect(tuple(latents.shape) == expected, f"cached latents {tuple(latents.shape)}, expected {expected}")
        expect(torch.isfinite(latents).all(), "cached latents hold NaN or Inf")
        expect(not torch.equal(latents[0], latents[1]), "two different images have the same cached latents")

    def sampler_stage(self, adapter: VLMAdapter, image_size: int) -> None:
        """A few steps of the sampler stage (LoRA in the language model + bridge) on the cache; a checkpoint."""
        stage = SamplerStage(
            adapter,
            str(self.decoder_export),
            latent_sampler=tiny_lora(adapter),
            sampling=SamplingConfig(steps=2, guidance_scale=2.0),
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        )
        trained = {"LoRA": nn.ModuleList(stage.latent_sampler.lora_b_layers()), "bridge": stage.latent_sampler.bridge}
        data = LatentCacheDataModule(str(self.latents), batch_size=2)
        trainer = self._fit(stage, "sampler stage", trained, datamodule=data)
        trainer.save_checkpoint(self.checkpoint, weights_only=False)  # a full checkpoint, as ModelCheckpoint writes
        self.sampler = stage

    def export(self, adapter: VLMAdapter, image_size: int) -> None:
        """``vugen export`` of the sampler checkpoint into a bundle (the VLM rebuilt from the checkpoint's record)."""
        with _quiet():
            export(str(self.checkpoint), str(self.bundle), trust_remote_code=self.trust_remote_code)
        expect((self.bundle / "vugen.json").is_file(), f"no vugen.json in {self.bundle}")

    def generate(self, adapter: VLMAdapter, image_size: int) -> None:
        """``vugen generate`` of one image from the bundle: the image the trained stage makes, at ``image_size``."""
        with _quiet():
            files = generate(
                bundle=str(self.bundle),
                out=str(self.workdir / "images"),
                prompt=GENERATE_PROMPT,
                trust_remote_code=self.trust_remote_code,
                accelerator=self.accelerator,
            )
        with Image.open(files[0]) as file:
            image = np.asarray(file.convert("RGB"), dtype=np.int16)
        expect(image.shape == (image_size, image_size, 3), f"generated {image.shape}, expected {image_size} px RGB")
        if self.sampler is None:
            return
        with torch.no_grad():
            expected = self.sampler.pipeline().sample([GENERATE_PROMPT], [0])
        difference = np.abs(image - np.asarray(to_pil(expected.cpu())[0], dtype=np.int16)).max()
        expect(difference <= 1, f"the bundle's image differs from the trained stage's by {difference} / 255")

    def _fit(self, stage: LightningModule, name: str, trained: dict[str, nn.Module], datamodule: object) -> Trainer:
        """``Trainer.fit`` for :attr:`steps` steps; checks the loss is finite and every ``trained`` module changed."""
        before = {key: copy.deepcopy(module.state_dict()) for key, module in trained.items()}
        with _quiet():
            trainer = Trainer(
                accelerator=self.accelerator,
                devices=1,
                max_steps=self.steps,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                log_every_n_steps=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=str(self.workdir),
            )
            trainer.fit(stage, datamodule=datamodule)
        expect(trainer.global_step == self.steps, f"{name}: {trainer.global_step} of {self.steps} steps ran")
        loss = trainer.callback_metrics.get("train/loss")
        expect(loss is not None and torch.isfinite(loss), f"{name}: the training loss is {loss}")
        for key, module in trained.items():
            after = module.state_dict()
            expect(
                any(not torch.equal(after[k].cpu(), v.cpu()) for k, v in before[key].items()),
                f"{name}: the {key} did not change in {self.steps} steps (no gradient reaches it)",
            )
        return trainer


def _patch_size(image_size: int) -> int:
    """The tiny pixel decoder's patch: 4 px (or the largest power of two under it that divides the image)."""
    return next(p for p in (4, 2, 1) if image_size % p == 0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's info lines and its advice that does not apply to a few-step smoke, silenced."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _INAPPLICABLE_ADVICE:
                warnings.filterwarnings("ignore", message=f".*{message}.*")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
