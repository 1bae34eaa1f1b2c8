"""LLaVA (`LlavaForConditionalGeneration`): any vision tower (CLIP, SigLIP, ...) + any causal LM.

What introspection alone gets less well: the pixels are plain `[B, 3, H, W]` at the tower's fixed size, so
they are normalised on the device instead of through the CPU image processor, and the features are the
`vision_feature_layer` hidden state with CLS dropped exactly as the projector reads them.
"""

from __future__ import annotations

from torch import Tensor
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
)

from vugen_adapters.auto import AutoAdapter, normalized_pixels
from vugen_adapters.tiny import TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id

LM_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LlavaAdapter(AutoAdapter):
    """LLaVA-family VLMs (llava-hf checkpoints). Arguments as for `AutoAdapter`."""

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """Plain normalised pixels at the tower's native size."""
        return {"pixel_values": normalized_pixels(images, self.image_processor, self.dtype)}

    @property
    def lora_target_modules(self) -> list[str]:
        """Attention and MLP projections of the language model."""
        return LM_LINEAR_LAYERS


def _tiny_llava(vision: dict, image_processor, strategy: str, feature_layer: int, extra_tokens: int):
    tokenizer = tiny_tokenizer(["<image>"], image_placeholder="<image>")
    config = LlavaConfig(
        vision_config=vision | TINY_VISION | {"image_size": 32, "patch_size": 4},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer)} | TINY_TEXT,
        image_token_index=token_id(tokenizer, "<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy=strategy,
        image_token="<image>",
        num_additional_image_tokens=extra_tokens,
        chat_template=tokenizer.chat_template,
    )
    return LlavaForConditionalGeneration(config), processor


def tiny_llava_siglip():
    """Tiny LLaVA with a SigLIP tower (no CLS) and a Llama LM: the default test VLM."""
    return _tiny_llava(
        {"model_type": "siglip_vision_model"},
        SiglipImageProcessor(size={"height": 32, "width": 32}),
        strategy="full",
        feature_layer=-1,
        extra_tokens=0,
    )


def tiny_llava_clip():
    """Tiny LLaVA with a CLIP tower: CLS token dropped, features from the second-to-last layer."""
    return _tiny_llava(
        {"model_type": "clip_vision_model", "projection_dim": 32},
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        strategy="default",
        feature_layer=-2,
        extra_tokens=1,
    )
