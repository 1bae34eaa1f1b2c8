"""Token ids back from input embeddings, for language models that embed each token once more per layer.

Gemma 3n and Gemma 4 (`hidden_size_per_layer_input` in the text config) add to every decoder layer an embedding of
the token id (`per_layer_inputs`). Given only `inputs_embeds`, they recover the ids by matching the embeddings against
their table, and fail on any row that is no token's embedding, as vugen's latent tokens are. `embedded_token_ids`
does that matching without failing: a row that is a token's embedding bit for bit gets that token's id, any other row
a placeholder the caller chooses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Coordinates compared for every (row, token) pair: a cheap filter before whole rows are compared.
_PREFIX = 4
# Tokens embedded and compared at a time: bounds the `[rows, _CHUNK, _PREFIX]` comparison.
_CHUNK = 4096


@torch.no_grad()
def embedded_token_ids(embeds: Tensor, embed: Callable[[Tensor], Tensor], vocab_size: int, missing: int) -> Tensor:
    """The token id whose embedding each row of `embeds` is, bit for bit; `missing` where no token's is.

    Args:
        embeds: `[B, T, D]` input embeddings: token embeddings and other rows (latent or image tokens) mixed.
        embed: The model's own input embedding, ids to rows, scaling included (what made the token rows).
        vocab_size: Number of token ids `embed` takes.
        missing: Id given to rows that are no token's embedding.

    Returns:
        `[B, T]` long ids. Where several tokens share the same embedding, the lowest id.
    """
    rows = embeds.reshape(-1, embeds.shape[-1])
    ids = torch.full((rows.shape[0],), vocab_size, dtype=torch.long, device=embeds.device)  # vocab_size: no match
    for start in range(0, vocab_size, _CHUNK):
        tokens = torch.arange(start, min(start + _CHUNK, vocab_size), device=embeds.device)
        table = embed(tokens).to(rows.dtype)
        row, token = (rows[:, None, :_PREFIX] == table[None, :, :_PREFIX]).all(-1).nonzero(as_tuple=True)
        exact = (rows[row] == table[token]).all(-1)
        ids.scatter_reduce_(0, row[exact], tokens[token[exact]], reduce="amin")
    return ids.masked_fill(ids == vocab_size, missing).view(embeds.shape[:-1])
