"""Whether vugen's recipe applies to a checkpoint at all, read from its ``config.json`` before anything loads.

The latent sampler runs the VLM's decoder-only language model on ``[prompt][BOI][latent tokens]``; an
encoder-decoder model (Florence-2, Pix2Struct, a ``VisionEncoderDecoderModel``, ...) has no such language model: its
decoder reads the image through cross-attention, not as tokens. That is no error to fix but a model outside the
recipe, said in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vugen.errors import VugenError

__all__ = ["NotApplicableError", "check_recipe_applies"]


class NotApplicableError(VugenError, ValueError):
    """vugen's recipe does not apply to this kind of model (not a broken checkpoint: another architecture)."""


# Config keys of language models that see the image through cross-attention layers, not as tokens of their input
# (Mllama's `cross_attention_layers`, Idefics' `cross_layer_interval`, decoders built with `add_cross_attention`, BLIP's
# text decoder: `encoder_hidden_size` is the width of the image states its cross-attention reads).
CROSS_ATTENTION_KEYS = ("cross_attention_layers", "cross_layer_interval", "add_cross_attention", "encoder_hidden_size")


def check_recipe_applies(config: Mapping[str, Any], source: str) -> None:
    """Refuse a checkpoint whose ``config.json`` describes an encoder-decoder model.

    Args:
        config: The checkpoint's ``config.json``, as read.
        source: Where it was read, for the message (the file, or the checkpoint).

    Raises:
        NotApplicableError: ``is_encoder_decoder`` is true in the config or in its ``text_config``, or the language
            model reads images through cross-attention (:data:`CROSS_ATTENTION_KEYS`).
    """
    text_config = config.get("text_config")
    text_config = text_config if isinstance(text_config, Mapping) else {}
    model_type = config.get("model_type") or "this model"
    if config.get("is_encoder_decoder") or text_config.get("is_encoder_decoder"):
        raise NotApplicableError(
            f"not applicable: {model_type} is an encoder-decoder model ({source} sets is_encoder_decoder); vugen's "
            "recipe needs a decoder-only language model that reads image tokens"
        )
    cross = [key for key in CROSS_ATTENTION_KEYS if text_config.get(key) or config.get(key)]
    if cross:
        raise NotApplicableError(
            f"not applicable: {model_type}'s language model reads images through cross-attention ({source} sets "
            f"{cross[0]}); vugen's recipe needs a decoder-only language model that reads image tokens"
        )
