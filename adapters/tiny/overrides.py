"""Per-architecture overrides of the generic tiny build, as data: model_type -> what the generic shrink and
processor builder cannot know. Each entry says why.

Keys of an entry (all optional):
    config: dotted config keys -> values, set after the generic shrink (`"text_config.hidden_size": 64`).
    processor_class: the processor class name where transformers maps the architecture to none.
    processor, image_processor, video_processor, feature_extractor: arguments of those constructors.
    tokens: extra special tokens for the tokenizer.
    placeholder: what the chat template writes for an image, where the processor's image token is not it ("" where
        the processor puts the image tokens before the prompt itself).
    unavailable: the one-line reason the architecture cannot be built offline.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OVERRIDES"]

# LLaVA's default tower is CLIP: one CLS token the processor must count before the "default" strategy drops it.
_CLIP_CLS = {"processor": {"num_additional_image_tokens": 1}}

# BLIP-2's processors put `num_query_tokens` image tokens before the text themselves: the prompt holds none.
_QUERY_TOKENS_FIRST = {"placeholder": ""}

OVERRIDES: dict[str, dict[str, Any]] = {
    "blip-2": _QUERY_TOKENS_FIRST,
    # Florence-2's processor puts the image token before each prompt itself: the prompt holds none. Its DaViT tower
    # keeps per-stage lists the generic shrink leaves alone; its projector feeds the text model (64 wide).
    "florence2": {
        "placeholder": "",
        "config": {
            "vision_config.embed_dim": [32, 32, 32, 32],
            "vision_config.num_heads": [4, 4, 4, 4],
            "vision_config.num_groups": [4, 4, 4, 4],
            "vision_config.depths": [1, 1, 1, 1],
            "vision_config.projection_dim": 64,
        },
    },
    # GOT-OCR2's processor writes 256 image tokens per tile whatever it is given (a class default `save_pretrained`
    # does not keep): a 256 px tile of 4 px patches, downsampled 4x by the projector, makes 16x16; layer 0 windowed
    # to keep the 4096-patch encoder cheap. The SAM neck (and the projector convolutions after it) 32 wide.
    "got_ocr2": {
        "config": {
            "vision_config.image_size": 256,
            "vision_config.window_size": 8,
            "vision_config.global_attn_indexes": [1],
            "vision_config.output_channels": 32,
        }
    },
    # Inkling's image processor `size` is one patch (one image token), not the image.
    "inkling_mm_model": {"image_processor": {"size": {"height": 4, "width": 4}}},
    "instructblip": _QUERY_TOKENS_FIRST,
    "instructblipvideo": _QUERY_TOKENS_FIRST,
    # Janus's aligners project the vision tower and the VQ codes to `projection_dim`: the language model's width; its
    # VQ-GAN (image generation only) has widths the generic shrink does not know (group norms of 32 channels).
    "janus": {
        "config": {
            "vision_config.projection_dim": 64,
            "vq_config.projection_dim": 64,
            "vq_config.base_channels": 32,
            "vq_config.channel_multiplier": [1, 1, 1],  # 32 px / 2**2 = num_patches 8
            "vq_config.latent_channels": 32,
            "vq_config.num_embeddings": 256,
            "vq_config.image_token_embed_dim": 64,
        }
    },
    # Kimi-K2.5's projector normalizes each tower token (32 wide) before merging 2x2 of them.
    "kimi_k25": {"config": {"projection_hidden_size": 32}},
    # LFM2-VL counts image tokens after its 2x2 downsampling: one 32 px tile is (32 / 4 / 2) ** 2 = 16 tokens, the
    # most of one tile (as 256 of a real 512 px tile); a minimum above it would upscale a whole-size image.
    "lfm2_vl": {"image_processor": {"min_image_tokens": 4, "max_image_tokens": 16}},
    # Llama 4's vision adapter reads the pixel-shuffled patches (hidden_size / ratio**2 wide) with an MLP of
    # `intermediate_size` inputs; its two projector layers and the multimodal projector chain one width.
    "llama4": {
        "config": {
            "vision_config.intermediate_size": 128,
            "vision_config.projector_input_dim": 64,
            "vision_config.projector_output_dim": 64,
            "vision_config.vision_output_dim": 64,
        }
    },
    "llava": _CLIP_CLS,
    "llava_next": _CLIP_CLS,
    "llava_next_video": _CLIP_CLS,
    # LLaVA-OneVision counts `num_image_tokens` per tile of its SigLIP tower, (32 / 4) ** 2, before it adds the
    # unpadded grid and newlines: the measured count of the packed features is not it.
    "llava_onevision": {"processor": {"num_image_tokens": 64}, "image_processor": {"image_seq_length": 64}},
    # Mllama's tower concatenates its last hidden state with its 2 intermediate layers': 3 x 32 wide.
    "mllama": {"config": {"vision_config.vision_output_dim": 96}},
    # MuseGlimmer's adapter reads the pixel-shuffled tower output: 2x2 merged tokens of 32 channels.
    "muse_glimmer": {"config": {"out_hidden_size": 128}},
    # Pix2Struct's encoder reads flattened 4x4 RGB patches (48 values after the row and column ids) and is as wide as
    # the decoder that cross-attends to it. (Its processor always asks for 2048 patches: a class default.)
    "pix2struct": {
        "config": {"vision_config.patch_embed_hidden_size": 48, "vision_config.hidden_size": 64},
        "image_processor": {"patch_size": {"height": 4, "width": 4}},
    },
    # PP-Chart2Table's processor expands no placeholder: the prompt holds every image token, 4 for the tiny tower
    # (8x8 patches, downsampled 4x by the projector's two strided convolutions); its SAM neck 32 wide as GOT-OCR2's.
    "pp_chart2table": {"placeholder": "<|image|>" * 4, "config": {"vision_config.output_channels": 32}},
    # PP-FormulaNet's encoder ends in a projection to the decoder that cross-attends to it (64 wide); its SAM neck
    # and post-convolutions chain widths the generic shrink does not know.
    "pp_formulanet": {
        "config": {
            "vision_config.decoder_hidden_size": 64,
            "vision_config.output_channels": 32,
            "vision_config.post_conv_in_channels": 32,
            "vision_config.post_conv_mid_channels": 32,
            "vision_config.post_conv_out_channels": 64,
        }
    },
    # Qwen2-VL's vision `hidden_size` is the merger's output width: the language model's.
    "qwen2_vl": {"config": {"vision_config.hidden_size": 64}},
    # PaliGemma's tower projects to `projection_dim` (the top-level key wins), which feeds the language model directly.
    "paligemma": {"config": {"projection_dim": 64, "vision_config.projection_dim": 64}},
    # The processor refuses any max_image_size but 490 or 980 px: thousands of patches for a tiny tower, and a
    # projector that only knows the real patch counts.
    "aria": {
        "unavailable": "AriaImageProcessor resizes only to 490 or 980 px (max_image_size), too large for a tiny "
        "tower, and the projector knows only the real patch counts (projector_patch_to_query_dict)"
    },
    # Step3p7's image processor `patch_size` is a crop edge in pixels (504), not the tower's patch; its text model
    # builds a sliding-window mask whatever its layer types, and the default window is None.
    "step3p7": {
        "image_processor": {"patch_size": 32, "max_image_size": 64},
        "config": {"text_config.sliding_window": 16},
    },
    # Unlimited-OCR feeds SAM's downsampled feature map to its CLIP encoder as patch embeddings: the last
    # downsampling width is the encoder's.
    "unlimited_ocr": {
        "config": {
            "vision_config.sam_config.output_channels": 32,
            "vision_config.sam_config.downsample_channels": [32, 32],
        }
    },
}
