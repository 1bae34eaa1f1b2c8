"""The generic shrink of a transformers config: every size field of every sub-config set to a tiny value.

`shrink_config_dict` walks the serialized config (`config.to_dict()`) and rewrites, in each (sub-)config, the keys
it knows by name: widths, depths, heads, head widths, experts, image and patch sizes, projector widths. The values
depend on the sub-config's role (the language model is 64 wide, vision and audio towers 32) and keep the ratios an
architecture needs: MLA rope and nope widths equal (and an MLA `head_dim` their sum where it was), sizes equal in the
deep config kept equal (kv heads and heads, codebook and hidden widths), `layer_types`-like per-layer lists cut to one
entry per kind (the depth grows to hold every kind), layer-index lists and sparse `per_layer_config` overrides mapped
onto the shrunk depth, pyramid stage lists kept one entry a stage, M-RoPE sections summing to half the rotary width
(per layer type where the rope parameters are). Rebuilding the config class from the shrunk dict then recomputes
whatever the class derives.

What the generic rules cannot know (a width that is a product of two others, a processor that counts pixels) lives
in `vugen_adapters.tiny.overrides` as data.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "TEXT_WIDTH",
    "VISION_WIDTH",
    "VOCAB_KEYS",
    "is_sub_config",
    "is_vision_role",
    "shrink_config_dict",
]

TEXT_WIDTH = 64
VISION_WIDTH = 32
HEADS, KV_HEADS = 4, 2
DEPTH = 2
IMAGE_SIZE, PATCH_SIZE = 32, 4  # 8x8 patches: a handful of image tokens after any 2x2 merge
EXPERTS, EXPERTS_PER_TOKEN = 4, 2
# SAM's configs initialise at std 1e-10 (weights meant to be loaded): a random tower that small returns the same tokens
# for every image, so no check could read anything from them. Below this, a tiny model initialises at the usual 0.02.
MIN_INITIALIZER_RANGE, INITIALIZER_RANGE = 1e-4, 0.02

# key -> value as a function of the sub-config's width W. One table: a key means the same in every config.
_WIDTH = (
    "hidden_size", "d_model", "embed_dim", "n_embd", "decoder_hidden_size", "mm_embed_dim", "output_proj_dims",
)  # fmt: skip
_FFN = (
    "intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "mlp_dim", "intermediate_size_mlp",
    "dense_intermediate_size", "shared_intermediate_size", "decoder_intermediate_size",
)  # fmt: skip
_EXPERT_FFN = (
    "moe_intermediate_size", "moe_hidden_size", "shared_expert_intermediate_size", "share_expert_dim",
    "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size",
)  # fmt: skip
_DEPTH = (
    "num_hidden_layers", "num_layers", "depth", "encoder_layers", "decoder_layers", "n_layers", "layers",
    "num_decoder_layers", "conf_num_hidden_layers", "decoder_num_layers", "resampler_depth", "num_global_layers",
)  # fmt: skip
_HEADS = (
    "num_attention_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads", "attention_heads",
    "n_heads", "swa_num_attention_heads", "num_sliding_attention_heads", "linear_num_heads", "linear_num_value_heads",
    "conf_num_attention_heads", "resampler_n_heads", "resampler_heads", "index_n_heads", "mamba_num_heads",
)  # fmt: skip
_KV_HEADS = ("num_key_value_heads", "swa_num_key_value_heads", "linear_num_key_heads")
# (follower, leader): equal in the deep config, kept equal in the tiny one (configs validate it: plain multi-head
# attention in GLM-5-Next and dots3, WavTokenizer's codebook without projections in Apertus 1.5).
_TIED = (
    ("num_key_value_heads", "num_attention_heads"),
    ("swa_num_key_value_heads", "swa_num_attention_heads"),
    ("codebook_dim", "hidden_size"),
)
_HEAD_DIM = (
    "head_dim", "d_kv", "swa_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
    "v_head_dim", "mamba_head_dim", "resampler_head_dim", "resampler_dim_head", "index_head_dim", "qk_rope_head_dim",
    "qk_nope_head_dim", "d_rel",
)  # fmt: skip
_TEXT_WIDTH_KEYS = (
    "out_hidden_size", "text_hidden_size", "output_dim", "adapter_out_dim", "projector_output_dim",
    "projector_hidden_size", "projection_hidden_size", "projection_intermediate_size", "alignment_intermediate_size",
    "word_embed_proj_dim", "hidden_size_per_layer_input", "ple_embed_dim", "projection_hidden_dim",
)  # fmt: skip
_VISION_WIDTH_KEYS = (
    "vision_hidden_size", "encoder_hidden_size", "adapter_in_dim", "adapter_input_size", "projector_input_dim",
)  # fmt: skip
_FIXED = {
    "kv_lora_rank": 32, "q_lora_rank": 32, "laurel_rank": 8, "hc_lowrank": 8, "loop_gate_rank": 8,
    "ssm_state_size": 16, "n_groups": 1, "n_group": 1, "topk_group": 1,
    "num_experts": EXPERTS, "n_routed_experts": EXPERTS, "num_local_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": EXPERTS_PER_TOKEN, "moe_topk": EXPERTS_PER_TOKEN, "moe_k": EXPERTS_PER_TOKEN,
    "n_shared_experts": 1, "moe_num_shared_experts": 1, "first_k_dense_replace": 1, "decoder_sparse_step": 1,
    "interleave_moe_layer_step": 1, "index_topk": 16, "num_query_tokens": 4, "latent_query_num": 4,
    "resampler_n_latents": 4, "resampler_num_latents": 4, "num_kv_shared_layers": 0, "max_window_layers": DEPTH,
    "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "num_position_embeddings": (IMAGE_SIZE // PATCH_SIZE) ** 2,
    # the largest images a tower's position table covers: the processor's up to 2x2 tiny images
    "max_image_size": 2 * IMAGE_SIZE, "max_img_size": 2 * IMAGE_SIZE, "min_image_size": IMAGE_SIZE,
    "mm_posemb_size": 4 * IMAGE_SIZE // PATCH_SIZE,
    "mm_tokens_per_image": 16, "projection_dim": VISION_WIDTH, "num_image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2,
    "sliding_window": 16, "sliding_window_size": 16, "attention_chunk_size": 16,
    "patch_embed_hidden_size": 3 * PATCH_SIZE**2,  # a flattened RGB patch (Pix2Struct, Kosmos-2.5)
    # Convolutional VQ image tokenizers (Chameleon, Emu3, Apertus 1.5) and audio codecs (WavTokenizer): one residual
    # block a resolution, channels a multiple of GroupNorm's 32 groups.
    "base_channels": 32, "latent_channels": 32, "num_res_blocks": 1, "num_filters": 4, "codebook_size": 64,
    "downsample_hidden_size": 16,  # the conv channels of Qwen3-Omni-style audio stems
}  # fmt: skip
# The text vocabulary, wherever a config repeats it (Inkling 2's head is `unpadded_vocab_size` wide).
VOCAB_KEYS = ("vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size")
_EXPERT_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
# Per-layer kinds the shrunk depth holds one layer of each (NemotronH's mamba / attention / MoE / MLP blocks).
_KIND_LISTS = ("layer_types", "layers_block_type", "mlp_layer_types")
_PER_LAYER_SIZES = ("intermediate_size",)  # an int, or a list of one per layer
_LIST_SIZES = (*_PER_LAYER_SIZES, "image_size", "patch_size")  # sizes that may be lists
_PER_LAYER_LISTS = (
    *_PER_LAYER_SIZES, "layer_types", "mlp_layer_types", "indexer_types", "layers_block_type", "no_rope_layers",
    "layer_rope_theta", "activation_sparsity_pattern",
)  # fmt: skip
_LAYER_INDEX_LISTS = (
    "full_attn_idxs", "fullatt_block_indexes", "deepstack_visual_indexes", "global_attn_indexes", "moe_layers",
    "cross_attention_layers", "intermediate_layers_indices", "spatial_target_layers", "kv_source_layers",
    "rope_scaling_layers", "ple_layer_ids", "mlp_only_layers",
)  # fmt: skip
_TEXT_ROLES = ("text", "llm", "language", "decoder", "dit")
_VISION_ROLES = ("vision", "visual", "vit", "siglip", "clip", "sam", "encoder", "audio", "vq", "perceiver", "qformer")
# Serialized dicts that are data, not sub-configs.
_NOT_SUB_CONFIGS = (
    "id2label", "label2id", "rope_parameters", "rope_scaling", "vocabulary_map", "quantization_config",
    "per_layer_config", "mtp_per_layer_config",
)  # fmt: skip
# Sparse per-layer overrides of heterogeneous configs: {"05": {"head_dim": 512}, ...} keyed by layer index.
_PER_LAYER_OVERRIDES = ("per_layer_config", "mtp_per_layer_config")


def is_sub_config(key: str, value: Any) -> bool:
    """Whether `value` under `key` of a serialized config is itself a serialized config."""
    if not isinstance(value, dict) or key in _NOT_SUB_CONFIGS:
        return False
    return "model_type" in value or key.endswith("_config") or key in ("encoder", "decoder")


def shrink_config_dict(config: dict[str, Any], vocab_size: int, rotary_sections: bool = False) -> dict[str, Any]:
    """Shrink a serialized config in place (and return it): the top level is a language model.

    Args:
        config: `PretrainedConfig.to_dict()` of the architecture's default config.
        vocab_size: vocabulary of the tiny tokenizer; every text `vocab_size` becomes it.
        rotary_sections: whether the text model splits its rotary width into M-RoPE sections (the default sections
            live in the modeling code, so the shrunk config must state them).
    """
    _shrink(config, vision=False, vocab_size=vocab_size, rotary_sections=rotary_sections)
    return config


def is_vision_role(key: str, value: dict[str, Any]) -> bool:
    """Whether the sub-config `value` under `key` is a vision, audio, VQ or resampler tower (narrow widths)."""
    if any(word in key for word in _TEXT_ROLES):
        return False
    name = f"{key} {value.get('model_type') or ''}"
    return any(word in name for word in _VISION_ROLES)


def _shrink(config: dict[str, Any], vision: bool, vocab_size: int, rotary_sections: bool) -> None:
    old_depth = _depth(config)
    # Multi-head attention stays so: DeepSeek-V3's MLA expands its latent into one key per query head.
    heads = config.get("num_attention_heads")
    multi_head = isinstance(heads, int) and config.get("num_key_value_heads") == heads
    old_layer_types = config.get("layer_types") if isinstance(config.get("layer_types"), list) else None
    for key, value in list(config.items()):
        if is_sub_config(key, value):
            text = any(word in key for word in _TEXT_ROLES)  # T5Gemma 2's encoder.text_config is a text model
            _shrink(value, not text and (vision or is_vision_role(key, value)), vocab_size, rotary_sections)
    _shrink_scalars(config, vision, vocab_size)
    if multi_head:
        config["num_key_value_heads"] = config["num_attention_heads"]
    depth = max([DEPTH] + [len(_kinds(config[key])) for key in _KIND_LISTS if isinstance(config.get(key), list)])
    if isinstance(config.get("depths"), list) and len(config["depths"]) == old_depth:  # a pyramid: a layer a stage
        depth = old_depth
        _shrink_stages(config, VISION_WIDTH if vision else TEXT_WIDTH)
    for key in _DEPTH:
        if isinstance(config.get(key), int) and not isinstance(config[key], bool) and config[key] > depth:
            config[key] = depth
    for key in _PER_LAYER_LISTS:
        if isinstance(config.get(key), list) and config[key]:
            config[key] = _per_layer(config[key], depth)
    for key in _LAYER_INDEX_LISTS:
        if isinstance(config.get(key), list):
            config[key] = _layer_indexes(config[key], old_depth or depth, depth)
    for key in _PER_LAYER_OVERRIDES:
        if isinstance(config.get(key), dict):
            sources = _source_layers(old_layer_types, config.get("layer_types"), old_depth or depth, depth)
            config[key] = _per_layer_overrides(config[key], sources, vision, vocab_size)
    _fix_feature_layers(config, depth)
    if isinstance(config.get("image_grid_pinpoints"), list):  # tiling layouts in multiples of the tiny image
        config["image_grid_pinpoints"] = [
            [IMAGE_SIZE, 2 * IMAGE_SIZE],
            [2 * IMAGE_SIZE, IMAGE_SIZE],
            [2 * IMAGE_SIZE] * 2,
        ]
    if isinstance(config.get("rope_parameters"), dict) and not vision:
        _shrink_rope(config, rotary_sections)


def _depth(config: dict[str, Any]) -> int | None:
    for key in _DEPTH:
        if isinstance(config.get(key), int) and not isinstance(config[key], bool):
            return config[key]
    return None


def _shrink_scalars(config: dict[str, Any], vision: bool, vocab_size: int) -> dict[str, Any]:
    """Every scalar size field of one (sub-)config or per-layer override rewritten in place (and returned)."""
    tied = [
        (follower, leader)
        for follower, leader in _TIED
        if follower in config and config[follower] == config.get(leader)
    ]
    mla_head = _is_int(config.get("head_dim")) and config["head_dim"] == _mla_query_head(config)
    for key, value in list(config.items()):
        new = _shrunk_value(key, value, vision, vocab_size)
        if new is not None:
            config[key] = new
    for follower, leader in tied:
        config[follower] = config[leader]
    if "head_dim" in config and config["head_dim"] is None and _is_int(config.get("num_attention_heads")):
        config["head_dim"] = (VISION_WIDTH if vision else TEXT_WIDTH) // HEADS  # stated: HunYuan-VL reads it as is
    if config.get("num_experts_per_tok", 0) is None and any(_is_int(config.get(key)) for key in _EXPERT_COUNTS):
        config["num_experts_per_tok"] = EXPERTS_PER_TOKEN  # a router needs it (DeepSeek-OCR 2's default omits it)
    if isinstance(config.get("initializer_range"), float) and config["initializer_range"] < MIN_INITIALIZER_RANGE:
        config["initializer_range"] = INITIALIZER_RANGE
    if mla_head:  # an MLA query head stays the sum of its parts (Mistral 4 rotates head_dim * partial factor)
        config["head_dim"] = _mla_query_head(config)
    return config


def _mla_query_head(config: dict[str, Any]) -> int | None:
    parts = [config.get(key) for key in ("qk_nope_head_dim", "qk_rope_head_dim")]
    return sum(parts) if all(_is_int(part) for part in parts) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shrunk_value(key: str, value: Any, vision: bool, vocab_size: int) -> Any:
    """The tiny value of one scalar field (or of each entry of a list of sizes: Gemma 3n's per-layer
    `intermediate_size`, Molmo 2's [height, width] `image_size`; InternVL's `[height, width]` image and patch sizes),
    or None to keep it."""
    if key in ("image_size", "patch_size") and isinstance(value, list) and len(value) == 2:
        return [_FIXED[key]] * 2  # InternVL-style pairs (not Florence-2's per-stage patch list)
    if isinstance(value, list) and value and all(_is_int(entry) for entry in value) and key in _LIST_SIZES:
        shrunk = [_shrunk_value(key, entry, vision, vocab_size) for entry in value]
        return [entry if new is None else new for entry, new in zip(value, shrunk, strict=True)]
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    width = VISION_WIDTH if vision else TEXT_WIDTH
    table = (
        (_WIDTH, width),
        (_FFN, 2 * width),
        (_EXPERT_FFN, width),
        (_HEADS, HEADS),
        (_KV_HEADS, KV_HEADS),
        (_HEAD_DIM, width // HEADS),
        (_TEXT_WIDTH_KEYS, TEXT_WIDTH),
        (_VISION_WIDTH_KEYS, VISION_WIDTH),
    )
    for keys, tiny in table:
        if key in keys:
            return min(value, tiny) if value > 0 else None
    if key in _FIXED:
        return min(value, _FIXED[key]) if value > 0 else None
    if key in VOCAB_KEYS and not vision:
        return vocab_size
    if key == "qk_head_dim":
        return 2 * (width // HEADS)  # nope + rope
    return None


def _kinds(values: list[Any]) -> list[Any]:
    """The distinct entries of a per-layer list, in order of first appearance."""
    kinds = []
    for value in values:
        if value not in kinds:
            kinds.append(value)
    return kinds


def _per_layer(values: list[Any], depth: int) -> list[Any]:
    """A per-layer list cut to `depth` layers keeping one layer of each kind (the last kind repeats to fill)."""
    kinds = _kinds(values)[:depth]
    return kinds + [kinds[-1]] * (depth - len(kinds))


def _layer_indexes(indexes: list[Any], old_depth: int, depth: int) -> list[Any]:
    """Layer indices of a deep model mapped proportionally onto `depth` layers (order kept, duplicates dropped)."""
    if not all(isinstance(index, int) for index in indexes):
        return indexes
    mapped = []
    for index in indexes:
        new = index * depth // max(old_depth, 1) if index >= 0 else max(index, -depth)
        if new not in mapped:
            mapped.append(min(new, depth - 1))
    return mapped


def _shrink_stages(config: dict[str, Any], width: int) -> None:
    """The per-stage lists of a pyramid (Muse Spark's audio tower) kept one entry a stage: one block, tiny widths."""
    config["depths"] = [1] * len(config["depths"])
    if isinstance(config.get("hidden_sizes"), list):
        config["hidden_sizes"] = [width] * len(config["hidden_sizes"])


def _source_layers(old_types: list[Any] | None, new_types: Any, old_depth: int, depth: int) -> list[int]:
    """For each layer of the shrunk model, the layer of the deep model it stands for: the first of its kind where
    the config lists layer types (as `_per_layer` keeps them), else the proportional one."""
    if old_types and isinstance(new_types, list) and all(kind in old_types for kind in new_types):
        return [old_types.index(kind) for kind in new_types[:depth]]
    return [index * old_depth // depth for index in range(depth)]


def _per_layer_overrides(
    overrides: dict[Any, dict[str, Any]], sources: list[int], vision: bool, vocab_size: int
) -> dict[str, dict[str, Any]]:
    """Sparse per-layer overrides re-keyed onto the shrunk layers (each takes its source layer's), values shrunk."""
    by_layer = {int(index): values for index, values in overrides.items()}
    shrunk = {}
    for index, source in enumerate(sources):
        if source in by_layer:
            shrunk[str(index)] = _shrink_scalars(dict(by_layer[source]), vision, vocab_size)
    return shrunk


def _fix_feature_layers(config: dict[str, Any], depth: int) -> None:
    """`vision_feature_layer` (an int or a list) must index the tower's hidden states: embeddings plus `depth`."""

    def clamp(index: int) -> int:
        return max(index, -(depth + 1)) if index < 0 else min(index, depth)

    value = config.get("vision_feature_layer")
    if isinstance(value, int):
        config["vision_feature_layer"] = clamp(value)
    elif isinstance(value, list):
        config["vision_feature_layer"] = [clamp(index) for index in value]


def _shrink_rope(config: dict[str, Any], rotary_sections: bool) -> None:
    """M-RoPE sections summing to half the rotated width, in the rope parameters or in each layer type's."""
    rope = config["rope_parameters"]
    if not rope:  # the modeling code's defaults, or per-layer-type parameters the override table states
        return
    if all(isinstance(value, dict) for value in rope.values()):  # {"full_attention": {...}, ...}
        for parameters in rope.values():
            _shrink_rope_parameters(config, parameters, rotary_sections)
    else:
        _shrink_rope_parameters(config, rope, rotary_sections)


def _shrink_rope_parameters(config: dict[str, Any], rope: dict[str, Any], rotary_sections: bool) -> None:
    head_dim = config.get("head_dim") or TEXT_WIDTH // HEADS
    if isinstance(config.get("qk_rope_head_dim"), int):
        head_dim = config["qk_rope_head_dim"]
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0
    if "mrope_section" in rope or rotary_sections:
        half = int(head_dim * factor) // 2
        if half < 3:  # three sections (time, height, width) need room: rotate more of a tiny head
            factor = 6 / head_dim
            half = 3
            rope["partial_rotary_factor"] = factor
            if "partial_rotary_factor" in config:
                config["partial_rotary_factor"] = factor
        sections = len(rope.get("mrope_section") or [0, 0, 0])
        rope["mrope_section"] = _split(half, sections)


def _split(total: int, parts: int) -> list[int]:
    """`total` split into `parts` positive integers, the first the largest (as Qwen's [16, 24, 24] reversed)."""
    base = total // parts
    return [total - base * (parts - 1)] + [base] * (parts - 1) if base else [1] * total
