"""`make demo-real` (vugen/demo_real.py) end to end in a scratch clone layout: the shipped configs/real/ with two
training steps, on an image set rendered from the test font of test_emoji_set.py; it trains both stages, tests,
scores the linear baselines with the same metrics and writes the grid. The real run takes ~15 CPU-minutes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.test_emoji_set import make_font
from vugen import demo_real
from vugen.data.emoji import build_emoji_set

ROOT = Path(__file__).resolve().parents[1]


def _two_steps(config: Path) -> None:
    settings = yaml.safe_load(config.read_text())
    settings["trainer"] |= {"max_steps": 2, "val_check_interval": 1, "limit_val_batches": 1}
    scheduler = settings["model"]["init_args"].get("lr_scheduler")
    if scheduler:
        scheduler["init_args"]["total_steps"] = 2
    settings["data"]["init_args"]["batch_size"] = 2  # 3 training images: one full batch
    config.write_text(yaml.safe_dump(settings))


@pytest.mark.slow
def test_the_real_demo_trains_scores_against_the_baselines_and_writes_its_grid(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "configs" / "real", tmp_path / "configs" / "real")
    for name in ("reducer.yaml", "decoder.yaml"):
        _two_steps(tmp_path / "configs" / "real" / name)
    monkeypatch.chdir(tmp_path)
    font = make_font(tmp_path / "test.ttf")
    build_emoji_set(demo_real.IMAGES, font, image_size=32, render_size=64, val_fraction=0.2, test_fraction=0.4)
    demo_real.main()
    out = capsys.readouterr().out
    for row in ("vugen: reducer + pixel decoder", "per-patch PCA (8 values per 4x4 patch", "global pixel PCA (512"):
        assert row in out
    assert "nan" not in out.split("held-out reconstruction of")[1]  # every code has PSNR, SSIM and HaarPSI
    grid = Image.open(demo_real.OUT / "reconstructions.png")
    assert grid.size[1] == 2 * 32 + 3  # a row of originals above a row of reconstructions, 1-pixel padding
    assert (demo_real.OUT / "decoder-stage").is_dir() and (demo_real.VLM / "config.json").is_file()


def test_without_a_set_or_the_font_it_says_what_to_install(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs" / "real", tmp_path / "configs" / "real")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo_real, "DEFAULT_EMOJI_FONT", str(tmp_path / "no-font.ttf"))
    with pytest.raises(SystemExit, match="apt-get install fonts-noto-color-emoji") as stop:
        demo_real.main()
    assert "\n" not in str(stop.value) and not (tmp_path / "outputs").exists()  # one line, nothing started
