"""Shapes as understanding examples: an image, a prompt and the answer a VLM that sees the image should give.

Two kinds of prompt, both answered from the scene that drew the image:

- the caption, ``"describe:"`` -> ``"a large red circle on the left"`` (:meth:`ShapeScene.caption`);
- attribute questions that bind one attribute to one object (:func:`attribute_questions`), for one object and for
  each of two::

      what color is the circle?          -> red            (asked only where one object has that shape)
      what shape is the red object?      -> circle         (the two objects' colours always differ)
      how large is the red circle?       -> large
      where is the red circle?           -> on the left    (two objects: "to the left of a small blue square")

A caption can be right by learning which words go together; a question names one attribute of an object and asks for
another, so it is answered only by binding them in the image (the lever the understanding ablation measures).
Held-out compositions are held out from generation: the ``train``, ``val`` and ``test`` splits never draw them. An
understanding run may see them (``heldout_ratio`` of :class:`ShapesUnderstandingDataModule`), as a real VLM has read
far more compositions than any generation set holds: the VUGEN premise the demo measures.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from vugen.data.shapes import (
    POSITION_PHRASES,
    RELATION_PHRASES,
    SPLITS,
    ShapeScene,
    ShapesDataset,
    parse_caption,
)
from vugen.data.shapes_datamodule import ShapesDataModule

__all__ = [
    "CAPTION_PROMPT",
    "ShapesUnderstandingDataModule",
    "ShapesUnderstandingDataset",
    "attribute_questions",
    "where_is",
]

CAPTION_PROMPT = "describe:"
# The relation of the second object to the first: the first is left of the second, so the second is right of it.
_CONVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def where_is(scene: ShapeScene, index: int) -> str:
    """Where ``scene.objects[index]`` is: its position phrase (one object), else its relation to the other object.

    Examples: ``"on the left"``; ``"to the right of a large red circle"`` for the second object of
    ``"a large red circle to the left of a small blue square"``.
    """
    obj = scene.objects[index]
    if scene.relation is None:
        return POSITION_PHRASES[obj.position]
    relation = scene.relation if index == 0 else _CONVERSE[scene.relation]
    return f"{RELATION_PHRASES[relation]} {scene.objects[1 - index].noun_phrase}"


def attribute_questions(scene: ShapeScene) -> list[tuple[str, str]]:
    """Every (question, answer) that binds an attribute to one object of ``scene``: its colour from its shape (when no
    other object has that shape), its shape from its colour, its size and where it is from its colour and shape."""
    shapes = [obj.shape for obj in scene.objects]
    questions = []
    for index, obj in enumerate(scene.objects):
        if shapes.count(obj.shape) == 1:
            questions.append((f"what color is the {obj.shape}?", obj.color))
        questions += [
            (f"what shape is the {obj.color} object?", obj.shape),
            (f"how large is the {obj.color} {obj.shape}?", obj.size),
            (f"where is the {obj.color} {obj.shape}?", where_is(scene, index)),
        ]
    return questions


def _checked_ratio(ratio: float, name: str = "question_ratio") -> float:
    if isinstance(ratio, bool) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {ratio!r}")
    return ratio


class ShapesUnderstandingDataset(ShapesDataset):
    """Shapes images with a prompt and its answer: the caption, or with probability ``question_ratio`` one of the
    image's :func:`attribute_questions` (drawn uniformly).

    Item ``i`` is the image of :class:`ShapesDataset` item ``i`` (same split, size, ratio and seed), and its prompt is
    drawn from a generator seeded by ``(seed, split, i)`` too: identical in any worker, process or access order.

    Args:
        split: One of :data:`~vugen.data.shapes.SPLITS`.
        size: Number of items.
        image_size: Image side in pixels; >= 16 and a multiple of 8.
        two_object_ratio: Probability that an item has two objects, in [0, 1].
        seed: Non-negative base seed.
        question_ratio: Probability that an item asks an attribute question instead of the caption, in [0, 1].
    """

    def __init__(
        self,
        split: str,
        size: int,
        image_size: int = 32,
        two_object_ratio: float = 0.3,
        seed: int = 0,
        question_ratio: float = 0.0,
    ) -> None:
        super().__init__(split, size, image_size, two_object_ratio, seed)
        self.question_ratio = _checked_ratio(question_ratio)

    def prompt_and_answer(self, scene: ShapeScene, index: int) -> tuple[str, str]:
        """The prompt and answer of item ``index``, whose scene is ``scene``."""
        # Its own stream (the trailing 1): the image's generator is seeded by (seed, split, index).
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), operator.index(index) % self.size, 1))
        if rng.random() >= self.question_ratio:
            return CAPTION_PROMPT, scene.caption()
        questions = attribute_questions(scene)
        return questions[rng.integers(len(questions))]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """``{"images": float32 [3, H, W] in [0, 1], "prompts": str, "answers": str}`` for item ``index``."""
        item = super().__getitem__(index)
        prompt, answer = self.prompt_and_answer(parse_caption(item["captions"]), index)
        return {"images": item["images"], "prompts": prompt, "answers": answer}


class ShapesUnderstandingDataModule(ShapesDataModule):
    """:class:`ShapesDataModule` serving understanding examples: batches are
    ``{"images": float32 [B, 3, H, W] in [0, 1], "prompts": list[str], "answers": list[str]}``.

    Args:
        question_ratio: Fraction of examples (every split) that ask an attribute question instead of the caption.
        heldout_ratio: Fraction of the training examples drawn from held-out compositions (evenly spaced through
            the split; their images are the ``heldout`` split's of seed ``seed + 1``, so that the ``heldout``
            images scored at seed ``seed`` are other draws). 0 keeps them out of training.
        kwargs: The arguments of :class:`ShapesDataModule` (sizes, image size, batch size, seed, ...).
    """

    def __init__(self, question_ratio: float = 0.0, heldout_ratio: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.question_ratio = _checked_ratio(question_ratio)
        self.heldout_ratio = _checked_ratio(heldout_ratio, "heldout_ratio")

    def dataset(self, split: str) -> ShapesUnderstandingDataset | _WithHeldout:
        """The understanding examples of ``split`` (one of ``train``, ``val``, ``test``, ``heldout``)."""
        images = super().dataset(split)
        examples = self._examples(split, images.seed, images)
        if split != "train" or self.heldout_ratio == 0:
            return examples
        return _WithHeldout(examples, self._examples("heldout", images.seed + 1, images), self.heldout_ratio)

    def _examples(self, split: str, seed: int, images: ShapesDataset) -> ShapesUnderstandingDataset:
        return ShapesUnderstandingDataset(
            split, images.size, images.image_size, images.two_object_ratio, seed, self.question_ratio
        )


class _WithHeldout(torch.utils.data.Dataset):
    """``base`` with a fraction ``ratio`` of its items, evenly spaced, taken from ``heldout`` at the same index."""

    def __init__(self, base: ShapesUnderstandingDataset, heldout: ShapesUnderstandingDataset, ratio: float) -> None:
        self.base, self.heldout, self.ratio = base, heldout, ratio

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        held_out = int((index + 1) * self.ratio) > int(index * self.ratio)
        return (self.heldout if held_out else self.base)[index]
