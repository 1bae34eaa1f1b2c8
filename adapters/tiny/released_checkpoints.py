"""The released checkpoints' geometry, as data: one `Released` entry per family with configs in `configs/`, copied
from the checkpoint's published `config.json` and `preprocessor_config.json` (their keys as published; an uncertain
value says so in its comment). `vugen_adapters.tiny.released` builds random models from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["QWEN_TOKENS", "RELEASED", "Released"]

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]
BICUBIC, BILINEAR, LANCZOS = 3, 2, 1  # PIL resampling codes, as preprocessor_config.json writes them
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# SigLIP so400m/14, the tower of Idefics3, SmolVLM, PaliGemma and Gemma 3 (each at its own image size).
SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
}


def _no_cut(vision_layers: int, text_layers: int) -> dict[str, dict[str, Any]]:
    return {}


class Released(NamedTuple):
    """The geometry of one released checkpoint, as its files publish it."""

    checkpoint: str  # the hub id configs/<family>/adapter.yaml names
    config: dict[str, Any]  # config.json: top-level fields, "vision_config" and "text_config" (released depths)
    image_processor: dict[str, Any]  # preprocessor_config.json
    processor: dict[str, Any]  # processor settings (image token counts, ...)
    min_layers: tuple[int, int] = (1, 1)  # (tower, LM) blocks the family's layer structure needs
    # (tower blocks, LM blocks) -> {"vision_config" / "text_config": per-layer fields at that depth}: NOT released
    cut: Callable[[int, int], dict[str, dict[str, Any]]] = _no_cut


# The Qwen processors: flat 14 (16) px patches merged 2x2 under a pixel budget (min_pixels / max_pixels, which
# transformers 5 writes as size.shortest_edge / longest_edge); the adapter sizes images itself.
_QWEN2_PIXELS = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},  # min_pixels 3136, max_pixels 12845056
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "resample": BICUBIC,
}

RELEASED: dict[str, Released] = {
    # llava-hf/llava-1.5-7b-hf: config.json vision_config (CLIP ViT-L/14-336) hidden_size 1024, intermediate_size 4096,
    # num_attention_heads 16, num_hidden_layers 24, image_size 336, patch_size 14, projection_dim 768;
    # vision_feature_layer -2, vision_feature_select_strategy "default", projector_hidden_act gelu; text_config
    # (Vicuna-7B v1.5 = LlamaConfig defaults) hidden_size 4096, intermediate_size 11008, 32 heads, 32 kv heads,
    # 32 layers, rms_norm_eps 1e-5, rope_theta 10000, max_position_embeddings 4096. preprocessor_config.json:
    # CLIPImageProcessor shortest_edge 336, crop 336x336, CLIP mean / std, bicubic; processor patch_size 14, one
    # extra (CLS) image token. Tower cut to 2 blocks at least: the projector reads the second-to-last one.
    "llava": Released(
        checkpoint="llava-hf/llava-1.5-7b-hf",
        config={
            "model_type": "llava",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
                "hidden_act": "quick_gelu",
            },
            "text_config": {
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "num_hidden_layers": 32,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "max_position_embeddings": 4096,
            },
        },
        image_processor={
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "resample": BICUBIC,
        },
        processor={"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
        min_layers=(2, 1),
    ),
    # Qwen/Qwen2-VL-2B-Instruct: config.json hidden_size 1536, intermediate_size 8960, num_attention_heads 12,
    # num_key_value_heads 2, num_hidden_layers 28, rms_norm_eps 1e-6, rope_theta 1e6, rope_scaling mrope
    # [16, 24, 24], max_position_embeddings 32768; vision_config depth 32, embed_dim 1280, mlp_ratio 4, num_heads 16,
    # hidden_size 1536 (the merger's output), patch_size 14, spatial_merge_size 2, temporal_patch_size 2.
    # preprocessor_config.json: min_pixels 3136, max_pixels 12845056, CLIP mean / std, bicubic.
    "qwen2_vl": Released(
        checkpoint="Qwen/Qwen2-VL-2B-Instruct",
        config={
            "model_type": "qwen2_vl",
            "vision_config": {
                "depth": 32,
                "embed_dim": 1280,
                "mlp_ratio": 4,
                "num_heads": 16,
                "hidden_size": 1536,
                "hidden_act": "quick_gelu",
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            "text_config": {
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "num_hidden_layers": 28,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                "max_position_embeddings": 32768,
            },
        },
        image_processor=_QWEN2_PIXELS,
        processor={},
    ),
    # Qwen/Qwen2.5-VL-3B-Instruct: config.json hidden_size 2048, intermediate_size 11008, num_attention_heads 16,
    # num_key_value_heads 2, num_hidden_layers 36, rms_norm_eps 1e-6, rope_theta 1e6, rope_scaling mrope
    # [16, 24, 24], max_position_embeddings 128000; vision_config depth 32, hidden_size 1280, intermediate_size 3420,
    # num_heads 16, hidden_act silu, out_hidden_size 2048, patch_size 14, spatial_merge_size 2, temporal_patch_size 2,
    # window_size 112, fullatt_block_indexes [7, 15, 23, 31]. preprocessor_config.json: as Qwen2-VL's.
    # Cut: 2 tower blocks at least, the last one full attention (as blocks 7, 15, ...), the others windowed.
    "qwen2_5_vl": Released(
        checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
        config={
            "model_type": "qwen2_5_vl",
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "hidden_act": "silu",
                "out_hidden_size": 2048,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
            "text_config": {
                "hidden_size": 2048,
                "intermediate_size": 11008,
                "num_attention_heads": 16,
                "num_key_value_heads": 2,
                "num_hidden_layers": 36,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                "max_position_embeddings": 128000,
            },
        },
        image_processor=_QWEN2_PIXELS,
        processor={},
        min_layers=(2, 1),
        cut=lambda vision, text: {"vision_config": {"fullatt_block_indexes": [vision - 1]}},
    ),
    # Qwen/Qwen3-VL-2B-Instruct: config.json text_config hidden_size 2048, intermediate_size 6144, num_attention_heads
    # 16, num_key_value_heads 8, head_dim 128, num_hidden_layers 28, rms_norm_eps 1e-6, rope_theta 5e6, rope_scaling
    # {mrope_interleaved, mrope_section [24, 20, 20]}, max_position_embeddings 262144; vision_config depth 24,
    # hidden_size 1024, intermediate_size 4096, num_heads 16, hidden_act gelu_pytorch_tanh, out_hidden_size 2048,
    # patch_size 16, spatial_merge_size 2, temporal_patch_size 2, num_position_embeddings 2304,
    # deepstack_visual_indexes [5, 11, 17]. preprocessor_config.json: patch_size 16, merge_size 2, size
    # {shortest_edge 65536, longest_edge 16777216}, mean / std 0.5. (intermediate_size 6144 is the Qwen3-1.7B LM's,
    # which this model's LM is: recalled, not read from the file here.) Cut: one deepstack tap, at block 0.
    "qwen3_vl": Released(
        checkpoint="Qwen/Qwen3-VL-2B-Instruct",
        config={
            "model_type": "qwen3_vl",
            "vision_config": {
                "depth": 24,
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_heads": 16,
                "hidden_act": "gelu_pytorch_tanh",
                "out_hidden_size": 2048,
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 2304,
                "deepstack_visual_indexes": [5, 11, 17],
            },
            "text_config": {
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "num_hidden_layers": 28,
                "rms_norm_eps": 1e-6,
                "rope_theta": 5000000.0,
                "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [24, 20, 20]},
                "max_position_embeddings": 262144,
            },
        },
        image_processor={
            "patch_size": 16,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "size": {"shortest_edge": 65536, "longest_edge": 16777216},
            "image_mean": HALF,
            "image_std": HALF,
            "resample": BICUBIC,
        },
        processor={},
        cut=lambda vision, text: {"vision_config": {"deepstack_visual_indexes": [0]}},
    ),
    # HuggingFaceM4/Idefics3-8B-Llama3: config.json scale_factor 2; vision_config (SigLIP so400m) hidden_size 1152,
    # intermediate_size 4304, num_attention_heads 16, num_hidden_layers 27, image_size 364, patch_size 14;
    # text_config (Llama 3.1 8B) hidden_size 4096, intermediate_size 14336, num_attention_heads 32,
    # num_key_value_heads 8, num_hidden_layers 32, rms_norm_eps 1e-5, rope_theta 500000, rope_scaling llama3
    # (factor 8, low / high freq factors 1 / 4, original_max_position_embeddings 8192), max_position_embeddings
    # 131072. preprocessor_config.json: do_image_splitting, size longest_edge 1456 (4 tiles), max_image_size
    # longest_edge 364, mean / std 0.5, resample lanczos; processor image_seq_len 169 (26x26 / 2x2).
    "idefics3": Released(
        checkpoint="HuggingFaceM4/Idefics3-8B-Llama3",
        config={
            "model_type": "idefics3",
            "scale_factor": 2,
            "vision_config": {
                **SIGLIP_SO400M,
                "image_size": 364,
            },
            "text_config": {
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "num_hidden_layers": 32,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "max_position_embeddings": 131072,
            },
        },
        image_processor={
            "do_image_splitting": True,
            "size": {"longest_edge": 4 * 364},
            "max_image_size": {"longest_edge": 364},
            "image_mean": HALF,
            "image_std": HALF,
            "resample": LANCZOS,
        },
        processor={"image_seq_len": 169},
    ),
    # HuggingFaceTB/SmolVLM-Instruct (2.2B): an `idefics3` checkpoint (Idefics3ForConditionalGeneration), config.json
    # scale_factor 3; vision_config (SigLIP so400m at 384 px) hidden_size 1152, intermediate_size 4304,
    # num_attention_heads 16, num_hidden_layers 27, image_size 384, patch_size 14; text_config (SmolLM2-1.7B)
    # hidden_size 2048, intermediate_size 8192, num_attention_heads 32, num_key_value_heads 32, num_hidden_layers
    # 24, rms_norm_eps 1e-5, rope_theta 273768, max_position_embeddings 16384. preprocessor_config.json:
    # do_image_splitting, size longest_edge 1536, max_image_size longest_edge 384, mean / std 0.5, resample lanczos;
    # processor image_seq_len 81 (27x27 / 3x3). (max_position_embeddings recalled, less certain than the rest.)
    "smolvlm": Released(
        checkpoint="HuggingFaceTB/SmolVLM-Instruct",
        config={
            "model_type": "idefics3",
            "scale_factor": 3,
            "vision_config": {
                **SIGLIP_SO400M,
                "image_size": 384,
            },
            "text_config": {
                "model_type": "llama",
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "num_hidden_layers": 24,
                "rms_norm_eps": 1e-5,
                "rope_theta": 273768.0,
                "max_position_embeddings": 16384,
            },
        },
        image_processor={
            "do_image_splitting": True,
            "size": {"longest_edge": 4 * 384},
            "max_image_size": {"longest_edge": 384},
            "image_mean": HALF,
            "image_std": HALF,
            "resample": LANCZOS,
        },
        processor={"image_seq_len": 81},
    ),
    # google/paligemma-3b-mix-224: config.json hidden_size 2048, projection_dim 2048; vision_config (SigLIP so400m)
    # hidden_size 1152, intermediate_size 4304, num_attention_heads 16, num_hidden_layers 27, image_size 224,
    # patch_size 14, projection_dim 2048 (PaliGemmaConfig's default intermediate_size, 4096, is not the
    # checkpoint's); text_config (Gemma 2B) hidden_size 2048, intermediate_size 16384, num_attention_heads 8,
    # num_key_value_heads 1, head_dim 256, num_hidden_layers 18. preprocessor_config.json: SiglipImageProcessor
    # 224x224, mean / std 0.5, bicubic, image_seq_length 256.
    "paligemma": Released(
        checkpoint="google/paligemma-3b-mix-224",
        config={
            "model_type": "paligemma",
            "hidden_size": 2048,
            "projection_dim": 2048,
            "vision_config": {
                "model_type": "siglip_vision_model",
                **SIGLIP_SO400M,
                "image_size": 224,
                "projection_dim": 2048,
            },
            "text_config": {
                "model_type": "gemma",
                "hidden_size": 2048,
                "intermediate_size": 16384,
                "num_attention_heads": 8,
                "num_key_value_heads": 1,
                "head_dim": 256,
                "num_hidden_layers": 18,
            },
        },
        image_processor={
            "size": {"height": 224, "width": 224},
            "image_mean": HALF,
            "image_std": HALF,
            "resample": BICUBIC,
            "image_seq_length": 256,
        },
        processor={},
    ),
    # OpenGVLab/InternVL3-1B-hf: config.json downsample_ratio 0.5, image_seq_length 256, projector_hidden_act gelu,
    # vision_feature_layer -1, vision_feature_select_strategy "default"; vision_config (InternViT-300M-448px =
    # InternVLVisionConfig's defaults) hidden_size 1024, intermediate_size 4096, num_attention_heads 16,
    # num_hidden_layers 24, image_size 448, patch_size 14, layer_scale_init_value 0.1, use_qk_norm false; text_config
    # (Qwen2.5-0.5B) hidden_size 896, intermediate_size 4864, num_attention_heads 14, num_key_value_heads 2,
    # num_hidden_layers 24, rms_norm_eps 1e-6, rope_theta 1e6. preprocessor_config.json: GotOcr2 448x448,
    # crop_to_patches false, min / max patches 1 / 12, ImageNet mean / std, bicubic.
    "internvl": Released(
        checkpoint="OpenGVLab/InternVL3-1B-hf",
        config={
            "model_type": "internvl",
            "downsample_ratio": 0.5,
            "image_seq_length": 256,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "vision_config": {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                "image_size": [448, 448],
                "patch_size": [14, 14],
                "layer_scale_init_value": 0.1,
                "use_qk_norm": False,
            },
            "text_config": {
                "model_type": "qwen2",
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "num_hidden_layers": 24,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
            },
        },
        image_processor={
            "size": {"height": 448, "width": 448},
            "crop_to_patches": False,
            "min_patches": 1,
            "max_patches": 12,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
            "resample": BICUBIC,
        },
        processor={"image_seq_length": 256},
    ),
    # google/gemma-3-4b-it: config.json mm_tokens_per_image 256; vision_config (SigLIP so400m at 896 px) hidden_size
    # 1152, intermediate_size 4304, num_attention_heads 16, num_hidden_layers 27, image_size 896, patch_size 14,
    # vision_use_head false; text_config hidden_size 2560, intermediate_size 10240, num_attention_heads 8,
    # num_key_value_heads 4, head_dim 256, num_hidden_layers 34, query_pre_attn_scalar 256, sliding_window 1024
    # (every 6th layer full attention), rope_theta 1e6 with rope_scaling linear factor 8 (full layers),
    # rope_local_base_freq 10000 (sliding layers), rms_norm_eps 1e-6. preprocessor_config.json: Gemma3ImageProcessor
    # 896x896, mean / std 0.5, bilinear, pan and scan off; processor image_seq_length 256.
    # Cut: the first layers of the pattern, sliding-window ones (full attention from 6 layers): the 4096-token latent
    # block of the sampler is longer than the window.
    "gemma3": Released(
        checkpoint="google/gemma-3-4b-it",
        config={
            "model_type": "gemma3",
            "mm_tokens_per_image": 256,
            "vision_config": {
                "model_type": "siglip_vision_model",
                **SIGLIP_SO400M,
                "image_size": 896,
                "vision_use_head": False,
            },
            "text_config": {
                "model_type": "gemma3_text",
                "hidden_size": 2560,
                "intermediate_size": 10240,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "num_hidden_layers": 34,
                "query_pre_attn_scalar": 256,
                "sliding_window": 1024,
                "sliding_window_pattern": 6,  # layers 0-4 sliding, 5 full, ...: a cut keeps the first layers
                "rope_theta": 1000000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                "rope_local_base_freq": 10000.0,
                "rms_norm_eps": 1e-6,
            },
        },
        image_processor={
            "size": {"height": 896, "width": 896},
            "image_mean": HALF,
            "image_std": HALF,
            "resample": BILINEAR,
            "do_pan_and_scan": False,
        },
        processor={"image_seq_length": 256},
    ),
}
