"""Images a VLM reads as flat patches its image processor does not give.

Fuyu's image processor returns whole images; its full processor cuts them into flat patches with the image processor's
`patchify_image` on the way to the prompt, and `get_image_features` reads those patches. `PatchedImages` makes the
image processor give the patches itself, so `AutoAdapter` needs no prompt to encode images.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class PatchedImages:
    """An image processor whose images the model reads as the flat patches the processor's own `patchify_image` cuts
    (Fuyu's, whose full processor does that on the way to the prompt): called like an image processor, returning those
    patches as `pixel_values`, its attributes read and set on the image processor inside (so normalisation can be
    switched off to measure the patch layout).

    Args:
        image_processor: the checkpoint's image processor, with a `patchify_image(images [B, C, H, W])` method.
    """

    model_input_names = ["pixel_values"]  # what `__call__` gives: no whole processor needed for prompt-side inputs

    def __init__(self, image_processor: Any) -> None:
        object.__setattr__(self, "image_processor", image_processor)

    def __getattr__(self, name: str) -> Any:
        if name == "image_processor":  # looked up while copying, before __init__ ran
            raise AttributeError(name)
        return getattr(self.image_processor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.image_processor, name, value)

    def __call__(self, images: list[Tensor], return_tensors: str = "pt", **kwargs: Any) -> dict[str, Tensor]:
        """`{"pixel_values": [B, N, values]}`: the patches of the image processor's pixel tensor (its largest floating
        one, `images` for Fuyu, one view per image)."""
        batch = self.image_processor(images=images, return_tensors=return_tensors, **kwargs)
        floating = [v for v in batch.values() if isinstance(v, Tensor) and v.is_floating_point()]
        pixels = max(floating, key=Tensor.numel)
        return {"pixel_values": self.image_processor.patchify_image(pixels.reshape(-1, *pixels.shape[-3:]))}
