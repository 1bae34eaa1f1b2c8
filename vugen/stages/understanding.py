"""Teach a VLM to understand: its own language-model loss on (image, prompt, answer) conversations.

Unlike the generation stages, this one trains the VLM itself, the parts ``trainable`` names:

- ``language_model``: the adapter's ``language_model`` (the decoder stack) with the VLM's input embeddings and its LM
  head (``get_input_embeddings`` / ``get_output_embeddings``);
- ``vision_tower``: the VLM's image encoder, as transformers finds it (``get_encoder(modality="image")``);
- ``projector``: every other weight of the VLM (the connector between the two).

The inputs are the VLM's own (:meth:`~vugen.adapter.VLMAdapter.conversation`: its processor, chat template, labels on
the answer and the end of turn) and the loss is its own forward's (``labels`` given), so nothing here depends on the
family. The adapter's ``vlm`` is the transformers model trained: the one attribute read beyond the contract.

Keeping the vision tower frozen (the default) keeps :meth:`~vugen.adapter.VLMAdapter.encode_images` bit for bit, so
the generation stages (reducer, decoder, latent cache) built on the features of the untrained VLM still fit the
trained one. What each choice of parts buys on the tiny LLaVA: ``docs/understanding.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedModel

from vugen.adapter import VLMAdapter
from vugen.distributed import is_global_zero
from vugen.stages.base import AdapterStage
from vugen.understanding_recipe import PARTS, Part

__all__ = ["Part", "UnderstandingStage", "model_parts", "understanding_model"]


def understanding_model(adapter: VLMAdapter) -> PreTrainedModel:
    """The transformers model behind ``adapter`` whose forward takes :meth:`VLMAdapter.conversation`'s inputs.

    Raises:
        TypeError: The adapter has no ``vlm`` that is a transformers model.
    """
    model = getattr(adapter, "vlm", None)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"{type(adapter).__name__} has no `vlm` (the transformers model whose forward gives the loss on "
            "`conversation` inputs): the understanding stage trains that model"
        )
    return model


def model_parts(adapter: VLMAdapter) -> dict[Part, list[nn.Parameter]]:
    """The VLM's parameters by part (see the module docstring); each parameter in exactly one part.

    Raises:
        TypeError: The VLM has no image encoder that transformers' ``get_encoder(modality="image")`` finds.
    """
    vlm = understanding_model(adapter)
    language = [adapter.language_model, vlm.get_input_embeddings(), vlm.get_output_embeddings()]
    tower = vlm.get_encoder(modality="image")
    if tower is vlm or tower is vlm.base_model:  # what get_encoder returns when it finds none
        raise TypeError(f"{type(vlm).__name__}: get_encoder(modality='image') finds no vision tower to tell apart")
    taken: set[int] = set()
    parts: dict[Part, list[nn.Parameter]] = {}
    for part, modules in (("language_model", language), ("vision_tower", [tower]), ("projector", [vlm])):
        own = {id(p): p for module in modules if module is not None for p in module.parameters()}
        parts[part] = [p for key, p in own.items() if key not in taken]  # tied weights: the first part keeps them
        taken |= own.keys()
    return parts


def _checked_parts(trainable: Sequence[str]) -> tuple[Part, ...]:
    unknown = [part for part in trainable if part not in PARTS]
    if unknown or not trainable or isinstance(trainable, str):
        raise ValueError(f"trainable must be a non-empty list of parts from {list(PARTS)}, got {trainable!r}")
    return tuple(trainable)


def _unfreeze(adapter: VLMAdapter, trainable: tuple[Part, ...]) -> tuple[Part, ...]:
    """Let the ``trainable`` parts learn; returns those that have weights of their own in this VLM.

    A part with none is skipped, saying so (Qwen2-VL's merger, its projector, lives inside the vision tower that
    transformers names); none left is an error.
    """
    parts = model_parts(adapter)
    model = type(understanding_model(adapter)).__name__
    empty = [part for part in trainable if not parts[part]]
    kept = tuple(part for part in trainable if parts[part])
    if not kept:
        raise ValueError(f"trainable: {model} has no {' or '.join(empty)} weights apart from the other parts'")
    if empty:
        rank_zero_info(
            f"UnderstandingStage: {model} has no {' or '.join(empty)} apart from its other parts; {kept} train"
        )
    for part in kept:
        for parameter in parts[part]:
            parameter.requires_grad_(True)
    return kept


class UnderstandingStage(AdapterStage):
    """Train parts of the VLM on its own language-model loss over conversations (image, prompt, answer).

    Batches are ``{"images": [B, 3, H, W] in [0, 1], "prompts": list[str], "answers": list[str]}``
    (:class:`~vugen.data.shapes_understanding.ShapesUnderstandingDataModule`). The adapter stays in eval mode (no
    dropout); the parts that do not train stay frozen and bit for bit as loaded.

    Checkpoints hold the trained parts only (the frozen ones are rebuilt from the adapter's ``pretrained``, as in every
    stage); the export is a whole checkpoint of the VLM that the same adapter loads.

    Args:
        adapter: The VLM.
        trainable: The parts that learn: ``language_model``, ``projector``, ``vision_tower`` (one this VLM has no
            weights for apart from the others, such as Qwen2-VL's projector inside its tower, is skipped).
        optimizer: Builds the optimizer from the trained parameters.
        lr_scheduler: Optional scheduler on that optimizer, stepped after every optimizer step.
        export_dir: If set, the trained VLM is written there with the adapter's ``save_pretrained`` (weights, config,
            processor: a checkpoint like any other) at the end of a ``fit`` that ran at least one optimizer step,
            with a ``training.json`` record.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        trainable: Sequence[Part] = ("language_model", "projector"),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(adapter, optimizer, lr_scheduler)
        self.record_hyperparameters(adapter=adapter, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.trainable = _unfreeze(adapter, _checked_parts(trainable))
        self.export_dir = export_dir

    # ------------------------------------------------------------------ model
    def conversation_loss(self, batch: dict[str, Any]) -> Tensor:
        """The VLM's own language-model loss on the batch's answers (and end of turn)."""
        inputs = self.adapter.conversation(batch["images"], batch["prompts"], batch["answers"])
        inputs = inputs.to(self.adapter.device).to(self.adapter.dtype)  # the dtype cast touches floating inputs only
        return understanding_model(self.adapter)(**inputs).loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One step of the conversation loss, logged as ``train/loss``."""
        loss = self.conversation_loss(batch)
        self.log_metrics("train", {"loss": loss}, len(batch["prompts"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The conversation loss on validation batches, logged as ``val/loss``."""
        self.log_metrics("val", {"loss": self.conversation_loss(batch)}, len(batch["prompts"]))

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        """Export the trained VLM to ``export_dir`` when one is set and this fit trained it."""
        if self.export_dir is not None:
            self.export_after_fit(self.export_dir, self.export_vlm, "the VLM")

    def export_vlm(self, directory: str | Path) -> Path | None:
        """Write the whole VLM with the adapter's ``save_pretrained`` and ``training.json``, replacing ``directory``
        atomically (the VLM may have been loaded from it: its files are replaced, not overwritten in place). Global
        rank zero writes; the others return None.

        Raises:
            NonFiniteError: A trained weight holds NaN or Inf; nothing is written.
        """
        self.require_finite_state(self.state_dict().items(), f"refusing to export the VLM to {directory}")
        if not is_global_zero():
            return None
        return self.write_export(directory, self.adapter.save_pretrained)
