"""Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower, an average-pooling projector, a Gemma 3 LM.

The projector average-pools the square patch grid down to `mm_tokens_per_image` tokens (raster order), then
RMS-normalises and projects them. The LM alternates sliding-window and full-attention layers; the cache that
`run_language_model` returns holds both kinds, and the decoder stack builds both masks from the padding mask.

What introspection alone gets less well: the pixels are plain `[B, 3, H, W]` at the tower's fixed size (pan and
scan off), so they are normalised on the device. Gemma's `sqrt(hidden_size)` embedding scale lives in the
embedding module (`Gemma3TextScaledWordEmbedding`), so `embed_tokens` already returns what the decoder expects.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

from vugen_adapters.auto import AutoAdapter, normalized_pixels
from vugen_adapters.tiny import TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id

LM_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


class Gemma3Adapter(AutoAdapter):
    """Gemma 3 vision-language checkpoints (`google/gemma-3-*-it`). Arguments as for `AutoAdapter`."""

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """Plain normalised pixels at the tower's native size."""
        return {"pixel_values": normalized_pixels(images, self.image_processor, self.dtype)}

    @property
    def lora_target_modules(self) -> list[str]:
        """Attention and MLP projections of the language model."""
        return LM_LINEAR_LAYERS


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
