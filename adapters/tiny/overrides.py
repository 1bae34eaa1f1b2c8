"""Per-architecture overrides of the generic tiny build, as data: model_type -> what the generic shrink and
processor builder cannot know. Each entry says why.

Keys of an entry (all optional):
    config: dotted config keys -> values, set after the generic shrink (`"text_config.hidden_size": 64`); a token-id
        field may name its token (`"vision_start_token_id": "<|vision_bos|>"`) for the tiny tokenizer's id.
    processor_class: the processor class name where transformers maps the architecture to none.
    processor, image_processor, video_processor, feature_extractor: arguments of those constructors.
    sub_processor_classes: sub-processor attribute -> class name, where no mapping names one.
    tokens: extra special tokens for the tokenizer.
    named_tokens: named tokens of the tokenizer (`{"image_token": "<image>"}`) where the processor's defaults are not
        what the model looks for.
    placeholder: what the chat template writes for an image, where the processor's image token is not it ("" where
        the processor writes the image token itself, or puts the image tokens before the prompt).
    unavailable: the one-line reason the architecture cannot be built offline.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OVERRIDES"]

# LLaVA's default tower is CLIP: one CLS token the processor must count before the "default" strategy drops it.
_CLIP_CLS = {"processor": {"num_additional_image_tokens": 1}}
# Inkling 2's image processor `size` is one merged patch (patch 4 x merge 2 = 8 px), not the image.
_INKLING2 = {"image_processor": {"size": {"height": 8, "width": 8}}}
# VQ codes a model maps into its vocabulary by token name (`vocabulary_map`): the tiny codebook's 64 codes.
_CODES = range(64)
# BLIP-2's processors put `num_query_tokens` image tokens before the text themselves: the prompt holds none.
_QUERY_TOKENS_FIRST = {"placeholder": ""}

OVERRIDES: dict[str, dict[str, Any]] = {
    # Images and audio are VQ codes written into the vocabulary at fixed offsets, the ranges back to back and inside
    # `vocab_size`: tiny codebooks at the bottom of the tiny vocabulary (sharing rows with text tokens, which a random
    # model does not mind).
    "apertus1p5": {
        "config": {
            "vision_config.codebook_size": 64,
            "audio_config.codebook_size": 64,
            "image_token_offset": 0,
            "audio_token_offset": 64,
        }
    },
    # The processor resizes only to 490 or 980 px and the projector knows only the real patch counts (1225 patches
    # -> 128 queries): 490 px images in 14 px patches, which a 32-wide two-layer tower runs in a blink.
    "aria": {
        "config": {"vision_config.image_size": 490, "vision_config.patch_size": 14},
        "image_processor": {"max_image_size": 490, "min_image_size": 490},
    },
    # The VQ-GAN's codes reach the language model by name: `IMGIMG` + the code's digits as letters (A = 0) + `Z`.
    "chameleon": {
        "config": {"vq_config.num_embeddings": len(_CODES)},
        "tokens": ["IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z" for code in _CODES],
    },
    # Its rotary embedding reads parameters per layer type, which the default config leaves empty: the released
    # layout, with M-RoPE sections for the tiny head (16 wide: sections summing to 8).
    "cohere_compass": {
        "config": {
            "text_config.rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
            }
        }
    },
    # Not in the processor mapping; its towers are Qwen3-VL's (vision and text sub-configs), and so is its processor.
    "cosmos3_omni": {"processor_class": "Qwen3VLProcessor"},
    # Its decoder reads a dense-or-sparse MLP kind a layer, which the default config leaves unset; the SAM stage's
    # last downsampling width is the second encoder's width (32 after the shrink). That encoder appends a fixed 144
    # learnt queries (12 x 12, the 768 px grid), which the processor counts as image / patch / 4 per side: 192 px.
    "deepseek_ocr2": {
        "config": {
            "text_config.mlp_layer_types": ["dense", "sparse"],
            "vision_config.sam_config.downsample_channels": [32, 32],
            "vision_config.sam_config.image_size": 192,
        },
        "image_processor": {"crop_to_patches": False},
    },
    # The language model is always a mixture of experts, but its default config leaves the expert counts unset.
    "diffusion_gemma": {
        "config": {
            "text_config.num_experts": 4,
            "text_config.top_k_experts": 2,
            "text_config.moe_intermediate_size": 64,
        }
    },
    # The sliding-window layers' head is the MLA query head: head_dim = qk_nope_head_dim + qk_rope_head_dim (16 + 16).
    # Its tower embeds single frames (a 2-D patch conv): the Qwen2-VL image processor must not pair frames.
    # Its audio conv stem flattens downsample_hidden_size channels (16 after the shrink) x feature_size / 8 bins.
    "dots3_note": {
        "config": {"text_config.head_dim": 32, "audio_config.conv_output_size": 16 * 16},
        "image_processor": {"temporal_patch_size": 1},
    },
    # The VQ-VAE's codes reach the language model by name (`<|visual token 000042|>`); the model finds images by
    # `<image>` and ends code rows with `<|extra_200|>`. The VQ attention is as wide as the deepest channels (32 * 4).
    "emu3": {
        "config": {"vq_config.hidden_size": 128},
        "named_tokens": {"image_token": "<image>"},
        "tokens": ["<image>", "<|extra_200|>"] + [f"<|visual token {code:06d}|>" for code in _CODES],
    },
    # Its video processor draws timestamps with a font file it cannot find offline; images need no drawing. Its
    # M-RoPE interleaves the height and width sections, which must be equal (the released [22, 22, 20]).
    "ernie4_5_vl_moe": {
        "video_processor": {"draw_on_frames": False},
        "config": {"text_config.rope_parameters.mrope_section": [3, 3, 2]},
    },
    # The mapping lists a protein-text model: nothing for a VLM wrapper to read images with.
    "evolla": {"unavailable": "EvollaForProteinText2Text reads protein sequences, not images"},
    # Not in the processor mapping; the converted checkpoints (KamilaMila/FastVLM-*) ship a LlavaProcessor. The tower
    # is timm's FastViT-HD, shrunk through timm's own arguments: five one-block stages, the attention ones 32 wide
    # (timm's attention head), features 32 * cls_ratio 2 = 64; they downsample 64x: 64 px patches of a 768 px image
    # (the released 1024 px, near enough): on a 2 x 2 grid its attention stages mix the whole image into every token.
    "fast_vlm": {
        "processor_class": "LlavaProcessor",
        "config": {
            "vision_config.model_args": {"inference_mode": True, "layers": [1] * 5, "embed_dims": [8, 8, 16, 32, 32]},
            "vision_config.hidden_size": 64,
        },
        "processor": {"patch_size": 64},
        "image_processor": {"size": {"shortest_edge": 768}, "crop_size": {"height": 768, "width": 768}},
    },
    # The processor looks its image and row-break tokens up by name in the vocabulary, and puts the image token in
    # front of every prompt itself: the chat template writes none.
    "fuyu": {"tokens": ["|SPEAKER|", "|NEWLINE|"], "placeholder": ""},
    # Its tower is timm's MobileNet-V5 encoder, which fixes its output: 2048 wide (the fusion adapter), 16 x 16 soft
    # tokens. What shrinks is the channels of its ~80 blocks (timm's channel_multiplier). Its fusion reads the 16x and
    # 32x downsampled stages: 128 px images (the released 768 px); at the generic 32 px those 2 x 2 and 1 x 1 maps
    # would be stretched over all 16 x 16 tokens.
    "gemma3n": {
        "config": {
            "vision_config.hidden_size": 2048,
            "vision_config.model_args": {"channel_multiplier": 0.0625},
        },
        "image_processor": {"size": {"height": 128, "width": 128}},
    },
    # Not in the processor mapping; zai-org/GLM-OCR ships GLM-4.6V's processor.
    "glm_ocr": {"processor_class": "Glm46VProcessor"},
    # Not in the processor mapping; a GLM-4.6V config (GLM-4.1V checkpoints) with its own image and video processors.
    "glmga": {"processor_class": "Glm46VProcessor"},
    # The default config names no deepstack map nor Window Q-Former rate (the released ones do): tower layer -> LM
    # layer pairs, and "1/2" (the spatial-offset groups halve the side); the Q-Former takes vision width // 64 heads,
    # so the tower is 64 wide. The model drops the CLS before the Q-Former pools, so the pooled count the processor
    # writes has no CLS to take off: its strategy is "full".
    "granite4_vision": {
        "processor": {"vision_feature_select_strategy": "full"},
        "config": {
            "downsample_rate": "1/2",
            "deepstack_layer_map": [[-1, 0], [-2, 1]],
            "vision_config.hidden_size": 64,
        },
    },
    # The processor refuses an image token its chat template did not wrap in the image start and end tokens.
    "hunyuan_vl": {"placeholder": "<|image_start|><|image|><|image_end|>"},
    "inkling2": _INKLING2,
    "inkling2_loop": _INKLING2,
    # The processor writes its class-level 64 image tokens (no constructor argument sets or saves another count): the
    # resampler emits as many latent queries.
    "kosmos-2": {"config": {"latent_query_num": 64}},
    # Its image processor cuts flattened patches of its own size (no vision-config key says it): the tiny patch, and
    # a few of them; the processor's image-token count is the resampler's latent queries (4 after the shrink).
    "kosmos-2.5": {
        "image_processor": {"patch_size": {"height": 4, "width": 4}, "max_patches": 64},
        "processor": {"num_image_tokens": 4},
    },
    "llava": _CLIP_CLS,
    "llava_next": _CLIP_CLS,
    "llava_next_video": _CLIP_CLS,
    # The mapping names a text-only causal LM: no image to verify a VLM wrapper on.
    "mistral4": {
        "unavailable": "Mistral4ForCausalLM reads no image (Mistral Small 4 checkpoints are mistral3 with a mistral4 "
        "text_config)"
    },
    # The adapter reads tower layers counted without the embeddings (index < depth), two of them. Its crops overlap
    # by margins of patches, 4 a side of a 27-patch crop: 1 of the tiny 8-patch crop, and a couple of crops. The
    # adapter's `hidden_size` is the tower's width. The processor writes its image tokens by name (`<im_patch>`).
    "molmo2": {
        "config": {
            "adapter_config.vision_feature_layer": [-1, -2],
            "adapter_config.hidden_size": 32,
            "image_patch_id": "<im_patch>",
            "image_start_token_id": "<im_start>",
            "low_res_image_start_token_id": "<low_res_im_start>",
            "image_end_token_id": "<im_end>",
            "frame_start_token_id": "<frame_start>",
            "frame_end_token_id": "<frame_end>",
        },
        "image_processor": {"overlap_margins": [1, 1], "max_crops": 2},
    },
    # The top-level `out_hidden_size` is the tower's merged patch: vision width 32 * merge_size 2 ** 2.
    "muse_spark": {"config": {"out_hidden_size": 128}},
    # Its processor requires a feature extractor, which no mapping names: its sound encoder is Parakeet's.
    "nemotron_h_omni": {"sub_processor_classes": {"feature_extractor": "ParakeetFeatureExtractor"}},
    # The default tower is a placeholder timm ResNet without `model_args`; the released ones are timm's Perception
    # Encoder ViT, shrunk through timm's own arguments (4 px patches of a 32 px tile, a CLS token), with the released
    # 2x2 pooling of the projected tokens, which the processor counts; at most 4 tiles, not 36.
    "perception_lm": {
        "config": {
            "vision_config.architecture": "vit_pe_core_large_patch14_336",
            "vision_config.model_args": {
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 4,
                "patch_size": 4,
                "img_size": [32, 32],
                "ref_feat_shape": [8, 8],
                "class_token": True,
            },
            "projector_pooling_ratio": 2,
        },
        "processor": {"patch_size": 4, "pooling_ratio": 2},
        "image_processor": {"max_num_tiles": 4},
    },
    # The thinker's M-RoPE finds images by `vision_start_token_id`, a field its config class lacks (the released
    # thinker_config.json adds it): the processor's vision_bos token.
    "qwen2_5_omni_thinker": {
        "config": {"vision_start_token_id": "<|vision_bos|>", "vision_end_token_id": "<|vision_eos|>"}
    },
    # Qwen2-VL's vision `hidden_size` is the merger's output width: the language model's.
    "qwen2_vl": {"config": {"vision_config.hidden_size": 64}},
    # PaliGemma's tower projects to `projection_dim` (the top-level key wins), which feeds the language model directly.
    "paligemma": {"config": {"projection_dim": 64, "vision_config.projection_dim": 64}},
    # As Qwen2.5-Omni's thinker.
    "qwen3_omni_moe_thinker": {
        "config": {"vision_start_token_id": "<|vision_bos|>", "vision_end_token_id": "<|vision_eos|>"}
    },
    # Its indexed-attention layers need the QSA indexer, which the default config leaves unset (one key head, a
    # budget divisible by the compression ratio, an index head as wide as the rotated part).
    "qwen4_exp": {
        "config": {
            "text_config.indexer_n_heads": 2,
            "text_config.indexer_kv_heads": 1,
            "text_config.indexer_head_dim": 16,
            "text_config.indexer_budget": 16,
            "text_config.indexer_compress_ratio": 4,
        }
    },
    # Step3p7's image processor `patch_size` is a crop edge in pixels (504), not the tower's patch; its text model
    # builds a sliding-window mask whatever its layer types, and the default window is None.
    "step3p7": {
        "image_processor": {"patch_size": 32, "max_image_size": 64},
        "config": {"text_config.sliding_window": 16},
    },
    # Its LayoutLMv3 image processor needs pytesseract for OCR only: off, the words come with the text. The model
    # starts decoding from `decoder_start_token_id`, which its config class lacks: the pad token, as T5's.
    "udop": {"image_processor": {"apply_ocr": False}, "config": {"decoder_start_token_id": "<|endoftext|>"}},
    # Not in the processor mapping (any encoder with any decoder); its default pair, ViT with a BERT decoder, is
    # TrOCR's. The model shifts labels right by the pad and start ids, which a user sets on the top-level config.
    "vision-encoder-decoder": {
        "processor_class": "TrOCRProcessor",
        "config": {"pad_token_id": "<|endoftext|>", "decoder_start_token_id": "<s>"},
    },
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
    # Unlimited-OCR feeds SAM's downsampled feature map to its CLIP encoder as patch embeddings: the last
    # downsampling width is the encoder's.
    "unlimited_ocr": {
        "config": {
            "vision_config.sam_config.output_channels": 32,
            "vision_config.sam_config.downsample_channels": [32, 32],
        }
    },
}
