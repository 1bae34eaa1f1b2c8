"""Where each image token comes from: the layout of a VLM's image tokens, read off its own image processor.

`AutoAdapter` must return raster `[B, N, D]` tokens from whatever a checkpoint's `get_image_features` gives: plain
`[B, 3, H, W]` towers, flat patches packed into one sequence (Qwen-style, in merge-block order), flat patches padded
per image (SigLIP2 NaFlex), towers with CLS or register tokens, pixel-shuffle / pooling / merge projectors. Rather
than a list of known shapes, the layout is measured from what the checkpoint itself says:

1. `measure_patch_layout` runs the checkpoint's image processor once on an image whose every pixel holds its own
   index (normalisation off, so the values come back as they went in) and reads, for every patch slot of
   `pixel_values`, which pixels it holds. That gives the encoder's patch grid for this image size and the raster
   position of every slot (raster for image tensors; merge-block order for Qwen-style patches; padding slots for
   NaFlex; for tiling processors, which of the views is the whole image), whatever the tensor layout: image tensors,
   flat patches (with Pix2Struct's leading (row, col) id columns, checked), per-patch images (a still patch repeated
   over frames is one slot), patches side by side in a strip (MiniCPM-V's `[C, p, N * p]`). Flat slots of several
   encoder patches (Inkling 2's tiles, one per merged token) are counted in the patches the tower cuts them into. A
   processor that resizes whatever it is told is measured at the size it keeps (`size_kept`).
2. `to_raster` matches the tokens of one image to that layout: one token per patch slot (vision tokens, padding
   dropped), or one token per `f x f` block of patches after a merge / pixel shuffle / pooling (`f` solved from the
   token count), after any leading CLS / register tokens.

A merge of patches that the processor gives in raster order (pixel shuffle, pooling, unshuffle) yields tokens raster
over blocks; a merge of patches given in block order (Qwen's merger groups `f^2` consecutive slots) yields tokens in
the order of the blocks. The adapter conformance checks verify the result (`raster_order` in `vugen check`); a layout
that is neither is reported with the checkpoint's model type and the hook to override.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vugen.errors import VugenError

# Leading tokens that are not patches: CLS, register tokens (DINOv2-style towers have 4, some 8 or 16).
MAX_PREFIX_TOKENS = 16


class LayoutNotDerivable(VugenError, ValueError):
    """The image tokens of a checkpoint cannot be matched to its patch grid by introspection."""


@dataclass(frozen=True)
class PatchLayout:
    """The encoder patches of one image of a given size, as the image processor lays them out.

    Attributes:
        rows: patch rows of the image.
        cols: patch columns of the image.
        slots: patch slots per image in `pixel_values` (padding included): `rows * cols` unless padded.
        raster: `[rows * cols]` raster index (`row * cols + col`) of each real patch slot, in slot order.
        slot_index: `[rows * cols]` slot of each real patch, in slot order (padding slots skipped).
        crops: views the processor makes of one image (tiled processors: the whole image and its tiles).
        crop: the view that is the whole image, as it went in; its tokens are the image's.
        split: patches along each side of one of the processor's slots: 1, or more for tiles that the tower cuts into
            patches (Inkling 2's), where `slots` and `slot_index` count patches, `split**2` per tile.
    """

    rows: int
    cols: int
    slots: int
    raster: Tensor
    slot_index: Tensor
    crops: int = 1
    crop: int = 0
    split: int = 1

    @classmethod
    def raster_grid(cls, rows: int, cols: int, crops: int = 1, crop: int = 0) -> PatchLayout:
        """An image tensor patchified in raster order (view `crop` of `crops`)."""
        order = torch.arange(rows * cols)
        return cls(rows, cols, rows * cols, order, order, crops, crop)

    @property
    def is_raster(self) -> bool:
        """Whether slot `k` is raster patch `k` (no padding, no reordering)."""
        return self.slots == self.rows * self.cols and torch.equal(self.raster, torch.arange(self.slots))


def position_coded_image(height: int, width: int) -> Tensor:
    """`[3, H, W]` floats in `(0, 1)`: every pixel holds `(index + 1) / (H * W + 1)` in all three channels.

    Exact in float32 up to ~4 M pixels, and never 0, so zero padding stays distinguishable from a pixel.
    """
    index = torch.arange(height * width, dtype=torch.float64).reshape(height, width)
    return ((index + 1) / (height * width + 1)).float().expand(3, -1, -1)


def decode_pixels(values: Tensor, height: int, width: int, model_type: str) -> Tensor:
    """Pixel indices back from `position_coded_image` values."""
    index = values.double() * (height * width + 1) - 1
    rounded = index.round()
    if not torch.allclose(index, rounded, atol=0.05) or rounded.max() >= height * width:
        raise LayoutNotDerivable(
            f"{model_type}: its image processor changes the pixels of a {height}x{width} image beyond normalisation "
            "(it resizes or quantises them); set the adapter's `image_size` to a size it keeps, or override "
            "`pixel_inputs`"
        )
    return rounded.long()


def measure_patch_layout(
    image_processor: Any, process: Any, height: int, width: int, patch_size: int, model_type: str
) -> PatchLayout:
    """Run the image processor on a position-coded image and read where every patch went.

    Args:
        image_processor: the checkpoint's image processor (copied; normalisation is switched off in the copy).
        process: `process(image_processor, images) -> dict of tensors`, the adapter's processor call (resizing,
            rescaling, cropping and tiling off).
        height: image height in pixels, as the adapter feeds it.
        width: image width in pixels.
        patch_size: the vision encoder's patch side, for image-tensor layouts and flat slots of several patches.
        model_type: the checkpoint's model type, for error messages.
    """
    pixels = _processed_patches(image_processor, process, height, width, model_type)
    if pixels.ndim >= 4:  # image tensors ([B, 3, H, W] or tiles [B, T, 3, H, W]): the encoder patchifies them
        return _image_tensor_layout(pixels, height, width, patch_size, model_type)
    return _in_encoder_patches(_flat_views_layout(pixels, height, width, model_type), height, patch_size)


def _in_encoder_patches(layout: PatchLayout, height: int, patch_size: int) -> PatchLayout:
    """A layout of flat `t x t`-px slots at the encoder's `p`-px patch resolution, for `p < t` dividing `t`.

    A processor may hand the tower one slot per merged token (Inkling 2's tile of `merge x merge` patches) that the
    tower cuts into `(t / p)^2` patches, raster within the slot, and returns a token for each, slot after slot (the
    order `raster_order` in `vugen check` confirms). A merge of each slot's patches (Inkling 2's projector), or a tower
    that takes each slot as one patch (Gemma 4 Unified's merged patches), gives one token per slot instead, which
    `reduction` reads off this layout as a merge of `t / p`. A tower that names no patch size (`p == 1`) is left at
    the processor's slots.
    """
    side = height // layout.rows
    if patch_size <= 1 or side <= patch_size or side % patch_size:
        return layout
    split = side // patch_size
    within = torch.arange(split**2)  # the slot's patches, raster within it
    rows = (layout.raster // layout.cols)[:, None] * split + within // split
    cols = (layout.raster % layout.cols)[:, None] * split + within % split
    return dataclasses.replace(
        layout,
        rows=layout.rows * split,
        cols=layout.cols * split,
        slots=layout.slots * split**2,
        raster=(rows * layout.cols * split + cols).reshape(-1),
        slot_index=(layout.slot_index[:, None] * split**2 + within).reshape(-1),
        split=split,
    )


def size_kept(image_processor: Any, process: Any, side: int, patch_size: int, model_type: str) -> int | None:
    """The side of the square images a processor that resizes on its own keeps unmoved, or None when it keeps
    `side` x `side` images (or its size cannot be read).

    Some processors resize whatever they are told (MiniCPM-V's to `scale_resolution`, Pix2Struct-style ones to fill
    `max_patches`): the patches they make of a `side`-px image give the area they resize to, and an image of that
    side must then come back unmoved.
    """
    try:
        measure_patch_layout(image_processor, process, side, side, patch_size, model_type)
        return None
    except LayoutNotDerivable:
        pixels = _processed_patches(image_processor, process, side, side, model_type)
    if pixels.ndim >= 4:
        area = pixels.shape[-2] * pixels.shape[-1]
    else:
        area = int((~_holds_no_pixel(pixels.reshape(-1, pixels.shape[-1]))).sum()) * patch_size**2
    kept = math.isqrt(area)
    if kept * kept != area or kept in (0, side):
        return None
    try:
        measure_patch_layout(image_processor, process, kept, kept, patch_size, model_type)
    except LayoutNotDerivable:
        return None
    return kept


def _processed_patches(image_processor: Any, process: Any, height: int, width: int, model_type: str) -> Tensor:
    """The pixel tensor the processor makes of a position-coded image (normalisation off), as image tensors
    (`ndim >= 4`) or flat patches (`[slots, values]`, or `[views, slots, values]`)."""
    plain = copy.deepcopy(image_processor)
    if hasattr(plain, "do_normalize"):
        plain.do_normalize = False
    pixels = pixel_values(process(plain, position_coded_image(height, width)[None]), model_type)
    if pixels.ndim >= 4 and pixels.shape[-2] * pixels.shape[-1] < height * width:  # one small image per patch
        pixels = _without_repeated_frames(pixels)
        return pixels.reshape(-1, pixels[0].numel() if pixels.ndim == 4 else pixels.shape[-3:].numel())
    if pixels.ndim >= 4 and _is_patch_strip(pixels, height):
        return _strip_patches(pixels)
    return pixels


def pixel_values(inputs: dict[str, Tensor], model_type: str) -> Tensor:
    """The image processor's pixel tensor: `pixel_values`, or the one entry named like it (`pixel_values_images`),
    else its one floating tensor of 3 or more dims (Pix2Struct's `flattened_patches`)."""
    if "pixel_values" in inputs:
        return inputs["pixel_values"]
    named = [key for key in inputs if key.startswith("pixel_values")]
    named = named or [key for key, value in inputs.items() if value.is_floating_point() and value.ndim >= 3]
    if len(named) != 1:
        raise LayoutNotDerivable(f"{model_type}: its image processor returns no single pixel tensor ({sorted(inputs)})")
    return inputs[named[0]]


def _without_repeated_frames(pixels: Tensor) -> Tensor:
    """Per-patch pixels with every frame axis kept once: a still patch repeated to fill a temporal patch (Inkling's
    `[N, T, p, p, C]`) is one patch slot, which the encoder folds into one token (identical tiles of image tensors
    are not frames: the encoder makes tokens of each)."""
    for axis in range(1, pixels.ndim - 3):
        first = pixels.narrow(axis, 0, 1)
        if pixels.shape[axis] > 1 and torch.equal(pixels, first.expand_as(pixels)):
            pixels = first
    return pixels


def _is_patch_strip(pixels: Tensor, height: int) -> bool:
    """Whether `[..., C, p, N * p]` pixels are patches side by side (NaViT packing, MiniCPM-V's): views lower than the
    image, as wide as a whole number of square `p x p` patches. `_flat_patch_layout` then checks that they are."""
    side, length = pixels.shape[-2:]
    return side < height and length % side == 0


def _strip_patches(pixels: Tensor) -> Tensor:
    """`[..., C, p, N * p]` strips -> `[N, C * p * p]` flat patches, one per `p`-wide column block, in strip order."""
    channels, side = pixels.shape[-3:-1]
    blocks = pixels.reshape(-1, channels, side, pixels.shape[-1] // side, side)
    return blocks.permute(0, 3, 1, 2, 4).reshape(-1, channels * side * side)


def _image_tensor_layout(pixels: Tensor, height: int, width: int, patch_size: int, model_type: str) -> PatchLayout:
    """Layout of image tensors: the one view (of possibly several tiles) that is the whole image, unmoved."""
    views = pixels.reshape(-1, *pixels.shape[-3:])
    whole = [
        index
        for index, view in enumerate(views)
        if view.shape[-2:] == (height, width) and _is_whole_image(view[0], height, width)
    ]
    if not whole:
        raise LayoutNotDerivable(
            f"{model_type}: none of the {len(views)} view(s) of {tuple(views.shape[-2:])} px its image processor makes "
            f"of a {height}x{width} image is that image unmoved; override `pixel_inputs` to give the encoder one "
            "whole image"
        )
    return PatchLayout.raster_grid(height // patch_size, width // patch_size, crops=len(views), crop=whole[0])


def _is_whole_image(channel: Tensor, height: int, width: int) -> bool:
    index = channel.double() * (height * width + 1) - 1
    return torch.allclose(index, torch.arange(height * width, dtype=torch.float64).reshape(height, width), atol=0.05)


def _flat_views_layout(pixels: Tensor, height: int, width: int, model_type: str) -> PatchLayout:
    """Layout of flat patches `[slots, values]`, or else of views of them `[views, slots, values]` (Molmo's crops,
    each of which may hold the whole image): the first view that holds every patch of the image once."""
    try:
        return _flat_patch_layout(pixels.reshape(-1, pixels.shape[-1]), height, width, model_type)
    except LayoutNotDerivable:
        if pixels.ndim < 3 or pixels.shape[-3] == 1:
            raise
    views = pixels.reshape(-1, *pixels.shape[-2:])
    for index, view in enumerate(views):
        try:
            layout = _flat_patch_layout(view, height, width, model_type)
        except LayoutNotDerivable:
            continue
        return dataclasses.replace(layout, crops=len(views), crop=index)
    raise LayoutNotDerivable(
        f"{model_type}: neither its flat patches nor any of the {len(views)} views of them its image processor makes "
        f"of a {height}x{width} image hold every patch of it once; override `pixel_inputs`"
    )


def _flat_patch_layout(rows_of_values: Tensor, height: int, width: int, model_type: str) -> PatchLayout:
    """Layout of flat patches `[slots, values]`: each slot's top-left pixel says which patch it is. Slots that hold
    no pixel are padding (zeros, Inkling's -1); leading whole-number columns are the processor's own (row, col) ids
    of each patch (Pix2Struct's), checked against its pixels."""
    is_padding = _holds_no_pixel(rows_of_values)
    ids, pixels = _split_patch_ids(rows_of_values[~is_padding])
    decoded = decode_pixels(pixels, height, width, model_type)
    top_left = decoded.amin(-1)
    ys, xs = top_left // width, top_left % width
    patch = int(math.isqrt(decoded.unique(dim=None).numel() // max(len(decoded), 1)))
    if patch == 0 or height % patch or width % patch:
        raise LayoutNotDerivable(f"{model_type}: cannot tell the patch size of its flat pixel patches")
    if not _is_own_patch(decoded, ys, xs, patch, width):
        raise LayoutNotDerivable(
            f"{model_type}: its flat pixel slots are not {patch}x{patch} patches of the image (a slot holds pixels "
            "from outside one patch); override `pixel_inputs`"
        )
    rows, cols = height // patch, width // patch
    raster = (ys // patch) * cols + xs // patch
    if raster.numel() != rows * cols or raster.unique().numel() != rows * cols:
        raise LayoutNotDerivable(
            f"{model_type}: its {raster.numel()} flat patches do not cover a {rows}x{cols} grid of {patch}-px "
            "patches once each; override `pixel_inputs`"
        )
    _check_patch_ids(ids, torch.stack([ys // patch, xs // patch], dim=-1), model_type)
    slot_index = torch.nonzero(~is_padding).squeeze(-1)
    return PatchLayout(rows, cols, len(rows_of_values), raster, slot_index)


def _is_own_patch(decoded: Tensor, ys: Tensor, xs: Tensor, patch: int, width: int) -> bool:
    """Whether each slot's pixels all lie in the `patch`-px patch whose grid-aligned top-left is `(ys, xs)`."""
    dy, dx = decoded // width - ys[:, None], decoded % width - xs[:, None]
    inside = (dy >= 0) & (dy < patch) & (dx >= 0) & (dx < patch)
    return bool(inside.all() and (ys % patch == 0).all() and (xs % patch == 0).all())


def _holds_no_pixel(rows_of_values: Tensor) -> Tensor:
    """`[slots]`: slots with no value inside `(0, 1)`, where every position-coded pixel lies: padding."""
    return ((rows_of_values <= 0) | (rows_of_values >= 1)).all(-1)


def _split_patch_ids(rows_of_values: Tensor) -> tuple[Tensor, Tensor]:
    """`(ids, pixels)`: the leading columns that hold whole numbers (no pixel value does), and the rest."""
    whole = (rows_of_values == rows_of_values.round()).all(0)
    leading = int(whole.long().cumprod(0).sum())
    return rows_of_values[:, :leading], rows_of_values[:, leading:]


def _check_patch_ids(ids: Tensor, positions: Tensor, model_type: str) -> None:
    """Leading id columns must be each patch's (row, col), counted from any start (Pix2Struct counts from 1)."""
    if ids.shape[-1] == 0:
        return
    offsets = ids.long() - positions
    if ids.shape[-1] != 2 or not (offsets == offsets[:1]).all():
        raise LayoutNotDerivable(
            f"{model_type}: the {ids.shape[-1]} leading whole-number column(s) of its flat patches are not each "
            "patch's (row, col); override `pixel_inputs`"
        )


def reduction(tokens: int, layout: PatchLayout, model_type: str, hook: str) -> tuple[int, int]:
    """`(factor, prefix)` with `tokens == prefix + (rows / factor) * (cols / factor)`: how many patches per side one
    token covers (merge, pixel shuffle, pooling) and how many leading non-patch tokens (CLS, registers) come first.
    Tokens one-to-one with the processor's padded slots read as factor 1, or `layout.split` where a slot holds several
    patches (see `to_raster`)."""
    for factor in (1, layout.split):
        if tokens * factor**2 == layout.slots:
            return factor, 0
    for factor in range(1, min(layout.rows, layout.cols) + 1):
        if layout.rows % factor or layout.cols % factor:
            continue
        prefix = tokens - (layout.rows // factor) * (layout.cols // factor)
        if 0 <= prefix <= MAX_PREFIX_TOKENS:
            return factor, prefix
    raise LayoutNotDerivable(
        f"{model_type}: {tokens} image tokens per image do not fit its {layout.rows}x{layout.cols} patch grid "
        f"(neither one token per patch nor one per square block, after at most {MAX_PREFIX_TOKENS} CLS / register "
        f"tokens); override `{hook}` in an adapter to say how this VLM lays out its tokens"
    )


def to_raster(tokens: Tensor, layout: PatchLayout, model_type: str, hook: str = "select_features") -> Tensor:
    """`[B, N, D]` tokens of images laid out as `layout` -> `[B, rows/f * cols/f, D]` in raster order."""
    if layout.crops > 1:  # the tokens of every view of each image: keep the whole image's
        tokens = _whole_image_tokens(tokens, layout, model_type, hook)
    factor, prefix = reduction(tokens.shape[1], layout, model_type, hook)
    padded = layout.slots != layout.rows * layout.cols
    if padded and not prefix and tokens.shape[1] * factor**2 == layout.slots:  # one per slot or patch, padding too
        tokens = tokens[:, layout.slot_index[:: factor**2] // factor**2]
    tokens = tokens[:, prefix:]
    if factor == 1:
        order = layout.raster
    elif torch.equal(layout.raster, torch.arange(layout.raster.numel())):
        return tokens  # merges of a raster grid (pixel shuffle, pooling, unshuffle) keep raster order over blocks
    else:
        order = _block_order(layout, factor, model_type, hook)
    if torch.equal(order, torch.arange(order.numel())):
        return tokens
    return tokens[:, torch.argsort(order)]


def _whole_image_tokens(tokens: Tensor, layout: PatchLayout, model_type: str, hook: str) -> Tensor:
    if tokens.shape[1] % layout.crops:
        raise LayoutNotDerivable(
            f"{model_type}: {tokens.shape[1]} image tokens per image are not {layout.crops} equal views (its processor "
            f"tiles each image; projector outputs that pack tiles with separators are not a grid): use "
            f"feature_source='vision' or override `{hook}`"
        )
    return tokens.reshape(tokens.shape[0], layout.crops, -1, tokens.shape[-1])[:, layout.crop]


def _block_order(layout: PatchLayout, factor: int, model_type: str, hook: str) -> Tensor:
    """Raster block index of each token when a merger groups `factor^2` consecutive patch slots."""
    rows, cols = layout.raster // layout.cols, layout.raster % layout.cols
    blocks = ((rows // factor) * (layout.cols // factor) + cols // factor).reshape(-1, factor * factor)
    if not (blocks == blocks[:, :1]).all():
        raise LayoutNotDerivable(
            f"{model_type}: its merger groups {factor * factor} consecutive patches that are not a {factor}x{factor} "
            f"block; override `{hook}`"
        )
    return blocks[:, 0]


def as_batch(features: Tensor | list[Tensor] | tuple[Tensor, ...], batch: int) -> Tensor:
    """Per-image lists, packed sequences, channel-first feature maps and batched tensors -> `[B, N, D]`.

    vugen encodes a batch of images of one size, so images have equal token counts and a sequence that packs all of
    them (`[sum N, D]`, or `[1, sum N, D]` from Pixtral-style towers) splits evenly.
    """
    if isinstance(features, (list, tuple)):  # one entry per image, or per sample of several images
        parts = [_tokens(part) for part in features]
        features = torch.stack(parts) if len(parts) == batch else torch.cat(parts)
    elif features.ndim == 4:  # a convolutional tower's [B, C, h, w] map
        features = features.flatten(2).transpose(1, 2)
    if features.ndim == 3 and features.shape[0] != batch:
        features = features.reshape(-1, features.shape[-1])
    if features.ndim == 2 and features.shape[0] % batch == 0:  # every image's tokens packed into one sequence
        features = features.reshape(batch, -1, features.shape[-1])
    if features.ndim != 3 or features.shape[0] != batch:
        raise ValueError(f"cannot read {batch} images' features from a tensor of shape {tuple(features.shape)}")
    return features


def _tokens(part: Tensor) -> Tensor:
    """One list entry as `[N, D]` tokens: `[1, N, D]` squeezed, a `[C, h, w]` map flattened channels-last."""
    if part.ndim == 3 and part.shape[0] != 1:
        return part.flatten(1).T
    return part.reshape(-1, part.shape[-1])
