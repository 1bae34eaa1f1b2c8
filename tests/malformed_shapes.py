"""Shapes images that ShapeEval's strict shape criterion must accept (degraded true renders) or reject (malformed
shapes), and the pass rates its thresholds were tuned on.

The thresholds (vugen/eval/shapeeval.py): the claimed shape's template fits best of the three, at soft IoU >= 0.85
with at most 0.1 defect pixel per template edge pixel, and strays weigh at most 5 % of the object. What separates
the two sides (measured): at 32 and 64 px every degraded render below fits with IoU >= 0.89 and no defect at all,
and has no stray; every malformed image has >= 0.12 defect per edge pixel (two pinholes in a small triangle;
>= 0.25 in every other case) or strays of >= 8 % of the object. The IoU alone would not separate them (ragged
edges reach 0.89 at 32 px, 0.94 at 64); it guards against faint or partial objects, which have no defect.

All-correct rates, lenient / strict, in % (``python -m tests.malformed_shapes`` measures them again, ~1 min):

=============================  ===========  ===========  ===========
true renders (210 one-object   16 px        32 px        64 px
+ 300 two-object scenes)
=============================  ===========  ===========  ===========
render                         100 / 100    100 / 100    100 / 100
gaussian blur 0.35             100 / 100    100 / 100    100 / 100
gaussian blur 0.7              99.8 / 99.6  100 / 100    100 / 100
box blur 3x3                   99.4 / 99.2  100 / 100    100 / 100
noise 0.05                     100 / 100    100 / 100    100 / 100
gaussian 0.7 + noise 0.05      93.9 / 93.9  100 / 100    100 / 100
box 3x3 + noise 0.05           86.1 / 85.7  100 / 100    100 / 100
=============================  ===========  ===========  ===========

At 16 px the objects are 4 and 6 pixels wide: blur and noise together defeat the lenient detector itself, and the
strict criterion costs at most 0.4 point more.

================================  ===========  ===========
malformed (70 scenes per shape)   32 px        64 px
================================  ===========  ===========
ragged edges (flip 0.3)           91.0 / 0     100 / 0
pinholes (20 % of the interior)   100 / 0      100 / 0
hole (a third of the side)        66.7 / 0     66.7 / 0
bite (radius 0.4 side)            44.3 / 0     50.5 / 0
ellipse (aspect 1.7; circles)     100 / 0      100 / 0
circle + square merged            51.4 / 0     51.4 / 0
stray pixels (10 % of the area)   100 / 0      100 / 0
stray blob (10 % of the area)     100 / 0      100 / 0
milder, for reference (untested):
ragged edges, flip 0.05           99.0 / 46.7  100 / 50.0
ragged edges, flip 0.1            98.6 / 8.6   100 / 4.8
ragged edges, flip 0.2            94.8 / 0     100 / 0
pinholes, 5 % (at least 2)        100 / 33.3   100 / 16.7
bite, radius 0.2 side             93.8 / 0     98.1 / 0
ellipse, aspect 1.2               100 / 50.0   100 / 0
stray pixels, 3 % of the area     100 / 83.3   100 / 100
================================  ===========  ===========
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from scipy import ndimage

from vugen.data.shapes import COLORS, ShapeScene, all_scenes, object_side, render
from vugen.eval.shapeeval import score_image

Image = np.ndarray  # float [H, W, 3] in [0, 1]
Mask = np.ndarray  # bool [H, W]
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


# ---------------------------------------------------------------------------------------------------- degradations
def gaussian_blur(image: Image, sigma: float) -> Image:
    """Gaussian blur of ``sigma`` pixels, zero outside the image."""
    return ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="constant")


def box_blur(image: Image) -> Image:
    """3x3 box blur, zero outside the image (as the lenient tests' ``degrade``)."""
    return ndimage.uniform_filter(image, (3, 3, 1), mode="constant")


def add_noise(image: Image, sigma: float, rng: np.random.Generator) -> Image:
    """Additive Gaussian noise of ``sigma``, clipped to [0, 1]."""
    return np.clip(image + sigma * rng.standard_normal(image.shape), 0.0, 1.0)


Degradation = Callable[[Image, np.random.Generator], Image]
DEGRADATIONS: dict[str, Degradation] = {
    "render": lambda image, rng: image,
    "gaussian 0.35": lambda image, rng: gaussian_blur(image, 0.35),
    "gaussian 0.7": lambda image, rng: gaussian_blur(image, 0.7),
    "box 3x3": lambda image, rng: box_blur(image),
    "noise 0.05": lambda image, rng: add_noise(image, 0.05, rng),
    "gaussian 0.7 + noise 0.05": lambda image, rng: add_noise(gaussian_blur(image, 0.7), 0.05, rng),
    "box 3x3 + noise 0.05": lambda image, rng: add_noise(box_blur(image), 0.05, rng),
}


# ---------------------------------------------------------------------------------------------------- malformations
def _boundary_band(mask: Mask) -> Mask:
    """The mask's own edge pixels and the pixels just outside it (4-connected)."""
    inner = mask & ~ndimage.binary_erosion(mask, _FOUR_CONNECTED)
    outer = ndimage.binary_dilation(mask, _FOUR_CONNECTED) & ~mask
    return inner | outer


def _disc(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]) -> Mask:
    """Pixels whose centre lies in the axis-aligned ellipse of ``radii`` (rows, columns) around ``center``."""
    rows, cols = np.indices(shape) + 0.5
    return ((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2 <= 1


def _centroid(mask: Mask) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()) + 0.5, float(cols.mean()) + 0.5


def ragged(mask: Mask, side: int, rng: np.random.Generator, flip: float = 0.3) -> Mask:
    """Each pixel of the boundary band (the edge and the ring outside it) flipped with probability ``flip``."""
    return mask ^ (_boundary_band(mask) & (rng.random(mask.shape) < flip))


def pinholes(mask: Mask, side: int, rng: np.random.Generator, drop: float = 0.2) -> Mask:
    """``drop`` of the interior pixels (those not on the edge), at least two, dropped at random."""
    interior = np.argwhere(ndimage.binary_erosion(mask, _FOUR_CONNECTED))
    count = max(2, round(drop * len(interior)))
    holed = mask.copy()
    holed[tuple(interior[rng.choice(len(interior), count, replace=False)].T)] = False
    return holed


def hole(mask: Mask, side: int, rng: np.random.Generator, fraction: float = 1 / 3) -> Mask:
    """A square hole of ``fraction`` of the side (at least 2 pixels) at the centroid."""
    width = max(2, round(fraction * side))
    row, col = (round(c - width / 2) for c in _centroid(mask))
    holed = mask.copy()
    holed[row : row + width, col : col + width] = False
    return holed


def bite(mask: Mask, side: int, rng: np.random.Generator, radius: float = 0.4) -> Mask:
    """A disc of ``radius`` times the side taken out, centred on a random edge pixel."""
    edge = np.argwhere(mask & ~ndimage.binary_erosion(mask, _FOUR_CONNECTED))
    row, col = edge[rng.integers(len(edge))] + 0.5
    return mask & ~_disc(mask.shape, (row, col), (radius * side, radius * side))


def ellipse(mask: Mask, side: int, rng: np.random.Generator, aspect: float = 1.7) -> Mask:
    """An ellipse of the object's area and centroid, ``aspect`` times wider than high (or higher than wide)."""
    stretch = math.sqrt(aspect) if rng.random() < 0.5 else 1 / math.sqrt(aspect)
    radius = math.sqrt(mask.sum() / math.pi)
    return _disc(mask.shape, _centroid(mask), (radius / stretch, radius * stretch))


def merged(mask: Mask, side: int, rng: np.random.Generator) -> Mask:
    """A circle and a square of the object's side overlapping by half, centred on the object's centroid."""
    row, col = _centroid(mask)
    half = side / 2
    rows, cols = np.indices(mask.shape) + 0.5
    circle = _disc(mask.shape, (row, col - half / 2), (half, half))
    square = (np.abs(rows - row) <= half) & (np.abs(cols - (col + half / 2)) <= half)
    return circle | square


def stray_pixels(mask: Mask, side: int, rng: np.random.Generator, fraction: float = 0.1) -> Mask:
    """The object plus single pixels, ``fraction`` of its area in all, 2 pixels or more from it and from each
    other (on even rows and columns)."""
    far = ~ndimage.binary_dilation(mask, np.ones((5, 5), dtype=bool))
    far[1::2] = far[:, 1::2] = False
    candidates = np.argwhere(far)
    count = max(1, math.ceil(fraction * mask.sum()))
    strays = mask.copy()
    strays[tuple(candidates[rng.choice(len(candidates), count, replace=False)].T)] = True
    return strays


def stray_blob(mask: Mask, side: int, rng: np.random.Generator, fraction: float = 0.1) -> Mask:
    """The object plus one square blob apart from it, of ``fraction`` of its area."""
    width = max(2, round(math.sqrt(fraction * mask.sum())))
    # Top-left corners whose whole blob keeps 2 pixels from the object and stays in the image.
    clear = ~ndimage.binary_dilation(mask, np.ones((5, 5), dtype=bool))
    fits = ndimage.binary_erosion(clear, np.ones((width, width), dtype=bool), origin=-(width // 2), border_value=0)
    row, col = np.argwhere(fits)[rng.integers(int(fits.sum()))]
    blobbed = mask.copy()
    blobbed[row : row + width, col : col + width] = True
    return blobbed


Malformation = Callable[[Mask, int, np.random.Generator], Mask]
# name -> (malformation, the shapes it applies to)
MALFORMATIONS: dict[str, tuple[Malformation, tuple[str, ...]]] = {
    "ragged edges": (ragged, ("circle", "square", "triangle")),
    "pinholes": (pinholes, ("circle", "square", "triangle")),
    "hole": (hole, ("circle", "square", "triangle")),
    "bite": (bite, ("circle", "square", "triangle")),
    "ellipse": (ellipse, ("circle",)),
    "circle + square merged": (merged, ("circle", "square")),
    "stray pixels": (stray_pixels, ("circle", "square", "triangle")),
    "stray blob": (stray_blob, ("circle", "square", "triangle")),
}


# Milder versions, measured for reference (where the strict criterion starts to accept), not tested.
MILDER: dict[str, tuple[Malformation, tuple[str, ...]]] = {
    "ragged edges, flip 0.05": (partial(ragged, flip=0.05), ("circle", "square", "triangle")),
    "ragged edges, flip 0.1": (partial(ragged, flip=0.1), ("circle", "square", "triangle")),
    "ragged edges, flip 0.2": (partial(ragged, flip=0.2), ("circle", "square", "triangle")),
    "pinholes, drop 0.05": (partial(pinholes, drop=0.05), ("circle", "square", "triangle")),
    "bite, radius 0.2": (partial(bite, radius=0.2), ("circle", "square", "triangle")),
    "ellipse, aspect 1.2": (partial(ellipse, aspect=1.2), ("circle",)),
    "stray pixels, 0.03": (partial(stray_pixels, fraction=0.03), ("circle", "square", "triangle")),
}


def malformed_image(scene: ShapeScene, image_size: int, malformation: Malformation, rng: np.random.Generator) -> Image:
    """The one-object ``scene`` rendered, then its object's mask replaced by ``malformation`` of it."""
    (obj,) = scene.objects
    mask = render(scene, image_size, rng).any(axis=-1)
    image = np.zeros((image_size, image_size, 3))
    image[malformation(mask, object_side(obj.size, image_size), rng)] = np.array(COLORS[obj.color]) / 255
    return image


# ---------------------------------------------------------------------------------------------------- measuring
def single_scenes(shapes: tuple[str, ...] = ("circle", "square", "triangle")) -> list[ShapeScene]:
    """Every one-object scene of ``shapes`` (70 per shape: colour x size x position)."""
    return [scene for scene in all_scenes() if scene.relation is None and scene.objects[0].shape in shapes]


def pass_rates(images: list[Image], scenes: list[ShapeScene]) -> tuple[float, float]:
    """Fractions of the images scored all-correct by ShapeEval, leniently and strictly."""
    results = [score_image(image, scene.caption()) for image, scene in zip(images, scenes, strict=True)]
    return (
        sum(result["all_correct"] for result in results) / len(results),
        sum(result["all_correct_strict"] for result in results) / len(results),
    )


def degraded_renders(scenes: list[ShapeScene], image_size: int, degradation: Degradation, seed: int) -> list[Image]:
    rng = np.random.default_rng(seed)
    return [degradation(render(scene, image_size, rng) / 255.0, rng) for scene in scenes]


def _measure() -> None:
    pairs = [scene for scene in all_scenes() if scene.relation is not None]
    chosen = np.random.default_rng(0).choice(len(pairs), 300, replace=False)
    scenes = single_scenes() + [pairs[index] for index in chosen]
    print("true renders (210 one-object + 300 two-object scenes): lenient / strict all-correct, %")
    for image_size in (16, 32, 64):
        for name, degradation in DEGRADATIONS.items():
            lenient, strict = pass_rates(degraded_renders(scenes, image_size, degradation, seed=1), scenes)
            print(f"  {image_size:3d} px  {name:28s} {100 * lenient:6.1f} {100 * strict:6.1f}")
    print("malformed one-object images (70 per shape): lenient / strict all-correct, %")
    for image_size in (32, 64):
        for name, (malformation, shapes) in (MALFORMATIONS | MILDER).items():
            malformed_scenes = single_scenes(shapes)
            rng = np.random.default_rng(2)
            images = [malformed_image(scene, image_size, malformation, rng) for scene in malformed_scenes]
            lenient, strict = pass_rates(images, malformed_scenes)
            print(f"  {image_size:3d} px  {name:28s} {100 * lenient:6.1f} {100 * strict:6.1f}")


if __name__ == "__main__":
    start = time.perf_counter()
    _measure()
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
