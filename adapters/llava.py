"""LLaVA (`LlavaForConditionalGeneration`): any vision tower (CLIP, SigLIP, ...) + any causal LM.

What introspection alone gets less well: the pixels are plain `[B, 3, H, W]` at the tower's fixed size, so
they are normalised on the device instead of through the CPU image processor, and the features are the
`vision_feature_layer` hidden state with CLS dropped exactly as the projector reads them.
"""

from __future__ import annotations

from torch import Tensor

from vugen_adapters.auto import AutoAdapter, normalized_pixels


class LlavaAdapter(AutoAdapter):
    """LLaVA-family VLMs (llava-hf checkpoints). Arguments as for `AutoAdapter`."""

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """Plain normalised pixels at the tower's native size."""
        return {"pixel_values": normalized_pixels(images, self.image_processor, self.dtype)}
