"""The training stages, one LightningModule each, chosen in YAML by ``class_path``."""

from vugen.stages.decoder import DecoderStage
from vugen.stages.reducer import ReducerStage

__all__ = ["DecoderStage", "ReducerStage"]
