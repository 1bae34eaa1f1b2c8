"""`vugen export CKPT OUT`: a latent-sampler (SamplerStage) checkpoint becomes a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from vugen.bundle import WEIGHTS_FILE
from vugen.callbacks import EMA
from vugen.checkpoint import check_writer, read_checkpoint
from vugen.finite import require_finite
from vugen.stages.sampler import SamplerStage

__all__ = ["export"]


def export(
    checkpoint: str,
    out: str,
    weights: Literal["auto", "ema", "training"] = "auto",
    decoder_export: str | None = None,
    trust_remote_code: bool = False,
) -> Path | None:
    """`vugen export CKPT OUT`: turn a latent-sampler (SamplerStage) Lightning checkpoint into a bundle.

    The VLM and the decoder export are rebuilt from the configuration recorded in the checkpoint, so they must be
    reachable where this runs. The checkpoint is data: its adapter must be a registered one, and it cannot turn
    ``trust_remote_code`` on (see :meth:`~vugen.stages.base.AdapterStage.load_from_checkpoint`).

    Args:
        checkpoint: A ``.ckpt`` written while training ``SamplerStage``.
        out: The bundle folder (replaced atomically).
        weights: ``ema``: the averages of the run's ``vugen.callbacks.EMA`` (an error if it had none); ``training``:
            the checkpoint's training weights; ``auto``: the averages when the checkpoint has them.
        decoder_export: Another decoder export to bundle instead of the one the sampler trained with, e.g. a
            one-step student (``DecoderDistillStage``'s ``export_dir``): its reducer must be the one the latent
            sampler learned, byte for byte (a distillation keeps it), else nothing is written.
        trust_remote_code: Let the VLM checkpoint run its own modelling code: runs code from the VLM checkpoint;
            pin revision. Never taken from the checkpoint.

    Returns:
        The bundle folder.

    Raises:
        NonFiniteError: The weights to export hold NaN or Inf (a diverged run); nothing is written.
    """
    if weights not in ("auto", "ema", "training"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'training', got {weights!r}")
    saved = read_checkpoint(checkpoint)  # mmap: only the EMA averages are read from it, below
    check_writer(saved, checkpoint, SamplerStage, "vugen export")
    replaced = {}
    if decoder_export is not None:
        check_same_reducer(saved, checkpoint, decoder_export)
        replaced["decoder_export"] = decoder_export
    stage = SamplerStage.load_from_checkpoint(
        checkpoint, map_location="cpu", trust_remote_code=trust_remote_code, **replaced
    )
    source = "training weights"
    if weights != "training":
        updates = EMA.apply_checkpoint(stage, saved)
        if updates is None and weights == "ema":
            raise ValueError(f"{checkpoint} holds no EMA averages: train with vugen.callbacks.EMA, or weights=training")
        source = "training weights" if updates is None else "EMA averages"
    require_finite(stage.state_dict().items(), f"refusing to export the {source} of {checkpoint}, nothing written")
    bundle = stage.pipeline().save_pretrained(out)
    if bundle is not None:  # the rank that wrote it
        print(f"vugen export: wrote the bundle {bundle} from the {source} of {checkpoint}")
    return bundle


def check_same_reducer(saved: dict[str, Any], checkpoint: str, decoder_export: str) -> None:
    """Refuse ``decoder_export`` unless its reducer's weights are those of the export the sampler trained with.

    Raises:
        ValueError: The recorded export is gone (nothing to compare with) or its reducer differs, naming both.
    """
    recorded = saved.get("hyper_parameters", {}).get("decoder_export")
    files = [Path(folder) / "reducer" / WEIGHTS_FILE for folder in (recorded, decoder_export) if folder]
    if recorded is None or not all(file.is_file() for file in files):
        missing = ", ".join(str(file) for file in files if not file.is_file()) or "no decoder_export recorded"
        raise ValueError(
            f"vugen export --decoder_export {decoder_export}: cannot check its reducer against the one {checkpoint} "
            f"trained with ({missing})"
        )
    if files[0].read_bytes() != files[1].read_bytes():
        raise ValueError(
            f"vugen export --decoder_export {decoder_export}: its reducer is not the one {checkpoint} trained with "
            f"({recorded}): the latent sampler would generate latents of another space"
        )
