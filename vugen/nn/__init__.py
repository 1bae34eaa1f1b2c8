"""Plain ``nn.Module`` building blocks, each saveable with ``save_pretrained`` / ``from_pretrained``."""

from vugen.nn.latent_bridge import LatentBridge
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer

__all__ = ["DimensionReducer", "LatentBridge", "PixelDecoder"]
