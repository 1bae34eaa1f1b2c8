"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints: 8 px patches merged 2x2, M-RoPE text models."""

from __future__ import annotations

from typing import Any

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vugen_adapters.tiny.common import TINY_TEXT, TINY_VISION, tiny_tokenizer, token_id

_PATCH, _MERGE, _TEMPORAL = 8, 2, 2
_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# sum(mrope_section) must be head_dim / 2 = 8.
_TEXT_ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


def _tiny_parts(video_processor_class: type, mean: list[float], std: list[float]) -> dict[str, Any]:
    """Tokenizer, image and video processors shared by the Qwen recipes, plus the config's token ids."""
    tokenizer = tiny_tokenizer(_SPECIAL_TOKENS, image_placeholder="<|vision_start|><|image_pad|><|vision_end|>")
    layout = {"patch_size": _PATCH, "merge_size": _MERGE, "temporal_patch_size": _TEMPORAL}
    # Pixel budget for the processor's own resize (the adapter turns resizing off): 32x32 up to 256x256.
    sizes = {"size": {"shortest_edge": 32 * 32, "longest_edge": 256 * 256}, "image_mean": mean, "image_std": std}
    return {
        "tokenizer": tokenizer,
        "image_processor": Qwen2VLImageProcessor(**layout, **sizes),
        "video_processor": video_processor_class(**layout, **sizes),
        "chat_template": tokenizer.chat_template,
        "ids": {
            "image_token_id": token_id(tokenizer, "<|image_pad|>"),
            "video_token_id": token_id(tokenizer, "<|video_pad|>"),
            "vision_start_token_id": token_id(tokenizer, "<|vision_start|>"),
            "vision_end_token_id": token_id(tokenizer, "<|vision_end|>"),
        },
    }


def _text_config(tokenizer: Any, **rope: Any) -> dict[str, Any]:
    # The Qwen text configs default to the real vocabulary's special-token ids: point them into the tiny one.
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return TINY_TEXT | ids | {"vocab_size": len(tokenizer), "rope_parameters": _TEXT_ROPE | rope}


def _processor(processor_class: type, parts: dict[str, Any]) -> Any:
    return processor_class(
        **{k: parts[k] for k in ("image_processor", "tokenizer", "video_processor", "chat_template")}
    )


def tiny_qwen2_vl() -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Tiny Qwen2-VL: 8-px patches merged 2x2, M-RoPE text model, CLIP normalisation."""
    parts = _tiny_parts(Qwen2VLVideoProcessor, mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954] * 3)
    vision = {
        "depth": TINY_VISION["num_hidden_layers"],
        "embed_dim": TINY_VISION["hidden_size"],
        "num_heads": TINY_VISION["num_attention_heads"],
        "mlp_ratio": TINY_VISION["intermediate_size"] // TINY_VISION["hidden_size"],
        "hidden_size": TINY_TEXT["hidden_size"],  # Qwen2-VL's vision `hidden_size` is the merger's output width
        "patch_size": _PATCH,
        "spatial_merge_size": _MERGE,
        "temporal_patch_size": _TEMPORAL,
    }
    config = Qwen2VLConfig(vision_config=vision, text_config=_text_config(parts["tokenizer"]), **parts["ids"])
    return Qwen2VLForConditionalGeneration(config), _processor(Qwen2VLProcessor, parts)


def _tiny_vision(**extra: Any) -> dict[str, Any]:
    """The tiny vision config shared by Qwen2.5-VL and Qwen3-VL (Qwen2-VL names its fields differently)."""
    return {
        "depth": TINY_VISION["num_hidden_layers"],
        "hidden_size": TINY_VISION["hidden_size"],
        "intermediate_size": TINY_VISION["intermediate_size"],
        "num_heads": TINY_VISION["num_attention_heads"],
        "out_hidden_size": TINY_TEXT["hidden_size"],
        "patch_size": _PATCH,
        "spatial_merge_size": _MERGE,
        "temporal_patch_size": _TEMPORAL,
    } | extra


def tiny_qwen2_5_vl() -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Tiny Qwen2.5-VL: windowed attention in vision layer 0 (windows of 2x2 merged tokens = 32 px), full in 1.

    32x32 images fit one window; 32x48 or 64x64 ones span several, which exercises the window un-permutation.
    """
    parts = _tiny_parts(Qwen2VLVideoProcessor, mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954] * 3)
    vision = _tiny_vision(window_size=2 * _MERGE * _PATCH, fullatt_block_indexes=[TINY_VISION["num_hidden_layers"] - 1])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=_text_config(parts["tokenizer"]), **parts["ids"])
    return Qwen2_5_VLForConditionalGeneration(config), _processor(Qwen2_5_VLProcessor, parts)


def tiny_qwen3_vl() -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """Tiny Qwen3-VL: interpolated 4x4 position-embedding grid, deepstack from vision layer 0, [-1, 1] pixels."""
    parts = _tiny_parts(Qwen3VLVideoProcessor, mean=[0.5] * 3, std=[0.5] * 3)
    vision = _tiny_vision(num_position_embeddings=16, deepstack_visual_indexes=[0])
    # Qwen3-VL interleaves the M-RoPE axes; released configs say so with `mrope_interleaved`.
    text = _text_config(parts["tokenizer"], mrope_interleaved=True)
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **parts["ids"])
    return Qwen3VLForConditionalGeneration(config), _processor(Qwen3VLProcessor, parts)
