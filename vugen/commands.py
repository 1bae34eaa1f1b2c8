"""`vugen generate` (text -> PNGs from a bundle) and `vugen export` (sampler checkpoint -> bundle).

Both are plain functions that jsonargparse turns into commands (``vugen/cli.py``); image ``k`` of prompt ``i`` uses
seed ``seed + i * n + k``, as everywhere (see :mod:`vugen.pipeline`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from rich.progress import track
from torchvision.utils import make_grid

from vugen.callbacks import EMA
from vugen.checkpoint import check_writer, read_checkpoint
from vugen.diffusion import Method
from vugen.distributed import resolve_device
from vugen.finite import require_finite
from vugen.generation import image_seeds
from vugen.pipeline import VugenPipeline, to_pil
from vugen.stages.sampler import SamplerStage

__all__ = ["export", "generate"]


def _slug(prompt: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def _read_prompts(prompt: str | None, prompts: str | None) -> list[str]:
    if (prompt is None) == (prompts is None):
        raise ValueError(
            "give exactly one of --prompt (one prompt) and --prompts (a text file, one prompt per line), "
            f"got prompt={prompt!r} and prompts={prompts!r}"
        )
    if prompt is not None:
        return [prompt]
    path = Path(prompts)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no such file {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts: {path} holds no prompt (expected one per line)")
    return lines


def generate(
    *,
    bundle: str,
    out: str,
    prompt: str | None = None,
    prompts: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    sampler: Method | None = None,
    num_images_per_prompt: int = 1,
    batch_size: int = 8,
    device: str | None = None,
) -> list[Path]:
    """`vugen generate --bundle DIR --prompt TEXT | --prompts FILE --out DIR`: write PNGs of generated images.

    Writes ``OUT/<index:05d>-<slug>-<k>.png`` (image ``k`` of prompt ``index``, seed ``seed + index * n + k``) and
    ``OUT/grid.png`` (one row per prompt when ``num_images_per_prompt > 1``, else rows of 8).

    Args:
        bundle: A bundle folder (``VugenPipeline.save_pretrained``, ``vugen export``).
        out: Output folder (created).
        prompt: One prompt. Give this or ``prompts``.
        prompts: A text file with one prompt per line (blank lines skipped).
        steps: Flow-matching steps (default: the bundle's).
        cfg: Classifier-free guidance scale (default: the bundle's; 1 = none).
        seed: Base seed.
        sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        num_images_per_prompt: Images per prompt.
        batch_size: Images generated together.
        device: Torch device (default: the GPU if there is one, else the CPU).

    Returns:
        The PNG files written, grid last.
    """
    texts = _read_prompts(prompt, prompts)
    if num_images_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"need num_images_per_prompt >= 1 and batch_size >= 1, got {num_images_per_prompt}, {batch_size}"
        )
    pipe = VugenPipeline.from_pretrained(bundle).to(resolve_device(device))
    n, folder = num_images_per_prompt, Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k, text, s) for i, text in enumerate(texts) for k, s in enumerate(image_seeds(seed, i, n))]
    files, images = [], []
    for start in track(range(0, len(jobs), batch_size), description="generating"):
        batch = jobs[start : start + batch_size]
        prompts_and_seeds = [job[2] for job in batch], [job[3] for job in batch]
        tensor = pipe.sample(*prompts_and_seeds, steps=steps, guidance_scale=cfg, solver=sampler).cpu()
        for (i, k, text, _), image in zip(batch, to_pil(tensor), strict=True):
            files.append(folder / f"{i:05d}-{_slug(text)}-{k}.png")
            image.save(files[-1])
        images.append(tensor)
    grid = make_grid(torch.cat(images), nrow=n if n > 1 else 8)
    files.append(folder / "grid.png")
    to_pil(grid[None])[0].save(files[-1])
    return files


def export(
    checkpoint: str,
    out: str,
    weights: Literal["auto", "ema", "training"] = "auto",
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
    stage = SamplerStage.load_from_checkpoint(checkpoint, map_location="cpu", trust_remote_code=trust_remote_code)
    source = "training weights"
    if weights != "training":
        updates = EMA.apply_checkpoint(stage, saved)
        if updates is None and weights == "ema":
            raise ValueError(f"{checkpoint} holds no EMA averages: train with vugen.callbacks.EMA, or weights=training")
        source = "training weights" if updates is None else "EMA averages"
    require_finite(stage.state_dict().items(), f"refusing to export the {source} of {checkpoint}, nothing written")
    return stage.pipeline().save_pretrained(out)
