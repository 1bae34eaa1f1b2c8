"""ShapeEval: score generated Shapes images against their captions by classical detection.

For each palette colour, the pixels within ``tolerance`` of it on every channel are its full-colour pixels;
connected components (``scipy.ndimage.label``, 8-connected) of those and of the colour's edge pixels (its
other channels dark, the colour at least a quarter present) are candidate objects, and the one with the most
full-colour pixels is that colour's object. It is measured on its soft mask: the colour's intensity over the
component grown by one pixel, so blurred or anti-aliased edges count by how much of each pixel they cover.

* size: the soft area, compared (in log) with the renderer's small and large areas of the detected shape;
* shape: two moments of the soft mask, normalised by its mass, which any symmetric separable blur (box,
  Gaussian) leaves unchanged, since it adds independent zero-mean offsets to x and y: *triangularity*, the
  vertical third central moment (1 for an apex-up triangle, 0 for a circle or a square), and *roundness*,
  ``-cov(x^2, y^2)`` (1 for a disc, 0 for an axis-aligned square). Fill ratios of a thresholded mask cannot
  tell a blurred small square from a circle: the renderer's 6-pixel circle is a 6-pixel square without its
  four corner pixels, and a 3x3 blur thresholded at half takes exactly those corners off the square;
* position: the anchor of :data:`~vugen.data.shapes.POSITION_ANCHORS` nearest to the centroid;
* relation (two objects): the sign of the centroids' offset along the axis where it is larger;
* strict shape: the shape above is lenient, any blob neither round nor triangular is a square, and a ragged,
  holed or bitten blob keeps the moments of its shape. Strictly, the soft mask must also match the renderer's
  ideal shape of the detected size (:mod:`vugen.eval.template_match`, the template blurred and placed as fits
  best): that shape's template fits best of the three, with soft IoU >= :data:`STRICT_TEMPLATE_IOU` and at most
  :data:`STRICT_TEMPLATE_DEFECTS` defect pixels (off by more than a half) per edge pixel of the template, and the
  colour's other components (stray pixels and blobs) weigh at most :data:`STRICT_STRAY_FRACTION` of the object.

An expected object takes the detection of its colour; one whose colour is missing takes the largest detection
that no expected colour claims, so a wrong colour costs only the colour: shape, size and position are still
scored on the object drawn instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchmetrics import Metric

from vugen.data.shapes import (
    COLORS,
    POSITION_ANCHORS,
    SHAPES,
    SIZES,
    ShapeObject,
    check_image_size,
    object_side,
    parse_caption,
    shape_mask,
)
from vugen.eval.geneval_folder import read_geneval_folder
from vugen.eval.template_match import template_fits

__all__ = ["Detection", "ShapeEval", "detect_objects", "format_report", "score_folder", "score_image"]

_RANGE_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding
# -mu_03 / M^1.5 of a continuous apex-up triangle (base = height) is 2 sqrt(2) / 135; scale it to 1.
_TRIANGULARITY_SCALE = 135.0 / (2.0 * math.sqrt(2.0))
# -cov(x^2, y^2) / M^2 of a disc is 1 / (48 pi^2); scale it to 1.
_ROUNDNESS_SCALE = 48.0 * math.pi**2
# Measured on the renderer at every image size 16..256: triangles have triangularity >= 0.68 and circles
# roundness >= 0.72 (both lowest at the smallest sides), the other shapes 0.
_SHAPE_THRESHOLD = 0.4
# Strict shape (Detection.strict_shape), tuned in tests/malformed_shapes.py (its docstring has the pass rates). At
# 32 and 64 px, true renders blurred (sigma <= 0.82) and noisy (sigma 0.05) fit their template with IoU >= 0.89 and
# no defect and have no strays; each malformed image has >= 0.12 defect per edge pixel or >= 8 % strays.
STRICT_TEMPLATE_IOU = 0.85
STRICT_TEMPLATE_DEFECTS = 0.1
STRICT_STRAY_FRACTION = 0.05
_EDGE_LEVEL = 0.25  # an edge pixel holds at least this much of the colour; 5 sigma above noise of sigma 0.05
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_OBJECT_ATTRIBUTES = ("color", "shape", "size")
_IMAGE_ATTRIBUTES = ("relation", "all_correct", "all_correct_strict")  # one per image; the others one per object
_ATTRIBUTES = (*_OBJECT_ATTRIBUTES, "position", "shape_strict", *_IMAGE_ATTRIBUTES)
_GROUP_ATTRIBUTES = {  # index in _GROUPS = number of objects - 1
    "single_object": (*_OBJECT_ATTRIBUTES, "position", "shape_strict", "all_correct", "all_correct_strict"),
    "two_object": (*_OBJECT_ATTRIBUTES, "shape_strict", "relation", "all_correct", "all_correct_strict"),
}
_GROUPS = tuple(_GROUP_ATTRIBUTES)
_OVERALL_ATTRIBUTES = ("all_correct", "all_correct_strict")
# The report's columns: the strict all-correct rate is the headline, each strict value left of its lenient one.
_REPORT_COLUMNS = (
    "all_correct_strict",
    "all_correct",
    "color",
    "shape_strict",
    "shape",
    "size",
    "position",
    "relation",
)


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        color: Palette colour name.
        shape: Classified shape.
        size: ``"small"`` or ``"large"``, the nearer (in log area) renderer size of that shape.
        position: Nearest position anchor of the centroid.
        centroid: ``(x, y)`` in pixels, continuous coordinates (pixel ``i`` covers ``[i, i + 1)``).
        area: Soft area in pixels.
        triangularity: Normalised vertical skew: 1 for an apex-up triangle, 0 for a circle or a square.
        roundness: Normalised ``-cov(x^2, y^2)``: 1 for a disc, 0 for an axis-aligned square.
        template_iou: Soft IoU of the soft mask with the renderer's template of ``shape`` at ``size``, blurred and
            placed as fits best (:func:`~vugen.eval.template_match.template_fits`).
        template_defects: Pixels off that template by more than a half, per edge pixel of the template.
        best_template: The shape whose template at ``size`` fits the soft mask best (highest IoU).
        stray_fraction: Mass of the colour's other components (those with full-colour pixels) over ``area``.
    """

    color: str
    shape: str
    size: str
    position: str
    centroid: tuple[float, float]
    area: float
    triangularity: float
    roundness: float
    template_iou: float
    template_defects: float
    best_template: str
    stray_fraction: float

    @property
    def strict_shape(self) -> bool:
        """Whether ``shape`` holds strictly: its template fits best and closely, and strays are negligible (see the
        module docstring)."""
        return (
            self.best_template == self.shape
            and self.template_iou >= STRICT_TEMPLATE_IOU
            and self.template_defects <= STRICT_TEMPLATE_DEFECTS
            and self.stray_fraction <= STRICT_STRAY_FRACTION
        )


def _to_rgb(image: Any) -> np.ndarray:
    """``image`` as float64 ``[H, W, 3]`` in [0, 1]: accepts PIL, a ``[3, H, W]`` tensor, ``[H, W, 3]`` or
    ``[3, H, W]`` numpy, each uint8 or float in [0, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W], got shape {tuple(image.shape)}")
        tensor = image.detach().cpu()
        array = (tensor if tensor.dtype == torch.uint8 else tensor.double()).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray) and image.ndim == 3 and 3 in (image.shape[0], image.shape[-1]):
        array = image if image.shape[-1] == 3 else image.transpose(1, 2, 0)
    else:
        description = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be a PIL image, a [3, H, W] tensor or [H, W, 3] array, got {description}")
    if array.dtype == np.uint8:
        return array / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float in [0, 1], got dtype {array.dtype}")
    low, high = float(array.min()), float(array.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"float image values must be in [0, 1], got [{low:.3g}, {high:.3g}]")
    return np.clip(array, 0.0, 1.0).astype(np.float64)


def _image_size(rgb: np.ndarray) -> int:
    height, width = rgb.shape[:2]
    if height != width:
        raise ValueError(f"image must be square, got {height}x{width}")
    try:
        return check_image_size(height)
    except ValueError as error:
        raise ValueError(f"image side {height} is not one the Shapes renderer draws: {error}") from error


def _template_area(shape: str, size: str, image_size: int) -> int:
    return int(shape_mask(shape, object_side(size, image_size)).sum())


def _moments(weights: np.ndarray, offset: tuple[int, int]) -> tuple[float, float, float, float, float]:
    """Mass, centroid ``(x, y)`` in image pixels, triangularity and roundness of a soft mask crop."""
    ys, xs = np.indices(weights.shape, dtype=np.float64) + 0.5
    mass = float(weights.sum())
    cx, cy = float((weights * xs).sum()) / mass, float((weights * ys).sum()) / mass
    dx2, dy = (xs - cx) ** 2, ys - cy

    def mean(values: np.ndarray) -> float:
        return float((weights * values).sum() / mass)

    triangularity = -mean(dy**3) / mass**1.5 * _TRIANGULARITY_SCALE
    roundness = -(mean(dx2 * dy**2) - mean(dx2) * mean(dy**2)) / mass**2 * _ROUNDNESS_SCALE
    return mass, cx + offset[1], cy + offset[0], triangularity, roundness


def _classify_shape(triangularity: float, roundness: float) -> str:
    if triangularity > _SHAPE_THRESHOLD:
        return "triangle"
    return "circle" if roundness > _SHAPE_THRESHOLD else "square"


def _classify_size(shape: str, area: float, image_size: int) -> str:
    small, large = (_template_area(shape, size, image_size) for size in SIZES)
    return "small" if area < math.sqrt(small * large) else "large"


def _nearest_position(x: float, y: float, image_size: int) -> str:
    point = np.array([x, y]) / image_size
    return min(POSITION_ANCHORS, key=lambda name: float(np.linalg.norm(point - POSITION_ANCHORS[name])))


def _measure(rgb: np.ndarray, color: str, tolerance: float) -> Detection | None:
    """The largest object of one palette colour, measured on its soft mask; None if the colour is absent."""
    target = np.array(COLORS[color], dtype=np.float64) / 255.0
    on = target > 0.5
    hard = np.all(np.abs(rgb - target) <= tolerance, axis=-1)
    if not hard.any():
        return None
    # Pixels of this colour at partial intensity (its other channels dark): blurred or anti-aliased edges.
    partial = np.all(rgb[..., ~on] <= tolerance, axis=-1)
    membership = rgb[..., on].mean(axis=-1)
    support = hard | (partial & (membership >= _EDGE_LEVEL))
    components, _ = ndimage.label(support, structure=_EIGHT_CONNECTED)
    # The object is the component with the most full-colour pixels: edge pixels alone never make one.
    largest = np.argmax(np.bincount(components[hard]))
    # One more pixel around takes in the faintest edge pixels (a 3x3 blur spreads a square's corner by one).
    region = ndimage.binary_dilation(components == largest, structure=_EIGHT_CONNECTED) & partial
    box = ndimage.find_objects(region.astype(np.int8))[0]
    weights = np.where(region[box], membership[box], 0.0)
    mass, cx, cy, triangularity, roundness = _moments(weights, (box[0].start, box[1].start))
    image_size = rgb.shape[0]
    shape = _classify_shape(triangularity, roundness)
    size = _classify_size(shape, mass, image_size)
    fits = template_fits(np.where(region, membership, 0.0), object_side(size, image_size))
    # Strays: the colour's other components with full-colour pixels (edge-only ones are another colour's edges).
    component_mass = np.bincount(components.ravel(), weights=membership.ravel())
    strays = np.bincount(components[hard], minlength=len(component_mass)) > 0
    strays[[0, largest]] = False
    return Detection(
        color=color,
        shape=shape,
        size=size,
        position=_nearest_position(cx, cy, image_size),
        centroid=(cx, cy),
        area=mass,
        triangularity=triangularity,
        roundness=roundness,
        template_iou=fits[shape].iou,
        template_defects=fits[shape].defects,
        best_template=max(fits, key=lambda name: fits[name].iou),
        stray_fraction=float(component_mass[strays].sum()) / mass,
    )


def detect_objects(image: Any, tolerance: float = 0.4, min_area_fraction: float = 0.25) -> list[Detection]:
    """Detect the largest object of each palette colour in a Shapes-style image.

    Args:
        image: PIL image, ``[3, H, W]`` tensor or ``[H, W, 3]`` array, uint8 or float in [0, 1]; square, with a
            side the Shapes renderer supports (>= 16, a multiple of 8).
        tolerance: Largest distance, on every channel (in [0, 1] units), of a full-colour pixel from its palette
            colour, and of an edge pixel's other channels from 0. At 0.5 every pixel takes its nearest colour;
            below it, off-palette hues (e.g. orange between red and yellow) count as no colour.
        min_area_fraction: An object counts if its soft area is at least this fraction of the smallest object
            the renderer draws at this image size.

    Returns:
        The detections, largest first, at most one per colour.

    Raises:
        ValueError: If the image has another layout, dtype, value range or size, or an argument is out of range.
    """
    if not 0.0 < tolerance <= 0.5:
        raise ValueError(f"tolerance must be in (0, 0.5], got {tolerance!r}")
    if not 0.0 < min_area_fraction <= 1.0:
        raise ValueError(f"min_area_fraction must be in (0, 1], got {min_area_fraction!r}")
    rgb = _to_rgb(image)
    image_size = _image_size(rgb)
    min_area = min_area_fraction * min(_template_area(shape, "small", image_size) for shape in SHAPES)
    detections = (_measure(rgb, color, tolerance) for color in COLORS)
    return sorted((d for d in detections if d is not None and d.area >= min_area), key=lambda d: -d.area)


def _match(objects: tuple[ShapeObject, ...], detections: list[Detection]) -> list[Detection | None]:
    """The detection of each object's colour; objects whose colour is missing take the largest unclaimed ones."""
    by_color = {detection.color: detection for detection in detections}
    expected_colors = {obj.color for obj in objects}
    spare = iter(d for d in detections if d.color not in expected_colors)
    return [by_color[obj.color] if obj.color in by_color else next(spare, None) for obj in objects]


def _relation(first: Detection, second: Detection) -> str:
    dx, dy = (a - b for a, b in zip(first.centroid, second.centroid, strict=True))
    if abs(dx) >= abs(dy):
        return "left_of" if dx < 0 else "right_of"
    return "above" if dy < 0 else "below"


def _object_scores(obj: ShapeObject, detection: Detection | None) -> dict[str, bool]:
    names = _OBJECT_ATTRIBUTES + (("position",) if obj.position is not None else ())
    return {name: detection is not None and getattr(detection, name) == getattr(obj, name) for name in names}


def score_image(image: Any, prompt: str, tolerance: float = 0.4, min_area_fraction: float = 0.25) -> dict[str, Any]:
    """Score one image against its Shapes caption.

    Args:
        image: PIL image, ``[3, H, W]`` tensor (float in [0, 1] as the pipeline outputs, or uint8), or an
            ``[H, W, 3]`` / ``[3, H, W]`` array; square, side >= 16 and a multiple of 8.
        prompt: A Shapes caption, e.g. ``"a large red circle on the left"``.
        tolerance: See :func:`detect_objects`.
        min_area_fraction: See :func:`detect_objects`.

    Returns:
        ``{"objects": [{"color", "shape", "size"[, "position"]: bool} per caption object], "relation": bool``
        (two-object captions only) ``, "all_correct": bool, "shape_strict": [bool per caption object],
        "all_correct_strict": bool, "matched": [Detection | None per caption object], "detected": [Detection,
        ...]}``. ``position`` is scored for a one-object caption only. ``shape_strict`` says whether the object's
        shape is right and holds strictly (:attr:`Detection.strict_shape`); ``all_correct_strict`` is
        ``all_correct`` with every shape strict.

    Raises:
        ValueError: If ``prompt`` is not a Shapes caption (the message quotes it) or the image is invalid.
    """
    scene = parse_caption(prompt)
    detections = detect_objects(image, tolerance, min_area_fraction)
    matched = _match(scene.objects, detections)
    result: dict[str, Any] = {
        "objects": [_object_scores(obj, det) for obj, det in zip(scene.objects, matched, strict=True)]
    }
    flags = [flag for scores in result["objects"] for flag in scores.values()]
    if scene.relation is not None:
        first, second = matched
        result["relation"] = first is not None and second is not None and _relation(first, second) == scene.relation
        flags.append(result["relation"])
    result["all_correct"] = all(flags)
    result["shape_strict"] = [
        scores["shape"] and detection.strict_shape for scores, detection in zip(result["objects"], matched, strict=True)
    ]
    result["all_correct_strict"] = result["all_correct"] and all(result["shape_strict"])
    result["matched"] = matched
    result["detected"] = detections
    return result


class ShapeEval(Metric):
    """Accuracy of generated Shapes images against their captions, per attribute, synchronised across ranks.

    Reported separately for one-object captions (colour, shape, size, position) and two-object captions
    (colour, shape and size over both objects, and the relation), with the all-correct rate of each group
    and overall. Each is scored leniently, as the classical detector sees it (any blob neither round nor
    triangular is a square), and strictly: ``shape_strict`` counts an object's shape only where its mask
    matches the renderer's ideal shape (:attr:`Detection.strict_shape`), and ``all_correct_strict`` is the
    all-correct rate with strict shapes, the score to quote for generated images.

    Keys of :meth:`compute`: ``"<group>/<attribute>"`` for groups ``single_object``, ``two_object`` and
    ``overall`` (only ``all_correct`` and ``all_correct_strict`` there), plus ``"<group>/count"``, the number of
    images; a group without images has only its count.

    Args:
        tolerance: See :func:`detect_objects`.
        min_area_fraction: See :func:`detect_objects`.
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, tolerance: float = 0.4, min_area_fraction: float = 0.25, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance
        self.min_area_fraction = min_area_fraction
        # correct[g, a]: number correct of attribute a among images of group g (objects counted one by one).
        self.add_state("correct", torch.zeros(len(_GROUPS), len(_ATTRIBUTES), dtype=torch.long), "sum")
        self.add_state("images", torch.zeros(len(_GROUPS), dtype=torch.long), "sum")

    def update(self, images: torch.Tensor | list[Any], prompts: list[str]) -> None:
        """Score a batch.

        Args:
            images: ``[B, 3, H, W]`` tensor or a list of images in any form :func:`score_image` takes.
            prompts: One Shapes caption per image.

        Raises:
            ValueError: If the numbers of images and prompts differ, or as :func:`score_image`.
        """
        if isinstance(prompts, str) or len(images) != len(prompts):
            kind = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"update needs a list with one prompt per image, got {len(images)} images and {kind}")
        for image, prompt in zip(images, prompts, strict=True):
            result = score_image(image, prompt, self.tolerance, self.min_area_fraction)
            objects = [
                {**scores, "shape_strict": strict}
                for scores, strict in zip(result["objects"], result["shape_strict"], strict=True)
            ]
            # Object attributes are counted over the image's objects, the others once per image.
            counts = [
                result.get(attribute, False)
                if attribute in _IMAGE_ATTRIBUTES
                else sum(scores.get(attribute, False) for scores in objects)
                for attribute in _ATTRIBUTES
            ]
            group = len(result["objects"]) - 1
            self.correct[group] += torch.tensor(counts, device=self.correct.device)
            self.images[group] += 1

    def compute(self) -> dict[str, float | int]:
        """Accuracies in [0, 1] and image counts (see the class docstring for the keys)."""
        results: dict[str, float | int] = {}
        for group, name in enumerate(_GROUPS):
            num_images = int(self.images[group])
            results[f"{name}/count"] = num_images
            for attribute in _GROUP_ATTRIBUTES[name] if num_images else ():
                # Object attributes are counted per object: one per image, or two.
                total = num_images if attribute in _IMAGE_ATTRIBUTES else num_images * (group + 1)
                results[f"{name}/{attribute}"] = int(self.correct[group, _ATTRIBUTES.index(attribute)]) / total
        results["overall/count"] = int(self.images.sum())
        for attribute in _OVERALL_ATTRIBUTES if results["overall/count"] else ():
            correct = int(self.correct[:, _ATTRIBUTES.index(attribute)].sum())
            results[f"overall/{attribute}"] = correct / results["overall/count"]
        return results


def score_folder(
    path: str | PathLike[str], tolerance: float = 0.4, min_area_fraction: float = 0.25
) -> dict[str, float | int]:
    """Score a folder in the GenEval layout: ``<idx:05d>/metadata.jsonl`` and ``<idx:05d>/samples/<NNNN>.png``.

    Every sample PNG is scored against its folder's prompt (the ``"prompt"`` of the first JSON line of
    ``metadata.jsonl``); other entries (e.g. ``grid.png``) are ignored.

    Args:
        path: The image folder.
        tolerance: See :func:`detect_objects`.
        min_area_fraction: See :func:`detect_objects`.

    Returns:
        :meth:`ShapeEval.compute` over all samples.

    Raises:
        FileNotFoundError: If ``path`` is not a directory or a prompt folder lacks its metadata.
        ValueError: If there is no prompt folder, one has no sample PNG, or a metadata file or prompt is invalid.
    """
    metric = ShapeEval(tolerance, min_area_fraction)
    for prompt, samples in read_geneval_folder(path):
        for sample in samples:
            with Image.open(sample) as image:
                metric.update([image.convert("RGB")], [prompt])
    return metric.compute()


def format_report(results: dict[str, float | int]) -> str:
    """A small text table of :meth:`ShapeEval.compute`'s results: accuracies in percent, ``-`` where not scored.

    The strict all-correct rate comes first (the headline), then the lenient one; ``shape_strict`` stands beside
    the lenient ``shape``.

    Args:
        results: The dict returned by :meth:`ShapeEval.compute` or :func:`score_folder`.

    Returns:
        The table, one line per group.

    Raises:
        ValueError: If ``results`` lacks the count of a group.
    """
    rows = [("ShapeEval", "count", *_REPORT_COLUMNS)]
    for group in (*_GROUPS, "overall"):
        if f"{group}/count" not in results:
            raise ValueError(f"results lack {group + '/count'!r}: expected the dict of ShapeEval.compute()")
        cells = [str(results[f"{group}/count"])]
        cells += [f"{100 * results[f'{group}/{a}']:.1f}" if f"{group}/{a}" in results else "-" for a in _REPORT_COLUMNS]
        rows.append((group, *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        row[0].ljust(widths[0]) + "".join(f"  {cell:>{w}}" for cell, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    ]
    return "\n".join(lines)
