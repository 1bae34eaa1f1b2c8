"""Tiny Gemma 3 checkpoint: a SigLIP tower pooled to 16 image tokens, a sliding-window + full-attention LM."""

from __future__ import annotations

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

from vugen_adapters.tiny.common import TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id

IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def tiny_gemma3() -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """Tiny Gemma 3: 32 px SigLIP tower (8x8 patches), pooled to 16 image tokens; a sliding + a full layer.

    The sliding window (8 tokens) is shorter than a chat-templated prompt, so the KV-cache path crosses it.
    The projector weight, zero at init in transformers, is drawn at random so projector features carry signal.
    """
    tokenizer = tiny_tokenizer(list(IMAGE_TOKENS.values()), image_placeholder="<start_of_image>", **IMAGE_TOKENS)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        image_seq_length=16,
        chat_template=tokenizer.chat_template,
    )
    text = TINY_TEXT | {
        "model_type": "gemma3_text",
        "vocab_size": len(tokenizer),
        "query_pre_attn_scalar": TINY_TEXT["head_dim"],
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    config = Gemma3Config(
        vision_config=TINY_VISION | {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 4},
        text_config=text,
        mm_tokens_per_image=16,
        boi_token_index=token_id(tokenizer, IMAGE_TOKENS["boi_token"]),
        eoi_token_index=token_id(tokenizer, IMAGE_TOKENS["eoi_token"]),
        image_token_index=token_id(tokenizer, IMAGE_TOKENS["image_token"]),
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    return model, processor
