"""Evaluation: reconstruction metrics for the stages' ``test`` (PSNR, SSIM, LPIPS, rFID)."""

from vugen.eval.metrics import CleanFIDInception, ReconstructionMetrics

__all__ = ["CleanFIDInception", "ReconstructionMetrics"]
