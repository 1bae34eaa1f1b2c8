"""LLaVA (`LlavaForConditionalGeneration`): any vision tower (CLIP, SigLIP, ...) + any causal LM.

Introspection reads LLaVA whole, so the family declares nothing: `AutoAdapter` normalises its plain `[B, 3, H, W]`
pixels on the device (`reads_plain_pixels`), reads the `vision_feature_layer` hidden state with CLS dropped exactly
as the projector does, and puts LoRA on the LM's linear layers. The class gives the family its registered name
(`llava`) and a class path that configs and bundles keep.
"""

from __future__ import annotations

from vugen_adapters.auto import AutoAdapter


class LlavaAdapter(AutoAdapter):
    """LLaVA-family VLMs (llava-hf checkpoints). Arguments as for `AutoAdapter`."""
