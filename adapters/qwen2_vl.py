"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic-resolution ViTs that read flattened patches.

What introspection alone gets less well:

- Pixels. The HF image processor round-trips through the CPU and builds `pixel_values` as flattened patches
  `(sum h*w, 3 * temporal_patch * patch * patch)` in merge-block order `[h/m, w/m, m, m]`, a still image repeated
  along the temporal axis, plus `image_grid_thw = [[1, h, w], ...]`. `pixel_inputs` builds exactly that with
  torch ops on the adapter's device (same numbers, bit for bit).
- Qwen2.5-VL's windowed attention. Its vision tower permutes the merge blocks into window order before the first
  block and only un-permutes the merger's output, so `last_hidden_state` comes back in window order whenever an
  image spans more than one window (more than 112 px per side on the released checkpoints). The adapter undoes
  that permutation, so the "vision" source is raster like every other family's.
- Qwen3-VL's deepstack. Besides the merger, some intermediate vision layers feed their own mergers whose outputs
  are added to the first decoder layers. The "vision" source is the last layer's tokens, the ones the main merger
  reads; the deepstack features are not part of it ("projector" is the main merger's output).

The language model runs on embeddings with 1-D text positions: Qwen's M-RoPE gives text tokens the same position
on all three (time, height, width) axes, so `[B, T]` position ids, which the Qwen text models broadcast to 3-D,
are the exact positions of a prompt without images. `mm_token_type_ids` only matters to full VLM forwards with
images, which the adapter never runs.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import (
    get_vision_attention_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

from vugen_adapters.auto import AutoAdapter, normalized_pixels

_MAX_CACHED_LAYOUTS = 16


def flatten_patches(pixels: Tensor, patch: int, merge: int, temporal: int) -> Tensor:
    """Normalised `[B, C, H, W]` pixels -> Qwen's flat patches `[B * h * w, C * temporal * patch * patch]`.

    The layout of `Qwen2VLImageProcessor.patchify`: patches in merge-block order (`[h/merge, w/merge, merge, merge]`),
    each flattened as `[C, temporal, patch, patch]` with the still image repeated `temporal` times.
    """
    batch, channels, height, width = pixels.shape
    rows, cols = height // patch, width // patch
    if rows * patch != height or cols * patch != width or rows % merge or cols % merge:
        raise ValueError(
            f"images of {height}x{width} px do not tile into {patch}-px patches grouped {merge}x{merge}: "
            f"both sides must be multiples of {patch * merge} px"
        )
    blocks = pixels.reshape(batch, channels, rows // merge, merge, patch, cols // merge, merge, patch)
    blocks = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, h/m, w/m, m, m, C, p, p]
    frames = blocks.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return frames.reshape(batch * rows * cols, channels * temporal * patch * patch)


class Qwen2VLAdapter(AutoAdapter):
    """Qwen2-VL checkpoints (e.g. `Qwen/Qwen2-VL-2B-Instruct`). Arguments as for `AutoAdapter`.

    Images keep their own size (no `native_size`); both sides must be multiples of `patch * merge` pixels
    (28 px on the released checkpoints), or set `image_size`.
    """

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """Flat merge-block-ordered patches and `image_grid_thw`, built on the adapter's device."""
        processor = self.image_processor
        patch, merge, temporal = processor.patch_size, processor.merge_size, processor.temporal_patch_size
        images = images.to(self.device)
        pixels = normalized_pixels(images, processor, self.dtype) if processor.do_normalize else images.to(self.dtype)
        batch, _, height, width = images.shape
        grid = torch.tensor([1, height // patch, width // patch], device=self.device).repeat(batch, 1)
        return {"pixel_values": flatten_patches(pixels, patch, merge, temporal), "image_grid_thw": grid}

    def image_features(self, inputs: dict[str, Tensor]) -> Any:
        """`get_image_features`, handed the vision tower's grid layout from the cache."""
        grid = inputs["image_grid_thw"]
        return self.vlm.model.get_image_features(inputs["pixel_values"], grid, **self.vision_layout(grid))

    def vision_layout(self, grid: Tensor) -> dict[str, Any]:
        """The vision tower's grid-dependent inputs (rotary positions, attention segments, ...) for `grid`.

        The Qwen towers rebuild these on every call, the rotary positions and attention windows with a Python loop
        over the images, but accept them precomputed as keyword arguments (see `transformers.vision_utils`): at a
        fixed training resolution they are built once.
        """
        key = (str(grid.device), tuple(map(tuple, grid.tolist())))
        if key not in self._layouts:
            if len(self._layouts) >= _MAX_CACHED_LAYOUTS:  # many resolutions: keep memory bounded
                self._layouts.clear()
            self._layouts[key] = self.build_vision_layout(grid)
        return self._layouts[key]

    def build_vision_layout(self, grid: Tensor) -> dict[str, Any]:
        """Compute what `vision_layout` caches, with the same helpers the tower itself calls."""
        visual = self.vlm.model.visual
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config)
        layout = {"position_ids": get_vision_position_ids(grid, visual.spatial_merge_size), "cu_seqlens": cu_seqlens}
        return layout | {"max_seqlen": max_seqlen}  # None (no flash attention) is popped and left None

    @cached_property
    def _layouts(self) -> dict[tuple, dict[str, Any]]:
        return {}


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL checkpoints (e.g. `Qwen/Qwen2.5-VL-3B-Instruct`). Arguments as for `AutoAdapter`.

    The vision tower's windowed attention leaves `last_hidden_state` in window order; `image_features` puts the
    merge blocks back in order before the shared merge-block -> raster step.
    """

    def check_token_order(self, rows: int, cols: int) -> None:
        """Any image size is fine: `image_features` undoes the window order."""

    def image_features(self, inputs: dict[str, Tensor]) -> Any:
        """`get_image_features` output with `last_hidden_state` back in merge-block order."""
        output = super().image_features(inputs)
        hidden, window_index = output.last_hidden_state, self.vision_layout(inputs["image_grid_thw"])["window_index"]
        blocks = hidden.reshape(window_index.numel(), -1, hidden.shape[-1])
        output.last_hidden_state = blocks[torch.argsort(window_index)].reshape(hidden.shape)
        return output

    def build_vision_layout(self, grid: Tensor) -> dict[str, Any]:
        """The shared layout plus the attention windows."""
        visual = self.vlm.model.visual
        window_index, cu_window_seqlens = get_vision_window_index(
            grid, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        max_window_seqlen = get_max_seqlen(cu_window_seqlens, visual.config)
        windows = {"window_index": window_index.to(grid.device), "cu_window_seqlens": cu_window_seqlens}
        return super().build_vision_layout(grid) | windows | {"max_window_seqlen": max_window_seqlen}


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL checkpoints (e.g. `Qwen/Qwen3-VL-2B-Instruct`). Arguments as for `AutoAdapter`.

    "vision" features are the last vision layer's tokens (what the main merger reads), without the deepstack
    features of intermediate layers.
    """

    def build_vision_layout(self, grid: Tensor) -> dict[str, Any]:
        """The shared layout plus the taps that resample the learned position-embedding grid."""
        visual = self.vlm.model.visual
        interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=visual.config.spatial_merge_size,
        )
        return super().build_vision_layout(grid) | {"interp_indices": interp_indices, "interp_weights": interp_weights}
