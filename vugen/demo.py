"""`make demo`: the three stages on Shapes, on a tiny VLM with random weights and on the same VLM taught Shapes.

Run from a clone (it reads ``configs/demo/``); everything is written under ``outputs/demo/``. Every step is the
``vugen`` command a user would type (run in this process by :func:`vugen.cli.run`, or as ``python -m vugen`` in
another process on one CPU thread, so that two steps share the machine's two cores):

1. ``tiny-llava/``: ``vugen tiny llava``, a tiny random LLaVA saved like a real checkpoint (skipped when present).
   Beside stages 1 and 3: ``tiny-llava-understands/``, the same checkpoint (same seed) taught to caption Shapes and
   answer questions about them (``vugen tiny llava DIR --understand shapes``: LM and projector train, the vision
   tower stays as it was; a fifth of its images show the compositions held out from generation), which prints its
   captioning accuracy; then the small Shapes classifier whose features
   the Fréchet distance reads (``python -m vugen.eval.shapes_classifier``).
2. Stage 1 (``configs/demo/reducer.yaml``): the reducer, learned vs PCA explained variance.
3. Stage 3 (``configs/demo/decoder.yaml``): pixel decoder + reducer jointly; ``vugen test`` gives held-out PSNR.
   Both VLMs share this decoder: it reads the vision tower's features, and the two towers are the same weights
   (checked).
4. ``latents/`` and ``latents-understands/``: ``vugen cache-latents`` of each VLM's train and val splits.
5. Stage 2 for both VLMs at once, one process each (``configs/demo/sampler.yaml``, and with
   ``configs/demo/sampler-understands.yaml`` over it), the same budget; ``vugen export`` makes ``bundle/`` and
   ``bundle-understands/``.
6. ``heldout/`` and ``heldout-understands/``: ``vugen export-geneval`` images of the held-out one- and two-object
   prompts, scored by ShapeEval (strict and lenient) and the Shapes Fréchet distance to true renders; the taught
   VLM's captions asked again through its bundle (``VugenPipeline.describe``'s path), which must equal those
   before stage 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from torchvision.utils import make_grid, save_image

from vugen.cli import run
from vugen.commands._understanding import RECORD, score_captions
from vugen.data.shapes import heldout_prompts, heldout_two_object_prompts
from vugen.eval.frechet import frechet_distance_folder
from vugen.eval.shapeeval import format_report, score_folder
from vugen.pipeline import VugenPipeline

CONFIGS = Path("configs/demo")
OUT = Path("outputs/demo")
IMAGES_PER_PROMPT = 4
TWO_OBJECT_PROMPTS = 30
VARIANTS = {"random": "", "understands": "-understands"}  # the VLM -> the suffix of its folders under outputs/demo
CLASSIFIER = OUT / "shapes-classifier"


def folder(name: str, variant: str) -> Path:
    """``outputs/demo/<name><suffix>``: a folder of one VLM's run."""
    return OUT / f"{name}{VARIANTS[variant]}"


# The command lines of the steps (`vugen ARGV...`); the configs hold every other setting.
TINY_VLM = ["tiny", "llava", str(folder("tiny-llava", "random"))]
# A fifth of its understanding images show compositions that generation never trains on (the held-out prompts): like
# a real VLM, it has read more than its generation data hold. Without them its LM's colour -> shape prior (after
# "blue" only squares and triangles) wins: held-out captions 0 %, and held-out generation fell to 29 % lenient.
UNDERSTANDING_VLM = [
    *("tiny", "llava", str(folder("tiny-llava", "understands"))),
    *("--understand", "shapes", "--understand_recipe.heldout_ratio", "0.2"),
]
# Run in another process while stages 1 and 3 run here.
BESIDE_STAGES_1_AND_3 = [
    ("understanding VLM", ["vugen", *UNDERSTANDING_VLM]),
    ("Shapes classifier (FD features)", ["vugen.eval.shapes_classifier", str(CLASSIFIER)]),
]
TEST_DECODER = ["test", "--config", str(CONFIGS / "decoder.yaml"), f"--ckpt_path={OUT / 'decoder.ckpt'}"]


def fit(config: str) -> list[str]:
    """``vugen fit`` of a demo config."""
    return ["fit", "--config", str(CONFIGS / config)]


def cache_latents(variant: str, split: str) -> list[str]:
    """``vugen cache-latents`` of one VLM's split into ``latents<suffix>/<split>``."""
    argv = ["cache-latents", "--config", str(CONFIGS / "cache.yaml"), "--split", split]
    vlm = f"--adapter.init_args.pretrained={folder('tiny-llava', variant)}"
    return [*argv, vlm, "--out_dir", str(folder("latents", variant) / split)]


def fit_sampler(variant: str) -> list[str]:
    """Stage 2 of one VLM: ``sampler.yaml``, with the taught VLM's overlay over it."""
    overlay = ["--config", str(CONFIGS / "sampler-understands.yaml")] if variant == "understands" else []
    return [*fit("sampler.yaml"), *overlay]


def export(variant: str) -> list[str]:
    """``vugen export`` of one VLM's stage-2 checkpoint into its bundle."""
    return ["export", str(folder("sampler", variant).with_suffix(".ckpt")), str(folder("bundle", variant))]


def export_geneval(variant: str, metadata: Path, out: Path) -> list[str]:
    """``vugen export-geneval`` of one VLM's bundle: the prompts of ``metadata``, images into ``out``."""
    return ["export-geneval", str(folder("bundle", variant)), str(metadata), str(out), "--n", str(IMAGES_PER_PROMPT)]


class Steps:
    """Runs the demo's steps, here or in another process, and keeps when each ran."""

    def __init__(self, console: Console, logs: Path = OUT / "logs") -> None:
        self.console, self.start = console, time.perf_counter()
        self.spans: dict[str, tuple[float, float]] = {}  # step -> (start, end), seconds since the demo started
        self.logs = logs  # the output of the steps run elsewhere

    def here(self, name: str, action: Callable[[], Any]) -> Any:
        """Run ``action`` in this process."""
        self.console.rule(f"[bold]{name}")
        begin = time.perf_counter()
        value = action()
        self.spans[name] = (begin - self.start, time.perf_counter() - self.start)
        return value

    def elsewhere(self, name: str, argv: Sequence[str]) -> None:
        """Run ``python -m ARGV...`` in another process on one CPU thread; raise one line if it fails."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}.log"
        self.console.print(f"[dim]{name}: started in another process (output: {log})")
        begin = time.perf_counter()
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with log.open("w") as output:
            code = subprocess.run(
                [sys.executable, "-m", *argv], stdout=output, stderr=subprocess.STDOUT, env=env
            ).returncode
        if code:
            raise SystemExit(f"make demo: {name} failed (exit status {code}); its output is in {log}")
        self.spans[name] = (begin - self.start, time.perf_counter() - self.start)
        self.console.print(f"[dim]{name}: done in {time.perf_counter() - begin:.0f} s")

    def in_turn(self, commands: Sequence[tuple[str, Sequence[str]]]) -> None:
        """:meth:`elsewhere` of each ``(name, argv)``, one after the other."""
        for name, argv in commands:
            self.elsewhere(name, argv)

    def table(self) -> Table:
        table = Table(title="vugen demo (steps side by side overlap; total = wall time)")
        for column in ("step", "from s", "seconds"):
            table.add_column(column, justify="left" if column == "step" else "right")
        for name, (begin, end) in self.spans.items():
            table.add_row(name, f"{begin:.0f}", f"{end - begin:.0f}")
        table.add_row("[bold]total", "", f"[bold]{time.perf_counter() - self.start:.0f}")
        return table


@contextmanager
def one_thread():
    """This process on one CPU thread while another process uses the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    """Run every step for both VLMs, then print the timings, reconstruction, captioning and generation scores."""
    console = Console(width=max(Console().width, 120))  # tables unwrapped in a log file too
    if not (CONFIGS / "reducer.yaml").is_file():
        raise SystemExit(f"{CONFIGS}/ not found: run `make demo` from the root of a vugen clone")
    steps, results = Steps(console), {}
    if not (folder("tiny-llava", "random") / "config.json").is_file():
        steps.here("tiny VLM", lambda: run(TINY_VLM))
    with ThreadPoolExecutor(max_workers=2) as pool, one_thread():
        beside = pool.submit(steps.in_turn, BESIDE_STAGES_1_AND_3)
        stage1 = steps.here("stage 1: reducer", lambda: run(fit("reducer.yaml")))
        steps.here("stage 3: pixel decoder (+ reducer)", lambda: run(fit("decoder.yaml")))
        tested = steps.here("stage 3: held-out reconstruction", lambda: run(TEST_DECODER))
        beside.result()
    results["reducer"] = {k: float(v) for k, v in stage1.trainer.callback_metrics.items() if "explained" in k}
    results["reconstruction"] = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    _check_same_tower(folder("tiny-llava", "random"), folder("tiny-llava", "understands"))
    steps.here("latent caches", lambda: [run(cache_latents(v, s)) for v in VARIANTS for s in ("train", "val")])
    _side_by_side(steps, {v: [(f"stage 2: latent sampler ({v} VLM)", ["vugen", *fit_sampler(v)])] for v in VARIANTS})
    steps.here("bundles", lambda: [run(export(variant)) for variant in VARIANTS])
    metadata = _heldout_prompts()
    _side_by_side(steps, {variant: _heldout_images(variant, metadata) for variant in VARIANTS})
    results["generation"] = steps.here("scores", lambda: {v: _scores(v) for v in VARIANTS})
    results["captions"] = steps.here("captions through the bundle", _captions_before_and_after)
    _save_grid(folder("heldout", "understands") / "single", OUT / "heldout_grid.png")
    _report(console, steps, results)


def _side_by_side(steps: Steps, lanes: dict[str, list[tuple[str, list[str]]]]) -> None:
    """Each lane's commands one after the other in processes of their own, the lanes at once (one CPU thread each)."""
    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        for future in [pool.submit(steps.in_turn, commands) for commands in lanes.values()]:
            future.result()


def _check_same_tower(random_vlm: Path, taught_vlm: Path) -> None:
    """Stop unless both VLMs hold the same vision tower: the shared reducer and decoder read its features."""
    with safe_open(random_vlm / "model.safetensors", "pt") as a, safe_open(taught_vlm / "model.safetensors", "pt") as b:
        tower = [key for key in a.keys() if "vision_tower" in key]
        if not tower or any(not torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in tower):
            raise SystemExit(f"make demo: {taught_vlm} has another vision tower than {random_vlm}; delete both")


def _heldout_prompts() -> dict[str, Path]:
    """The held-out one- and two-object prompts as GenEval metadata files: ``{"single" | "two": path}``."""
    prompts = {"single": heldout_prompts(), "two": heldout_two_object_prompts()[:TWO_OBJECT_PROMPTS]}
    files = {name: OUT / f"heldout_{name}.jsonl" for name in prompts}
    for name, texts in prompts.items():
        files[name].write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in texts))
    return files


def _heldout_images(variant: str, metadata: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """The commands that write one VLM's held-out images, one per prompt file."""
    return [
        (
            f"held-out {name}-object images ({variant} VLM)",
            ["vugen", *export_geneval(variant, path, folder("heldout", variant) / name)],
        )
        for name, path in metadata.items()
    ]


def _scores(variant: str) -> dict[str, dict[str, float | int]]:
    """ShapeEval (strict and lenient) and the Shapes Fréchet distance of one VLM's held-out images."""
    return {
        name: score_folder(images) | frechet_distance_folder(images, CLASSIFIER)
        for name in ("single", "two")
        for images in [folder("heldout", variant) / name]
    }


def _captions_before_and_after() -> dict[str, Any]:
    """The taught VLM's caption accuracy as ``vugen tiny --understand`` measured it, and through its bundle now."""
    before = json.loads((folder("tiny-llava", "understands") / RECORD).read_text())["caption_accuracy"]
    # The bundle's VLM with its stage-2 LoRA attached, in eval mode: what `VugenPipeline.describe` asks.
    bundle = VugenPipeline.from_pretrained(folder("bundle", "understands"))
    scores = score_captions(bundle.adapter)
    after = {split: {kind: score.to_dict() for kind, score in kinds.items()} for split, kinds in scores.items()}
    return {"before": before, "after": after}


def _save_grid(images: Path, path: Path) -> None:
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    pictures = [to_tensor(Image.open(p).convert("RGB")) for p in sorted(images.glob("*/samples/*.png"))]
    save_image(make_grid(torch.stack(pictures), nrow=IMAGES_PER_PROMPT * 2, padding=1), path)


def _report(console: Console, steps: Steps, results: dict[str, Any]) -> None:
    console.print(steps.table())
    console.print(f"stage 1 (val): {results['reducer']}")
    console.print(f"stage 3 held-out reconstruction: {results['reconstruction']}")
    captions = results["captions"]
    console.print(
        "captioning accuracy of the taught VLM (greedy, every attribute right), before stage 2 -> through its bundle:"
    )
    for split, kinds in captions["before"].items():
        for kind, before in kinds.items():
            after = captions["after"][split][kind]
            same = "equal" if before == after else "[bold red]DIFFERENT"
            counts = f"{before['correct']}/{before['total']} -> {after['correct']}/{after['total']}"
            console.print(f"  {split:<8} {kind:<11} {counts} ({same})")
    for variant in VARIANTS:
        for name, scores in results["generation"][variant].items():
            console.print(
                f"ShapeEval, held-out {name}-object prompts, {variant} VLM ({folder('heldout', variant) / name}):"
            )
            console.print(format_report(scores))
    console.print(_comparison(results["generation"]))
    console.print(f"grid (taught VLM, held-out one-object prompts): {OUT / 'heldout_grid.png'}")


def _comparison(generation: dict[str, dict[str, dict[str, float | int]]]) -> Table:
    table = Table(title="held-out prompts, same sampler budget: the VLM that understands vs the random one")
    table.add_column("VLM")
    for name in ("one", "two"):
        for column in ("strict", "lenient", "FD"):
            table.add_column(f"{name} obj. {column}", justify="right")
    for variant, by_kind in generation.items():
        cells = []
        for scores in (by_kind["single"], by_kind["two"]):
            strict, lenient = scores["overall/all_correct_strict"], scores["overall/all_correct"]
            cells += [f"{strict:.1%}", f"{lenient:.1%}", f"{scores['frechet_distance']:.1f}"]
        table.add_row(variant, *cells)
    return table


if __name__ == "__main__":
    main()
