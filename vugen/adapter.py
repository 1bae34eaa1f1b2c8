"""The adapter contract: how vugen sees a vision-language model. Owned by the core; plug-ins implement it.

A stage, the latent sampler or the pipeline never looks inside a VLM. They ask an adapter for frozen vision
features in raster order (`encode_images`), for prompt tokens (`tokenize`, `embed_tokens`) and for the language model
run on embeddings (`run_language_model`). Everything a VLM family does differently stays behind this class. The
adapters vugen ships live in the plug-in package `vugen_adapters`, which imports this module; vugen itself finds them
through the registry's entry points (`vugen.registry`), never by importing the package.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn
from transformers import BatchEncoding, BatchFeature

FeatureSource = Literal["vision", "projector"]
"""`vision`: the vision encoder's tokens that the VLM's projector reads (the default, as in VUGEN);
`projector`: the same tokens after the projector / merger, in the language model's width."""

DType = Literal["float32", "bfloat16", "float16", "auto"]


class VLMAdapter(nn.Module, ABC):
    """A frozen VLM seen through a fixed interface.

    Subclasses load their weights in `__init__`, then call `self._freeze()`: the VLM's own weights never
    train (LoRA layers that a stage adds later are new parameters and do). The adapter stays in eval mode
    whatever `train()` says, so dropout in a frozen model never turns on.

    Attributes a subclass must provide:
        feature_dim: D, the channel count of `encode_images`.
        hidden_size: the language model's width.
        patch_stride: pixels of the encoder's input per feature token along one side.
        language_model: the decoder stack that LoRA wraps (no LM head, no vision tower).

    Derived from those unless a subclass says otherwise: `lora_target_modules` (the LM's linear layers).
    """

    pretrained: str
    """Hub id or local path the weights came from (recorded in exported bundles)."""

    def __init__(self) -> None:
        super().__init__()

    # ---------------------------------------------------------------- vision side
    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """D, channels per feature token returned by `encode_images`."""

    @property
    @abstractmethod
    def patch_stride(self) -> int:
        """Pixels (of the encoder's input) per feature token along one side."""

    @abstractmethod
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, columns) of feature tokens `encode_images` returns for images of this size."""

    @abstractmethod
    def encode_images(self, images: Tensor) -> Tensor:
        """Frozen vision features.

        Args:
            images: `[B, 3, H, W]` floats in `[0, 1]`.

        Returns:
            `[B, N, D]` feature tokens in raster order (row by row), `N = rows * cols` of `token_grid(H, W)`.
            No gradient flows back into the VLM.
        """

    # ---------------------------------------------------------------- language side
    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the language model's hidden states."""

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The language model's decoder stack: the module LoRA wraps."""

    @property
    def bidirectional_latents(self) -> bool:
        """Whether the language model obeys the latent sampler's 4-D mask (latent tokens attending to each other both
        ways: `image_attention: bidirectional`). True by default; False for language models with layers that take no
        attention mask (linear attention, state-space or convolution layers, chunked attention) or that take only a
        `[B, S]` padding mask: the latent sampler then runs causal (`image_attention: causal`)."""
        return True

    @property
    def lora_target_modules(self) -> list[str] | str:
        """peft `target_modules`, relative to `language_model` (so never inside the vision tower).

        Derived from `language_model` by default: the name of every `nn.Linear` in it (peft's `all-linear`, limited
        to the LM), which for a decoder LM are the attention and MLP projections (`q_proj`, ..., `down_proj`). Left
        out, since peft matches a name wherever it occurs: names also borne by a linear subclass with its own
        `forward` (LoRA adds to a linear map's output; Llama 4's router returns top-k scores and logits), and names
        peft refuses for this language model (a Mamba mixer's `out_proj`, which fused kernels read by weight).
        Override it only to narrow the choice, or for a model whose LM has no `nn.Linear` layers.
        """
        kinds = [(name.rsplit(".", 1)[-1], _is_linear(m)) for name, m in self.language_model.named_modules()]
        linear = {name for name, is_linear in kinds if is_linear} - {name for name, is_linear in kinds if not is_linear}
        config = getattr(self.language_model, "config", None)
        targets = sorted(name for name in linear if _peft_accepts(name, config))
        if not targets:
            raise TypeError(
                f"{type(self).__name__}: its language_model has no nn.Linear layer LoRA can wrap; override "
                "`lora_target_modules` with the peft `target_modules` of this model"
            )
        return targets

    @property
    @abstractmethod
    def block_classes(self) -> set[type[nn.Module]]:
        """Module classes that are units for FSDP sharding and activation checkpointing."""

    @abstractmethod
    def tokenize(self, prompts: list[str]) -> BatchEncoding:
        """Chat-templated, left-padded prompts as `input_ids` and `attention_mask` tensors.

        Left padding puts the end of every prompt at the same position, so image tokens appended after
        the prompt line up across the batch.
        """

    @abstractmethod
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """`[B, T]` token ids -> `[B, T, hidden_size]` input embeddings."""

    @abstractmethod
    def run_language_model(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
    ) -> tuple[Tensor, Any]:
        """Run the decoder stack on embeddings.

        Args:
            inputs_embeds: `[B, T, hidden_size]` embeddings of the new tokens.
            attention_mask: One of two forms, over the cached and the new tokens:

                - `[B, past + T]` padding mask (1: token, 0: padding): the language model attends causally.
                - `[B, 1, T, past + T]` bool attention mask (True: may attend), to be obeyed as given: what the
                  latent sampler passes for its bidirectional latent block (`latent_attention_mask`: causal over
                  the prompt, the trailing latent tokens see each other whole), in training on the whole sequence
                  and in generation on the prompt's cache. A language model with sliding-window layers restricts
                  them to their window as it restricts its causal mask, and gives each layer the keys its cache
                  keeps.

                The conformance check `latent_mask` (`vugen check`) runs exactly what the sampler passes.
            position_ids: `[B, T]` positions of the new tokens, counted from 0 (the adapter shifts them to where the
                language model counts from when it numbers tokens itself: the conformance check `positions`);
                derived from the mask when None (2-D masks only).
            past_key_values: a cache returned by an earlier call, or None.

        Returns:
            The last hidden states `[B, T, hidden_size]` and the updated cache.
        """

    # ---------------------------------------------------------------- understanding: the VLM as it is
    def conversation(self, images: Any, prompts: list[str], answers: list[str] | None = None) -> BatchFeature:
        """The VLM's own model inputs for one image and one user prompt per example, through its processor and chat
        template, as its model card would build them (not vugen's encoding settings).

        Args:
            images: One image per prompt: PIL images or `[3, H, W]` tensors in `[0, 1]` (or one `[B, 3, H, W]`).
            prompts: The user prompts.
            answers: The assistant's answers, or None.

        Returns:
            Without answers: left-padded prompts, each ending with the generation prompt (for `answer`). With answers:
            right-padded conversations ending with the template's end of turn, and `labels` (the answer tokens and
            the end of turn; -100 elsewhere): the VLM's own forward gives its language-model loss on them.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose the VLM's understanding (conversation)")

    def answer_ids(self, images: Any, prompts: list[str], max_new_tokens: int = 64) -> list[list[int]]:
        """The VLM's greedy answers through its own `generate`: each example's new tokens, without the stop token.

        LoRA that vugen attached with `lora_scope="image_tokens"` is inactive here, so these are the base VLM's.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose the VLM's understanding (answer_ids)")

    def answer(self, images: Any, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        """The VLM's greedy answers as text (`answer_ids` decoded, special tokens dropped, whitespace stripped)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose the VLM's understanding (answer)")

    @abstractmethod
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the VLM (weights, config, processor) so `type(self)(pretrained=directory)` reloads it."""

    # ---------------------------------------------------------------- shared behaviour
    def _freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VLMAdapter:
        """Keep the frozen VLM in eval mode; `mode` is ignored on purpose (see the class docstring)."""
        return super().train(False)

    def describe(self) -> dict[str, Any]:
        """What a saved bundle records to rebuild this adapter."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "pretrained": self.pretrained}

    def init_config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuild this adapter: :meth:`describe` limited to the constructor's
        arguments (what checkpoints, bundles and YAML configs record)."""
        record = self.describe()
        accepted = inspect.signature(type(self)).parameters
        return {"class_path": record["class_path"], "init_args": {k: v for k, v in record.items() if k in accepted}}

    @property
    def device(self) -> torch.device:
        """Device of the adapter's weights."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the adapter's weights."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())


def _is_linear(module: nn.Module) -> bool:
    """An `nn.Linear` that computes the linear map itself: not a subclass with its own `forward`, whose output may be
    more than the map (Llama 4's router returns top-k scores and logits), which LoRA cannot add to."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _peft_accepts(name: str, config: Any) -> bool:
    """Whether peft injects LoRA into a linear layer called `name` of a model with this `config`: peft refuses some
    names by the model's type (a Mamba mixer's `out_proj` and `conv1d`), which it says only by raising."""
    probe = nn.Module()
    probe.config = config
    probe.add_module(name, nn.Linear(1, 1))
    try:
        inject_adapter_in_model(LoraConfig(r=1, target_modules=[name]), probe)
    except ValueError:
        return False
    return True


def positions_from_mask(attention_mask: Tensor, new_tokens: int) -> Tensor:
    """Positions of the last `new_tokens` tokens, counting only unpadded ones (left padding aware)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -new_tokens:]


def latent_attention_mask(prefix_mask: Tensor, num_latents: int, num_queries: int | None = None) -> Tensor:
    """The 4-D attention mask the latent sampler passes to `VLMAdapter.run_language_model` for a bidirectional
    latent block: `[prefix][num_latents latent tokens]`, causal over the prefix, whole inside the latent block.

    Args:
        prefix_mask: `[B, P]` padding mask of the prefix (left-padded prompts and the BOI token).
        num_latents: N, the latent tokens after the prefix.
        num_queries: The last rows to return: `P + N` (default) for the whole sequence, `N` for the latent block run
            on the prefix's KV cache.

    Returns:
        `[B, 1, num_queries, P + N]` bool, True = may attend. A padding token attends to itself only, so that no
        softmax row is empty.
    """
    b, p = prefix_mask.shape
    total = p + num_latents
    keys = torch.cat([prefix_mask.bool(), prefix_mask.new_ones(b, num_latents, dtype=torch.bool)], dim=1)
    allowed = torch.ones(total, total, dtype=torch.bool, device=prefix_mask.device).tril()
    allowed[p:, p:] = True  # the latent block sees itself whole
    allowed = allowed[None] & keys[:, None, :]
    allowed |= torch.eye(total, dtype=torch.bool, device=prefix_mask.device)
    return allowed[:, None, total - (total if num_queries is None else num_queries) :, :]
