"""Shapes FD: the Fréchet distance between generated Shapes images and true renders of the same prompts.

A distribution score beside ShapeEval's per-image verdicts: torchmetrics' :class:`FrechetInceptionDistance` on
the penultimate features of a :class:`~vugen.eval.shapes_classifier.ShapesClassifier` trained here, in place of
Inception's (which knows nothing of 32-pixel shapes and is not shipped). The reference set holds true renders of
the generated images' own prompts (:func:`~vugen.data.shapes.render`, seeded), as many per prompt as there are
generated images, so the distance measures how the images are drawn, not which prompts were asked.

Like any FID it is biased upwards for small sets: compare values at equal image counts only. Measured with the
classifier of :func:`~vugen.eval.shapes_classifier.train_shapes_classifier`'s defaults, on the 30 one-object
held-out prompts x 4 images (120 per set, as the demo generates; in brackets x 16, 480 per set), against renders
of seed 0:

==========================================  ==============
renders of another seed (the floor)         1.42 (0.42)
gaussian noise sigma 0.05 / 0.1 / 0.2       3.3 / 15.3 / 84.8 (2.1 / 13.3 / 80.6)
gaussian blur sigma 0.35 / 0.7 / 1.0 / 1.5  1.41 / 13.0 / 28.9 / 58.7
ragged edges, flip 0.1 / 0.3 / 0.5          4.7 / 17.7 / 24.8 (4.5 / 17.4 / 24.6)
pinholes / hole / bite / stray pixels       3.0 / 3.7 / 35.6 / 18.0 (see tests/malformed_shapes.py)
==========================================  ==============

Noise below sigma 0.03 stays within 0.5 of the floor: the classifier is trained with such noise, since generated
images are rarely exactly black around the shapes (see :mod:`vugen.eval.shapes_classifier`).

How the demo calls it (after ``vugen export-geneval`` has written ``OUT/heldout/single``)::

    from vugen.eval import frechet_distance_folder, train_shapes_classifier

    classifier = OUT / "shapes-classifier"
    if not (classifier / "config.json").is_file():
        train_shapes_classifier(classifier, image_size=32)  # about a minute on one CPU thread
    scores = frechet_distance_folder(OUT / "heldout" / "single", classifier)
    console.print(f"Shapes FD: {scores['frechet_distance']:.2f} over {scores['count']} images")
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance  # torchmetrics.image exports it only with torch-fidelity

from vugen.data.shapes import parse_caption, render
from vugen.eval.geneval_folder import read_geneval_folder
from vugen.eval.shapes_classifier import ShapesClassifier, load_shapes_classifier

__all__ = [
    "ShapesFeatures",
    "frechet_distance",
    "frechet_distance_folder",
    "reference_renders",
    "shapes_frechet_distance",
]


class ShapesFeatures(nn.Module):
    """A classifier's penultimate features as torchmetrics' FID feature extractor: float images ``[B, 3, S, S]``
    in [0, 1] to float64 ``[B, num_features]`` (so that the distance is computed and returned in float64).

    It stays in eval mode whatever ``train()`` says: its batch norms use their running statistics.

    Args:
        classifier: The trained classifier.
    """

    def __init__(self, classifier: ShapesClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features  # torchmetrics reads it instead of a dummy forward pass

    def forward(self, images: Tensor) -> Tensor:
        """Features of float images ``[B, 3, S, S]`` in [0, 1], S the classifier's image size."""
        side = self.classifier.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, side, side) or not images.is_floating_point():
            raise ValueError(
                f"Shapes FD images must be float [B, 3, {side}, {side}] (the classifier's image size), got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        with torch.no_grad():
            return self.classifier.features(images.float()).double()

    def train(self, mode: bool = True) -> ShapesFeatures:
        """Stay in eval mode (see the class docstring)."""
        return super().train(False)


def shapes_frechet_distance(classifier: ShapesClassifier) -> FrechetInceptionDistance:
    """torchmetrics' FID on ``classifier``'s features, synchronised across ranks like any metric.

    ``update(images, real=True)`` with the true renders, ``update(images, real=False)`` with the generated images
    (float ``[B, 3, S, S]`` in [0, 1]), then ``compute()``.

    Args:
        classifier: The trained classifier.

    Returns:
        The metric.
    """
    return FrechetInceptionDistance(feature=ShapesFeatures(classifier), normalize=True)


def reference_renders(prompts: Sequence[str], counts: Sequence[int], image_size: int, seed: int = 0) -> Tensor:
    """True renders of Shapes prompts: ``counts[i]`` of ``prompts[i]``, drawn from the rng seeded ``(seed, i)``.

    Args:
        prompts: Shapes captions.
        counts: Renders per prompt.
        image_size: Image side; >= 16 and a multiple of 8.
        seed: Base seed.

    Returns:
        Float ``[sum(counts), 3, S, S]`` in [0, 1], prompt by prompt.

    Raises:
        ValueError: If a prompt is not a Shapes caption (the message quotes it) or the lengths differ.
    """
    if len(prompts) != len(counts):
        raise ValueError(f"reference_renders needs one count per prompt, got {len(prompts)} prompts, {len(counts)}")
    images = []
    for index, (prompt, count) in enumerate(zip(prompts, counts, strict=True)):
        scene, rng = parse_caption(prompt), np.random.default_rng((seed, index))
        images += [render(scene, image_size, rng) for _ in range(count)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).contiguous()


def frechet_distance(images: Tensor, reference: Tensor, classifier: ShapesClassifier, batch_size: int = 256) -> float:
    """Fréchet distance between ``images`` and ``reference`` on ``classifier``'s features.

    Args:
        images: Generated images, float ``[N, 3, S, S]`` in [0, 1]; N >= 2.
        reference: True renders, the same layout; at least 2.
        classifier: The trained classifier (its image size S).
        batch_size: Images per forward pass.

    Returns:
        The distance (0 for identical feature statistics).

    Raises:
        ValueError: If a set has fewer than 2 images or images of another layout.
    """
    for name, tensor in (("images", images), ("reference", reference)):
        if len(tensor) < 2:
            raise ValueError(f"Shapes FD needs at least 2 {name} (a covariance), got {len(tensor)}")
    metric = shapes_frechet_distance(classifier)
    for chunk in reference.split(batch_size):
        metric.update(chunk, real=True)
    for chunk in images.split(batch_size):
        metric.update(chunk, real=False)
    return float(metric.compute())


def _read_image(path: Path, image_size: int) -> Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    if pixels.shape[:2] != (image_size, image_size):
        raise ValueError(
            f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels; the Shapes classifier reads {image_size}x{image_size}"
        )
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def frechet_distance_folder(
    folder: str | PathLike[str], classifier_path: str | PathLike[str], seed: int = 0
) -> dict[str, float | int]:
    """Shapes FD of a GenEval-layout folder against true renders of its prompts.

    The folder is read as :func:`~vugen.eval.shapeeval.score_folder` reads it (``<idx:05d>/metadata.jsonl`` and
    ``<idx:05d>/samples/*.png``); each prompt folder's samples are compared with as many renders of its prompt
    (:func:`reference_renders`).

    Args:
        folder: The image folder.
        classifier_path: A folder written by :func:`~vugen.eval.shapes_classifier.train_shapes_classifier`.
        seed: Seed of the reference renders.

    Returns:
        ``{"frechet_distance": float, "count": number of generated images}``.

    Raises:
        FileNotFoundError: If the folder, a metadata file or the classifier is missing.
        ValueError: As :func:`~vugen.eval.geneval_folder.read_geneval_folder`, for a prompt that is not a Shapes
            caption, an image of another size than the classifier's, or fewer than 2 images.
    """
    entries = read_geneval_folder(folder)
    classifier = load_shapes_classifier(classifier_path)
    images = torch.stack([_read_image(path, classifier.image_size) for _, paths in entries for path in paths])
    prompts, counts = zip(*((prompt, len(paths)) for prompt, paths in entries), strict=True)
    reference = reference_renders(prompts, counts, classifier.image_size, seed)
    return {"frechet_distance": frechet_distance(images, reference, classifier), "count": len(images)}
