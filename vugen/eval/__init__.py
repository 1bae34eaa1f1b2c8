"""Evaluation: reconstruction metrics for the stages' ``test`` (PSNR, SSIM, LPIPS, rFID), ShapeEval for generated
Shapes images (the GenEval / DPG-Bench exporters are commands: ``vugen.commands.benchmarks``)."""

from vugen.eval.metrics import CleanFIDInception, ReconstructionMetrics
from vugen.eval.shapeeval import Detection, ShapeEval, detect_objects, format_report, score_folder, score_image

__all__ = [
    "CleanFIDInception",
    "Detection",
    "ReconstructionMetrics",
    "ShapeEval",
    "detect_objects",
    "format_report",
    "score_folder",
    "score_image",
]
