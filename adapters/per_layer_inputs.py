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

# Tokens embedded at a time while the table's keys are computed: bounds the memory of one `[_CHUNK, D]` slice.
_CHUNK = 16384


@torch.no_grad()
def embedded_token_ids(embeds: Tensor, embed: Callable[[Tensor], Tensor], vocab_size: int, missing: int) -> Tensor:
    """The token id whose embedding each row of `embeds` is, bit for bit; `missing` where no token's is.

    Rows and table are looked up by their first 8 bytes (a sort and a binary search, not a comparison of every row
    with every token), then every candidate is compared whole.

    Args:
        embeds: `[B, T, D]` input embeddings: token embeddings and other rows (latent or image tokens) mixed.
        embed: The model's own input embedding, ids to rows, scaling included (what made the token rows).
        vocab_size: Number of token ids `embed` takes.
        missing: Id given to rows that are no token's embedding.

    Returns:
        `[B, T]` long ids. Where several tokens share one embedding, the lowest id.
    """
    rows = embeds.reshape(-1, embeds.shape[-1])
    tokens = torch.arange(vocab_size, device=rows.device)
    keys, order = torch.cat([_prefix_keys(embed(chunk).to(rows.dtype)) for chunk in tokens.split(_CHUNK)]).sort()
    queries = _prefix_keys(rows)
    first = torch.searchsorted(keys, queries)
    counts = torch.searchsorted(keys, queries, right=True) - first  # tokens whose first 8 bytes are the row's
    row = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts)
    pair = torch.arange(len(row), device=rows.device)
    candidate = order[first[row] + pair - (counts.cumsum(0) - counts)[row]]
    exact = (embed(candidate).to(rows.dtype) == rows[row]).all(-1)
    ids = torch.full((len(rows),), vocab_size, dtype=torch.long, device=rows.device)  # vocab_size: no token's
    ids.scatter_reduce_(0, row[exact], candidate[exact], reduce="amin")
    return ids.masked_fill(ids == vocab_size, missing).view(embeds.shape[:-1])


def _prefix_keys(rows: Tensor) -> Tensor:
    """`[N, D]` rows -> `[N]` int64: the bytes of each row's first coordinates (8 bytes), as one number."""
    return rows.contiguous().view(torch.uint8)[:, :8].contiguous().view(torch.int64).squeeze(1)
