"""Build and verify a tiny offline checkpoint of every architecture in transformers' image-text-to-text mapping.

    python -m vugen_adapters.tiny.survey --json survey.json [ARCH ...]

Per architecture: built offline (or the one-line reason it is not), reloaded with the Auto classes, processor plus
full forward with labels and image features ok (or the one-line reason), seconds. Prints one line per architecture
and the counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from vugen_adapters.tiny.architecture import ARCHITECTURES, TinyBuildError, build_tiny_architecture
from vugen_adapters.tiny.verify import verify_tiny_checkpoint

__all__ = ["NOT_DECODER_LM", "SurveyRow", "survey", "survey_architecture"]

# No decoder-only language model reading image tokens: an encoder-decoder, or images through cross-attention.
# (Not InstructBLIP-Video: its Q-Former cross-attends to the frames, its language model reads the query tokens.)
NOT_DECODER_LM = frozenset(
    {
        "florence2", "pix2struct", "pp_formulanet", "t5gemma2", "udop", "vision-encoder-decoder",
        "blip", "idefics", "mllama",
    }
)  # fmt: skip


@dataclass
class SurveyRow:
    """One architecture's result."""

    arch: str
    built: bool
    verified: bool
    seconds: float
    reason: str = ""  # the one-line reason it did not build or verify
    loss: float | None = None
    parameters: int | None = None


def survey_architecture(arch: str, workspace: Path) -> SurveyRow:
    """Build `arch` into `workspace`/`arch` and verify it."""
    start = time.perf_counter()
    try:
        directory = build_tiny_architecture(arch, workspace / arch)
    except TinyBuildError as error:
        return SurveyRow(arch, False, False, time.perf_counter() - start, str(error))
    try:
        check = verify_tiny_checkpoint(directory)
    except Exception as error:  # any failure is a finding of the survey, reported in one line
        reason = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
        return SurveyRow(arch, True, False, time.perf_counter() - start, reason)
    return SurveyRow(arch, True, True, time.perf_counter() - start, "", check.loss, check.parameters)


def survey(architectures: tuple[str, ...] = ARCHITECTURES, verbose: bool = True) -> list[SurveyRow]:
    """Survey `architectures` in a temporary folder, printing one line each when `verbose`."""
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as workspace, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in architectures:
            row = survey_architecture(arch, Path(workspace))
            rows.append(row)
            if verbose:
                status = "verified" if row.verified else "built" if row.built else "not built"
                print(f"{arch:28s} {status:9s} {row.seconds:5.1f}s {row.reason}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line: survey the given architectures (all by default) and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="*", help="model_types (default: every one of the mapping)")
    parser.add_argument("--json", type=Path, help="write the rows and counts here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = survey(tuple(args.architectures) or ARCHITECTURES)
    counts = {
        "architectures": len(rows),
        "built": sum(row.built for row in rows),
        "verified": sum(row.verified for row in rows),
        "verified_decoder_lm": sum(row.verified for row in rows if row.arch not in NOT_DECODER_LM),
        "decoder_lm": sum(row.arch not in NOT_DECODER_LM for row in rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(counts))
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "rows": [asdict(row) for row in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
