"""Evaluation: reconstruction metrics for the stages' ``test`` (PSNR, SSIM, LPIPS, rFID); for generated Shapes
images, ShapeEval (per-image verdicts, lenient and strict) and the Shapes FD (a distribution score on the
features of a classifier trained here). The GenEval / DPG-Bench exporters are commands: ``vugen.commands.benchmarks``.
"""

from vugen.eval.frechet import (
    ShapesFeatures,
    frechet_distance,
    frechet_distance_folder,
    reference_renders,
    shapes_frechet_distance,
)
from vugen.eval.geneval_folder import read_geneval_folder
from vugen.eval.metrics import CleanFIDInception, ReconstructionMetrics
from vugen.eval.shapeeval import Detection, ShapeEval, detect_objects, format_report, score_folder, score_image
from vugen.eval.shapes_classifier import (
    ShapesClassifier,
    classifier_accuracy,
    load_shapes_classifier,
    train_shapes_classifier,
)
from vugen.eval.template_match import TemplateFit, template_fits

__all__ = [
    "CleanFIDInception",
    "Detection",
    "ReconstructionMetrics",
    "ShapeEval",
    "ShapesClassifier",
    "ShapesFeatures",
    "TemplateFit",
    "classifier_accuracy",
    "detect_objects",
    "format_report",
    "frechet_distance",
    "frechet_distance_folder",
    "load_shapes_classifier",
    "read_geneval_folder",
    "reference_renders",
    "score_folder",
    "score_image",
    "shapes_frechet_distance",
    "template_fits",
    "train_shapes_classifier",
]
