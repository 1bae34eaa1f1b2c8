"""Tests of the procedural Shapes dataset and its LightningDataModule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vugen.data.shapes import (
    COLORS,
    HELDOUT_PAIRS,
    POSITION_ANCHORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapeScene,
    ShapesDataset,
    all_scenes,
    heldout_prompts,
    heldout_two_object_prompts,
    is_heldout,
    object_side,
    parse_caption,
    render,
    shape_mask,
)
from vugen.data.shapes_datamodule import ShapesDataModule

IMAGE_SIZES = (16, 24, 32, 64)


def color_mask(image: np.ndarray, color: str) -> np.ndarray:
    return np.all(image == np.array(COLORS[color], dtype=np.uint8), axis=-1)


def centroid(mask: np.ndarray) -> np.ndarray:
    """(x, y) pixel centroid in continuous coordinates (pixel i covers [i, i + 1))."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()]) + 0.5


def dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbourhood dilation by one pixel."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.any([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=0)


def single_scenes() -> list[ShapeScene]:
    return [scene for scene in all_scenes() if scene.relation is None]


def pair_scenes() -> list[ShapeScene]:
    return [scene for scene in all_scenes() if scene.relation is not None]


# --- captions ---------------------------------------------------------------------------------------------


def test_captions_match_the_documented_wording():
    left = ShapeScene((ShapeObject("circle", "red", "large", "left"),))
    assert left.caption() == "a large red circle on the left"
    phrases = {"center": "in the center", "top": "at the top", "bottom": "at the bottom", "right": "on the right"}
    for position, phrase in phrases.items():
        scene = ShapeScene((ShapeObject("circle", "red", "large", position),))
        assert scene.caption() == f"a large red circle {phrase}"
    pair = (ShapeObject("square", "blue", "small"), ShapeObject("triangle", "yellow", "large"))
    relation_phrases = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
    for relation, phrase in relation_phrases.items():
        assert ShapeScene(pair, relation).caption() == f"a small blue square {phrase} a large yellow triangle"


def test_caption_parse_round_trip_over_every_scene():
    scenes = all_scenes()
    # Independent count: 3 shapes x 7 colours x 2 sizes = 42 objects; 42 x 5 positions singles and
    # 42 x 36 (other colour) x 4 relations ordered pairs.
    assert len(scenes) == 42 * 5 + 42 * 36 * 4
    captions = [scene.caption() for scene in scenes]
    assert len(set(captions)) == len(scenes)
    for scene, caption in zip(scenes, captions, strict=True):
        assert parse_caption(caption) == scene


def test_parse_caption_normalises_case_and_spaces():
    expected = ShapeScene((ShapeObject("triangle", "cyan", "small", "bottom"),))
    assert parse_caption("  A small  CYAN triangle at the bottom\n") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a huge red circle on the left",
        "a large red hexagon on the left",
        "a large red circle",
        "a large red circle on the left of a small blue square",
        "a small red circle to the left of a large red square",  # same colour twice
    ],
)
def test_parse_caption_rejects_invalid_text_naming_it(text):
    with pytest.raises(ValueError, match="caption") as error:
        parse_caption(text)
    assert repr(text) in str(error.value)


def test_scene_validation_names_the_bad_field():
    with pytest.raises(ValueError, match="shape"):
        ShapeObject("hexagon", "red", "large", "left")
    with pytest.raises(ValueError, match="color"):
        ShapeObject("circle", "purple", "large", "left")
    with pytest.raises(ValueError, match="position"):
        ShapeScene((ShapeObject("circle", "red", "large"),))
    with pytest.raises(ValueError, match="relation"):
        ShapeScene((ShapeObject("circle", "red", "large"), ShapeObject("square", "blue", "small")), "near")
    with pytest.raises(ValueError, match="1 or 2"):
        ShapeScene(())


# --- rendering ----------------------------------------------------------------------------------------------


def test_shape_masks_fill_their_box_with_distinct_fill_ratios():
    for side in (4, 6, 12, 24):
        fills = {}
        for shape in SHAPES:
            mask = shape_mask(shape, side)
            rows, cols = np.nonzero(mask)
            assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, side - 1, 0, side - 1)
            fills[shape] = mask.mean()
        assert fills["square"] == 1.0
        assert fills["circle"] < 0.95
        # The triangle's apex row is narrow and its base row full.
        triangle = shape_mask("triangle", side)
        assert triangle[0].sum() <= 2 and triangle[-1].all()


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_render_exact_colours_black_background_whole_shapes(image_size):
    rng = np.random.default_rng(1)
    scenes = all_scenes()
    for index in rng.choice(len(scenes), size=300, replace=False):
        scene = scenes[index]
        image = render(scene, image_size, rng)
        assert image.dtype == np.uint8 and image.shape == (image_size, image_size, 3)
        colours = {tuple(pixel) for pixel in image.reshape(-1, 3).tolist()}
        assert colours == {(0, 0, 0)} | {COLORS[obj.color] for obj in scene.objects}
        painted = 0
        for obj in scene.objects:
            # The full mask is inside the image: nothing cropped, nothing painted over.
            area = color_mask(image, obj.color).sum()
            assert area == shape_mask(obj.shape, object_side(obj.size, image_size)).sum()
            painted += area
        assert (image.sum(-1) == 0).sum() == image_size**2 - painted


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_shapes_stay_distinguishable_at_every_size(image_size):
    for size in SIZES:
        masks = [shape_mask(shape, object_side(size, image_size)) for shape in SHAPES]
        for first, second in itertools.combinations(masks, 2):
            assert not np.array_equal(first, second), (image_size, size)


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_large_objects_have_at_least_twice_the_area(image_size):
    rng = np.random.default_rng(0)
    for shape, position in itertools.product(SHAPES, POSITIONS):
        areas = {
            size: color_mask(
                render(ShapeScene((ShapeObject(shape, "white", size, position),)), image_size, rng), "white"
            ).sum()
            for size in SIZES
        }
        assert areas["large"] >= 2 * areas["small"], (shape, areas)


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_single_object_centroid_is_nearest_its_position_anchor(image_size):
    rng = np.random.default_rng(2)
    anchors = {name: np.array(anchor) * image_size for name, anchor in POSITION_ANCHORS.items()}
    for scene in single_scenes():
        obj = scene.objects[0]
        for _ in range(3):
            center = centroid(color_mask(render(scene, image_size, rng), obj.color))
            distances = {name: np.linalg.norm(center - anchor) for name, anchor in anchors.items()}
            assert min(distances, key=distances.get) == obj.position
            # Jitter is at most S/16 per axis, plus rounding.
            assert distances[obj.position] <= np.sqrt(2) * (image_size / 16 + 0.5)


@pytest.mark.parametrize("image_size", (16, 32))
def test_relation_geometry_and_separation(image_size):
    rng = np.random.default_rng(3)
    for scene in pair_scenes():
        image = render(scene, image_size, rng)
        first, second = (color_mask(image, obj.color) for obj in scene.objects)
        dx, dy = centroid(first) - centroid(second)
        along, across = {"left_of": (-dx, dy), "right_of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[
            scene.relation
        ]
        assert along >= image_size / 2 - 1, scene
        assert abs(across) <= image_size / 8 + 1, scene
        assert not np.any(dilate(first) & second), f"objects touch: {scene.caption()}"


def test_render_is_deterministic_and_jitters_with_the_rng():
    scene = ShapeScene((ShapeObject("circle", "green", "small"), ShapeObject("square", "red", "large")), "above")
    first = render(scene, 32, np.random.default_rng(5))
    assert np.array_equal(first, render(scene, 32, np.random.default_rng(5)))
    others = [render(scene, 32, np.random.default_rng(seed)) for seed in range(6, 16)]
    assert any(not np.array_equal(first, other) for other in others)


@pytest.mark.parametrize("image_size", [0, 8, 12, 20, 33, 32.0, "32", True])
def test_bad_image_size_is_rejected_naming_it(image_size):
    scene = single_scenes()[0]
    with pytest.raises(ValueError, match="image_size"):
        render(scene, image_size, np.random.default_rng(0))
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset("train", 4, image_size=image_size)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataModule(image_size=image_size)


# --- held-out compositions --------------------------------------------------------------------------------


def test_heldout_pairs_are_one_per_shape_with_distinct_colours():
    assert sorted(shape for shape, _ in HELDOUT_PAIRS) == sorted(SHAPES)
    assert len({color for _, color in HELDOUT_PAIRS}) == len(HELDOUT_PAIRS)


def test_training_splits_never_contain_heldout_pairs_but_cover_the_rest():
    seen_pairs, relations, sizes, positions = set(), set(), set(), set()
    for split in ("train", "val", "test"):
        dataset = ShapesDataset(split, 4000 if split == "train" else 500, image_size=16, two_object_ratio=0.5)
        for index in range(len(dataset)):
            scene, _ = dataset.sample(index)
            pairs = {(obj.shape, obj.color) for obj in scene.objects}
            assert not pairs & HELDOUT_PAIRS, scene.caption()
            seen_pairs |= pairs
            relations.add(scene.relation)
            sizes |= {obj.size for obj in scene.objects}
            positions |= {obj.position for obj in scene.objects}
    assert seen_pairs == set(itertools.product(SHAPES, COLORS)) - HELDOUT_PAIRS
    assert relations == {None, *RELATIONS}
    assert sizes == set(SIZES) and positions == {None, *POSITIONS}


def test_heldout_split_contains_only_heldout_scenes_and_every_pair():
    dataset = ShapesDataset("heldout", 300, image_size=16)
    scenes = [dataset.sample(index)[0] for index in range(len(dataset))]
    assert all(is_heldout(scene) for scene in scenes)
    found = {(obj.shape, obj.color) for scene in scenes for obj in scene.objects} & HELDOUT_PAIRS
    assert found == HELDOUT_PAIRS
    assert {len(scene.objects) for scene in scenes} == {1, 2}


def test_heldout_prompts_list_every_heldout_composition():
    expected = {
        f"a {size} {color} {shape} {phrase}"
        for (shape, color), size, phrase in itertools.product(
            HELDOUT_PAIRS, SIZES, ["on the left", "on the right", "at the top", "at the bottom", "in the center"]
        )
    }
    prompts = heldout_prompts()
    assert len(prompts) == len(expected) == 30 and set(prompts) == expected
    two = heldout_two_object_prompts()
    # 1512 ordered pairs with distinct colours minus 1104 pairs of training objects
    # (4 objects per colour of a held-out pair, 6 otherwise: 3*4*32 + 4*6*30), times 4 relations.
    assert len(two) == len(set(two)) == (1512 - 1104) * 4
    assert all(is_heldout(parse_caption(prompt)) and parse_caption(prompt).relation for prompt in two)


# --- dataset ----------------------------------------------------------------------------------------------


def test_dataset_items_are_deterministic_and_seed_and_split_dependent():
    dataset = ShapesDataset("train", 64, seed=7)
    items = [dataset[index] for index in reversed(range(64))][::-1]
    again = ShapesDataset("train", 64, seed=7)
    for index in (0, 17, 63):
        assert torch.equal(items[index]["images"], again[index]["images"])
        assert items[index]["captions"] == again[index]["captions"]
    for other in (ShapesDataset("train", 64, seed=8), ShapesDataset("val", 64, seed=7)):
        differ = [not torch.equal(item["images"], other[index]["images"]) for index, item in enumerate(items)]
        assert sum(differ) > 32


def test_dataset_item_format_matches_render():
    dataset = ShapesDataset("val", 8, image_size=24, two_object_ratio=1.0)
    item = dataset[3]
    scene, image = dataset.sample(3)
    assert set(item) == {"images", "captions"}
    assert item["captions"] == scene.caption() and scene.relation is not None
    pixels = item["images"]
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 24, 24)
    assert torch.equal(pixels, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert set(pixels.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(dataset[-5]["images"], pixels)
    with pytest.raises(IndexError):
        dataset[8]


def test_dataset_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("training", 4)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset("train", 0)
    with pytest.raises(ValueError, match="two_object_ratio"):
        ShapesDataset("train", 4, two_object_ratio=1.5)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset("train", 4, seed=-1)


# --- datamodule -------------------------------------------------------------------------------------------


def small_datamodule(**overrides) -> ShapesDataModule:
    arguments = dict(image_size=16, train_size=40, val_size=12, test_size=10, heldout_size=9, batch_size=8)
    return ShapesDataModule(**{**arguments, **overrides})


def test_datamodule_batches():
    datamodule = small_datamodule()
    train = list(datamodule.train_dataloader())
    assert len(train) == 5
    for batch in train:
        assert batch["images"].shape == (8, 3, 16, 16) and batch["images"].dtype == torch.float32
        assert 0.0 <= batch["images"].min() and batch["images"].max() == 1.0
        assert isinstance(batch["captions"], list) and len(batch["captions"]) == 8
    val = list(datamodule.val_dataloader())
    assert [len(batch["captions"]) for batch in val] == [8, 4]
    reference = datamodule.dataset("val")
    assert val[1]["captions"] == [reference[index]["captions"] for index in range(8, 12)]
    assert torch.equal(val[0]["images"][2], reference[2]["images"])


def test_datamodule_stage_splits():
    datamodule = small_datamodule()
    test_captions = [caption for batch in datamodule.test_dataloader() for caption in batch["captions"]]
    assert test_captions == [datamodule.dataset("test")[index]["captions"] for index in range(10)]
    predicted = [caption for batch in datamodule.predict_dataloader() for caption in batch["captions"]]
    assert len(predicted) == 9 and all(is_heldout(parse_caption(caption)) for caption in predicted)
    heldout_test = [
        caption for batch in small_datamodule(test_split="heldout").test_dataloader() for caption in batch["captions"]
    ]
    assert heldout_test == predicted


def test_datamodule_shuffle_is_deterministic_and_seeded():
    def train_captions(datamodule: ShapesDataModule) -> list[str]:
        return [caption for batch in datamodule.train_dataloader() for caption in batch["captions"]]

    first = train_captions(small_datamodule())
    torch.manual_seed(123)  # the global RNG must not matter
    assert train_captions(small_datamodule()) == first
    in_order = [small_datamodule().dataset("train")[index]["captions"] for index in range(40)]
    assert first != in_order and sorted(first) == sorted(in_order)
    assert train_captions(small_datamodule(seed=1)) != first


def test_datamodule_workers_give_the_same_batches():
    single = next(iter(small_datamodule().val_dataloader()))
    multi = next(iter(small_datamodule(num_workers=2).val_dataloader()))
    assert torch.equal(single["images"], multi["images"]) and single["captions"] == multi["captions"]


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("train_size", 0),
        ("batch_size", 0),
        ("batch_size", 64),
        ("two_object_ratio", -0.1),
        ("num_workers", -1),
        ("test_split", "val"),
    ],
)
def test_datamodule_rejects_bad_arguments_naming_them(argument, value):
    with pytest.raises(ValueError, match=argument):
        small_datamodule(**{argument: value})
    with pytest.raises(ValueError, match="split"):
        small_datamodule().dataset("heldin")
