"""`vugen export-geneval` and `vugen export-dpg`: generate images in the layouts the GenEval and DPG-Bench scorers read.

The scorers run in their own environments (mmdet 2.x / modelscope stacks); vugen only writes their inputs.

- GenEval (``djghosh13/geneval``): ``OUT/<index:05d>/metadata.jsonl`` (the prompt's line of
  ``evaluation_metadata.jsonl``, as is), ``OUT/<index:05d>/samples/<k:04d>.png`` and optionally
  ``OUT/<index:05d>/grid.png``.
- DPG-Bench (``TencentQQGYLab/ELLA``): ``OUT/<id>.png`` for ``dpg_bench/prompts/<id>.txt``: 4 images tiled 2x2 without
  padding (the scorer crops tiles of ``--resolution`` pixels, ``--pic-num 4``).

Both shard prompts across ranks (prompt ``i`` goes to rank ``i % world_size``; ``RANK`` / ``WORLD_SIZE`` by default,
as torchrun sets them) and generate each prompt's images as one batch with seeds ``seed + i * n + k``, so every file
is the same whatever the rank count. Rank 0 writes ``OUT/vugen_sampling.json``: every sampling setting, the seed rule,
the bundle and the sha256 of its ``vugen.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub.utils.sha import sha_fileobj
from rich.progress import track
from torch import Tensor
from torchvision.utils import make_grid

from vugen.bundle import CONFIG_FILE
from vugen.diffusion import Method
from vugen.distributed import resolve_device, resolve_rank
from vugen.generation import image_seeds
from vugen.pipeline import VugenPipeline, to_pil

__all__ = ["SIDECAR_FILE", "export_dpg", "export_geneval"]

SIDECAR_FILE = "vugen_sampling.json"
DPG_IMAGES = 4  # the DPG-Bench scorer's --pic-num, tiled 2x2


def export_geneval(
    bundle: str,
    metadata: str,
    out: str,
    n: int = 4,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    sampler: Method | None = None,
    grid: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | None = None,
) -> None:
    """`vugen export-geneval BUNDLE METADATA OUT`: images for GenEval, in its folder layout.

    Args:
        bundle: A vugen bundle folder.
        metadata: GenEval's ``prompts/evaluation_metadata.jsonl`` (one JSON object with a ``prompt`` per line).
        out: Output folder (``<index:05d>/metadata.jsonl``, ``<index:05d>/samples/<k:04d>.png``, ``grid.png``).
        n: Images per prompt (GenEval uses 4).
        seed: Base seed: image ``k`` of prompt ``i`` uses ``seed + i * n + k``.
        steps: Flow-matching steps (default: the bundle's).
        cfg: Classifier-free guidance scale (default: the bundle's).
        sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        grid: Also write each prompt's ``grid.png`` (one row).
        rank: This process's shard (default: ``RANK``, else 0).
        world_size: Number of shards (default: ``WORLD_SIZE``, else 1).
        device: Torch device (default: the local rank's GPU if there is one, else the CPU).
    """
    path = Path(metadata)
    lines = _read_geneval_metadata(path)

    def write(index: int, images: Tensor) -> None:
        folder = Path(out) / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(lines[index] + "\n")
        for k, image in enumerate(to_pil(images)):
            image.save(folder / "samples" / f"{k:04d}.png")
        if grid:
            to_pil(make_grid(images, nrow=n)[None])[0].save(folder / "grid.png")

    prompts = [json.loads(line)["prompt"] for line in lines]
    settings = {"benchmark": "geneval", "metadata": str(path.resolve()), "grid": grid}
    overrides = {"steps": steps, "guidance_scale": cfg, "solver": sampler}
    _export(bundle, prompts, write, out, n, seed, overrides, rank, world_size, device, settings)


def export_dpg(
    bundle: str,
    prompts_dir: str,
    out: str,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    sampler: Method | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | None = None,
) -> None:
    """`vugen export-dpg BUNDLE PROMPTS_DIR OUT`: images for DPG-Bench, ``OUT/<id>.png`` as 2x2 grids.

    Score with the DPG-Bench scorer's ``--resolution`` set to the bundle's image size (recorded in the sidecar).

    Args:
        bundle: A vugen bundle folder.
        prompts_dir: DPG-Bench's ``dpg_bench/prompts`` folder of ``<id>.txt`` files (one prompt each).
        out: Output folder.
        seed: Base seed: image ``k`` of prompt ``i`` (files in name order) uses ``seed + i * 4 + k``.
        steps: Flow-matching steps (default: the bundle's).
        cfg: Classifier-free guidance scale (default: the bundle's).
        sampler: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        rank: This process's shard (default: ``RANK``, else 0).
        world_size: Number of shards (default: ``WORLD_SIZE``, else 1).
        device: Torch device (default: the local rank's GPU if there is one, else the CPU).
    """
    files = sorted(Path(prompts_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"prompts_dir: no <id>.txt prompt files in {prompts_dir}")

    def write(index: int, images: Tensor) -> None:
        to_pil(make_grid(images, nrow=2, padding=0)[None])[0].save(Path(out) / f"{files[index].stem}.png")

    prompts = [file.read_text().strip() for file in files]
    settings = {"benchmark": "dpg_bench", "prompts_dir": str(Path(prompts_dir).resolve()), "grid": "2x2"}
    overrides = {"steps": steps, "guidance_scale": cfg, "solver": sampler}
    _export(bundle, prompts, write, out, DPG_IMAGES, seed, overrides, rank, world_size, device, settings)


def _read_geneval_metadata(path: Path) -> list[str]:
    """The non-blank lines of ``evaluation_metadata.jsonl``, each checked to be a JSON object with a ``prompt``."""
    if not path.is_file():
        raise FileNotFoundError(f"metadata: no such file {path} (GenEval's prompts/evaluation_metadata.jsonl)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: entry {number} is not JSON: {error}") from error
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}: entry {number} has no string 'prompt': {line[:80]}")
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return lines


def _export(
    bundle: str,
    prompts: list[str],
    write: Callable[[int, Tensor], None],
    out: str,
    n: int,
    seed: int,
    overrides: dict[str, Any],
    rank: int | None,
    world_size: int | None,
    device: str | None,
    settings: dict[str, Any],
) -> None:
    """Generate this rank's share of ``prompts`` (``n`` images each, one batch per prompt) and ``write`` them."""
    if n < 1:
        raise ValueError(f"n (images per prompt) must be >= 1, got {n}")
    rank, world_size = resolve_rank(rank, world_size)
    pipe = VugenPipeline.from_pretrained(bundle).to(resolve_device(device))
    Path(out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        with (Path(bundle) / CONFIG_FILE).open("rb") as handle:
            bundle_hash = sha_fileobj(handle).hex()
        sidecar = {
            **settings,
            "bundle": str(Path(bundle).resolve()),
            "bundle_vugen_json_sha256": bundle_hash,
            "image_size": pipe.image_size,
            "images_per_prompt": n,
            "num_prompts": len(prompts),
            "seed": seed,
            "seed_rule": "image k of prompt i uses seed + i * images_per_prompt + k",
            "sampling": pipe.sampling.with_overrides(**overrides).to_dict(),
            "decoder_sampling": pipe.decoder_sampling.to_dict(),
        }
        (Path(out) / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    mine = range(rank, len(prompts), world_size)
    for index in track(mine, description=f"rank {rank}/{world_size}: {settings['benchmark']}"):
        write(index, pipe.sample([prompts[index]] * n, image_seeds(seed, index, n), **overrides).cpu())
