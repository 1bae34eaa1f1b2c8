"""ShapeEval's strict shape criterion: true renders pass it, blurred and noisy too; malformed shapes fail it while
the lenient classifier still calls them right (tests/malformed_shapes.py makes both, and holds the figures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.malformed_shapes import (
    DEGRADATIONS,
    MALFORMATIONS,
    degraded_renders,
    malformed_image,
    pass_rates,
    ragged,
    single_scenes,
)
from vugen.data.shapes import all_scenes, parse_caption, render
from vugen.eval.shapeeval import ShapeEval, detect_objects, score_image

ELLIPSE = "a large red circle on the left"
PAIR = "a small blue square to the left of a large yellow triangle"


def some_scenes(num_pairs: int = 60):
    """Every one-object scene, then ``num_pairs`` two-object scenes spread over the whole list."""
    pairs = [scene for scene in all_scenes() if scene.relation is not None]
    return single_scenes() + pairs[:: len(pairs) // num_pairs][:num_pairs]


def test_a_true_render_fits_its_template_exactly():
    rng = np.random.default_rng(0)
    for scene in single_scenes():
        (detection,) = detect_objects(render(scene, 32, rng))
        assert detection.strict_shape, scene.caption()
        assert (detection.template_iou, detection.template_defects, detection.stray_fraction) == (1.0, 0.0, 0.0)
        assert detection.best_template == detection.shape == scene.objects[0].shape


@pytest.mark.parametrize(
    ("image_size", "degradation"),
    [
        (16, "render"),
        (16, "noise 0.05"),
        (16, "gaussian 0.7"),
        (32, "render"),
        (32, "gaussian 0.7 + noise 0.05"),
        (32, "box 3x3 + noise 0.05"),
        (64, "gaussian 0.7 + noise 0.05"),
    ],
)
def test_degraded_true_renders_pass_strictly(image_size, degradation):
    """The 16 px renders with blur and noise together are left out: the lenient scorer misses 6-14 % of them."""
    scenes = some_scenes()
    lenient, strict = pass_rates(degraded_renders(scenes, image_size, DEGRADATIONS[degradation], seed=3), scenes)
    assert strict >= 0.99 and strict <= lenient, (lenient, strict)


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("name", MALFORMATIONS)
def test_malformed_shapes_fail_strictly_but_not_leniently(name, image_size):
    """Negative control: the lenient criterion passes at least 40 % of each malformed case (measured 44-100 %),
    the strict one none."""
    malformation, shapes = MALFORMATIONS[name]
    scenes = single_scenes(shapes)
    rng = np.random.default_rng(4)
    images = [malformed_image(scene, image_size, malformation, rng) for scene in scenes]
    lenient, strict = pass_rates(images, scenes)
    assert lenient >= 0.4 and strict == 0.0, (lenient, strict)


def test_score_image_says_which_shape_holds_strictly():
    rng = np.random.default_rng(5)
    image = render(parse_caption(PAIR), 32, rng) / 255.0
    yellow = np.all(image == (1.0, 1.0, 0.0), axis=-1)
    image[ragged(yellow, 12, rng, flip=0.5) & ~yellow] = (1.0, 1.0, 0.0)  # bumps on the triangle only
    result = score_image(image, PAIR)
    assert result["all_correct"] and result["shape_strict"] == [True, False]
    assert result["all_correct_strict"] is False


def test_strict_counts_go_into_compute_and_merge_like_every_state():
    rng = np.random.default_rng(6)
    circle = parse_caption(ELLIPSE)
    ellipse_image = malformed_image(circle, 32, MALFORMATIONS["ellipse"][0], rng)
    pair = render(parse_caption(PAIR), 32, rng) / 255.0
    pair[np.all(pair == (0.0, 0.0, 1.0), axis=-1)] = 0.0  # no blue square: its colour, shape and size are wrong
    images = [render(circle, 32, rng) / 255.0, ellipse_image, render(parse_caption(PAIR), 32, rng) / 255.0, pair]
    prompts = [ELLIPSE, ELLIPSE, PAIR, PAIR]
    metric = ShapeEval()
    metric.update([torch.from_numpy(image).permute(2, 0, 1) for image in images], prompts)
    results = metric.compute()
    assert (results["single_object/shape"], results["single_object/shape_strict"]) == (1.0, 0.5)
    assert (results["single_object/all_correct"], results["single_object/all_correct_strict"]) == (1.0, 0.5)
    assert (results["two_object/shape"], results["two_object/shape_strict"]) == (0.75, 0.75)
    assert (results["two_object/all_correct"], results["two_object/all_correct_strict"]) == (0.5, 0.5)
    assert (results["overall/all_correct"], results["overall/all_correct_strict"]) == (0.75, 0.5)
    # Two ranks' worth of states, merged as torchmetrics syncs them, give the same figures.
    halves = [ShapeEval(), ShapeEval()]
    for half, indices in zip(halves, ([0, 2], [1, 3]), strict=True):
        half.update([torch.from_numpy(images[i]).permute(2, 0, 1) for i in indices], [prompts[i] for i in indices])
    halves[0].merge_state(halves[1])
    assert halves[0].compute() == results


def test_best_template_names_the_shape_a_mask_is():
    """A circle drawn where the caption asks for a square: lenient and strict both say circle."""
    image = render(parse_caption("a large white circle in the center"), 32, np.random.default_rng(7))
    result = score_image(image, "a large white square in the center")
    (detection,) = result["matched"]
    assert detection.best_template == detection.shape == "circle" and detection.strict_shape
    assert result["objects"][0]["shape"] is False and result["shape_strict"] == [False]


def test_a_faint_object_fails_on_its_iou_alone():
    """Negative control of the IoU threshold: a faint circle has no defect (off by less than a half everywhere)
    and no stray, and its moments are a circle's."""
    image = render(parse_caption(ELLIPSE), 32, np.random.default_rng(8)) / 255.0 * 0.65
    result = score_image(image, ELLIPSE)
    (detection,) = result["matched"]
    assert result["all_correct"] and not result["all_correct_strict"]
    assert detection.template_defects == 0.0 and detection.stray_fraction == 0.0
    assert detection.best_template == "circle" and detection.template_iou < 0.85
