"""How closely an object's soft mask matches the Shapes renderer's ideal shape: a fit of blurred templates.

The ideal shape of a side is the renderer's own mask, :func:`vugen.data.shapes.shape_mask`. An image may be
blurred (a decoder's smooth edges, a resize), so each template is compared blurred by every kernel of a small
family, the separable 3-tap kernels ``[a, 1 - 2a, a]`` with ``a`` in :data:`BLUR_WEIGHTS` (``a = 0``: hard
edges; ``a = 1/3``: a 3x3 box; a Gaussian of sigma ``s`` is close to ``a = s^2 / 2`` up to sigma ~0.8), at every
integer offset within a few pixels of where the centroids coincide. The renderer places objects at integer
offsets, so sub-pixel offsets are not searched. Both mask and template first go through the same ramp, which
makes values within :data:`NOISE_FLOOR` of 0 or 1 exactly 0 or 1 (additive noise of sigma 0.05 then costs
almost nothing). The best fit has the highest soft IoU (Ruzicka), ``sum(min(m, t)) / sum(max(m, t))`` over the
image; template pixels that would fall outside the image are dropped (a blur there loses them too).

Fitting the blur lets a blurred, noisy true render match its template almost exactly (IoU >= 0.89 and no defect
at 32 px, see tests/malformed_shapes.py), while ragged edges, holes, bites and wrong proportions still cost what
they cover: a blur never makes a full pixel empty or an empty pixel full, so they remain *defects*, pixels where
mask and fitted template differ by more than a half.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from vugen.data.shapes import SHAPES, shape_mask

__all__ = ["BLUR_WEIGHTS", "NOISE_FLOOR", "TemplateFit", "template_fits"]

BLUR_WEIGHTS: tuple[float, ...] = tuple(step / 18 for step in range(7))  # 0 to 1/3; a step of 1/18 (measured):
# the Gaussian of sigma 0.7 (a = 0.245) fits at IoU 0.988 (a 1/12 step left 0.948 at 32 px)
NOISE_FLOOR = 0.1  # two sigmas of the noise tolerated (0.05); blurred edges keep values well inside
# Offsets searched around centroid alignment, per axis. A mask that can pass the strict criterion (defects at most a
# tenth of the template's edge, so a mass of about 0.4 side at most a side away) has its centroid within about
# 0.4 pixel of its template's: 2 pixels leave a margin at any size.
_RADIUS = 2


@dataclass(frozen=True)
class TemplateFit:
    """How one shape's template fits a mask at its best blur and offset.

    Attributes:
        iou: Soft IoU, in [0, 1].
        defects: Pixels where the mask and the fitted template differ by more than a half, per edge pixel of
            the template (so that ragged edges cost alike at every size): none in a blurred noisy render; each
            pixel flipped, of a hole or of a bump counts one.
    """

    iou: float
    defects: float


def _ramp(values: np.ndarray) -> np.ndarray:
    """Values within NOISE_FLOOR of 0 or 1 made 0 or 1, the rest stretched linearly between."""
    return np.clip((values - NOISE_FLOOR) / (1 - 2 * NOISE_FLOOR), 0.0, 1.0)


def _centroid(mask: np.ndarray) -> np.ndarray:
    """``(row, column)`` of the mass centroid, in pixel indices."""
    indices = np.indices(mask.shape, dtype=np.float64)
    return (indices * mask).sum(axis=(1, 2)) / mask.sum()


@lru_cache(maxsize=64)
def _templates(shape: str, side: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The template with a one-pixel margin: blurred by each kernel and ramped, ``[K, side + 2, side + 2]``; its
    centroid in that box (both read-only, cached); its number of edge pixels."""
    mask = shape_mask(shape, side)
    edge = int(np.count_nonzero(mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1))))
    template = np.pad(mask.astype(np.float64), 1)
    blurred = []
    for weight in BLUR_WEIGHTS:
        kernel = np.array([weight, 1 - 2 * weight, weight])
        rows = ndimage.convolve1d(template, kernel, axis=0, mode="constant")
        blurred.append(ndimage.convolve1d(rows, kernel, axis=1, mode="constant"))
    templates, centroid = _ramp(np.stack(blurred)).astype(np.float32), _centroid(template)
    for array in (templates, centroid):
        array.setflags(write=False)
    return templates, centroid, edge


def _soft_iou(mask: np.ndarray, template: np.ndarray, mass: float) -> np.ndarray:
    """Soft IoU over the image of a mask of total ``mass`` with templates placed in boxes ``[..., box, box]``, of
    which ``mask`` holds the mask's part (broadcast)."""
    # With A, B the mask's and the template's mass in the box and D their L1 distance there, the box holds
    # sum(min) = (A + B - D) / 2 and sum(max) = (A + B + D) / 2, and the union adds the mask's M - A outside.
    in_box, template_mass = mask.sum(axis=(-2, -1)), template.sum(axis=(-2, -1))
    distance = np.abs(mask - template).sum(axis=(-2, -1))
    return (in_box + template_mass - distance) / (2 * mass - in_box + template_mass + distance)


def template_fits(mask: np.ndarray, side: int) -> dict[str, TemplateFit]:
    """How each shape's template of ``side`` pixels fits ``mask`` at its best blur and offset (highest IoU).

    Args:
        mask: ``[H, W]`` soft mask of one object in [0, 1], zero away from it; not all zero.
        side: Template side in pixels (:func:`vugen.data.shapes.object_side` of the size to compare with).

    Returns:
        ``{shape: TemplateFit}`` for every shape of :data:`vugen.data.shapes.SHAPES`.
    """
    box = side + 2  # the template's box: the shape and its one-pixel margin, where the blur spreads it
    pad = box + _RADIUS
    canvas = np.pad(_ramp(mask).astype(np.float32), pad)
    inside = np.pad(np.ones(mask.shape, dtype=np.float32), pad)
    mass, mask_on = float(canvas.sum()), np.count_nonzero(canvas > 0.5)
    row, col = _centroid(mask)
    fits = {}
    for shape in SHAPES:
        templates, (template_row, template_col), edge = _templates(shape, side)
        top = round(row - template_row) + pad - _RADIUS
        left = round(col - template_col) + pad - _RADIUS
        span = (slice(top, top + 2 * _RADIUS + box), slice(left, left + 2 * _RADIUS + box))
        windows = sliding_window_view(canvas[span], (box, box))  # [P, P, box, box], one per offset
        insides = sliding_window_view(inside[span], (box, box))
        # A symmetric blur does not move the best offset: find it with the middle blur, then fit the blur there.
        ious = _soft_iou(windows, templates[len(BLUR_WEIGHTS) // 2] * insides, mass)
        offset = np.unravel_index(np.argmax(ious), ious.shape)
        window, placed = windows[offset], templates * insides[offset]  # [box, box], [K, box, box]
        ious = _soft_iou(window, placed, mass)
        blur = int(np.argmax(ious))
        # Defects in the box, and the mask's pixels more than half on outside it.
        defects = np.count_nonzero(np.abs(window - placed[blur]) > 0.5)
        defects += mask_on - np.count_nonzero(window > 0.5)
        fits[shape] = TemplateFit(float(ious[blur]), defects / edge)
    return fits
