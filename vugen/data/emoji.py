"""A real captioned image set made offline: the colour glyphs of an emoji font, captioned with their Unicode names.

Shapes is flat colour; a decoder tuned on it says little about real images. Debian's ``fonts-noto-color-emoji``
(``apt-get install fonts-noto-color-emoji``) holds ~1,400 single-character colour icons with shading, outlines and
text, each with a Unicode name for its caption ("shark", "film projector", ...). :func:`build_emoji_set` renders
every named glyph of a font centred on a square of the background colour, downsamples it (Lanczos) to
``image_size`` and writes an ``imagefolder`` layout that :class:`~vugen.data.image_text.ImageTextDataModule` reads::

    DIR/images/1f988.png            one image per character, named by its code point
    DIR/{train,val,test}.jsonl      {"file_name": "1f988.png", "text": "shark"}, split by a seeded shuffle

The test split holds characters the training split never shows (held-out reconstruction). Any TrueType/OpenType
font works (a monochrome one renders in ``color``); a bitmap-only colour font renders at its one strike size.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vugen.atomic import atomic_directory

__all__ = ["DEFAULT_EMOJI_FONT", "NOTO_BITMAP_SIZE", "EmojiSet", "build_emoji_set", "glyph_names", "render_glyph"]

DEFAULT_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian's fonts-noto-color-emoji
NOTO_BITMAP_SIZE = 109  # the one bitmap strike of Noto Color Emoji (FreeType refuses other sizes for it)
_FIRST_NON_ASCII = 0x80  # emoji fonts map ASCII digits, '#' and '*' for keycap sequences: plain characters alone
_MARGIN_DIVISOR = 16  # a margin of 1/16 of the glyph on each side, as the font's own bitmaps have
_MIN_INK_PIXELS = 16  # at the render size: a glyph with less ink than this is blank (spaces, joiners, selectors)


@dataclass(frozen=True)
class EmojiSet:
    """What :func:`build_emoji_set` wrote.

    Attributes:
        directory: The set's folder.
        splits: Image count per split (``train``, ``val``, ``test``).
    """

    directory: Path
    splits: dict[str, int]


def glyph_names(font_path: str | Path) -> list[tuple[int, str]]:
    """``(code point, lower-case Unicode name)`` of each non-ASCII character the font maps, in code-point order.

    Raises:
        FileNotFoundError: The font is missing (naming the Debian package of the default).
        ValueError: The file is not a font fontTools can read.
    """
    from fontTools.ttLib import TTFont, TTLibError  # the set's builder only: no other path needs fontTools

    path = Path(font_path)
    if not path.is_file():
        hint = " (apt-get install fonts-noto-color-emoji)" if str(path) == DEFAULT_EMOJI_FONT else ""
        raise FileNotFoundError(f"emoji font {path} not found{hint}; pass --font with a TrueType/OpenType font")
    try:
        cmap = TTFont(path, lazy=True).getBestCmap() or {}
    except (TTLibError, OSError) as error:
        raise ValueError(f"{path}: not a TrueType/OpenType font ({error})") from error
    names = [(code, unicodedata.name(chr(code), "").lower()) for code in sorted(cmap) if code >= _FIRST_NON_ASCII]
    return [(code, name) for code, name in names if name]


def _load_font(path: Path, render_size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(path), render_size)
    except OSError as error:  # a bitmap-only font has its own strike sizes
        raise ValueError(
            f"{path}: cannot render at size {render_size} ({error}); a bitmap colour font renders only at its strike "
            f"size (Noto Color Emoji: {NOTO_BITMAP_SIZE})"
        ) from error


def render_glyph(
    character: str, font: ImageFont.FreeTypeFont, image_size: int, background: Sequence[int], color: Sequence[int]
) -> Image.Image | None:
    """The glyph's ink centred on a square of ``background`` with a small margin, downsampled to ``image_size`` (its
    aspect kept); None when it has (almost) no ink."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), character, font=font, embedded_color=True)
    if right <= left or bottom <= top:
        return None
    drawn = Image.new("RGB", (right - left, bottom - top), tuple(background))
    ImageDraw.Draw(drawn).text((-left, -top), character, font=font, fill=tuple(color), embedded_color=True)
    ink = (np.asarray(drawn) != np.asarray(background, dtype=np.uint8)).any(axis=-1)
    if ink.sum() < _MIN_INK_PIXELS:
        return None
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    glyph = drawn.crop((int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1))
    ink_side = max(glyph.size)
    side = ink_side + 2 * max(1, ink_side // _MARGIN_DIVISOR)
    canvas = Image.new("RGB", (side, side), tuple(background))
    canvas.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def build_emoji_set(
    directory: str | Path,
    font_path: str | Path = DEFAULT_EMOJI_FONT,
    image_size: int = 32,
    render_size: int = NOTO_BITMAP_SIZE,
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    seed: int = 0,
    background: Sequence[int] = (255, 255, 255),
    color: Sequence[int] = (0, 0, 0),
) -> EmojiSet:
    """Render every named glyph of a font into a captioned image set with train / val / test splits.

    Args:
        directory: Output folder, replaced whole once the set is complete (never left half-written).
        font_path: A TrueType/OpenType font; by default Debian's Noto Color Emoji.
        image_size: Side of the square images.
        render_size: Font size the glyphs are drawn at before downsampling.
        val_fraction: Fraction of the characters in the validation split.
        test_fraction: Fraction of the characters in the test split (never in training).
        seed: Seed of the split shuffle.
        background: RGB of the square behind each glyph.
        color: RGB of a monochrome glyph (colour glyphs keep their own colours).

    Raises:
        FileNotFoundError: The font is missing.
        ValueError: A bad argument, or a font that renders no glyph.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not (0 <= val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, 0 < test_fraction and val_fraction + test_fraction < 1, got {val_fraction} "
            f"and {test_fraction}"
        )
    names = glyph_names(font_path)
    font = _load_font(Path(font_path), render_size)
    out = Path(directory)
    with atomic_directory(out) as staging:  # a failed or interrupted build leaves no half-written set
        (staging / "images").mkdir()
        rows = []
        for code, name in names:
            image = render_glyph(chr(code), font, image_size, background, color)
            if image is not None:
                file_name = f"{code:05x}.png"
                image.save(staging / "images" / file_name)
                rows.append({"file_name": file_name, "text": name})
        if len(rows) < 3:
            raise ValueError(f"{font_path}: only {len(rows)} named glyphs with ink; need at least 3 for three splits")
        random.Random(seed).shuffle(rows)
        n_test = max(1, round(len(rows) * test_fraction))
        n_val = round(len(rows) * val_fraction)
        splits = {"test": rows[:n_test], "val": rows[n_test : n_test + n_val], "train": rows[n_test + n_val :]}
        for split, split_rows in splits.items():
            with (staging / f"{split}.jsonl").open("w", encoding="utf-8") as stream:
                stream.writelines(json.dumps(row) + "\n" for row in sorted(split_rows, key=lambda r: r["file_name"]))
    return EmojiSet(out, {split: len(split_rows) for split, split_rows in splits.items()})
