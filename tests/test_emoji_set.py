"""`vugen emoji-set` and :mod:`vugen.data.emoji`: a captioned image set rendered from a font, read back by
ImageTextDataModule. The font is built here with fontTools (square, triangle and bar glyphs at emoji code points, an
ASCII letter and an empty glyph), so the test needs no font package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from PIL import Image

from vugen.cli import main
from vugen.data.emoji import build_emoji_set, glyph_names
from vugen.data.image_text import ImageTextDataModule

UNITS = 1000
# code point -> outline (polygons in font units); U+2003 EM SPACE has no ink, 'A' is ASCII: both left out.
GLYPHS = {
    0x25A0: [[(100, 100), (900, 100), (900, 900), (100, 900)]],  # BLACK SQUARE
    0x25B2: [[(100, 100), (900, 100), (500, 900)]],  # BLACK UP-POINTING TRIANGLE
    0x2580: [[(100, 500), (900, 500), (900, 900), (100, 900)]],  # UPPER HALF BLOCK
    0x2584: [[(100, 100), (900, 100), (900, 500), (100, 500)]],  # LOWER HALF BLOCK
    0x258C: [[(100, 100), (500, 100), (500, 900), (100, 900)]],  # LEFT HALF BLOCK
    0x2590: [[(500, 100), (900, 100), (900, 900), (500, 900)]],  # RIGHT HALF BLOCK
    0x2003: [],
    ord("A"): [[(100, 100), (900, 100), (500, 900)]],
}


def _glyph(polygons):
    pen = TTGlyphPen(None)
    for polygon in polygons:
        pen.moveTo(polygon[0])
        for point in polygon[1:]:
            pen.lineTo(point)
        pen.closePath()
    return pen.glyph()


def make_font(path, glyphs=GLYPHS):
    """A TrueType font of ``glyphs`` (code point -> polygons) at ``path``."""
    names = [".notdef", *(f"g{code:04x}" for code in glyphs)]
    builder = FontBuilder(UNITS, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({code: f"g{code:04x}" for code in glyphs})
    builder.setupGlyf({".notdef": _glyph([]), **{f"g{code:04x}": _glyph(p) for code, p in glyphs.items()}})
    builder.setupHorizontalMetrics({name: (UNITS, 0) for name in names})
    builder.setupHorizontalHeader(ascent=UNITS, descent=0)
    builder.setupNameTable({"familyName": "VugenTest", "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=UNITS, usWinAscent=UNITS, usWinDescent=0)
    builder.setupPost()
    builder.save(str(path))
    return path


@pytest.fixture(scope="module")
def font(tmp_path_factory):
    return make_font(tmp_path_factory.mktemp("font") / "test.ttf")


def test_glyph_names_are_the_unicode_names_of_the_non_ascii_characters(font):
    names = dict(glyph_names(font))
    assert names[0x25A0] == "black square" and names[0x25B2] == "black up-pointing triangle"
    assert ord("A") not in names


def test_the_set_holds_every_inked_glyph_once_captioned_and_centred(font, tmp_path):
    made = build_emoji_set(tmp_path / "set", font, image_size=16, render_size=64, val_fraction=0.2, test_fraction=0.2)
    rows = {split: [json.loads(line) for line in (made.directory / f"{split}.jsonl").open()] for split in made.splits}
    every = [row for split_rows in rows.values() for row in split_rows]
    inked = {code for code, polygons in GLYPHS.items() if polygons and code >= 0x80}
    assert sorted(int(row["file_name"][:-4], 16) for row in every) == sorted(inked)  # each once, none blank
    assert made.splits == {"test": 1, "val": 1, "train": 4} == {split: len(r) for split, r in rows.items()}
    by_name = {row["text"]: np.asarray(Image.open(made.directory / "images" / row["file_name"])) for row in every}
    square, triangle = by_name["black square"], by_name["black up-pointing triangle"]
    assert square.shape == (16, 16, 3)
    ink = square.mean(-1) < 128
    assert ink[2:-2, 2:-2].all() and not ink[0].any() and not ink[:, 0].any()  # centred, margin of background
    dark = triangle.mean(-1) < 128
    assert dark[-3].sum() > 3 * dark[3].sum()  # wide at the bottom, narrow at the top
    top_half = by_name["upper half block"].mean(-1) < 128
    assert top_half.any(1).sum() < 12  # scaled to fit, not stretched: the glyph's aspect is kept


def test_the_split_is_seeded_and_the_set_loads_through_image_text_data(font, tmp_path):
    first = build_emoji_set(tmp_path / "a", font, image_size=16, render_size=64, test_fraction=0.3, seed=1)
    again = build_emoji_set(tmp_path / "b", font, image_size=16, render_size=64, test_fraction=0.3, seed=1)
    other = build_emoji_set(tmp_path / "c", font, image_size=16, render_size=64, test_fraction=0.3, seed=5)
    test_of = lambda made: (made.directory / "test.jsonl").read_text()  # noqa: E731
    assert test_of(first) == test_of(again)
    assert test_of(first) != test_of(other)  # negative control: the seed chooses the held-out characters
    data = ImageTextDataModule(
        root=str(first.directory / "images"),
        metadata=str(first.directory / "train.jsonl"),
        test_root=str(first.directory / "images"),
        test_metadata=str(first.directory / "test.jsonl"),
        image_size=16,
        batch_size=8,
        num_workers=0,
    )
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["images"].shape == (first.splits["test"], 3, 16, 16)
    assert torch.all((batch["images"] >= 0) & (batch["images"] <= 1))
    assert set(batch["captions"]) <= {name for _, name in glyph_names(font)}


def test_a_failed_build_leaves_the_previous_set_as_it_was(font, tmp_path):
    made = build_emoji_set(tmp_path / "set", font, image_size=16, render_size=64)
    before = sorted(p.name for p in (made.directory / "images").iterdir())
    two_glyphs = make_font(tmp_path / "two.ttf", {code: GLYPHS[code] for code in (0x25A0, 0x25B2)})
    with pytest.raises(ValueError, match="only 2 named glyphs with ink"):
        build_emoji_set(tmp_path / "set", two_glyphs, image_size=16, render_size=64)
    assert sorted(p.name for p in (made.directory / "images").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "two.ttf"]  # no staging folder left behind


def test_the_command_names_a_missing_font_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["emoji-set", str(tmp_path / "set"), "--font", str(tmp_path / "none.ttf")])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip()
    assert "none.ttf not found" in error and "\n" not in error
    assert not (tmp_path / "set").exists()  # nothing half-written


def test_the_command_writes_the_set(font, tmp_path, capsys):
    main(["emoji-set", str(tmp_path / "set"), "--font", str(font), "--render_size", "64", "--image_size", "8"])
    assert "6 captioned 8px images" in capsys.readouterr().out
    assert len(list((tmp_path / "set" / "images").glob("*.png"))) == 6
