"""Training callbacks: EMA of the trainable weights, reconstruction grids to TensorBoard."""

from vugen.callbacks.ema import EMA
from vugen.callbacks.image_grid import ReconstructionGrid, reconstruction_grid

__all__ = ["EMA", "ReconstructionGrid", "reconstruction_grid"]
