"""InternVL (`InternVLForConditionalGeneration`, the `-hf` checkpoints): InternViT + pixel shuffle + MLP + Qwen2.

The tower emits a CLS token and a square patch grid; the projector pixel-shuffles 2x2 patches into one token
(`downsample_ratio` 0.5) in raster order, then runs a LayerNorm + MLP.

What introspection alone gets less well:
- the pixels are plain `[B, 3, H, W]` at the tower's fixed size (GotOcr2 processor with `crop_to_patches` off),
  so they are normalised on the device;
- `vision_feature_layer = -1` means the tower's `last_hidden_state` (after its final LayerNorm, when the
  checkpoint has one) in InternVL's own `get_image_features`, not `hidden_states[-1]`: the features here are
  the ones the projector reads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vugen_adapters.auto import AutoAdapter, normalized_pixels


class InternVLAdapter(AutoAdapter):
    """InternVL 2.5 / 3 checkpoints in transformers format (`OpenGVLab/InternVL3-*-hf`).

    Arguments as for `AutoAdapter`.
    """

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """Plain normalised pixels at the tower's native size (one tile, no cropping to patches)."""
        return {"pixel_values": normalized_pixels(images, self.image_processor, self.dtype)}

    def vision_tokens(self, output: Any) -> Tensor:
        """The tokens InternVL's projector reads: layer -1 is `last_hidden_state`, CLS dropped by "default"."""
        config = self.vlm.config
        if config.vision_feature_layer != -1:
            return super().vision_tokens(output)
        tokens = output.last_hidden_state
        return tokens[:, 1:] if config.vision_feature_select_strategy == "default" else tokens
