"""Evaluation: reconstruction metrics for the stages' ``test`` (PSNR, SSIM, LPIPS, rFID), ShapeEval for generated
Shapes images, the VLM's own understanding of Shapes (captions, attribute questions) (the GenEval / DPG-Bench
exporters are commands: ``vugen.commands.benchmarks``)."""

from vugen.eval.captioning import AnswerScore, caption_accuracy, question_accuracy
from vugen.eval.metrics import CleanFIDInception, ReconstructionMetrics
from vugen.eval.shapeeval import Detection, ShapeEval, detect_objects, format_report, score_folder, score_image

__all__ = [
    "AnswerScore",
    "CleanFIDInception",
    "Detection",
    "ReconstructionMetrics",
    "ShapeEval",
    "caption_accuracy",
    "detect_objects",
    "format_report",
    "question_accuracy",
    "score_folder",
    "score_image",
]
