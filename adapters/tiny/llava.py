"""Tiny LLaVA checkpoints: a SigLIP or a CLIP tower and a Llama LM."""

from __future__ import annotations

from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
)

from vugen_adapters.tiny.common import TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id


def _tiny_llava(
    vision: dict, image_processor, strategy: str, feature_layer: int, extra_tokens: int
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = tiny_tokenizer(["<image>"], image_placeholder="<image>")
    config = LlavaConfig(
        vision_config=TINY_VISION | {"image_size": 32, "patch_size": 4} | vision,
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


def tiny_llava_siglip() -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Tiny LLaVA with a SigLIP tower (no CLS) and a Llama LM: the default test VLM."""
    return _tiny_llava(
        {"model_type": "siglip_vision_model"},
        SiglipImageProcessor(size={"height": 32, "width": 32}),
        strategy="full",
        feature_layer=-1,
        extra_tokens=0,
    )


def tiny_llava_wide_tower() -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Tiny LLaVA whose SigLIP tower is wider (64) than the 48 values of its 4 x 4 RGB patch, as released towers are
    (SigLIP-so400m/14: 1152 channels for 588): the tiny default's 32 channels cannot pass a patch on, so held-out
    reconstruction of real images is capped by the tower (configs/real/, docs/real_images.md)."""
    return _tiny_llava(
        {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128},
        SiglipImageProcessor(size={"height": 32, "width": 32}),
        strategy="full",
        feature_layer=-1,
        extra_tokens=0,
    )


def tiny_llava_clip() -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Tiny LLaVA with a CLIP tower: CLS token dropped, features from the second-to-last layer."""
    return _tiny_llava(
        {"model_type": "clip_vision_model", "projection_dim": 32},
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        strategy="default",
        feature_layer=-2,
        extra_tokens=1,
    )
