"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower, an average-pooling projector, a Gemma 3 LM.

The projector average-pools the square patch grid down to `mm_tokens_per_image` tokens (raster order), then
RMS-normalises and projects them. The LM alternates sliding-window and full-attention layers; the cache that
`run_language_model` returns holds both kinds, and the decoder stack builds both masks from the padding mask.

Introspection reads Gemma 3 whole, so the family declares nothing: with pan and scan off the pixels are plain
`[B, 3, H, W]` at the tower's fixed size, normalised on the device (`reads_plain_pixels`), and Gemma's
`sqrt(hidden_size)` embedding scale lives in the embedding module (`Gemma3TextScaledWordEmbedding`), so
`embed_tokens` already returns what the decoder expects. The class gives the family its registered name (`gemma3`)
and a class path that configs and bundles keep.
"""

from __future__ import annotations

from vugen_adapters.auto import AutoAdapter


class Gemma3Adapter(AutoAdapter):
    """Gemma 3 vision-language checkpoints (`google/gemma-3-*-it`). Arguments as for `AutoAdapter`."""
