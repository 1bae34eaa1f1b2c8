"""Tiny InternVL checkpoint (transformers format): InternViT with CLS, pixel shuffle, a Qwen2 LM."""

from __future__ import annotations

from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
)

from vugen_adapters.tiny.common import TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def tiny_internvl() -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """Tiny InternVL: 32 px InternViT (8x8 patches of 4 px + CLS), pixel-shuffled 2x2 into 16 tokens, Qwen2 LM."""
    tokenizer = tiny_tokenizer(list(IMAGE_TOKENS.values()), image_placeholder="<IMG_CONTEXT>", **IMAGE_TOKENS)
    size = {"height": 32, "width": 32}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=16,
        chat_template=tokenizer.chat_template,
    )
    config = InternVLConfig(
        vision_config=TINY_VISION | {"image_size": 32, "patch_size": 4},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer)} | TINY_TEXT,
        image_token_id=token_id(tokenizer, "<IMG_CONTEXT>"),
        image_seq_length=16,
    )
    return InternVLForConditionalGeneration(config), processor
