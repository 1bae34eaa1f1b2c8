"""What :class:`~vugen.stages.understanding.UnderstandingStage` trains (:data:`Part`) and how ``vugen tiny DIR
--understand shapes`` trains it (:class:`UnderstandingRecipe`, run by :mod:`vugen.commands._understanding`).

Apart from the stage and the training code, which import Lightning and torch: ``vugen tiny``'s signature names the
recipe, and parsing it (``vugen tiny --help``, a plain ``vugen tiny FAMILY DIR``) must stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["PARTS", "Part", "UnderstandingRecipe"]

# The parts of the VLM, as vugen.stages.understanding's docstring defines them.
Part = Literal["language_model", "projector", "vision_tower"]
PARTS: tuple[Part, ...] = get_args(Part)


@dataclass(frozen=True)
class UnderstandingRecipe:
    """How the tiny VLM learns Shapes.

    Args:
        trainable: The parts of the VLM that learn (``language_model``, ``projector``, ``vision_tower``); the default
            keeps the vision tower, so its features for the generation stages, as they were.
        question_ratio: Fraction of training examples that ask an attribute question instead of the caption.
        batch_size: Examples per step.
        lr: Peak learning rate of AdamW's one-cycle schedule.
        warmup: Fraction of the steps that warm the learning rate up.
        two_object_ratio: Fraction of two-object scenes among the training images.
        heldout_ratio: Fraction of training images with a composition held out from generation (the demo's
            held-out prompts): a VLM that has seen them, as real VLMs have seen far more than a generation set.
        seed: Seed of the training images and their order.
    """

    trainable: tuple[Part, ...] = ("language_model", "projector")
    question_ratio: float = 0.25
    batch_size: int = 16
    lr: float = 3e-3
    warmup: float = 0.1
    two_object_ratio: float = 0.5
    heldout_ratio: float = 0.0
    seed: int = 0
