"""InternVL (`InternVLForConditionalGeneration`, the `-hf` checkpoints): InternViT + pixel shuffle + MLP + Qwen2.

The tower emits a CLS token and a square patch grid; the projector pixel-shuffles 2x2 patches into one token
(`downsample_ratio` 0.5) in raster order, then runs a LayerNorm + MLP.

What introspection alone gets wrong: `vision_feature_layer = -1` means the tower's `last_hidden_state` (after its
final LayerNorm, when the checkpoint has one) in InternVL's own `get_image_features`, not `hidden_states[-1]`: the
features here are the ones the projector reads. (With `crop_to_patches` off, the GotOcr2 processor gives plain
`[B, 3, H, W]` pixels at the tower's fixed size, which `AutoAdapter` normalises on the device by itself.)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vugen_adapters.auto import AutoAdapter


class InternVLAdapter(AutoAdapter):
    """InternVL 2.5 / 3 checkpoints in transformers format (`OpenGVLab/InternVL3-*-hf`).

    Arguments as for `AutoAdapter`.
    """

    def vision_tokens(self, output: Any) -> Tensor:
        """The tokens InternVL's projector reads: layer -1 is `last_hidden_state`, CLS dropped by "default"."""
        config = self.vlm.config
        if config.vision_feature_layer != -1:
            return super().vision_tokens(output)
        tokens = output.last_hidden_state
        return tokens[:, 1:] if config.vision_feature_select_strategy == "default" else tokens
