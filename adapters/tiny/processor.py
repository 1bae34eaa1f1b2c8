"""The offline processor of a tiny architecture: its own processor class, image (and video) processor sized to the
shrunk vision config, and a locally trained tokenizer that holds every special token the processor asks for.

Which special tokens a processor needs is read from the processor itself: the `tokenizer.<name>_token` attributes
its module reads become named tokens of the tiny tokenizer (`tokenizer.image_token`, `tokenizer.boi_token`, ...),
and the special-token literals its module writes (`"<|image_pad|>"`, `"[IMG]"`, ...) or its class declares
(`IMAGE_TOKEN = "]<]image[>["`) join the vocabulary as they are.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any

import transformers
from transformers import BaseImageProcessor, BaseVideoProcessor, FeatureExtractionMixin, ProcessorMixin
from transformers.image_utils import SizeDict
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.feature_extraction_auto import (
    FEATURE_EXTRACTOR_MAPPING_NAMES,
    feature_extractor_class_from_name,
)
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
from transformers.models.auto.video_processing_auto import (
    VIDEO_PROCESSOR_MAPPING_NAMES,
    video_processor_class_from_name,
)

from vugen_adapters.tiny.common import tiny_tokenizer
from vugen_adapters.tiny.shrink import IMAGE_SIZE, PATCH_SIZE

__all__ = [
    "image_placeholder",
    "processor_class",
    "processor_special_tokens",
    "sized_sub_processor",
    "tiny_processor",
]

_STANDARD_TOKENS = {"bos", "eos", "unk", "sep", "pad", "cls", "mask"}
# `tokenizer.image_token`, and `getattr(tokenizer, "audio_token", None)`: an optional token the processor still
# checks (Gemma 4 refuses any input while its audio tokens are None).
_NAMED_TOKEN = re.compile(
    r"""tokenizer\.([a-z][a-z0-9_]*?_token)(?:_id)?\b|getattr\(tokenizer, "([a-z][a-z0-9_]*?_token)", None\)"""
)
_LITERAL_TOKEN = re.compile(r"""["'](<\|?[A-Za-z][\w\-./:|]{0,40}\|?>|\[[A-Z][A-Z_]{1,30}\])["']""")
_WRITTEN_TOKEN = re.compile(r"""self\.([a-z][a-z0-9_]*_token) = ["']([^"'\s]+)["']""")
_ADDED_TOKEN = re.compile(r"self\.([a-z_]+_token)\.content")
# Processor arguments whose config key has another name.
_CONFIG_ALIASES = {
    "img_size": "image_size",
    "image_seq_length": "mm_tokens_per_image",
    "merge_size": "spatial_merge_size",
}
# Scalar size attributes of image processors, by meaning: a vision patch, the image edge, a pixel area, a patch
# count (up to 2x2 images), a token count (one image of patches).
_SCALAR_SIZES = {
    "encoder_patch_size": "patch",
    "vision_patch_size": "patch",
    "tile_size": "image",
    "scale_resolution": "image",
    "min_pixels": "area",
    "max_pixels": "area",
    "max_num_patches": "patches",
    "min_image_tokens": "tokens",
    "max_image_tokens": "tokens",
}
# Image-processor attributes holding edges (or areas) of the tower's input: all follow the tiny image size.
_EDGE_SIZES = ("size", "crop_size", "max_image_size", "high_res_size", "pad_size")
# Of those, one tile the tower reads whole (Idefics3's 364 px: its tower's image size), not a resize target.
_TILE_SIZES = ("max_image_size",)
_AREA = 10_000  # a `size` edge above this is a pixel area (Qwen-style processors), not a length
_SUB_PROCESSOR_BASES = {
    "image_processor": BaseImageProcessor,
    "video_processor": BaseVideoProcessor,
    "feature_extractor": FeatureExtractionMixin,
}
_MAPPINGS = {
    "image_processor": IMAGE_PROCESSOR_MAPPING_NAMES,
    "video_processor": VIDEO_PROCESSOR_MAPPING_NAMES,
    "feature_extractor": FEATURE_EXTRACTOR_MAPPING_NAMES,
}


def processor_class(model_type: str, override: str | None = None) -> type[ProcessorMixin] | None:
    """The processor class transformers maps `model_type` to (or `override`, a class name), else the one its model
    folder defines (Kosmos-2, the Qwen Omni thinkers are missing from the mapping); None when there is none."""
    name = override or PROCESSOR_MAPPING_NAMES.get(model_type)
    if name:
        return processor_class_from_name(name)
    return _folder_class(model_type, ProcessorMixin)


def _folder_class(model_type: str, base: type) -> type | None:
    """The one public subclass of `base` the model folder of `model_type` defines (the torchvision one of an image
    processor pair), None when it defines none or several."""
    folder = importlib.import_module(CONFIG_MAPPING[model_type].__module__.rsplit(".", 1)[0])
    candidates = []
    for name in dir(folder):
        if name.endswith(("Processor", "FeatureExtractor")):
            value = getattr(folder, name)
            if isinstance(value, type) and issubclass(value, base):
                candidates.append(value)
    return candidates[0] if len(candidates) == 1 else None


def processor_special_tokens(cls: type) -> tuple[dict[str, str], list[str]]:
    """The named special tokens a processor reads from its tokenizer, and the token literals its module writes.

    Returns:
        `({"image_token": "<|image|>", ...}, ["<|image_pad|>", ...])`.
    """
    source = _module_source(cls)
    # Not named: flags (`add_bos_token`), and tokens the processor makes an `AddedToken` of itself (`.content`).
    own_objects = set(_ADDED_TOKEN.findall(source))
    names = {
        name
        for name in (attribute or optional for attribute, optional in _NAMED_TOKEN.findall(source))
        if name.removesuffix("_token") not in _STANDARD_TOKENS
        and not name.startswith("add_")
        and name not in own_objects
    }
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if isinstance(parameter.default, str) and name.endswith("_token")
    }
    # A processor that writes its own literal (`self.image_token = "<|IMAGE_PAD|>"`) yet counts by the tokenizer's
    # `image_token_id` (Cohere Compass) needs the two to be the same token.
    written = dict(_WRITTEN_TOKEN.findall(source))
    named = {
        name: defaults.get(name) or written.get(name) or f"<|{name.removesuffix('_token')}|>" for name in sorted(names)
    }
    # Class constants (MiniMax-M3-VL's `IMAGE_TOKEN = "]<]image[>["`) whatever their spelling.
    constants = {
        value
        for klass in cls.__mro__
        for key, value in vars(klass).items()
        if key.isupper() and key.endswith("_TOKEN") and isinstance(value, str)
    }
    literals = sorted(
        set(_LITERAL_TOKEN.findall(source)) | constants | {v for k, v in defaults.items() if k not in named}
    )
    return named, literals


def _module_source(cls: type) -> str:
    """The source of the module defining `cls` and of its processor base classes within transformers.models."""
    sources = []
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and ".models." in klass.__module__:
            sources.append(inspect.getsource(module))
    return "\n".join(sources)


def image_placeholder(processor: ProcessorMixin, config: dict[str, Any], override: str | None) -> str:
    """What the chat template writes for an image: the processor's image token, between the vision start and end
    tokens when the model finds images by them (Qwen-style position ids)."""
    if override is not None:  # "" where the processor writes the image token itself (Fuyu)
        return override
    # QianfanOCR's prompt placeholder (`<image>`) is another token than the one it expands it into.
    token = getattr(processor, "image_placeholder_token", None) or getattr(processor, "image_token", None) or "<image>"
    token = getattr(token, "content", token)  # BLIP-2 keeps an AddedToken
    tokenizer = processor.tokenizer
    if "vision_start_token_id" in config and "vision_end_token_id" in config:
        start, end = (tokenizer.convert_ids_to_tokens(config[f"vision_{side}_token_id"]) for side in ("start", "end"))
        return f"{start}{token}{end}"
    return token


def sized_sub_processor(cls: type, config: dict[str, Any], vision: dict[str, Any], settings: dict[str, Any]) -> Any:
    """An image or video processor of class `cls` resizing to the shrunk vision tower's input.

    Every size the default instance holds is rewritten: `size`/`crop_size`/... edges to the image size (areas to
    areas), `patch_size`, `merge_size` and `temporal_patch_size` to the vision config's. `settings` (from the
    overrides table) win.
    """
    default = cls()
    image, patch = vision.get("image_size") or IMAGE_SIZE, vision.get("patch_size") or PATCH_SIZE
    image = image[0] if isinstance(image, (list, tuple)) else image
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    kwargs: dict[str, Any] = {}
    for key in _EDGE_SIZES:
        value = getattr(default, key, None)
        value = dict(value) if isinstance(value, (dict, SizeDict)) else None  # SizeDict iterates its set fields
        if value:
            tile = key in _TILE_SIZES
            kwargs[key] = {edge: image if tile else _edge(edge, length, image) for edge, length in value.items()}
    for key, config_key in (
        ("patch_size", "patch_size"),
        ("merge_size", "spatial_merge_size"),
        ("temporal_patch_size", "temporal_patch_size"),
    ):
        if getattr(default, key, None) is not None and vision.get(config_key) is not None:
            kwargs[key] = vision[config_key] if key != "patch_size" else patch
    grid = image // patch
    scalars = {"patch": patch, "image": image, "area": image * image, "patches": 4 * grid * grid, "tokens": grid * grid}
    for key, meaning in _SCALAR_SIZES.items():
        if isinstance(getattr(default, key, None), int):
            kwargs[key] = scalars[meaning] if key != "max_pixels" else 4 * image * image
    for key in ("image_grid_pinpoints",):  # tiling layouts must be the config's (the model unpads by them)
        if getattr(default, key, None) is not None and key in config:
            kwargs[key] = config[key]
    return cls(**(kwargs | settings))


def _edge(edge: str, length: Any, image: int) -> Any:
    if not isinstance(length, int):
        return length
    if length > _AREA or edge in ("min_pixels", "max_pixels"):  # a pixel area: one tile of `image` px up to 2x2
        return image * image if edge in ("shortest_edge", "min_pixels") else 4 * image * image
    return 2 * image if edge == "longest_edge" and length > image else image


def sub_processor_class(attribute: str, model_type: str, processor: type) -> type | None:
    """The class of one sub-processor (`image_processor`, `video_processor`, `feature_extractor`) of `processor`."""
    owner = processor.__module__.split(".")[-2]  # the processor's own model folder (glm4v_moe uses glm4v's)
    if attribute in _MAPPINGS and model_type not in _MAPPINGS[attribute]:  # unmapped: Glmga's own, not GLM-4.6V's
        own = _folder_class(model_type, _SUB_PROCESSOR_BASES[attribute])
        if own is not None:
            return own
    for name in (model_type, owner):
        if attribute == "image_processor" and name in IMAGE_PROCESSOR_MAPPING_NAMES:
            classes = IMAGE_PROCESSOR_MAPPING_NAMES[name]
            class_name = classes.get("torchvision") or classes.get("pil")
            return get_image_processor_class_from_name(class_name) if class_name else None
        if attribute == "video_processor" and name in VIDEO_PROCESSOR_MAPPING_NAMES:
            classes = VIDEO_PROCESSOR_MAPPING_NAMES[name]
            class_name = classes.get("torchvision") if isinstance(classes, dict) else classes
            return video_processor_class_from_name(class_name) if class_name else None
        if attribute == "feature_extractor" and name in FEATURE_EXTRACTOR_MAPPING_NAMES:
            return feature_extractor_class_from_name(FEATURE_EXTRACTOR_MAPPING_NAMES[name])
    return None


def tiny_processor(
    cls: type[ProcessorMixin],
    model_type: str,
    config: dict[str, Any],
    vision: dict[str, Any],
    tokenizer: Any,
    settings: dict[str, Any],
) -> ProcessorMixin:
    """Build processor `cls` offline around `tokenizer`, its sub-processors sized to `vision` (a shrunk vision config).

    Args:
        cls: the processor class.
        model_type: the architecture, to find the sub-processor classes.
        config: the shrunk serialized config: `__init__` arguments named like a config key take its value.
        vision: the shrunk vision sub-config (image and patch sizes).
        tokenizer: the tiny tokenizer.
        settings: overrides: `processor` (init arguments), `image_processor` and `video_processor` (their arguments),
            `sub_processor_classes` (attribute -> class name, where no mapping names one).
    """
    parts: dict[str, Any] = {}
    for attribute in cls.get_attributes():
        if "tokenizer" in attribute:
            parts[attribute] = tokenizer
            continue
        named = settings.get("sub_processor_classes", {}).get(attribute)
        sub_class = getattr(transformers, named) if named else sub_processor_class(attribute, model_type, cls)
        if sub_class is None:
            raise LookupError(f"no {attribute} class for {model_type}")
        parts[attribute] = (
            sub_class(**settings.get(attribute, {}))
            if attribute == "feature_extractor"
            else sized_sub_processor(sub_class, config, vision, settings.get(attribute, {}))
        )
    init = inspect.signature(cls.__init__).parameters
    from_config = {
        name: _config_value(config, vision, name)
        for name in init
        if name not in parts and name not in ("self", "chat_template", "kwargs")
    }
    arguments = {k: v for k, v in from_config.items() if v is not None} | settings.get("processor", {})
    return cls(**parts, **arguments)


def _config_value(config: dict[str, Any], vision: dict[str, Any], name: str) -> Any:
    """The value of key `name` (or its config-side alias) in the config, its vision sub-config, or any sub-config."""
    name = _CONFIG_ALIASES.get(name, name)
    if name in config and not isinstance(config[name], dict):
        return config[name]
    if name in vision:
        return vision[name]
    for value in config.values():
        if isinstance(value, dict) and name in value and not isinstance(value[name], dict):
            return value[name]
    return None


def tokenizer_for(named: dict[str, str], literals: list[str], extra: list[str], placeholder: str) -> Any:
    """The tiny tokenizer with `named` tokens as attributes and `literals` and `extra` as special tokens."""
    specials = list(dict.fromkeys([*named.values(), *literals, *extra]))
    return tiny_tokenizer(specials, image_placeholder=placeholder, extra_special_tokens=named)
