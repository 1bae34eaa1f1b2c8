"""Images as one-frame videos, for VLMs that read images only as frames of a video.

InstructBLIP-Video ships a video processor and `get_video_features` but no image processor and no
`get_image_features`: its vision tower and Q-Former run on every frame alone, so a one-frame video is exactly an image.
`OneFrameVideos` lets `AutoAdapter` use such a video processor where it expects an image processor.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class OneFrameVideos:
    """A video processor that takes `images=` as one-frame videos and otherwise reads and writes as itself.

    Args:
        video_processor: the checkpoint's video processor (`AutoVideoProcessor`).
    """

    def __init__(self, video_processor: Any) -> None:
        object.__setattr__(self, "video_processor", video_processor)

    def __call__(self, images: list[Tensor], **kwargs: Any) -> Any:
        """Process `[3, H, W]` images as videos of one frame each (pixels `[B, 1, 3, H, W]`)."""
        return self.video_processor(videos=[image[None] for image in images], **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the wrapper lacks; `video_processor` itself is missing only mid-copy (deepcopy builds
        # the copy before restoring its state), where delegating would recurse.
        if name == "video_processor" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.video_processor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Settings (`do_normalize = False` in the patch-layout probe) must reach the processor that reads them.
        setattr(self.video_processor, name, value)
