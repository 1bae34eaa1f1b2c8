"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower, an average-pooling projector, a Gemma 3 LM.

The projector average-pools the square patch grid down to `mm_tokens_per_image` tokens (raster order), then
RMS-normalises and projects them. The LM alternates sliding-window and full-attention layers; the cache that
`run_language_model` returns holds both kinds, and the decoder stack builds both masks from the padding mask.

What introspection alone gets less well: the pixels are plain `[B, 3, H, W]` at the tower's fixed size (pan and
scan off), so they are normalised on the device. Gemma's `sqrt(hidden_size)` embedding scale lives in the
embedding module (`Gemma3TextScaledWordEmbedding`), so `embed_tokens` already returns what the decoder expects.
"""

from __future__ import annotations

from torch import Tensor

from vugen_adapters.auto import AutoAdapter, normalized_pixels


class Gemma3Adapter(AutoAdapter):
    """Gemma 3 vision-language checkpoints (`google/gemma-3-*-it`). Arguments as for `AutoAdapter`."""

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """Plain normalised pixels at the tower's native size."""
        return {"pixel_values": normalized_pixels(images, self.image_processor, self.dtype)}
