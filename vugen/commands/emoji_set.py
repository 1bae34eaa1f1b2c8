"""`vugen emoji-set DIR`: a real captioned image set made offline from an emoji font (see :mod:`vugen.data.emoji`)."""

from __future__ import annotations

from vugen.data.emoji import DEFAULT_EMOJI_FONT, NOTO_BITMAP_SIZE, build_emoji_set

__all__ = ["emoji_set"]


def emoji_set(
    directory: str,
    font: str = DEFAULT_EMOJI_FONT,
    image_size: int = 32,
    render_size: int = NOTO_BITMAP_SIZE,
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> None:
    """`vugen emoji-set DIR`: render an emoji font's named glyphs into captioned images with train / val / test splits.

    Writes DIR/images/*.png and DIR/{train,val,test}.jsonl (`{"file_name": ..., "text": ...}`), the layout of
    `vugen.data.image_text.ImageTextDataModule` (configs/real/ read it). The test split's characters are never
    trained on.

    Args:
        directory: output folder.
        font: a TrueType/OpenType font; the default is Debian's fonts-noto-color-emoji.
        image_size: side of the square images.
        render_size: font size the glyphs are drawn at before downsampling (a bitmap colour font has one).
        val_fraction: fraction of the characters in the validation split.
        test_fraction: fraction of the characters in the test split.
        seed: seed of the split.
    """
    made = build_emoji_set(directory, font, image_size, render_size, val_fraction, test_fraction, seed)
    counts = ", ".join(f"{count} {split}" for split, count in made.splits.items())
    print(f"{made.directory}: {sum(made.splits.values())} captioned {image_size}px images ({counts})")
