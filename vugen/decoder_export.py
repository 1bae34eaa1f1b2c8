"""The decoder-stage export: what ``DecoderStage`` writes to its ``export_dir``, the sampler stage reads, and every
bundle contains::

    reducer/        DimensionReducer.save_pretrained
    decoder/        PixelDecoder.save_pretrained
    sampling.json   the decoder's SamplingConfig (``solver``, ``steps``, ``guidance_scale``, ...); files written before
                    the ODE choice was named ``solver`` say ``sampler`` and are still read
"""

from __future__ import annotations

import json
from pathlib import Path

from vugen.generation import SamplingConfig
from vugen.nn.pixel_decoder import PixelDecoder
from vugen.nn.reducer import DimensionReducer

__all__ = ["SAMPLING_FILE", "read_decoder_export", "read_decoder_sampling", "write_decoder_export"]

SAMPLING_FILE = "sampling.json"


def write_decoder_export(
    directory: Path, reducer: DimensionReducer, decoder: PixelDecoder, sampling: SamplingConfig
) -> None:
    """Write the decoder-stage export layout: ``reducer/``, ``decoder/`` and ``sampling.json`` in ``directory``."""
    reducer.save_pretrained(directory / "reducer")
    decoder.save_pretrained(directory / "decoder")
    (directory / SAMPLING_FILE).write_text(json.dumps(sampling.to_dict(), indent=2) + "\n")


def read_decoder_export(directory: str | Path) -> tuple[DimensionReducer, PixelDecoder, SamplingConfig]:
    """The reducer, decoder and sampling settings of a decoder-stage export, each checked to exist and to fit.

    Raises:
        FileNotFoundError: A part is missing, naming it.
        ValueError: The reducer's and the decoder's ``latent_dim`` differ, or ``sampling.json`` is not valid.
    """
    directory = Path(directory)
    missing = [name for name in ("reducer", "decoder", SAMPLING_FILE) if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a decoder-stage export (DecoderStage export_dir): missing {', '.join(missing)}"
        )
    reducer = DimensionReducer.from_pretrained(directory / "reducer")
    decoder = PixelDecoder.from_pretrained(directory / "decoder")
    if reducer.latent_dim != decoder.latent_dim:
        raise ValueError(
            f"{directory}: reducer latent_dim={reducer.latent_dim} but decoder latent_dim={decoder.latent_dim}"
        )
    return reducer, decoder, read_decoder_sampling(directory)


def read_decoder_sampling(directory: str | Path) -> SamplingConfig:
    """The decoder's sampling settings of an export (its ``sampling.json``), without building the modules.

    Raises:
        FileNotFoundError: ``sampling.json`` is missing.
        ValueError: It is not valid JSON or holds an unknown setting.
    """
    path = Path(directory) / SAMPLING_FILE
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if isinstance(settings, dict) and "sampler" in settings and "solver" not in settings:
        settings = {("solver" if key == "sampler" else key): value for key, value in settings.items()}
    return SamplingConfig.from_dict(settings, str(path))
