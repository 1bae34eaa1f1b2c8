"""Training callbacks: EMA of the trainable weights, exact resume, the NaN / Inf guard, reconstruction grids to
TensorBoard."""

from vugen.callbacks.ema import EMA
from vugen.callbacks.exact_resume import ExactResume
from vugen.callbacks.image_grid import ReconstructionGrid, reconstruction_grid
from vugen.callbacks.non_finite import NonFiniteGuard

__all__ = ["EMA", "ExactResume", "NonFiniteGuard", "ReconstructionGrid", "reconstruction_grid"]
