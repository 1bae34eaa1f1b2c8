"""`vugen generate`: text -> PNGs from a bundle; image ``k`` of prompt ``i`` uses seed ``seed + i * n + k``, as
everywhere (see :mod:`vugen.pipeline`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from rich.progress import track
from torchvision.utils import make_grid

from vugen.diffusion import Method
from vugen.distributed import resolve_device
from vugen.pipeline import VugenPipeline, image_seeds, to_pil

__all__ = ["generate"]


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
        tensor = pipe.sample([job[2] for job in batch], [job[3] for job in batch], steps, cfg, sampler).cpu()
        for (i, k, text, _), image in zip(batch, to_pil(tensor), strict=True):
            files.append(folder / f"{i:05d}-{_slug(text)}-{k}.png")
            image.save(files[-1])
        images.append(tensor)
    grid = make_grid(torch.cat(images), nrow=n if n > 1 else 8)
    files.append(folder / "grid.png")
    to_pil(grid[None])[0].save(files[-1])
    return files
