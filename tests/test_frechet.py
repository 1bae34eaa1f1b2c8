"""The Shapes classifier (trained here, saved with safetensors) and the Shapes FD on its features."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from tests.malformed_shapes import add_noise, gaussian_blur, malformed_image, ragged
from vugen.data.shapes import heldout_prompts, parse_caption
from vugen.eval import (
    ShapesFeatures,
    classifier_accuracy,
    frechet_distance,
    frechet_distance_folder,
    load_shapes_classifier,
    reference_renders,
    train_shapes_classifier,
)
from vugen.eval.shapes_classifier import CONFIG_FILE, WEIGHTS_FILE

# A short training for the tests (about 11 s of one CPU): FD orderings already hold (measured from 150 steps on).
TEST_STEPS = 200
PER_PROMPT = 8  # 30 held-out prompts x 8 = 240 images per set


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes-classifier") / "classifier"
    train_shapes_classifier(path, steps=TEST_STEPS, eval_images=512)
    return path


@pytest.fixture(scope="module")
def classifier(classifier_path):
    return load_shapes_classifier(classifier_path)


@pytest.fixture(scope="module")
def renders():
    """``(reference, other)``: renders of the held-out prompts from two seeds."""
    prompts = heldout_prompts()
    return tuple(reference_renders(prompts, [PER_PROMPT] * len(prompts), 32, seed) for seed in (0, 1))


def transform(images: torch.Tensor, function) -> torch.Tensor:
    """``function(image [H, W, 3] float64, rng)`` applied to each image of ``[N, 3, H, W]``."""
    rng = np.random.default_rng(9)
    arrays = [function(image.permute(1, 2, 0).double().numpy(), rng) for image in images]
    return torch.from_numpy(np.clip(np.stack(arrays), 0, 1)).permute(0, 3, 1, 2).float()


def malformed_renders(flip: float) -> torch.Tensor:
    """The held-out prompts drawn with ragged edges, as many per prompt as the reference."""
    images = []
    for index, prompt in enumerate(heldout_prompts()):
        rng = np.random.default_rng((1, index))
        scene = parse_caption(prompt)
        images += [malformed_image(scene, 32, partial(ragged, flip=flip), rng) for _ in range(PER_PROMPT)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def test_the_classifier_reads_scenes(classifier_path, classifier):
    """Predicting 'absent' for every colour scores 0.786 (1.5 of 7 colours present); 200 steps measured 0.87."""
    config = json.loads((classifier_path / CONFIG_FILE).read_text())
    accuracy = classifier_accuracy(classifier, "test", size=512, seed=1)
    assert accuracy["colour_accuracy"] >= 0.85
    assert config["accuracy"]["test"]["colour_accuracy"] >= 0.85
    assert config["training"]["steps"] == TEST_STEPS and config["num_features"] == classifier.num_features == 64


@pytest.mark.slow
def test_the_default_training_reaches_its_measured_accuracy(tmp_path):
    """Measured: 1000 steps, 51 s of one CPU; test colour accuracy 0.991, scene accuracy 0.942, centroids 2.0 px
    off; held-out compositions 0.989 and 0.925."""
    config = train_shapes_classifier(tmp_path / "classifier")
    test, heldout = config["accuracy"]["test"], config["accuracy"]["heldout"]
    assert test["colour_accuracy"] >= 0.985 and test["scene_accuracy"] >= 0.9
    assert heldout["colour_accuracy"] >= 0.98 and heldout["scene_accuracy"] >= 0.88


def test_training_is_deterministic_and_loads_back_exactly(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_shapes_classifier(tmp_path / name, steps=2, batch_size=8, seed=seed, eval_images=8)
    states = {name: load_shapes_classifier(tmp_path / name).state_dict() for name in "abc"}
    assert states["a"].keys() == states["c"].keys()
    assert all(torch.equal(states["a"][key], states["b"][key]) for key in states["a"])
    assert not all(torch.equal(states["a"][key], states["c"][key]) for key in states["a"])
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (tmp_path / "b" / WEIGHTS_FILE).read_bytes()


def test_loading_checks_every_tensor_and_key(tmp_path):
    folder = tmp_path / "classifier"
    train_shapes_classifier(folder, steps=1, batch_size=4, eval_images=8)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(config | {"width": 8}))
    match = r"model\.safetensors does not match .*config\.json: feature\.0\.weight \[64, 1024\] \(config: \[64, 512\]\)"
    with pytest.raises(ValueError, match=match + ", trunk.0.bias .* and 22 more$"):
        load_shapes_classifier(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({k: v for k, v in config.items() if k != "num_features"}))
    with pytest.raises(ValueError, match=r"config\.json: expected an object with integers.*num_features"):
        load_shapes_classifier(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config | {"image_size": 30}))
    with pytest.raises(ValueError, match="config.json: image_size must be"):
        load_shapes_classifier(folder)
    (folder / CONFIG_FILE).write_text("{")
    with pytest.raises(ValueError, match="config.json is not JSON"):
        load_shapes_classifier(folder)
    (folder / WEIGHTS_FILE).write_bytes(b"damaged")
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_shapes_classifier(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_shapes_classifier(folder)


# Features of ReLU units that never fire have no variance: the covariances are singular, which sqrtm warns about.
@pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning")
def test_the_distance_is_the_frechet_distance_of_the_features(classifier, renders):
    """torchmetrics' value against scipy's matrix square root on the same features."""
    reference, other = renders
    generated = transform(other, lambda image, rng: gaussian_blur(image, 1.0))
    features = ShapesFeatures(classifier)
    real, fake = (features(images).numpy() for images in (reference, generated))
    sigma_real, sigma_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_real @ sigma_fake).real
    expected = np.sum((real.mean(0) - fake.mean(0)) ** 2) + np.trace(sigma_real + sigma_fake - 2 * root)
    assert frechet_distance(generated, reference, classifier) == pytest.approx(expected, rel=1e-6)
    assert expected > 0.1


def test_the_distance_grows_with_each_corruption(classifier, renders):
    reference, other = renders
    floor = frechet_distance(other, reference, classifier)
    corruptions = {
        "noise": [transform(other, lambda image, rng, s=s: add_noise(image, s, rng)) for s in (0.05, 0.1, 0.2)],
        "blur": [transform(other, lambda image, rng, s=s: gaussian_blur(image, s)) for s in (0.7, 1.0, 1.5)],
        "ragged": [malformed_renders(flip) for flip in (0.1, 0.3, 0.5)],
    }
    distances = {
        name: [frechet_distance(images, reference, classifier) for images in sets] for name, sets in corruptions.items()
    }
    for name, values in distances.items():
        assert values == sorted(values), (name, floor, values)
        assert values[-1] > 2 * floor, (name, floor, values)
    assert floor < 0.5, floor  # measured 0.2 at 200 steps with 240 images per set


def write_folder(root, prompts: list[str], images: list[list[np.ndarray]]) -> None:
    for index, (prompt, samples) in enumerate(zip(prompts, images, strict=True)):
        folder = root / f"{index:05d}" / "samples"
        folder.mkdir(parents=True)
        (folder.parent / "metadata.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
        for number, image in enumerate(samples):
            Image.fromarray(image).save(folder / f"{number:04d}.png")


def test_frechet_distance_folder_compares_with_renders_of_the_prompts(tmp_path, classifier_path, classifier):
    prompts = heldout_prompts()[:10]
    generated = reference_renders(prompts, [3] * 10, 32, seed=5)
    as_uint8 = (generated.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    write_folder(tmp_path / "renders", prompts, [list(as_uint8[3 * i : 3 * i + 3]) for i in range(10)])
    result = frechet_distance_folder(tmp_path / "renders", classifier_path, seed=2)
    expected = frechet_distance(generated, reference_renders(prompts, [3] * 10, 32, seed=2), classifier)
    assert result == {"frechet_distance": pytest.approx(expected, rel=1e-9), "count": 30}
    black = np.zeros((32, 32, 3), dtype=np.uint8)
    write_folder(tmp_path / "black", prompts, [[black] * 3] * 10)
    assert frechet_distance_folder(tmp_path / "black", classifier_path)["frechet_distance"] > 10 * expected


def test_bad_inputs_name_the_problem(tmp_path, classifier_path, classifier):
    write_folder(tmp_path / "big", ["a large red circle on the left"], [[np.zeros((64, 64, 3), dtype=np.uint8)] * 2])
    with pytest.raises(ValueError, match=r"0000\.png: 64x64 pixels; the Shapes classifier reads 32x32"):
        frechet_distance_folder(tmp_path / "big", classifier_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        frechet_distance_folder(tmp_path / "big", tmp_path)
    with pytest.raises(ValueError, match="'a purple blob'"):
        reference_renders(["a purple blob"], [1], 32)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(torch.zeros(1, 3, 32, 32), torch.zeros(4, 3, 32, 32), classifier)
    with pytest.raises(ValueError, match=r"float \[B, 3, 32, 32\].*\(2, 3, 16, 16\)"):
        ShapesFeatures(classifier)(torch.zeros(2, 3, 16, 16))
