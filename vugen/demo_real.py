"""`make demo-real`: stages 1 and 3 on real images (an emoji font's colour icons) against linear codes of their size.

Run from a clone (it reads ``configs/real/``); everything is written under ``outputs/real/``. The steps are the
``vugen`` commands a user would type:

1. ``emoji32/``: ``vugen emoji-set`` (Debian's ``fonts-noto-color-emoji``), skipped when present.
2. ``tiny-llava/``: ``vugen tiny llava_wide_tower``, a tiny random LLaVA whose vision tower is wider than its patches.
3. Stage 1 (``configs/real/reducer.yaml``) and stage 3 (``configs/real/decoder.yaml``), then ``vugen test``: held-out
   reconstruction of characters never trained on (PSNR, SSIM, HaarPSI).
4. The linear baselines of :mod:`vugen.eval.linear_baselines` at the latent's size (per-patch PCA in the latent's
   token layout, global pixel PCA with as many values), fitted on the training split, scored on the same test images
   with the same metrics; ``reconstructions.png``: originals above their reconstructions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torchvision.utils import make_grid, save_image

from vugen.cli import VugenCLI, run
from vugen.data.emoji import DEFAULT_EMOJI_FONT
from vugen.data.image_text import ImageTextDataModule
from vugen.decoder_export import read_decoder_export
from vugen.demo import Steps
from vugen.eval import ReconstructionMetrics
from vugen.eval.linear_baselines import global_pca, patch_pca
from vugen.generation import decode_latents

CONFIGS = Path("configs/real")
OUT = Path("outputs/real")
IMAGES = OUT / "emoji32"
VLM = OUT / "tiny-llava"  # the configs' adapter checkpoint
GRID_IMAGES = 16
TEST_DECODER = ["test", "--config", str(CONFIGS / "decoder.yaml"), f"--ckpt_path={OUT / 'decoder.ckpt'}"]


def main() -> None:
    """Build the set and the VLM if missing, train stages 1 and 3, print held-out reconstruction vs the baselines."""
    console = Console(width=max(Console().width, 120))
    if not (CONFIGS / "decoder.yaml").is_file():
        raise SystemExit(f"{CONFIGS}/ not found: run `make demo-real` from the root of a vugen clone")
    steps = Steps(console, OUT / "logs")
    if not (IMAGES / "test.jsonl").is_file():
        if not Path(DEFAULT_EMOJI_FONT).is_file():
            raise SystemExit(
                f"make demo-real: no image set at {IMAGES} and no {DEFAULT_EMOJI_FONT} to render one: apt-get install "
                f"fonts-noto-color-emoji, or make the set from another font: vugen emoji-set {IMAGES} --font FONT"
            )
        steps.here("emoji set", lambda: run(["emoji-set", str(IMAGES)]))
    if not (VLM / "config.json").is_file():
        steps.here("tiny VLM", lambda: run(["tiny", "llava_wide_tower", str(VLM)]))
    steps.here("stage 1: reducer", lambda: run(["fit", "--config", str(CONFIGS / "reducer.yaml")]))
    steps.here("stage 3: pixel decoder (+ reducer)", lambda: run(["fit", "--config", str(CONFIGS / "decoder.yaml")]))
    tested = steps.here("stage 3: held-out reconstruction", lambda: run(TEST_DECODER))
    learned = {key.removeprefix("test/"): float(v) for key, v in tested.trainer.callback_metrics.items()}
    rows = steps.here("linear baselines and grid", lambda: _baselines_and_grid(tested, OUT / "reconstructions.png"))
    console.print(steps.table())
    console.print(_table({"vugen: reducer + pixel decoder (held-out, sampled)": learned, **rows}))
    console.print(f"grid (originals above reconstructions, held-out characters): {OUT / 'reconstructions.png'}")


def _split(data: ImageTextDataModule, split: str) -> torch.Tensor:
    dataset = data.dataset(split)
    return torch.stack([dataset[index]["images"] for index in range(len(dataset))])


def _baselines_and_grid(tested: VugenCLI, grid_path: Path) -> dict[str, dict[str, float]]:
    """The linear codes' scores on the tested run's test split, and a grid of originals above their reconstructions
    by the stage's export (the averaged weights a user generates with; the tested module holds its training weights
    again once ``test`` ends)."""
    adapter, data = tested.model.adapter, tested.datamodule
    train, test = _split(data, "train"), _split(data, "test")
    reducer, decoder, sampling = read_decoder_export(OUT / "decoder-stage")
    grid = adapter.token_grid(*test.shape[-2:])
    channels, patch = reducer.latent_dim, test.shape[-1] // grid[1]
    values = grid[0] * grid[1] * channels
    codes = {
        f"per-patch PCA ({channels} values per {patch}x{patch} patch: the latent's layout)": patch_pca(
            train, test, patch, channels
        ),
        f"global pixel PCA ({values} components)": global_pca(train, test, values),
    }
    scores = {name: _metrics(images, test) for name, images in codes.items()}
    originals = test[:GRID_IMAGES]
    with torch.no_grad():
        latents = reducer.eval().encode(adapter.encode_images(originals))
    generator = torch.Generator().manual_seed(0)
    sampled = decode_latents(decoder.eval(), latents, grid, tuple(test.shape[-2:]), sampling, generator)
    save_image(make_grid(torch.cat([originals, sampled]), nrow=len(originals), padding=1), grid_path)
    return scores


def _metrics(reconstructions: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    metrics = ReconstructionMetrics()
    metrics.update(reconstructions, images)
    return {name: float(value) for name, value in metrics.compute().items()}


def _table(rows: dict[str, dict[str, float]]) -> Table:
    table = Table(title=f"held-out reconstruction of {IMAGES} (test split: characters never trained on)")
    table.add_column("code")
    for column in ("PSNR dB", "SSIM", "HaarPSI"):
        table.add_column(column, justify="right")
    for name, scores in rows.items():
        table.add_row(
            name, f"{scores['psnr']:.2f}", f"{scores['ssim']:.3f}", f"{scores.get('haarpsi', float('nan')):.3f}"
        )
    return table


if __name__ == "__main__":
    main()
