"""Plain ``nn.Module`` building blocks, each saveable with ``save_pretrained`` / ``from_pretrained``."""

from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer

__all__ = ["DimensionReducer", "PixelDecoder"]
