"""`make demo`: the three stages on Shapes with the tiny offline VLM, then text-to-image on held-out prompts.

Run from a clone (it reads ``configs/demo/``); everything is written under ``outputs/demo/``:

1. ``tiny-llava/``: a tiny random LLaVA, saved like a real checkpoint (skipped when present).
2. Stage 1 (``configs/demo/reducer.yaml``): the reducer, learned vs PCA explained variance.
3. Stage 3 (``configs/demo/decoder.yaml``): pixel decoder + reducer jointly; ``vugen test`` gives held-out PSNR.
4. ``latents/``: Shapes encoded once into the stage-3 reducer's latents (``configs/demo/cache.yaml``).
5. Stage 2 (``configs/demo/sampler.yaml``): LoRA latent sampler trained from the cache; exported as ``bundle/``.
6. ``heldout/``: images for every held-out prompt in the GenEval layout, ``heldout_grid.png``, and ShapeEval.
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

from vugen.cli import VugenCLI
from vugen.commands import export
from vugen.data.latent_writer import cache_latents
from vugen.data.shapes import heldout_prompts, heldout_two_object_prompts
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.eval.export import export_geneval
from vugen.eval.shapeeval import format_report, score_folder
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.tiny import build_tiny_vlm

CONFIGS = Path("configs/demo")
OUT = Path("outputs/demo")
IMAGES_PER_PROMPT = 4


def main() -> None:
    """Run every stage, print the timings, the reconstruction PSNR and ShapeEval on held-out prompts."""
    console = Console()
    if not (CONFIGS / "reducer.yaml").is_file():
        raise SystemExit(f"{CONFIGS}/ not found: run `make demo` from the root of a vugen clone")
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def step(name: str, run: Callable[[], Any]) -> Any:
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        value = run()
        timings[name] = time.perf_counter() - start
        return value

    if not (OUT / "tiny-llava" / "config.json").is_file():
        step("tiny VLM", lambda: build_tiny_vlm("llava", OUT / "tiny-llava"))
    stage1 = step("stage 1: reducer", lambda: _fit("reducer.yaml"))
    results["reducer"] = {k: float(v) for k, v in stage1.trainer.callback_metrics.items() if "explained" in k}
    step("stage 3: pixel decoder (+ reducer)", lambda: _fit("decoder.yaml"))
    tested = step("stage 3: held-out reconstruction", lambda: _test("decoder.yaml", OUT / "decoder.ckpt"))
    results["reconstruction"] = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    step("latent cache", _cache)
    step("stage 2: latent sampler", lambda: _fit("sampler.yaml"))
    step("bundle", lambda: export(str(OUT / "sampler.ckpt"), str(OUT / "bundle")))
    results["shapeeval"] = step("held-out generation + ShapeEval", _generate_and_score)
    _report(console, timings, results)


def _fit(config: str) -> VugenCLI:
    return VugenCLI(args=["fit", "--config", str(CONFIGS / config)])


def _test(config: str, checkpoint: Path) -> VugenCLI:
    return VugenCLI(args=["test", "--config", str(CONFIGS / config), f"--ckpt_path={checkpoint}"])


def _cache() -> None:
    adapter = LlavaAdapter(str(OUT / "tiny-llava"), dtype="float32")
    shapes = ShapesDataModule(image_size=32, train_size=8192, val_size=256, batch_size=64)
    for split in ("train", "val"):
        cache_latents(
            adapter=adapter,
            reducer_path=str(OUT / "decoder-stage" / "reducer"),
            data=shapes,
            out_dir=str(OUT / "latents" / split),
            split=split,
        )


def _generate_and_score() -> dict[str, dict[str, float | int]]:
    """GenEval-layout images for the held-out one- and two-object prompts, a grid, and their ShapeEval scores."""
    scores = {}
    for name, prompts in (("single", heldout_prompts()), ("two", heldout_two_object_prompts()[:30])):
        metadata = OUT / f"heldout_{name}.jsonl"
        metadata.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
        folder = OUT / "heldout" / name
        export_geneval(str(OUT / "bundle"), str(metadata), str(folder), n=IMAGES_PER_PROMPT)
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
