"""Understanding accuracy on Shapes: does the VLM say what the image shows?

The VLM is asked about each image of a Shapes split through the adapter contract only
(:meth:`~vugen.adapter.VLMAdapter.answer_ids` and :meth:`~vugen.adapter.VLMAdapter.answer`: its own processor, chat
template and greedy ``generate``), and one- and two-object scenes are scored apart:

- :func:`caption_accuracy`: ``"describe:"``; an answer is correct when it stopped (its end of turn within
  ``max_new_tokens``) and :func:`~vugen.data.shapes.parse_caption` reads it back as the drawn scene, every attribute
  equal; an answer that does not parse or does not stop is wrong.
- :func:`question_accuracy`: every attribute question of each image
  (:func:`~vugen.data.shapes_understanding.attribute_questions`), each answer stopped and equal to the expected
  words (case and spacing aside). On the ``heldout`` split this asks whether the VLM binds the held-out colour-shape
  pairs when a question names one of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from vugen.adapter import VLMAdapter
from vugen.data.shapes import ShapeScene, ShapesDataset, parse_caption
from vugen.data.shapes_understanding import CAPTION_PROMPT, attribute_questions
from vugen.errors import check_positive

__all__ = ["AnswerScore", "answer_correct", "caption_accuracy", "caption_correct", "question_accuracy"]

_SCENE_KINDS = {1: "one_object", 2: "two_object"}


@dataclass(frozen=True)
class AnswerScore:
    """Correct answers out of those asked."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """``correct / total`` (0 when nothing was asked)."""
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """``{"correct", "total", "accuracy"}``."""
        return asdict(self) | {"accuracy": self.accuracy}

    def __str__(self) -> str:
        return f"{self.correct}/{self.total}"


def caption_correct(answer: str, scene: ShapeScene, stopped: bool = True) -> bool:
    """Whether ``answer`` is ``scene``'s caption: it stopped, parses, and states every attribute of the scene."""
    try:
        return stopped and parse_caption(answer) == scene
    except ValueError:  # not a Shapes caption
        return False


def answer_correct(answer: str, expected: str, stopped: bool = True) -> bool:
    """Whether ``answer`` stopped and says ``expected``'s words (case and spacing aside)."""
    return stopped and " ".join(answer.lower().split()) == " ".join(expected.lower().split())


@dataclass(frozen=True)
class _Asked:
    """One prompt about one image, the scene kind it counts for, and what a correct answer says: a caption of the
    scene, or the words of an attribute."""

    image: Tensor
    prompt: str
    kind: str
    expected: ShapeScene | str

    def correct(self, answer: str, stopped: bool) -> bool:
        if isinstance(self.expected, ShapeScene):
            return caption_correct(answer, self.expected, stopped)
        return answer_correct(answer, self.expected, stopped)


def caption_accuracy(
    adapter: VLMAdapter,
    split: str = "test",
    n: int = 128,
    image_size: int = 32,
    seed: int = 0,
    two_object_ratio: float = 0.3,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> dict[str, AnswerScore]:
    """Greedy ``"describe:"`` answers on ``n`` images of a Shapes split, scored against the drawn scenes.

    Args:
        adapter: Any adapter that answers (:meth:`~vugen.adapter.VLMAdapter.answer`).
        split: A Shapes split (``test``; ``heldout``: only scenes with a held-out colour-shape pair).
        n: Images asked about.
        image_size: Side of the drawn images (the VLM's processor sizes them its own way).
        seed: Seed of the split's images.
        two_object_ratio: Fraction of two-object scenes drawn.
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: An answer that has not stopped after this many tokens is wrong (a Shapes caption takes at
            most ~20 tokens of the tiny tokenizer).

    Returns:
        ``{"one_object": AnswerScore, "two_object": AnswerScore}``.
    """
    scenes = _scenes(split, n, image_size, seed, two_object_ratio)
    asked = [_Asked(image, CAPTION_PROMPT, _kind(scene), scene) for image, scene in scenes]
    return _score(adapter, asked, batch_size, max_new_tokens)


def question_accuracy(
    adapter: VLMAdapter,
    split: str = "test",
    n: int = 128,
    image_size: int = 32,
    seed: int = 0,
    two_object_ratio: float = 0.3,
    batch_size: int = 64,
    max_new_tokens: int = 32,
) -> dict[str, AnswerScore]:
    """Greedy answers to every attribute question about ``n`` images of a Shapes split (arguments as for
    :func:`caption_accuracy`); ``{"one_object": AnswerScore, "two_object": AnswerScore}`` over the questions."""
    asked = [
        _Asked(image, question, _kind(scene), expected)
        for image, scene in _scenes(split, n, image_size, seed, two_object_ratio)
        for question, expected in attribute_questions(scene)
    ]
    return _score(adapter, asked, batch_size, max_new_tokens)


def _kind(scene: ShapeScene) -> str:
    return _SCENE_KINDS[len(scene.objects)]


def _scenes(split: str, n: int, image_size: int, seed: int, two_object_ratio: float) -> list[tuple[Tensor, ShapeScene]]:
    data = ShapesDataset(split, n, image_size, two_object_ratio, seed)
    return [(item["images"], parse_caption(item["captions"])) for item in (data[i] for i in range(n))]


def _score(
    adapter: VLMAdapter, asked: Sequence[_Asked], batch_size: int, max_new_tokens: int
) -> dict[str, AnswerScore]:
    """Ask each prompt, in batches, and count the correct answers per scene kind."""
    check_positive("batch_size", batch_size)
    check_positive("max_new_tokens", max_new_tokens)
    counts = {kind: [0, 0] for kind in _SCENE_KINDS.values()}
    for start in range(0, len(asked), batch_size):
        batch = asked[start : start + batch_size]
        images, prompts = [one.image for one in batch], [one.prompt for one in batch]
        # `answer` drops the stop token; the ids tell whether there was one (fewer tokens than the limit).
        stopped = [len(ids) < max_new_tokens for ids in adapter.answer_ids(images, prompts, max_new_tokens)]
        for one, answer, stop in zip(batch, adapter.answer(images, prompts, max_new_tokens), stopped, strict=True):
            counts[one.kind][0] += one.correct(answer, stop)
            counts[one.kind][1] += 1
    return {kind: AnswerScore(correct, total) for kind, (correct, total) in counts.items()}
