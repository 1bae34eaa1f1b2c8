"""Callbacks: EMA of the trainable weights, exact resume, the NaN / Inf guard, reconstruction grids to TensorBoard,
and the prediction writers (GenEval, DPG-Bench and plain-folder layouts)."""

from vugen.callbacks.ema import EMA
from vugen.callbacks.exact_resume import ExactResume
from vugen.callbacks.image_grid import ReconstructionGrid, reconstruction_grid
from vugen.callbacks.non_finite import NonFiniteGuard
from vugen.callbacks.prediction_writers import SIDECAR_FILE, DPGBenchWriter, GenEvalWriter, ImageFolderWriter

__all__ = [
    "EMA",
    "SIDECAR_FILE",
    "DPGBenchWriter",
    "ExactResume",
    "GenEvalWriter",
    "ImageFolderWriter",
    "NonFiniteGuard",
    "ReconstructionGrid",
    "reconstruction_grid",
]
