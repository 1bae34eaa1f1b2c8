"""A 4-D attention mask over the whole sequence, in the form each layer of a transformers decoder reads.

The latent sampler passes `run_language_model` a bool `[B, 1, T, past + T]` mask (`vugen.adapter.
latent_attention_mask`). transformers uses a 4-D mask as given, in every layer: it neither applies a sliding window to
it nor fits it to a sliding-window layer's cache, which keeps only its last `window - 1` keys; and its eager attention
adds the mask to the scores. So, before the call:

- a sliding-window layer gets the mask AND its window (a key at most `window - 1` tokens behind the query), over the
  keys its cache holds (`cache.get_mask_sizes`): what transformers does with its own masks, and how Gemma 3 composes
  its bidirectional image blocks with the window;
- decoders with both kinds of layer get a dict by layer type, which hybrid decoders (Gemma 2 and 3, Qwen 2, ...)
  take in place of the mask;
- eager attention gets an additive float mask (0 or the dtype's minimum).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

__all__ = ["BIDIRECTIONAL_KINDS", "fit_attention_mask", "language_layer_kinds"]

BIDIRECTIONAL_KINDS = ("full_attention", "sliding_attention", "indexed_attention")
"""Layer kinds whose attention reads a 4-D mask as given: full, sliding-window (fitted to its window and cache) and
indexed attention (DeepSeek sparse attention: full attention over the keys its indexer selects, under the mask). A
decoder made only of these lets latent tokens attend to each other both ways."""


def language_layer_kinds(config: PretrainedConfig) -> list[str]:
    """The kinds of the decoder's layers (``full_attention``, ``sliding_attention``, ``linear_attention``, ``conv``,
    ...), read as transformers' own cache reads them, from a language model's or a VLM's config."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return list(dict.fromkeys(layer_types))


def fit_attention_mask(
    config: PretrainedConfig, mask: Tensor, cache: Any, new_tokens: int, dtype: torch.dtype
) -> Tensor | dict[str, Tensor]:
    """The mask (or masks by layer type) a decoder with ``config`` reads for a bool 4-D ``mask``.

    Args:
        config: The language model's config, or a VLM's (its decoder's: layer types, windows, attention
            implementation).
        mask: `[B, 1, T, past + T]` bool, True = may attend, over the cached and the new tokens.
        cache: The transformers cache the call continues, or None.
        new_tokens: T.
        dtype: The hidden states' dtype (for eager attention's additive mask).

    Raises:
        ValueError: The mask does not cover the cached and the new tokens, or the decoder has layers of another kind
            than full or sliding-window attention.
    """
    config = config.get_text_config(decoder=True)  # the decoder's, as DynamicCache reads it
    past = cache.get_seq_length() if cache is not None else 0
    if mask.dtype != torch.bool or mask.shape[-2:] != (new_tokens, past + new_tokens):
        raise ValueError(
            f"a 4-D attention_mask must be bool [B, 1, {new_tokens}, {past + new_tokens}] ({past} cached + "
            f"{new_tokens} new tokens), got {mask.dtype} {list(mask.shape)}"
        )
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    kinds = list(dict.fromkeys(layer_types))
    if "sliding_attention" not in kinds:
        return _for_implementation(config, mask, dtype)
    other = [kind for kind in kinds if kind not in BIDIRECTIONAL_KINDS]
    if other:
        raise ValueError(f"4-D attention masks are fitted to full and sliding-window layers only, not to {other[0]}")
    masks = {}
    for kind in kinds:
        layer = layer_types.index(kind)
        window = layer_kwargs[layer].get("sliding_window") if kind == "sliding_attention" else None
        masks[kind] = _for_implementation(config, _layer_mask(mask, cache, layer, new_tokens, window), dtype)
    return masks[kinds[0]] if len(kinds) == 1 else masks


def _layer_mask(mask: Tensor, cache: Any, layer: int, new_tokens: int, window: int | None) -> Tensor:
    """``mask`` over the keys layer ``layer`` attends to, within ``window`` when it has one."""
    total = mask.shape[-1]
    length, offset = cache.get_mask_sizes(new_tokens, layer) if cache is not None else (total, 0)
    mask = mask[..., offset : offset + length]
    if window is None:
        return mask
    queries = torch.arange(total - new_tokens, total, device=mask.device)[:, None]
    keys = torch.arange(offset, offset + length, device=mask.device)[None, :]
    return mask & (keys > queries - window)


def _for_implementation(config: PretrainedConfig, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Eager attention adds its mask to the scores: a bool mask there would add 1 where it allows."""
    if getattr(config, "_attn_implementation", None) != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
