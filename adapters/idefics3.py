"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

A SigLIP-style tower that reads 5-D `(B, n_images, 3, H, W)` pixels plus a pixel mask, then a connector that
pixel-shuffles `scale_factor x scale_factor` patches into one token and projects it to the LM width.

What introspection alone gets wrong:
- the encoder size is the processor's `max_image_size` (one tile per image, splitting off), which the generic
  size lookup does not read;
- a list of images given to the image processor becomes ONE sample with many images, so the connector's
  per-sample output no longer lines up with the batch;
- `get_image_features` drops every image whose normalised pixels are all zero as "padding", so a uniformly
  mid-grey picture (0.5 under mean = std = 0.5) vanishes from the batch. We run the tower and the connector
  directly on every image instead.
The pixel shuffle keeps raster order (token `(i, j)` concatenates the patches of block `(i, j)`), which the tests
check with left/right and top/bottom contrast images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vugen_adapters.auto import AutoAdapter, normalized_pixels


class Idefics3Adapter(AutoAdapter):
    """Idefics3 checkpoints (e.g. `HuggingFaceM4/Idefics3-8B-Llama3`). Arguments as for `AutoAdapter`."""

    @property
    def native_size(self) -> tuple[int, int]:
        """One whole-image tile: the processor's `max_image_size` longest edge (or `image_size` when set)."""
        if self.image_size is not None:
            return (self.image_size, self.image_size)
        side = self.image_processor.max_image_size["longest_edge"]
        return (side, side)

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """One tile per sample: `(B, 1, 3, H, W)` normalised pixels and an all-ones pixel mask."""
        pixels = normalized_pixels(images, self.image_processor, self.dtype).unsqueeze(1)
        mask = torch.ones(pixels.shape[0], 1, *pixels.shape[-2:], dtype=torch.long, device=pixels.device)
        return {"pixel_values": pixels, "pixel_attention_mask": mask}

    def image_features(self, inputs: dict[str, Tensor]) -> Any:
        """Tower and connector on every image (no padding-image filter; our tiles are never padded)."""
        model = self.vlm.model
        pixels = inputs["pixel_values"].flatten(0, 1)
        hidden = model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=model.connector(hidden))


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM checkpoints (e.g. `HuggingFaceTB/SmolVLM2-2.2B-Instruct`): Idefics3's layout, its own classes."""
