"""What a language model does by itself, measured once on a few tokens when `AutoAdapter` loads.

vugen runs a VLM's language model on embeddings with positions and masks of its own making. Two things the model does
differently from one architecture to the next are read off the model rather than named per family:

- `position_offset`: where the model counts positions from when it numbers the tokens itself (0 for most; Kosmos-2's
  sinusoidal table starts at `padding_idx + 1`);
- `takes_is_causal`: whether the call may carry `is_causal=True` (vugen passes it because some VLMs mark their language
  model bidirectional for the image prefix, PaliGemma's; DiffusionGemma's layers pass their own and refuse a second).

Both run at load, before LoRA hooks or sharding wrap the language model (measured later they gave wrong answers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# Offsets tried besides `pad_token_id + 1`: 0 first, so that relative encodings (RoPE), equal at every offset, get 0.
_OFFSETS = (0, 1, 2)


def position_offset(language_model: nn.Module, embeds: Tensor | None, pad_token_id: Any) -> int:
    """What `language_model` adds to 0-based positions when it numbers the tokens itself.

    Its own pass (no `position_ids`) on `embeds` against passes at `arange + k`, for k in 0, 1, 2 and `pad_token_id
    + 1`: the first k that reproduces the own pass wins. 0 when none does, or when the model does not run without
    `position_ids` (the `positions` check of `vugen check` then says so).

    Args:
        language_model: the decoder stack, taking `inputs_embeds`.
        embeds: `[1, T, D]` unpadded probe embeddings, or None when the adapter could make none.
        pad_token_id: the text config's pad id (an int, or None).
    """
    own = own_hidden_states(language_model, embeds)
    if own is None:
        return 0
    # Within a thousandth of the scale, not bit for bit: the model may build its positions in another dtype or shape
    # (M-RoPE's three sections) than the ones passed.
    tolerance = 1e-3 * own.abs().max().item()
    extra = [pad_token_id + 1] if isinstance(pad_token_id, int) else []
    for offset in dict.fromkeys([*_OFFSETS, *extra]):
        shifted = own_hidden_states(language_model, embeds, offset)
        if shifted is not None and (shifted - own).abs().max().item() <= tolerance:
            return offset
    return 0


def own_hidden_states(language_model: nn.Module, embeds: Tensor | None, offset: int | None = None) -> Tensor | None:
    """The last hidden states of `embeds`, the model numbering the tokens itself (offset None) or from `offset`. None
    when it does not run so (positions required, past its table, a model the adapter cannot read): the conformance
    checks report that where it matters instead of failing the load."""
    if embeds is None:
        return None
    positions = None if offset is None else torch.arange(embeds.shape[1], device=embeds.device)[None] + offset
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    try:
        with torch.no_grad():
            output = language_model(  # a copy: some models add their positions in place (GIT)
                inputs_embeds=embeds.clone(),
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                return_dict=True,
            )
        return output.last_hidden_state
    except Exception:  # noqa: BLE001  whatever stops it, it cannot say where the model counts from
        return None


def takes_is_causal(language_model: nn.Module, embeds: Tensor | None) -> bool:
    """False only where passing `is_causal=True` raises about it (layers that pass their own `is_causal` together with
    the call's: "multiple values for keyword argument"); any other failure is not about the flag, and the real calls
    will report it."""
    if embeds is None:
        return True
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    try:
        with torch.no_grad():
            language_model(inputs_embeds=embeds.clone(), attention_mask=mask, use_cache=False, is_causal=True)
    except TypeError as error:
        return "is_causal" not in str(error)
    except Exception:  # noqa: BLE001  see the docstring
        return True
    return True
