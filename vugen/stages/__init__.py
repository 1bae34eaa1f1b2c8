"""The training stages, one LightningModule each, chosen in YAML by ``class_path``."""

from vugen.stages.decoder import DecoderStage
from vugen.stages.distill import DecoderDistillStage
from vugen.stages.reducer import ReducerStage
from vugen.stages.sampler import SamplerStage
from vugen.stages.understanding import UnderstandingStage

__all__ = ["DecoderDistillStage", "DecoderStage", "ReducerStage", "SamplerStage", "UnderstandingStage"]
