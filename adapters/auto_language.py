"""`AutoLanguageModel`: the language-model half of `AutoAdapter`, found and run by introspection.

The decoder stack is found in the VLM (`get_decoder()`, or the innermost module that takes the VLM's input embeddings
alone); prompts are tokenized through the tokenizer's chat template and left-padded; `run_language_model` fits a
4-D attention mask to each kind of layer (`vugen_adapters.attention_masks`), shifts positions by the offset the model
adds itself, and passes the cache and the per-layer inputs under the names the model takes. What the model does by
itself is measured once at load (`vugen_adapters.language_probes`). The vision half, loading and the processors are
`vugen_adapters.auto.AutoAdapter`'s, which builds on this class and sets the attributes it reads.
"""

from __future__ import annotations

import inspect
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from transformers import BatchEncoding, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from vugen.adapter import VLMAdapter, latent_attention_mask, positions_from_mask
from vugen_adapters import language_probes
from vugen_adapters.attention_masks import BIDIRECTIONAL_KINDS, fit_attention_mask, language_layer_kinds
from vugen_adapters.per_layer_inputs import embedded_token_ids

__all__ = ["AutoLanguageModel"]


class AutoLanguageModel(VLMAdapter):
    """The language-model side of the `VLMAdapter` contract for any transformers VLM (abstract: the vision side is
    `AutoAdapter`'s).

    Attributes:
        vlm: The loaded VLM.
        tokenizer: Its tokenizer.
        use_chat_template: Wrap prompts in the tokenizer's chat template when it has one.
        max_prompt_tokens: Prompts longer than this many tokens are truncated.
    """

    vlm: PreTrainedModel
    tokenizer: Any
    use_chat_template: bool
    max_prompt_tokens: int

    @property
    def hidden_size(self) -> int:
        """Width of the language model, read from its own config (PI0's config names no text width of its own)."""
        return self.language_model.config.get_text_config().hidden_size

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (no LM head, no vision tower): `get_decoder()`, and once more where that is a whole causal
        LM with its head (BLIP-2 and InstructBLIP wrap an `OPTForCausalLM` / `LlamaForCausalLM`).

        Where that is no language model by `_is_language_model` (PI0's `get_decoder()` is its whole
        vision-language-action model, which needs action inputs; DiffusionGemma's is its canvas decoder, which takes
        token ids only), the innermost module of the VLM that is one.
        """
        decoder = self.vlm.get_decoder()
        if decoder.get_output_embeddings() is not None or hasattr(decoder, "lm_head"):
            inner = decoder.get_decoder()
            decoder = inner if inner is not decoder else getattr(decoder, "model", decoder.base_model)  # Llama 4
        if self._is_language_model(decoder):
            return decoder
        found = [m for m in self.vlm.modules() if self._is_language_model(m)]
        innermost = [m for m in found if not any(other is not m for other in m.modules() if other in found)]
        if len(innermost) != 1:
            raise ValueError(
                f"{type(self.vlm).__name__}: `get_decoder()` is no language model, and {len(innermost)} innermost "
                "modules take its input embeddings as `inputs_embeds` with no other input required"
            )
        return innermost[0]

    def _is_language_model(self, module: nn.Module) -> bool:
        """Whether `module` is a language model vugen can feed token embeddings alone: a model whose input embeddings
        are the VLM's and whose forward takes `inputs_embeds` and requires nothing else."""
        if not isinstance(module, PreTrainedModel):
            return False
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:
            return False
        parameters = inspect.signature(module.forward).parameters
        required = [
            name
            for name, parameter in parameters.items()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        return embeddings is self.vlm.get_input_embeddings() and "inputs_embeds" in parameters and not required

    @cached_property
    def bidirectional_latents(self) -> bool:
        """True when every layer of the language model is an attention layer that reads the mask as given (full,
        sliding-window, indexed: see `vugen_adapters.attention_masks`); linear attention, Mamba, convolution or chunked
        layers cannot let the latent tokens see each other both ways, nor can a language model that takes only a
        `[B, S]` padding mask (Kosmos-2's)."""
        kinds = language_layer_kinds(self.language_model.config)  # PI0's own config names no layers of its own
        return set(kinds) <= set(BIDIRECTIONAL_KINDS) and self._runs_on_4d_masks()

    def _runs_on_4d_masks(self) -> bool:
        """Whether the language model runs on a 4-D attention mask at all: some expand a `[B, S]` padding mask
        themselves and fail on anything else. Measured on two tokens, `[prefix][latent]`."""
        weight = next(self.language_model.parameters())
        tokens = torch.zeros(1, 2, self.hidden_size, device=weight.device, dtype=weight.dtype)
        mask = latent_attention_mask(torch.ones(1, 1, dtype=torch.long, device=weight.device), 1)
        try:
            with torch.no_grad():
                self.run_language_model(tokens, mask, torch.arange(2, device=weight.device).unsqueeze(0))
        except ValueError:  # Kosmos-2's text model unpacks the mask as `bsz, src_len = mask.size()`
            return False
        return True

    @property
    def block_classes(self) -> set[type[nn.Module]]:
        """The checkpoint's `_no_split_modules` classes, without PreTrainedModel wrappers; where it names none (GIT),
        the layers transformers checkpoints one by one (`GradientCheckpointingLayer`)."""
        names = set(getattr(self.vlm, "_no_split_modules", None) or [])
        if not names:
            return {type(m) for m in self.vlm.modules() if isinstance(m, GradientCheckpointingLayer)}
        return {type(m) for m in self.vlm.modules() if type(m).__name__ in names and not isinstance(m, PreTrainedModel)}

    def chat_messages(self, prompt: str) -> list[dict[str, Any]]:
        """The conversation a prompt becomes before the chat template is applied."""
        return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]

    def tokenize(self, prompts: list[str]) -> BatchEncoding:
        """Chat-templated, left-padded prompts as tensors on the adapter's device."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("tokenize expects a non-empty list of prompt strings")
        templated = self.use_chat_template and self.tokenizer.chat_template is not None
        texts = (
            [
                self.tokenizer.apply_chat_template(self.chat_messages(p), add_generation_prompt=True, tokenize=False)
                for p in prompts
            ]
            if templated
            else list(prompts)
        )
        encoding = self.tokenizer(
            texts,
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=self.max_prompt_tokens,
            add_special_tokens=not templated,
            return_tensors="pt",
        )
        return BatchEncoding({"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}).to(
            self.device
        )

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token ids -> input embeddings of the language model."""
        return self.vlm.get_input_embeddings()(input_ids)

    def run_language_model(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
    ) -> tuple[Tensor, Any]:
        """Run the decoder stack on embeddings; returns (last hidden states, cache). A 4-D mask is fitted to each kind
        of layer (sliding windows, their caches) and to the attention implementation: see `fit_attention_mask`."""
        masks: Tensor | dict[str, Tensor] = attention_mask
        if attention_mask.ndim == 4:
            if position_ids is None:
                raise ValueError("run_language_model needs position_ids with a 4-D attention_mask")
            config, tokens = self.language_model.config, inputs_embeds.shape[1]
            masks = fit_attention_mask(config, attention_mask, past_key_values, tokens, inputs_embeds.dtype)
        elif position_ids is None:
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1])
        position_ids = position_ids + self.position_offset  # vugen counts from 0, the language model from its offset
        if past_key_values is None and self._given_default_cache:
            # The cache `generate` gives the first call: some LMs build none themselves (Granite 4 Vision's)
            past_key_values = DynamicCache(config=self.vlm.config.get_text_config(decoder=True))
        output = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=masks,
            position_ids=position_ids.contiguous(),  # callers pass slices; some LMs `view` them (Kosmos-2's positions)
            use_cache=True,
            return_dict=True,
            **self._causal_argument,
            **{self._cache_argument: past_key_values},
            **self._per_layer_inputs(inputs_embeds),
        )
        cache = output.get("cache")  # reading `past_key_values` first would warn of its deprecation
        return output.last_hidden_state, cache if cache is not None else output.get("past_key_values")

    def _per_layer_inputs(self, inputs_embeds: Tensor) -> dict[str, Tensor]:
        """`per_layer_inputs` for a language model that embeds each token once more per layer (Gemma 3n, Gemma 4:
        see `vugen_adapters.per_layer_inputs`), from the ids of the rows that are token embeddings and the pad id
        elsewhere, as the VLM's own forward gives its image and audio soft tokens. Empty for other models."""
        if not self._takes_per_layer_inputs:
            return {}
        pad = self.vlm.config.get_text_config(decoder=True).pad_token_id
        if pad is None:
            raise ValueError("the language model takes per_layer_inputs, but no pad_token_id to give latents")
        vocab = self.vlm.get_input_embeddings().num_embeddings
        ids = embedded_token_ids(inputs_embeds, self.embed_tokens, vocab, missing=pad)
        return {"per_layer_inputs": self.language_model.get_per_layer_inputs(ids)}

    @cached_property
    def _takes_per_layer_inputs(self) -> bool:
        """Whether the language model adds per-layer token embeddings (`hidden_size_per_layer_input`), takes them as
        `per_layer_inputs` and can look them up (`get_per_layer_inputs`)."""
        model = self.language_model
        return (
            bool(getattr(getattr(model, "config", None), "hidden_size_per_layer_input", None))
            and "per_layer_inputs" in inspect.signature(model.forward).parameters
            and callable(getattr(model, "get_per_layer_inputs", None))
        )

    @cached_property
    def position_offset(self) -> int:
        """What the language model adds to 0-based positions when it numbers the tokens itself (Kosmos-2: its
        `padding_idx + 1`), measured at load: `vugen_adapters.language_probes.position_offset`."""
        pad = getattr(self.vlm.config.get_text_config(decoder=True), "pad_token_id", None)
        return language_probes.position_offset(self.language_model, self._probe_embeddings, pad)

    @cached_property
    def _probe_embeddings(self) -> Tensor | None:
        """`[1, 4, hidden_size]` random embeddings at the scale of the token table's, for the load-time probes of the
        language model; None where the adapter cannot make them (the conformance checks then say why)."""
        try:
            weight = next(self.language_model.parameters())
            scale = self.embed_tokens(torch.arange(4, device=weight.device)).float().std().item()
            embeds = torch.randn(1, 4, self.hidden_size, generator=torch.Generator().manual_seed(0)) * scale
            return embeds.to(weight.device, weight.dtype)
        except Exception:  # noqa: BLE001  a checkpoint the adapter cannot read fails in the checks, not at load
            return None

    @cached_property
    def _given_default_cache(self) -> bool:
        """Whether `generate` would give the language model's first call a `DynamicCache` (models without `generate`,
        PI0's and DiffusionGemma's, build their caches themselves)."""
        supports = getattr(self.vlm, "_supports_default_dynamic_cache", None)
        return callable(supports) and supports()

    @cached_property
    def _causal_argument(self) -> dict[str, bool]:
        """`is_causal=True` where the language model takes it (`vugen_adapters.language_probes.takes_is_causal`)."""
        takes = language_probes.takes_is_causal(self.language_model, self._probe_embeddings)
        return {"is_causal": True} if takes else {}

    @cached_property
    def _cache_argument(self) -> str:
        """The name the language model takes its cache under: `cache` since transformers 5.24 (`past_key_values`
        warns and goes away in 5.40), `past_key_values` in models written before."""
        return "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else "past_key_values"
