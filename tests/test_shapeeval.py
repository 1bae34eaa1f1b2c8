"""Tests of ShapeEval, the classical-detection scorer of generated Shapes images."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vugen.data.shapes import (
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapeScene,
    all_scenes,
    parse_caption,
    render,
)
from vugen.eval.shapeeval import Detection, ShapeEval, detect_objects, format_report, score_folder, score_image

PAIR = "a small blue square to the left of a large yellow triangle"
ATTRIBUTE_OPTIONS = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "position": POSITIONS}


def scenes(num_pairs: int, seed: int = 0) -> list[ShapeScene]:
    """Every one-object scene (210: shape x colour x size x position), then ``num_pairs`` random two-object ones."""
    singles = [scene for scene in all_scenes() if scene.relation is None]
    pairs = [scene for scene in all_scenes() if scene.relation is not None]
    chosen = np.random.default_rng(seed).choice(len(pairs), num_pairs, replace=False)
    return singles + [pairs[index] for index in chosen]


def render_batch(batch: list[ShapeScene], image_size: int, seed: int = 0) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1], as the pipeline outputs."""
    rng = np.random.default_rng(seed)
    images = np.stack([render(scene, image_size, rng) for scene in batch])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def attributes(item: ShapeObject | Detection) -> tuple[str | None, ...]:
    return item.color, item.shape, item.size, item.position


def expected_metrics(num_singles: int, num_pairs: int, value: float) -> dict[str, float | int]:
    metrics: dict[str, float | int] = {"single_object/count": num_singles, "two_object/count": num_pairs}
    strict = ("shape_strict", "all_correct_strict")
    metrics |= {f"single_object/{a}": value for a in ("color", "shape", "size", "position", "all_correct", *strict)}
    metrics |= {f"two_object/{a}": value for a in ("color", "shape", "size", "relation", "all_correct", *strict)}
    overall = {"overall/all_correct": value, "overall/all_correct_strict": value}
    return metrics | {"overall/count": num_singles + num_pairs} | overall


@pytest.mark.parametrize("image_size", [32, 64])
def test_renderer_images_score_perfectly(image_size):
    batch = scenes(300)
    metric = ShapeEval()
    metric.update(render_batch(batch, image_size), [scene.caption() for scene in batch])
    assert metric.compute() == expected_metrics(210, 300, 1.0)


@pytest.mark.parametrize("image_size", [16, 24, 32, 64])
def test_detections_match_the_rendered_pixels(image_size):
    """Area and centroid equal those of the drawn pixels, computed here from the image alone."""
    rng = np.random.default_rng(1)
    for scene in [scene for scene in all_scenes() if scene.relation is None]:
        image = render(scene, image_size, rng)
        (detection,) = detect_objects(image)
        rows, cols = np.nonzero(image.any(axis=-1))
        (obj,) = scene.objects
        assert attributes(detection) == attributes(obj)
        assert detection.area == pytest.approx(len(rows))
        assert detection.centroid == pytest.approx((cols.mean() + 0.5, rows.mean() + 0.5))


def test_shape_features_keep_a_margin_at_every_renderer_size():
    """Triangularity and roundness are ~0 where the shape lacks them and >= 0.68 where it has them (threshold 0.4)."""
    rng = np.random.default_rng(2)
    for image_size in range(16, 257, 8):
        for shape, size in itertools.product(SHAPES, SIZES):
            scene = ShapeScene((ShapeObject(shape, "white", size, "center"),))
            (detection,) = detect_objects(render(scene, image_size, rng))
            assert (detection.shape, detection.size, detection.position) == (shape, size, "center"), image_size
            # Roundness is high for triangles too: the classifier looks at triangularity first.
            for feature, present in (("triangularity", shape == "triangle"), ("roundness", shape != "square")):
                value = getattr(detection, feature)
                assert value >= 0.68 if present else abs(value) < 1e-9, (image_size, shape, size, feature, value)


def degrade(images: torch.Tensor, blur: bool, noise: bool, seed: int = 0) -> torch.Tensor:
    """3x3 box blur (zero padding) and/or Gaussian noise of sigma 0.05, clipped to [0, 1]."""
    if blur:
        images = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=True)
    if noise:
        images = images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return images.clamp(0, 1)


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize(("blur", "noise"), [(False, True), (True, False), (True, True)])
def test_robust_to_noise_and_blur(image_size, blur, noise):
    batch = scenes(300, seed=1)
    metric = ShapeEval()
    metric.update(degrade(render_batch(batch, image_size, seed=1), blur, noise), [scene.caption() for scene in batch])
    results = metric.compute()
    assert results.keys() == expected_metrics(210, 300, 1.0).keys()
    assert (results["single_object/count"], results["two_object/count"]) == (210, 300)
    accuracies = {key: value for key, value in results.items() if not key.endswith("/count")}
    assert min(accuracies.values()) >= 0.99, accuracies


def one_attribute_changes(scene: ShapeScene):
    """Yield ``(object index or None for the relation, attribute, changed scene)`` for every valid caption that
    differs from ``scene`` in exactly one attribute."""
    for index, obj in enumerate(scene.objects):
        for attribute, options in ATTRIBUTE_OPTIONS.items():
            if attribute == "position" and obj.position is None:
                continue
            for value in options:
                if value == getattr(obj, attribute):
                    continue
                objects = list(scene.objects)
                objects[index] = dataclasses.replace(obj, **{attribute: value})
                try:
                    changed = ShapeScene(tuple(objects), scene.relation)
                except ValueError:  # the two objects would share a colour
                    continue
                yield index, attribute, changed
    for relation in RELATIONS if scene.relation is not None else ():
        if relation != scene.relation:
            yield None, "relation", ShapeScene(scene.objects, relation)


def test_a_caption_wrong_in_one_attribute_fails_exactly_that_attribute():
    # Each of the 42 (shape, colour, size) one-object scenes at a position cycling through all five, 40 pairs.
    singles = scenes(0)
    batch = [singles[5 * index + index % 5] for index in range(42)] + scenes(40, seed=2)[210:]
    images = render_batch(batch, 32, seed=2)
    checked: dict[str, int] = {}
    for scene, image in zip(batch, images, strict=True):
        assert score_image(image, scene.caption())["all_correct"]
        for index, attribute, changed in one_attribute_changes(scene):
            result = score_image(image, changed.caption())
            for object_index, scores in enumerate(result["objects"]):
                expected = {name: not (object_index == index and name == attribute) for name in scores}
                assert scores == expected, (scene.caption(), changed.caption())
            if scene.relation is not None:
                assert result["relation"] is (attribute != "relation"), changed.caption()
            assert result["all_correct"] is False
            checked[attribute] = checked.get(attribute, 0) + 1
    # 42 singles: 6 colours + 2 shapes + 1 size + 4 positions each; 40 pairs: 3 relations, 2x(2 shapes + 1 size).
    assert checked["position"] == 42 * 4 and checked["relation"] == 40 * 3
    assert checked["shape"] == 42 * 2 + 40 * 4 and checked["size"] == 42 + 40 * 2
    assert checked["color"] == 42 * 6 + 40 * 2 * 5


def test_black_image_scores_nothing():
    black = torch.zeros(3, 32, 32)
    single = score_image(black, "a large red circle on the left")
    assert single["objects"] == [{"color": False, "shape": False, "size": False, "position": False}]
    assert single["all_correct"] is False and single["matched"] == [None] and single["detected"] == []
    pair = score_image(black, PAIR)
    assert pair["objects"] == [{"color": False, "shape": False, "size": False}] * 2
    assert pair["relation"] is False and pair["all_correct"] is False and pair["matched"] == [None, None]
    metric = ShapeEval()
    metric.update(torch.zeros(2, 3, 32, 32), ["a large red circle on the left", PAIR])
    assert metric.compute() == expected_metrics(1, 1, 0.0)


def test_specks_below_the_minimum_area_are_ignored():
    image = render(parse_caption("a large red circle on the left"), 32, np.random.default_rng(0))
    image[30:32, 30:32] = COLORS["green"]  # 4 pixels; the smallest object at 32 has 24, the minimum is 6
    assert [d.color for d in detect_objects(image)] == ["red"]
    image[26:32, 26:32] = COLORS["green"]  # 36 pixels: an object
    assert [d.color for d in detect_objects(image)] == ["red", "green"]


def test_image_forms_give_the_same_detections():
    image = render(parse_caption(PAIR), 32, np.random.default_rng(3))
    reference = detect_objects(image)
    assert [(d.color, d.shape, d.size) for d in reference] == [
        ("yellow", "triangle", "large"),
        ("blue", "square", "small"),
    ]
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    for form in (image.transpose(2, 0, 1), image / 255.0, tensor, tensor.float() / 255, Image.fromarray(image)):
        found = detect_objects(form)
        assert [attributes(d) for d in found] == [attributes(d) for d in reference]
        measures = [value for detections in (found, reference) for d in detections for value in (d.area, *d.centroid)]
        assert measures[: len(measures) // 2] == pytest.approx(measures[len(measures) // 2 :])


def write_sample_folder(root, index: int, prompt: str, images: list[np.ndarray]) -> None:
    """One prompt folder of the GenEval layout, with a metadata line as GenEval writes it and a grid to ignore."""
    folder = root / f"{index:05d}"
    (folder / "samples").mkdir(parents=True)
    record = {"tag": "single_object", "include": [{"class": "shape", "count": 1}], "prompt": prompt}
    (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
    for number, image in enumerate(images):
        Image.fromarray(image).save(folder / "samples" / f"{number:04d}.png")
    Image.fromarray(np.concatenate(images, axis=1)).save(folder / "grid.png")


def test_score_folder_reads_the_geneval_layout(tmp_path):
    rng = np.random.default_rng(4)
    single = "a large red circle on the left"
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    write_sample_folder(tmp_path, 0, single, [render(parse_caption(single), 32, rng) for _ in range(2)])
    write_sample_folder(tmp_path, 1, PAIR, [render(parse_caption(PAIR), 32, rng), black])
    # The image has a large circle where the prompt asks for a small one: only the size is wrong.
    write_sample_folder(tmp_path, 2, single.replace("large", "small"), [render(parse_caption(single), 32, rng)])
    results = score_folder(tmp_path)
    expected = {
        "single_object/count": 3,
        "single_object/color": 1.0,
        "single_object/shape": 1.0,
        "single_object/size": 2 / 3,
        "single_object/position": 1.0,
        "single_object/all_correct": 2 / 3,
        "single_object/shape_strict": 1.0,
        "single_object/all_correct_strict": 2 / 3,
        "two_object/count": 2,
        "two_object/color": 0.5,
        "two_object/shape": 0.5,
        "two_object/size": 0.5,
        "two_object/relation": 0.5,
        "two_object/all_correct": 0.5,
        "two_object/shape_strict": 0.5,
        "two_object/all_correct_strict": 0.5,
        "overall/count": 5,
        "overall/all_correct": 3 / 5,
        "overall/all_correct_strict": 3 / 5,
    }
    assert results == pytest.approx(expected)


def test_score_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        score_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no <index:05d>/ prompt folders"):
        score_folder(tmp_path)
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="00000.*metadata.jsonl"):
        score_folder(tmp_path)
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"tag": "single_object"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl.*'prompt'"):
        score_folder(tmp_path)
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"prompt": "a large red circle on the left"}\n')
    with pytest.raises(ValueError, match="00000.*no samples"):
        score_folder(tmp_path)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "00000" / "samples" / "0000.png")
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"prompt": "a purple blob"}\n')
    with pytest.raises(ValueError, match="a purple blob"):
        score_folder(tmp_path)


def test_bad_inputs_raise_clear_errors():
    image = torch.zeros(3, 32, 32)
    with pytest.raises(ValueError, match="'a large red hexagon on the left'"):
        score_image(image, "a large red hexagon on the left")
    with pytest.raises(ValueError, match=r"\[3, H, W\].*\(1, 3, 32, 32\)"):
        score_image(image[None], "a large red circle on the left")
    with pytest.raises(ValueError, match="square.*32x24"):
        detect_objects(torch.zeros(3, 32, 24))
    with pytest.raises(ValueError, match="side 30.*multiple of 8"):
        detect_objects(torch.zeros(3, 30, 30))
    with pytest.raises(ValueError, match=r"\[0, 1\].*255"):
        detect_objects(torch.full((3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="tolerance"):
        detect_objects(image, tolerance=0.7)
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        ShapeEval().update(torch.zeros(2, 3, 32, 32), ["a large red circle on the left"])


def test_format_report_tabulates_the_results():
    metric = ShapeEval()
    scene = parse_caption("a large red circle on the left")
    metric.update(render_batch([scene, scene], 32), [scene.caption(), scene.caption().replace("left", "right")])
    lines = format_report(metric.compute()).splitlines()
    header = ["all_correct_strict", "all_correct", "color", "shape_strict", "shape", "size", "position", "relation"]
    assert [line.split() for line in lines] == [
        ["ShapeEval", "count", *header],
        ["single_object", "2", "50.0", "50.0", "100.0", "100.0", "100.0", "100.0", "50.0", "-"],
        ["two_object", "0", "-", "-", "-", "-", "-", "-", "-", "-"],
        ["overall", "2", "50.0", "50.0", "-", "-", "-", "-", "-", "-"],
    ]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    with pytest.raises(ValueError, match="single_object/count"):
        format_report({})
