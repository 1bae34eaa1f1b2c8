"""A tiny offline checkpoint of any architecture of transformers' image-text-to-text mapping.

    build_tiny_architecture("glm4v", "/tmp/tiny-glm4v")

The architecture's own config class shrunk (`vugen_adapters.tiny.shrink`), its own processor built offline around
a locally trained tokenizer (`vugen_adapters.tiny.processor`), the per-architecture overrides of
`vugen_adapters.tiny.overrides` applied on top, random weights, `save_pretrained`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel, ProcessorMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from vugen.atomic import atomic_directory
from vugen.errors import VugenError
from vugen_adapters.tiny.common import CHAT_TEMPLATE
from vugen_adapters.tiny.overrides import OVERRIDES
from vugen_adapters.tiny.processor import (
    image_placeholder,
    processor_class,
    processor_special_tokens,
    tiny_processor,
    tokenizer_for,
)
from vugen_adapters.tiny.shrink import VOCAB_KEYS, is_sub_config, is_vision_role, shrink_config_dict
from vugen_adapters.tiny.verify import image_tokens_per_image, observed_image_token

__all__ = ["ARCHITECTURES", "TinyBuildError", "build_tiny_architecture", "tiny_architecture"]

ARCHITECTURES = tuple(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
# Processor arguments that fix how many tokens one image (or tile) expands into.
_COUNT_ARGUMENTS = ("image_seq_len", "image_seq_length", "num_image_tokens", "tokens_per_image")
# Token fields whose default is None but which the model reads all the same.
_UNSET_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
_TOKEN_FIELD = re.compile(r"^(\w+?)(?:_token)?(?:_id|_index|_ids)$")
# Special-token fields that mean the tokenizer's own roles.
_ROLE_FIELDS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "unk_token_id": "unk_token_id",
    "sep_token_id": "eos_token_id",
    "decoder_start_token_id": "bos_token_id",
    "forced_bos_token_id": "bos_token_id",
    "forced_eos_token_id": "eos_token_id",
    "mask_token_id": "unk_token_id",
}


class TinyBuildError(VugenError):
    """An architecture that cannot be built offline as a tiny checkpoint; the message is one line saying why."""


def tiny_architecture(arch: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random model of `arch` (a model_type of the image-text-to-text mapping) and its offline processor.

    Raises:
        TinyBuildError: `arch` is not in the mapping, or cannot be built offline (the message says why).
    """
    if arch not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise TinyBuildError(
            f"unknown architecture {arch!r}: expected a model_type of transformers' image-text-to-text mapping "
            f"({len(ARCHITECTURES)} known; `vugen tiny --list` prints them)"
        )
    override = OVERRIDES.get(arch, {})
    if "unavailable" in override:
        raise TinyBuildError(f"{arch}: {override['unavailable']}")
    with _one_line(arch):
        return _build(arch, override)


def build_tiny_architecture(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `arch` (weights, config, processor) to `directory`, all or nothing.

    Args:
        arch: a model_type of transformers' image-text-to-text mapping (`ARCHITECTURES`).
        directory: output folder (replaced when it exists).
        seed: torch seed of the random weights.

    Returns:
        The folder, ready for the Auto classes' `from_pretrained`.

    Raises:
        TinyBuildError: as `tiny_architecture`, or saving failed (the message says why).
    """
    torch.manual_seed(seed)
    model, processor = tiny_architecture(arch)
    with _one_line(arch), atomic_directory(directory) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(directory)


@contextmanager
def _one_line(arch: str) -> Iterator[None]:
    """Turn a library's refusal into a `TinyBuildError` of one line naming the architecture."""
    try:
        yield
    except TinyBuildError:
        raise
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        raise TinyBuildError(f"{arch}: cannot be built offline: {type(error).__name__}: {message}") from error


def _build(arch: str, override: dict[str, Any]) -> tuple[PreTrainedModel, ProcessorMixin]:
    config_class = CONFIG_MAPPING[arch]
    default = _with_vision_config(config_class)
    cls = processor_class(arch, override.get("processor_class"))
    if cls is None:
        raise TinyBuildError(f"{arch}: transformers maps it to no processor class")
    named, literals = processor_special_tokens(cls)
    named |= override.get("named_tokens", {})
    own = [f"<|{stem}|>" for stem in _own_token_stems(default)]
    tokenizer = tokenizer_for(named, literals, own + override.get("tokens", []), placeholder="")
    config = shrink_config_dict(default, len(tokenizer), rotary_sections=_uses_rotary_sections(arch, default))
    settings = _token_names_resolved(override.get("config", {}), tokenizer)
    _set_dotted(config, settings)
    vision = _vision_config(config)
    vocab_size = len(tokenizer)
    processor = tiny_processor(cls, arch, config, vision, tokenizer, override)
    _resize_vocab(config, vocab_size, len(tokenizer))  # a processor may add tokens (Kosmos-2's patch indices)
    if "vocabulary_map" in config:  # token -> id, where Chameleon and Emu3 find their image tokens and VQ codes
        config["vocabulary_map"] = tokenizer.get_vocab()
    _wire_token_ids(config, tokenizer, processor)
    _set_dotted(config, settings)
    placeholder = image_placeholder(processor, config, override.get("placeholder"))
    processor.chat_template = tokenizer.chat_template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", placeholder)
    counted = _counted_settings(processor)
    if counted:  # the processor expands an image into a fixed count of tokens: the count the tiny vision path emits
        model = AutoModelForImageTextToText.from_config(config_class.from_dict(config))
        measured = image_tokens_per_image(model, processor.image_processor)
        if measured:
            settings = {
                part: dict.fromkeys(names, measured) | override.get(part, {}) for part, names in counted.items()
            }
            processor = tiny_processor(cls, arch, config, vision, tokenizer, override | settings)
            processor.chat_template = tokenizer.chat_template
    _wire_observed_image_token(config, processor, override)
    return AutoModelForImageTextToText.from_config(config_class.from_dict(config)), processor


def _with_vision_config(config_class: type) -> dict[str, Any]:
    """The default config serialized, its vision sub-config filled in where the default is text-only (Gemma 4)."""
    config = config_class().to_dict()
    for key, sub_class in getattr(config_class, "sub_configs", {}).items():
        if config.get(key) is None and "vision" in key and hasattr(sub_class, "model_type") and sub_class.model_type:
            config[key] = sub_class().to_dict()
    return config


def _wire_observed_image_token(config: dict[str, Any], processor: ProcessorMixin, override: dict[str, Any]) -> None:
    """Point the config's image-token field at the token the processor repeats for an image.

    A processor may expand its placeholder (`<image>`) into another token (Aya Vision's `<|IMG_PATCH|>`, Ovis2's
    `<IMG_ATOM>`): the model must look for the one it writes, which the processed chat shows.
    """
    fields = [key for key in ("image_token_id", "image_token_index") if isinstance(config.get(key), int)]
    if not fields or any(field in override.get("config", {}) for field in fields):
        return
    observed = observed_image_token(processor)
    if observed is not None:
        config.update(dict.fromkeys(fields, observed))


def _counted_settings(processor: ProcessorMixin) -> dict[str, list[str]]:
    """The count-of-image-tokens arguments of the processor (`__init__` arguments or class-level defaults) and of its
    image processor (instance attributes): {"processor": [...], "image_processor": [...]}."""
    cls = type(processor)
    parameters = inspect.signature(cls.__init__).parameters
    accepted = set(parameters)
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        accepted |= set(vars(cls))  # a class-level default the constructor takes as a keyword (and saves)
    image_processor = getattr(processor, "image_processor", None)
    counted = {
        "processor": [name for name in _COUNT_ARGUMENTS if name in accepted],
        "image_processor": [name for name in _COUNT_ARGUMENTS if name in getattr(image_processor, "__dict__", {})],
    }
    return {part: names for part, names in counted.items() if names}


def _uses_rotary_sections(arch: str, config: dict[str, Any]) -> bool:
    """Whether the modeling code of the architecture or of a sub-config's model splits the rotary width into M-RoPE
    sections (GLM-4.6V's text model lives in glm4v's module)."""
    modules = {_model_class(arch).__module__}
    for key, value in config.items():
        if is_sub_config(key, value) and value.get("model_type") in CONFIG_MAPPING:
            modules.add(CONFIG_MAPPING[value["model_type"]].__module__.replace(".configuration_", ".modeling_"))
    return any("mrope_section" in _module_source(name) for name in modules)


def _module_source(name: str) -> str:
    try:
        return inspect.getsource(importlib.import_module(name))
    except ImportError:  # a config without a modeling module of its own
        return ""


def _model_class(arch: str) -> type[PreTrainedModel]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[CONFIG_MAPPING[arch]]


def _token_fields(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted path -> stem of every special-token id field that is not a tokenizer role (`image_token_index` ->
    `image`), in the config and its sub-configs."""
    fields = {}
    for key, value in config.items():
        if is_sub_config(key, value):
            fields |= _token_fields(value, f"{prefix}{key}.")
        elif _is_token_field(key, value) and key not in _ROLE_FIELDS:
            fields[f"{prefix}{key}"] = _TOKEN_FIELD.match(key).group(1)
    return fields


def _own_token_stems(config: dict[str, Any]) -> list[str]:
    """The stems of the tiny tokenizer's own tokens for the config's token fields (one per id of a list field)."""
    stems = []
    for path, stem in _token_fields(config).items():
        value = _get_dotted(config, path)
        stems += [f"{stem}_{i}" for i in range(len(value))] if isinstance(value, list) else [stem]
    return stems


def _get_dotted(config: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        config = config[key]
    return config


def _is_token_field(key: str, value: Any) -> bool:
    if not _TOKEN_FIELD.match(key) or "layer" in key:
        return False
    if value is None:  # BLIP-2 leaves its image token unset; the model still compares ids with it
        return key in _UNSET_TOKEN_FIELDS
    if key.endswith("_ids"):
        return isinstance(value, list) and all(isinstance(v, int) for v in value)
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return "token" in key or value > 1000  # `im_start_id` = 120118: an id in the real vocabulary


def _wire_token_ids(config: dict[str, Any], tokenizer: Any, processor: Any) -> None:
    """Point every special-token id field of the config into the tiny vocabulary."""
    _wire_roles(config, tokenizer)
    _wire_unset_ids(config, processor)
    for path, stem in _token_fields(config).items():
        *parents, key = path.split(".")
        owner = config
        for parent in parents:
            owner = owner[parent]
        if key.endswith("_ids"):
            owner[key] = [_token_id(f"{stem}_{i}", tokenizer, processor) for i in range(len(owner[key]))]
        else:
            owner[key] = _token_id(stem, tokenizer, processor)


def _wire_unset_ids(config: dict[str, Any], processor: Any) -> None:
    """Unset top-level token-id fields (`image_token_id: null`, NemotronH Omni's default) set to the processor's."""
    for key, value in config.items():
        if value is None and key.endswith("_token_id") and key not in _ROLE_FIELDS:
            index = getattr(processor, key, None)
            if isinstance(index, int):
                config[key] = index


def _wire_roles(config: dict[str, Any], tokenizer: Any) -> None:
    for key, value in list(config.items()):
        if is_sub_config(key, value):
            _wire_roles(value, tokenizer)
        elif key in _ROLE_FIELDS and value is not None:
            new = getattr(tokenizer, _ROLE_FIELDS[key])
            config[key] = [new] if isinstance(value, list) else new


def _token_id(stem: str, tokenizer: Any, processor: Any) -> int:
    """The id of the token a config's `<stem>_token_id` field means: the tokenizer's or processor's named token, else
    the tiny tokenizer's own `<|stem|>`."""
    for owner in (tokenizer, processor):
        token = getattr(owner, f"{stem}_token", None)
        token = getattr(token, "content", token)  # an AddedToken
        if isinstance(token, str) and tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id:
            return tokenizer.convert_tokens_to_ids(token)
    index = getattr(processor, f"{stem}_token_id", None)
    if isinstance(index, int):
        return index
    own = tokenizer.convert_tokens_to_ids(f"<|{stem}|>")
    if own is None or own == tokenizer.unk_token_id:
        own = tokenizer.convert_tokens_to_ids(f"<|{stem.rsplit('_', 1)[0]}|>")
    return own


def _vision_config(config: dict[str, Any]) -> dict[str, Any]:
    """The (first) vision sub-config that sets an image or patch size; the top level when there is none."""
    for key, value in config.items():
        if is_sub_config(key, value) and is_vision_role(key, value):
            if "image_size" in value or "patch_size" in value:
                return value
            nested = _vision_config(value)
            if nested is not value:
                return nested
    return config


def _resize_vocab(config: dict[str, Any], old: int, new: int) -> None:
    """Every `vocab_size` of the tiny tokenizer's old length set to its new one."""
    for key, value in config.items():
        if is_sub_config(key, value):
            _resize_vocab(value, old, new)
        elif key in VOCAB_KEYS and value == old:
            config[key] = new


def _token_names_resolved(values: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Override values of token-id fields given as token strings (`"<|vision_bos|>"`) turned into the tiny ids."""
    return {
        path: tokenizer.convert_tokens_to_ids(value)
        if isinstance(value, str) and _TOKEN_FIELD.match(path.rsplit(".", 1)[-1])
        else value
        for path, value in values.items()
    }


def _set_dotted(config: dict[str, Any], values: dict[str, Any]) -> None:
    for path, value in values.items():
        *parents, key = path.split(".")
        owner = config
        for parent in parents:
            owner = owner.setdefault(parent, {})
        owner[key] = value
