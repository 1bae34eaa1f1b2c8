"""Tiny Idefics3 and SmolVLM checkpoints: 32 px tiles, a pixel-shuffle connector, a Llama LM."""

from __future__ import annotations

from typing import Any

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)

from vugen_adapters.tiny.common import TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


def _tiny_config(config_class: type, tokenizer: Any) -> Any:
    return config_class(
        vision_config=TINY_VISION | {"image_size": 32, "patch_size": 4},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer)} | TINY_TEXT,
        scale_factor=2,
        image_token_id=token_id(tokenizer, "<image>"),
    )


def tiny_idefics3() -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Tiny Idefics3: 32 px tiles of 8x8 patches, pixel-shuffled 2x2 into 16 image tokens, Llama LM.

    The processor keeps the family's defaults (image splitting on, resize to a longest edge of two tiles), so the
    adapter has to switch splitting off itself, as for a real checkpoint.
    """
    tokenizer = tiny_tokenizer(IMAGE_TOKENS, image_placeholder="<image>")
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=16, chat_template=tokenizer.chat_template)
    return Idefics3ForConditionalGeneration(_tiny_config(Idefics3Config, tokenizer)), processor


def tiny_smolvlm() -> tuple[SmolVLMForConditionalGeneration, SmolVLMProcessor]:
    """Tiny SmolVLM: the same geometry as `tiny_idefics3`, SmolVLM's classes (and its mandatory video processor)."""
    tokenizer = tiny_tokenizer(IMAGE_TOKENS, image_placeholder="<image>")
    sizes = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    processor = SmolVLMProcessor(
        SmolVLMImageProcessor(**sizes),
        tokenizer,
        SmolVLMVideoProcessor(**sizes),
        image_seq_len=16,
        chat_template=tokenizer.chat_template,
    )
    return SmolVLMForConditionalGeneration(_tiny_config(SmolVLMConfig, tokenizer)), processor
