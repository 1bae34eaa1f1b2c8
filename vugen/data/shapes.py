"""The built-in procedural Shapes dataset: captioned images drawn from a seed, with no files.

Each image is RGB on a black background with one or two filled shapes, drawn with hard edges and exact
colours so that a classical colour-mask detector (ShapeEval) can recover every attribute of the caption.

Vocabulary: shapes ``circle, square, triangle``; colours :data:`COLORS`; sizes ``small, large``; a single
object's position ``left, right, top, bottom, center``; two objects' relation ``left_of, right_of, above,
below`` (the first object relative to the second).

Captions::

    a large red circle on the left          (also: on the right, at the top, at the bottom, in the center)
    a small blue square to the left of a large yellow triangle    (also: to the right of, above, below)

Geometry at image size ``S`` (see :func:`render`): a small object spans ``max(4, 3*S//16)`` pixels on a side,
a large one ``3*S//8`` (about twice as wide from ``S = 32`` on; 4 and 6 pixels at ``S = 16``). An object is placed
so that its pixel centroid lands on an anchor (fractions of ``S``: :data:`POSITION_ANCHORS`) plus an integer
jitter of at most ``S//16`` per axis, then clamped inside the image. Two objects sit on opposite anchors along
the relation's axis (e.g. ``left`` and ``right``) and are jittered only away from each other along that axis,
so their centroids are about ``S/2`` or more apart there, at most about ``S/8`` across it, and the shapes never touch.

Held-out compositions: the (shape, colour) pairs in :data:`HELDOUT_PAIRS` (one per shape, each colour
different) never occur in the ``train``, ``val`` or ``test`` splits, not even as one object of a two-object
scene; every shape and every colour still occurs there. The ``heldout`` split contains only scenes with at
least one held-out pair, and :func:`heldout_prompts` lists their captions for generation evaluation.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION_PHRASES: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
# (x, y) of an object's pixel centroid as fractions of the image side; y grows downwards.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Anchors of (first, second) object for each relation.
RELATION_LAYOUT: dict[str, tuple[str, str]] = {
    "left_of": ("left", "right"),
    "right_of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "blue"), ("square", "yellow"), ("triangle", "magenta")}
)


def _check_choice(owner: str, name: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{owner}.{name} must be one of {options}, got {value!r}")


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape.

    Args:
        shape: One of :data:`SHAPES`.
        color: A key of :data:`COLORS`.
        size: One of :data:`SIZES`.
        position: One of :data:`POSITIONS` for a single-object scene; ``None`` inside a two-object scene,
            where the relation places the objects.
    """

    shape: str
    color: str
    size: str
    position: str | None = None

    def __post_init__(self) -> None:
        _check_choice("ShapeObject", "shape", self.shape, SHAPES)
        _check_choice("ShapeObject", "color", self.color, tuple(COLORS))
        _check_choice("ShapeObject", "size", self.size, SIZES)
        if self.position is not None:
            _check_choice("ShapeObject", "position", self.position, POSITIONS)

    @property
    def noun_phrase(self) -> str:
        """The object without its position, e.g. ``"a large red circle"``."""
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class ShapeScene:
    """One or two objects; with two, ``relation`` says where ``objects[0]`` is relative to ``objects[1]``.

    Args:
        objects: One object with a position, or two objects without positions and with distinct colours.
        relation: ``None`` for one object, else one of :data:`RELATIONS`.
    """

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.objects) == 1:
            self._check_single()
        elif len(self.objects) == 2:
            self._check_pair()
        else:
            raise ValueError(f"ShapeScene.objects must hold 1 or 2 objects, got {len(self.objects)}")

    def _check_single(self) -> None:
        if self.relation is not None:
            raise ValueError(f"ShapeScene.relation must be None for one object, got {self.relation!r}")
        if self.objects[0].position is None:
            raise ValueError(f"the object of a one-object ShapeScene needs a position from {POSITIONS}")

    def _check_pair(self) -> None:
        _check_choice("ShapeScene", "relation", self.relation, RELATIONS)
        first, second = self.objects
        if first.position is not None or second.position is not None:
            raise ValueError("objects of a two-object ShapeScene must have position=None (the relation places them)")
        if first.color == second.color:
            raise ValueError(f"the two objects of a ShapeScene need distinct colours, got {first.color!r} twice")

    def caption(self) -> str:
        """The caption stating every attribute; :func:`parse_caption` inverts it."""
        first = self.objects[0]
        if self.relation is None:
            return f"{first.noun_phrase} {POSITION_PHRASES[first.position]}"
        return f"{first.noun_phrase} {RELATION_PHRASES[self.relation]} {self.objects[1].noun_phrase}"


def _alternatives(options: Iterable[str]) -> str:
    return "(" + "|".join(re.escape(option) for option in options) + ")"


_OBJECT_PATTERN = rf"a {_alternatives(SIZES)} {_alternatives(COLORS)} {_alternatives(SHAPES)}"
_SINGLE_RE = re.compile(rf"{_OBJECT_PATTERN} {_alternatives(POSITION_PHRASES.values())}")
_PAIR_RE = re.compile(rf"{_OBJECT_PATTERN} {_alternatives(RELATION_PHRASES.values())} {_OBJECT_PATTERN}")
_POSITION_BY_PHRASE = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_RELATION_BY_PHRASE = {phrase: name for name, phrase in RELATION_PHRASES.items()}


def parse_caption(text: str) -> ShapeScene:
    """Parse a Shapes caption back into its scene (case and repeated whitespace are ignored).

    Args:
        text: A caption as written by :meth:`ShapeScene.caption`.

    Returns:
        The scene whose caption ``text`` is.

    Raises:
        ValueError: If ``text`` is not a valid Shapes caption; the message quotes ``text``.
    """
    normalized = " ".join(text.lower().split())
    try:
        if match := _SINGLE_RE.fullmatch(normalized):
            size, color, shape, phrase = match.groups()
            return ShapeScene((ShapeObject(shape, color, size, _POSITION_BY_PHRASE[phrase]),))
        if match := _PAIR_RE.fullmatch(normalized):
            size_a, color_a, shape_a, phrase, size_b, color_b, shape_b = match.groups()
            objects = (ShapeObject(shape_a, color_a, size_a), ShapeObject(shape_b, color_b, size_b))
            return ShapeScene(objects, _RELATION_BY_PHRASE[phrase])
    except ValueError as error:
        raise ValueError(f"caption {text!r} does not describe a valid Shapes scene: {error}") from error
    raise ValueError(
        f"cannot parse caption {text!r}: expected e.g. 'a large red circle on the left' or "
        "'a small blue square to the left of a large yellow triangle'"
    )


def is_heldout(scene: ShapeScene) -> bool:
    """Whether any object of ``scene`` is a held-out (shape, colour) pair of :data:`HELDOUT_PAIRS`."""
    return any((obj.shape, obj.color) in HELDOUT_PAIRS for obj in scene.objects)


@lru_cache(maxsize=1)
def all_scenes() -> tuple[ShapeScene, ...]:
    """Every valid scene in a fixed order: 210 one-object scenes, then 6048 two-object scenes."""
    attributes = list(itertools.product(SHAPES, COLORS, SIZES))
    singles = [
        ShapeScene((ShapeObject(shape, color, size, position),))
        for (shape, color, size), position in itertools.product(attributes, POSITIONS)
    ]
    pairs = [
        ShapeScene((ShapeObject(*first), ShapeObject(*second)), relation)
        for first, second, relation in itertools.product(attributes, attributes, RELATIONS)
        if first[1] != second[1]
    ]
    return tuple(singles + pairs)


@lru_cache(maxsize=4)
def _scene_pool(heldout: bool, num_objects: int) -> tuple[ShapeScene, ...]:
    return tuple(scene for scene in all_scenes() if len(scene.objects) == num_objects and is_heldout(scene) == heldout)


def heldout_prompts() -> list[str]:
    """All one-object captions with a held-out (shape, colour) pair (30 captions), in a fixed order."""
    return [scene.caption() for scene in _scene_pool(True, 1)]


def heldout_two_object_prompts() -> list[str]:
    """All two-object captions where at least one object is a held-out pair, in a fixed order."""
    return [scene.caption() for scene in _scene_pool(True, 2)]


def check_image_size(image_size: int) -> int:
    """Return ``image_size`` if it is an int >= 16 and a multiple of 8, else raise ValueError naming it."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16 or image_size % 8:
        raise ValueError(f"image_size must be an integer >= 16 and a multiple of 8, got {image_size!r}")
    return image_size


def object_side(size: str, image_size: int) -> int:
    """Side in pixels of the bounding square of a ``size`` object at ``image_size``."""
    _check_choice("object_side", "size", size, SIZES)
    image_size = check_image_size(image_size)
    # A side of 4 is the least that tells a circle from a square; large stays 3S/8 so two fit with a gap.
    return max(4, 3 * image_size // 16) if size == "small" else 3 * image_size // 8


@lru_cache(maxsize=64)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``[side, side]`` mask of a filled shape with hard edges; every shape spans the whole box.

    A pixel is in the circle if its centre is. The triangle is isosceles, apex up, base along the bottom
    row; a pixel row is in where the bottom edge of the row lies inside it, so the apex row is not empty.
    The returned array is read-only (cached).
    """
    _check_choice("shape_mask", "shape", shape, SHAPES)
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    half = side / 2
    if shape == "circle":
        mask = (xs - half) ** 2 + (ys - half) ** 2 <= half**2
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    else:
        mask = np.abs(xs - half) <= (ys + 0.5) / 2
    mask.setflags(write=False)
    return mask


def _jitter(anchor: tuple[float, float], axis: int | None, max_jitter: int, rng: np.random.Generator) -> np.ndarray:
    """Per-axis integer jitter; along ``axis`` (two-object scenes) only away from the image centre."""
    jitter = rng.integers(-max_jitter, max_jitter + 1, size=2)
    if axis is not None:
        outward = 1 if anchor[axis] > 0.5 else -1
        jitter[axis] = outward * rng.integers(0, max_jitter + 1)
    return jitter


def _paint(image: np.ndarray, obj: ShapeObject, anchor_name: str, axis: int | None, rng: np.random.Generator) -> None:
    image_size = image.shape[0]
    side = object_side(obj.size, image_size)
    mask = shape_mask(obj.shape, side)
    rows, cols = np.nonzero(mask)
    # Put the pixel centroid (not the box centre) on the anchor: a triangle's centroid sits low in its box.
    centroid = np.array([cols.mean(), rows.mean()]) + 0.5
    anchor = POSITION_ANCHORS[anchor_name]
    target = np.array(anchor) * image_size + _jitter(anchor, axis, image_size // 16, rng)
    left, top = np.clip(np.rint(target - centroid).astype(int), 0, image_size - side)
    image[top : top + side, left : left + side][mask] = COLORS[obj.color]


def render(scene: ShapeScene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``scene`` on a black ``image_size`` square with a small random placement jitter from ``rng``.

    Args:
        scene: The scene to draw.
        image_size: Side in pixels; >= 16 and a multiple of 8.
        rng: Source of the placement jitter (the scene's attributes hold for any jitter).

    Returns:
        ``uint8`` array ``[image_size, image_size, 3]`` holding only black and the objects' exact colours.
    """
    image = np.zeros((check_image_size(image_size), image_size, 3), dtype=np.uint8)
    if scene.relation is None:
        _paint(image, scene.objects[0], scene.objects[0].position, None, rng)
        return image
    axis = 0 if scene.relation in ("left_of", "right_of") else 1
    for obj, anchor_name in zip(scene.objects, RELATION_LAYOUT[scene.relation], strict=True):
        _paint(image, obj, anchor_name, axis, rng)
    return image


def sample_scene(split: str, rng: np.random.Generator, two_object_ratio: float = 0.3) -> ShapeScene:
    """Draw a scene uniformly among the one- or two-object scenes allowed in ``split``.

    Args:
        split: One of :data:`SPLITS`; ``heldout`` draws only scenes with a held-out pair, the others never.
        rng: Source of randomness.
        two_object_ratio: Probability of a two-object scene.

    Returns:
        The drawn scene.
    """
    _check_choice("sample_scene", "split", split, SPLITS)
    num_objects = 2 if rng.random() < two_object_ratio else 1
    pool = _scene_pool(split == "heldout", num_objects)
    return pool[rng.integers(len(pool))]


class ShapesDataset(Dataset):
    """Map-style Shapes dataset; item ``i`` is drawn from an rng seeded by ``(seed, split, i)``.

    Items are therefore identical in any worker, process or access order, and differ between splits.

    Args:
        split: One of :data:`SPLITS`.
        size: Number of items.
        image_size: Image side in pixels; >= 16 and a multiple of 8.
        two_object_ratio: Probability that an item has two objects, in [0, 1].
        seed: Non-negative base seed.
    """

    def __init__(
        self, split: str, size: int, image_size: int = 32, two_object_ratio: float = 0.3, seed: int = 0
    ) -> None:
        _check_choice("ShapesDataset", "split", split, SPLITS)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if not 0.0 <= two_object_ratio <= 1.0:
            raise ValueError(f"two_object_ratio must be in [0, 1], got {two_object_ratio!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split = split
        self.size = size
        self.image_size = check_image_size(image_size)
        self.two_object_ratio = two_object_ratio
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> tuple[ShapeScene, np.ndarray]:
        """The scene and ``uint8 [H, W, 3]`` image of item ``index`` (negative indices count from the end)."""
        index = operator.index(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), index % self.size))
        scene = sample_scene(self.split, rng, self.two_object_ratio)
        return scene, render(scene, self.image_size, rng)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """``{"images": float32 [3, H, W] in [0, 1], "captions": str}`` for item ``index``."""
        scene, image = self.sample(index)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0).contiguous()
        return {"images": pixels, "captions": scene.caption()}
