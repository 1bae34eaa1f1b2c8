"""`make demo`: the three stages on Shapes with the tiny offline VLM, then text-to-image on held-out prompts.

Run from a clone (it reads ``configs/demo/``); everything is written under ``outputs/demo/``. Every step is the
``vugen`` command a user would type (run in this process by :func:`vugen.cli.run`), on the shipped configs:

1. ``tiny-llava/``: ``vugen tiny llava``, a tiny random LLaVA saved like a real checkpoint (skipped when present).
2. Stage 1 (``configs/demo/reducer.yaml``): the reducer, learned vs PCA explained variance.
3. Stage 3 (``configs/demo/decoder.yaml``): pixel decoder + reducer jointly; ``vugen test`` gives held-out PSNR.
4. ``latents/{train,val}``: ``vugen cache-latents --config configs/demo/cache.yaml``, once per split.
5. Stage 2 (``configs/demo/sampler.yaml``): LoRA latent sampler trained from the cache; ``vugen export`` makes
   ``bundle/``.
6. ``heldout/``: ``vugen export-geneval`` images for every held-out prompt (GenEval layout), ``heldout_grid.png``,
   and ShapeEval.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torchvision.utils import make_grid, save_image

from vugen.cli import run
from vugen.data.shapes import heldout_prompts, heldout_two_object_prompts
from vugen.eval.shapeeval import format_report, score_folder

CONFIGS = Path("configs/demo")
OUT = Path("outputs/demo")
IMAGES_PER_PROMPT = 4

# The command lines of the steps (`vugen ARGV...`); the configs hold every other setting.
TINY_VLM = ["tiny", "llava", str(OUT / "tiny-llava")]
TEST_DECODER = ["test", "--config", str(CONFIGS / "decoder.yaml"), f"--ckpt_path={OUT / 'decoder.ckpt'}"]
CACHE_TRAIN = ["cache-latents", "--config", str(CONFIGS / "cache.yaml")]  # the config's split: train
CACHE_VAL = [*CACHE_TRAIN, "--split", "val", "--out_dir", str(OUT / "latents" / "val")]
EXPORT = ["export", str(OUT / "sampler.ckpt"), str(OUT / "bundle")]


def fit(config: str) -> list[str]:
    """``vugen fit`` of a demo config."""
    return ["fit", "--config", str(CONFIGS / config)]


def export_geneval(metadata: Path, folder: Path) -> list[str]:
    """``vugen export-geneval`` of the demo's bundle: the prompts of ``metadata``, images into ``folder``."""
    return ["export-geneval", str(OUT / "bundle"), str(metadata), str(folder), "--n", str(IMAGES_PER_PROMPT)]


def main() -> None:
    """Run every stage, print the timings, the reconstruction PSNR and ShapeEval on held-out prompts."""
    console = Console()
    if not (CONFIGS / "reducer.yaml").is_file():
        raise SystemExit(f"{CONFIGS}/ not found: run `make demo` from the root of a vugen clone")
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def step(name: str, action: Callable[[], Any]) -> Any:
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        value = action()
        timings[name] = time.perf_counter() - start
        return value

    if not (OUT / "tiny-llava" / "config.json").is_file():
        step("tiny VLM", lambda: run(TINY_VLM))
    stage1 = step("stage 1: reducer", lambda: run(fit("reducer.yaml")))
    results["reducer"] = {k: float(v) for k, v in stage1.trainer.callback_metrics.items() if "explained" in k}
    step("stage 3: pixel decoder (+ reducer)", lambda: run(fit("decoder.yaml")))
    tested = step("stage 3: held-out reconstruction", lambda: run(TEST_DECODER))
    results["reconstruction"] = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    step("latent cache", lambda: [run(CACHE_TRAIN), run(CACHE_VAL)])
    step("stage 2: latent sampler", lambda: run(fit("sampler.yaml")))
    step("bundle", lambda: run(EXPORT))
    results["shapeeval"] = step("held-out generation + ShapeEval", _generate_and_score)
    _report(console, timings, results)


def _generate_and_score() -> dict[str, dict[str, float | int]]:
    """GenEval-layout images for the held-out one- and two-object prompts, a grid, and their ShapeEval scores."""
    scores = {}
    for name, prompts in (("single", heldout_prompts()), ("two", heldout_two_object_prompts()[:30])):
        metadata = OUT / f"heldout_{name}.jsonl"
        metadata.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
        folder = OUT / "heldout" / name
        run(export_geneval(metadata, folder))
        scores[name] = score_folder(folder)
    _save_grid(OUT / "heldout" / "single", OUT / "heldout_grid.png")
    return scores


def _save_grid(folder: Path, path: Path) -> None:
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    images = [to_tensor(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*/samples/*.png"))]
    save_image(make_grid(torch.stack(images), nrow=IMAGES_PER_PROMPT * 2, padding=1), path)


def _report(console: Console, timings: dict[str, float], results: dict[str, Any]) -> None:
    table = Table(title="vugen demo")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for name, seconds in timings.items():
        table.add_row(name, f"{seconds:.0f}")
    table.add_row("[bold]total", f"[bold]{sum(timings.values()):.0f}")
    console.print(table)
    console.print(f"stage 1 (val): {results['reducer']}")
    console.print(f"stage 3 held-out reconstruction: {results['reconstruction']}")
    for name, scores in results["shapeeval"].items():
        console.print(f"ShapeEval, held-out {name}-object prompts ({OUT / 'heldout' / name}):")
        console.print(format_report(scores))
    console.print(f"grid: {OUT / 'heldout_grid.png'}")


if __name__ == "__main__":
    main()
