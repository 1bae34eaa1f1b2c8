"""Tiny PaliGemma checkpoint: a SigLIP tower, a linear projector, a Gemma LM, and no chat template."""

from __future__ import annotations

from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

from vugen_adapters.tiny.common import TINY_TEXT, TINY_VISION, tiny_tokenizer


def tiny_paligemma() -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """Tiny PaliGemma: 32 px SigLIP tower (8x8 patches of 4 px), projector to a 64-wide Gemma LM.

    Like the real checkpoints, the tokenizer has no chat template and `PaliGemmaProcessor` adds the `<image>`,
    `<locXXXX>` and `<segXXX>` tokens, so the LM's vocabulary is sized after building the processor.
    """
    tokenizer = tiny_tokenizer([], image_placeholder="<image>")
    tokenizer.chat_template = None
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=64)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = PaliGemmaConfig(
        vision_config=TINY_VISION | {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 4},
        text_config={"model_type": "gemma", "vocab_size": len(tokenizer)} | TINY_TEXT,
        image_token_index=processor.image_token_id,
        projection_dim=TINY_TEXT["hidden_size"],
        hidden_size=TINY_TEXT["hidden_size"],
        vocab_size=len(tokenizer),
    )
    return PaliGemmaForConditionalGeneration(config), processor
