"""`AutoAdapter`: any `AutoModelForImageTextToText` checkpoint, wrapped by introspection.

It loads the checkpoint's own image processor (so normalisation and the pixel layout a family expects, flat
patches or 5-D tiles, come from the checkpoint), calls `get_image_features`, and turns whatever comes back
(a `[B, N, D]` tensor, one `[N_i, D]` tensor per image, all images packed into one sequence, a conv feature map) into
raster `[B, N, D]` tokens, by the patch layout the image processor gives (`vugen_adapters.token_layout`): padding
slots, CLS / register tokens, merge-block orders and merge / pixel-shuffle / pooling factors are derived, not listed.
`get_image_features` is read on the shallowest module that has one (an inner VLM, a multimodal encoder); a VLM with
none (GIT) is read through its vision tower and the projector beside it (`TowerFeatures`); a VQ image tokenizer
(`vq_config`: Chameleon, Emu3) stands for the vision tower, its continuous latent grid for the tower's tokens.
Where the processor would only normalise plain `[B, 3, H, W]` pixels (measured once, see `reads_plain_pixels`), the
adapter does that on the device instead. Family adapters subclass it and override only the hooks introspection gets
wrong.
"""

from __future__ import annotations

import inspect
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    AutoVideoProcessor,
    BatchFeature,
    PreTrainedModel,
)

from vugen.adapter import DType, FeatureSource
from vugen_adapters.auto_language import AutoLanguageModel
from vugen_adapters.conversation import conversation_inputs, generate_answer_ids
from vugen_adapters.patched_images import PatchedImages
from vugen_adapters.source import RemoteCodeRefused, check_pretrained_source, remote_code_message
from vugen_adapters.token_layout import (
    LayoutNotDerivable,
    PatchLayout,
    as_batch,
    measure_patch_layout,
    pixel_values,
    size_kept,
    to_raster,
)
from vugen_adapters.tower_features import TowerFeatures, maps_width
from vugen_adapters.video_frames import OneFrameVideos

# What a vision tower's learned query tables are called (DeepSeek-OCR 2's `query_768_resolution`, Q-Former
# `query_tokens`, Perceiver `latents`): tokens read out of one are in the order the model learnt, not a patch grid.
_QUERY_TABLE_NAME = re.compile(r"quer|latent")
# Side of the blank image whose processed size tells what a tower that names no patch size reads (a common photo side).
_PROCESSOR_PROBE_SIDE = 224
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
# Image-processor switches that would change the pixel grid behind our back: we resize ourselves.
_PROCESSOR_OVERRIDES = {
    "do_resize": False,
    "do_rescale": False,
    "do_center_crop": False,
    "do_image_splitting": False,
    "do_pan_and_scan": False,
    "crop_to_patches": False,
}
# What a vision path that reads the prompt too (InstructBLIP's Q-Former) is told when vugen encodes images alone.
IMAGE_INSTRUCTION = "Describe the image."


class AutoAdapter(AutoLanguageModel):
    """Wrap any Hugging Face image-text-to-text VLM by introspection.

    Args:
        pretrained: Hub id or local folder of the VLM checkpoint (weights, config, image processor,
            tokenizer).
        revision: Hub revision (branch, tag or commit) to load; pin a commit for reproducible runs.
        dtype: Weight dtype of the frozen VLM. Use `bfloat16` on GPUs; `float32` on CPU.
        trust_remote_code: Allow code shipped inside the checkpoint to run. Off by default.
        feature_source: `vision` (default): the vision-encoder tokens that the VLM's projector reads
            (for LLaVA-style models the `vision_feature_layer` hidden state; for a VQ image tokenizer,
            Chameleon's or Emu3's, the encoder's continuous latent grid before quantisation). `projector`:
            the tokens after the projector / merger, in the language model's width (for a VQ tokenizer, the
            language model's input embeddings of the image's codes). Both are token grids in raster order.
        image_size: Side in pixels that images are resized to before encoding. None: the checkpoint's
            native size for fixed-size encoders, or the input's own size for dynamic-resolution ones.
        attn_implementation: transformers attention backend (`sdpa`, `eager`, `flash_attention_2`, ...).
        use_chat_template: Wrap prompts in the tokenizer's chat template (as a user turn, with the
            generation prompt) when it has one.
        max_prompt_tokens: Prompts longer than this many tokens are truncated.
    """

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        dtype: DType = "float32",
        trust_remote_code: bool = False,
        feature_source: FeatureSource = "vision",
        image_size: int | None = None,
        attn_implementation: str | None = None,
        use_chat_template: bool = True,
        max_prompt_tokens: int = 256,
    ) -> None:
        super().__init__()
        if feature_source not in ("vision", "projector"):
            raise ValueError(f"feature_source must be 'vision' or 'projector', got {feature_source!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.pretrained, self.revision = str(pretrained), revision
        self.feature_source, self.image_size = feature_source, image_size
        self.use_chat_template, self.max_prompt_tokens = use_chat_template, max_prompt_tokens
        self._load_settings = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        self.attn_implementation = attn_implementation
        self.vlm = self._load_model(attn_implementation)
        self.image_processor, self.tokenizer = self._load_processors()
        self._freeze()
        # Measured now, before LoRA hooks or sharding wrap the language model.
        self.position_offset  # noqa: B018
        self._causal_argument  # noqa: B018

    # ------------------------------------------------------------------ loading
    def _hub_kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision, "trust_remote_code": self._load_settings["trust_remote_code"]}

    def _load_model(self, attn_implementation: str | None) -> PreTrainedModel:
        check_pretrained_source(self.pretrained, self._load_settings["trust_remote_code"])
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        try:
            return AutoModelForImageTextToText.from_pretrained(
                self.pretrained, dtype=_DTYPES[self._load_settings["dtype"]], **self._hub_kwargs(), **extra
            )
        except ValueError as error:
            if "trust_remote_code" in str(error):
                raise RemoteCodeRefused(remote_code_message(self.pretrained)) from error
            raise ValueError(
                f"adapter `pretrained`: {self.pretrained!r} is not an image-text-to-text VLM that "
                f"transformers knows ({str(error).splitlines()[0]}). Write a family adapter for it "
                "(see examples/custom_adapter)."
            ) from error
        except OSError as error:
            raise OSError(f"adapter `pretrained`: could not load a VLM from {self.pretrained!r}: {error}") from error

    def _load_processors(self) -> tuple[Any, Any]:
        try:
            image_processor = self._load_image_processor()
            tokenizer = AutoTokenizer.from_pretrained(self.pretrained, **self._hub_kwargs())
        except (OSError, ValueError) as error:
            raise OSError(
                f"adapter `pretrained`: {self.pretrained!r} has weights but no usable image processor or "
                f"tokenizer (save the processor next to the model): {error}"
            ) from error
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if hasattr(image_processor, "patchify_image") and not self._reads_image_processor_outputs(image_processor):
            image_processor = PatchedImages(image_processor)  # images out, patches in (Fuyu)
        return image_processor, tokenizer

    def _load_image_processor(self) -> Any:
        """The checkpoint's image processor; for a VLM that reads images only as videos (`_video_only_model`), its
        video processor, taking each image as a one-frame video."""
        try:
            return AutoImageProcessor.from_pretrained(self.pretrained, **self._hub_kwargs())
        except (OSError, ValueError):
            if self._video_only_model is None:
                raise
        return OneFrameVideos(AutoVideoProcessor.from_pretrained(self.pretrained, **self._hub_kwargs()))

    @cached_property
    def _video_only_model(self) -> nn.Module | None:
        """The module with `get_video_features` of a VLM that has no `get_image_features` (InstructBLIP-Video, whose
        tower and Q-Former read every frame alone), else None."""
        models = [model for model in (getattr(self.vlm, "model", None), self.vlm) if model is not None]
        if any(hasattr(model, "get_image_features") for model in models):
            return None
        return next((model for model in models if hasattr(model, "get_video_features")), None)

    @cached_property
    def prompt_processor(self) -> Any | None:
        """The checkpoint's whole processor where `get_image_features` requires inputs that its image processor does
        not name (InstructBLIP's Q-Former reads `qformer_input_ids`, which the processor's `qformer_tokenizer` makes),
        else None: most checkpoints need only their image processor, and not every one has a loadable processor."""
        try:
            if self._reads_image_processor_outputs(self.image_processor):
                return None
        except TypeError:  # no `get_image_features`: an adapter that overrides `image_features` reads images its way
            return None
        processor = self._whole_processor
        return None if isinstance(processor, Exception) else processor  # None: `image_features` names what is unmade

    def _reads_image_processor_outputs(self, image_processor: Any) -> bool:
        """Whether the image processor names every input `get_image_features` requires."""
        made = getattr(image_processor, "model_input_names", ["pixel_values"])
        return set(self._required_image_inputs) <= set(made)

    # ------------------------------------------------------------------ understanding
    @cached_property
    def chat_processor(self) -> Any:
        """The checkpoint's whole processor (tokenizer, image processor, chat template): how the VLM is asked things."""
        processor = self._whole_processor
        if isinstance(processor, Exception):
            raise OSError(
                f"adapter `pretrained`: {self.pretrained!r} has no loadable processor to ask the VLM with: {processor}"
            ) from processor
        return processor

    @cached_property
    def _whole_processor(self) -> Any:
        """The checkpoint's `AutoProcessor`, or the error that loading it raised (not every checkpoint has one)."""
        try:
            return AutoProcessor.from_pretrained(self.pretrained, **self._hub_kwargs())
        except (OSError, ValueError, TypeError) as error:
            return error

    def conversation(self, images: Any, prompts: list[str], answers: list[str] | None = None) -> BatchFeature:
        """See `VLMAdapter.conversation`: the checkpoint's processor and chat template (`conversation.py`)."""
        return conversation_inputs(self.chat_processor, images, prompts, answers)

    def answer_ids(self, images: Any, prompts: list[str], max_new_tokens: int = 64) -> list[list[int]]:
        """See `VLMAdapter.answer_ids`: the VLM's own `generate`, greedy, until its end of turn."""
        inputs = self.conversation(images, prompts)
        return generate_answer_ids(self.vlm, self.chat_processor, inputs, max_new_tokens, self.dtype)

    def answer(self, images: Any, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        """See `VLMAdapter.answer`."""
        ids = self.answer_ids(images, prompts, max_new_tokens)
        return [text.strip() for text in self.chat_processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write weights, config, image processor and tokenizer to `directory`, and the whole processor where the
        checkpoint has one (what `conversation` and `prompt_processor` load: its own settings, such as LLaVA's
        `patch_size`, live in `processor_config.json`)."""
        self.vlm.save_pretrained(directory)
        if not isinstance(self._whole_processor, Exception):
            self._whole_processor.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def describe(self) -> dict[str, Any]:
        """What a bundle records to rebuild this adapter."""
        return super().describe() | {
            "revision": self.revision,
            "feature_source": self.feature_source,
            "image_size": self.image_size,
            "attn_implementation": self.attn_implementation,
            **self._load_settings,
        }

    # ------------------------------------------------------------------ geometry
    @property
    def vision_config(self) -> Any:
        """The config of what turns pixels into image tokens: the feature model's `vision_config` (found on the inner
        VLM of a wrapper such as pi0's), else its one sub-config that is not the language model's (the VQ tokenizer's
        `vq_config` of Chameleon and Emu3), else the config itself where it holds the patch size (Fuyu)."""
        config = self._feature_model.config
        found = image_sub_config(config)
        if found is not None:
            return found
        if getattr(config, "patch_size", None):
            return config
        # Not an AttributeError: raised inside properties, it would read as their absence.
        raise TypeError(f"{self.model_type}: its config has no `vision_config`; override `vision_config`")

    @cached_property
    def vit_patch_size(self) -> int:
        """Pixels per vision-encoder patch along one side: the vision config's `patch_size`, else its sub-configs' (a
        tower of two encoders, Unlimited-OCR's), else the image processor's, else 1 (see below)."""
        configs = [self.vision_config, *(v for v in vars(self.vision_config).values() if hasattr(v, "patch_size"))]
        patch = next((c.patch_size for c in configs if getattr(c, "patch_size", None)), None)
        patch = patch or getattr(self.image_processor, "patch_size", None)
        if isinstance(patch, dict) or hasattr(patch, "height"):  # {"height", "width"}, or a SizeDict
            patch = patch["height"] if isinstance(patch, dict) else patch.height
        if not patch:
            # A tower that says nothing of its patches (timm's, in `model_args`): count in pixels; the patch layout
            # then solves the tokens' factor over the pixel grid, which is the patch size.
            return 1
        return int(patch[0] if isinstance(patch, (list, tuple)) else patch)

    @property
    def native_size(self) -> tuple[int, int] | None:
        """The fixed input size of the encoder, or None for dynamic-resolution encoders: `image_size`, else the size the
        image processor resizes to, or for a processor with no resize step the one size it makes of every image."""
        if self.image_size is not None:
            return (self.image_size, self.image_size)
        processor = self.image_processor
        if getattr(processor, "do_resize", None) is None:
            # No resize step to switch off: the processor sizes images its own way, and what it does says the size
            # (its `size` may be a tile it cuts, Inkling 2's, not an image size).
            return self._size_processor_gives or self._size_processor_keeps
        tile = getattr(processor, "max_image_size", None)
        if tile and hasattr(processor, "do_image_splitting"):  # Idefics3-style: one whole-image tile
            return (tile["longest_edge"], tile["longest_edge"])
        crop = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop:
            return (crop["height"], crop["width"])
        size = getattr(processor, "size", None) or {}
        if "height" in size and "width" in size:
            return (size["height"], size["width"])
        if set(size) == {"shortest_edge"}:
            return (size["shortest_edge"], size["shortest_edge"])
        return self._size_processor_keeps

    @cached_property
    def _size_processor_keeps(self) -> tuple[int, int] | None:
        """The size a processor that resizes whatever it is told keeps (MiniCPM-V's `scale_resolution`, Pix2Struct's
        `max_patches`), measured once; None for processors that keep any size (`token_layout.size_kept`)."""
        side = size_kept(
            self.image_processor, self._process, 2 * self._patch_block, self.vit_patch_size, self.model_type
        )
        return None if side is None else (side, side)

    @cached_property
    def _size_processor_gives(self) -> tuple[int, int] | None:
        """The one size the image processor makes of any image (Aria pads every image to its `max_image_size`), or None
        where the size follows the image (Inkling 2 cuts tiles, Qwen-style processors patches): read off the pixel
        tensors it makes of two blank images of different sizes."""
        block = self._patch_block
        sides = (block * math.ceil(64 / block), block * (math.ceil(64 / block) + 1))  # whole merged patches, 64 px up
        shapes = {self._pixel_shape(side) for side in sides}
        shape = shapes.pop()
        if shapes or len(shape) < 4 or shape[-3] != 3:  # sizes that follow the input, or no [.., 3, H, W] images
            return None
        return (shape[-2], shape[-1])

    def _pixel_shape(self, side: int) -> tuple[int, ...]:
        """Shape of the pixel tensor the image processor makes of one blank `side` x `side` image (() if none)."""
        try:
            return tuple(pixel_values(self._process(self.image_processor, torch.zeros(1, 3, side, side)), "").shape)
        except LayoutNotDerivable:  # no single pixel tensor: the patch layout says why, where it is needed
            return ()

    @property
    def _patch_block(self) -> int:
        """Pixels per side of one merged patch, as the configs name it (1 for towers that name no patch size)."""
        return self.vit_patch_size * self.merge_size

    @property
    def size_multiple(self) -> int:
        """Dynamic-resolution inputs must be a multiple of this many pixels per side: a merged patch, or for a tower
        that names no patch size (a convolutional one) its measured stride, so that images hold whole tokens."""
        return self._patch_block if self.vit_patch_size > 1 else self.patch_stride

    @property
    def merge_size(self) -> int:
        """Patches per side that the VLM merges into one token after the tower (`spatial_merge_size` of the vision
        config, of the VLM's config (Mistral 3), the image processor's `merge_size`, or Gemma 4's pooling kernel,
        whose processor resizes to whole kernels of patches), or 1."""
        for owner in (self.vision_config, self.vlm.config, self.image_processor):
            for name in ("spatial_merge_size", "merge_size", "pooling_kernel_size"):
                value = getattr(owner, name, None)
                if isinstance(value, int) and value > 0:
                    return value
        return 1

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size images of `height` x `width` are resized to before encoding."""
        if self.native_size is not None:
            return self.native_size
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"images of {height}x{width} px: {type(self).__name__} encodes dynamic resolutions whose "
                f"sides are multiples of {multiple} px; resize the data or set `image_size`"
            )
        return (height, width)

    @property
    def _probe_size(self) -> tuple[int, int]:
        """Size of the images the adapter measures itself on: the native one, or a small one that fits one window;
        for a tower that names no patch size, the size its image processor would itself make of an image (a stride
        that is not known cannot size a small probe: a 2 px image is no input for a convolution stack)."""
        if self.native_size is not None:
            return self.native_size
        if self.vit_patch_size == 1:
            return self._processor_chosen_size
        return (2 * self.size_multiple, 2 * self.size_multiple)

    @cached_property
    def _processor_chosen_size(self) -> tuple[int, int]:
        """The size the image processor, its own resizing on, gives a blank square image: one its encoder reads."""
        blank = torch.zeros(3, _PROCESSOR_PROBE_SIDE, _PROCESSOR_PROBE_SIDE)
        inputs = _call_image_processor(self.image_processor, [blank], {})
        height, width = pixel_values(inputs, self.model_type).shape[-2:]
        return (int(height), int(width))

    @cached_property
    def _probe(self) -> tuple[int, int]:
        """(D, stride) measured by encoding one blank image: exact for any family, paid once."""
        side = self._probe_size
        features = self._encode(torch.zeros(1, 3, *side, device=self.device))  # at its size: no multiple to check
        rows = math.isqrt(features.shape[1] * side[0] // side[1])
        return features.shape[-1], side[0] // rows

    @property
    def feature_dim(self) -> int:
        """D, channels per feature token."""
        return self._probe[0]

    @property
    def patch_stride(self) -> int:
        """Pixels of the encoder's input per feature token along one side."""
        return self._probe[1]

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of feature tokens for images of `height` x `width`."""
        size, stride = self.input_size(height, width), self.patch_stride
        return (size[0] // stride, size[1] // stride)

    # ------------------------------------------------------------------ vision
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """`[B, 3, H, W]` in `[0, 1]` -> frozen `[B, N, D]` feature tokens in raster order."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"encode_images expects float images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        size = self.input_size(*images.shape[-2:])
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True).clamp(0, 1)
        return self._encode(images)

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        """Images already at the encoder's input size -> raster `[B, N, D]` tokens."""
        output = self.image_features(self.pixel_inputs(images))
        return self.select_features(output, tuple(images.shape[-2:]), batch=images.shape[0])

    def pixel_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """The model's pixel inputs: normalised on the adapter's device when the encoder reads plain pixels
        (`reads_plain_pixels`), else built by the checkpoint's own image processor."""
        if self.reads_plain_pixels:
            return {"pixel_values": normalized_pixels(images, self.image_processor, self.dtype)}
        return {
            k: v.to(self.device, self.dtype if v.is_floating_point() else None)
            for k, v in self.processor_inputs(images).items()
        }

    def processor_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """What the checkpoint's image processor makes of `images` (no resizing, rescaling or cropping: vugen has
        sized them already), as tensors on the CPU."""
        return self._process(self.image_processor, images)

    @staticmethod
    def _process(image_processor: Any, images: Tensor) -> dict[str, Tensor]:
        overrides = {k: v for k, v in _PROCESSOR_OVERRIDES.items() if hasattr(image_processor, k)}
        images = list(images.float().cpu())
        try:
            batch = _call_image_processor(image_processor, images, overrides)
        except (ValueError, RuntimeError, UnboundLocalError):
            if "do_resize" not in overrides:
                raise
            # Some processors refuse (Llama 4, MiniCPM) or break on do_resize=False; at the size they expect,
            # their own resize keeps the pixels (the patch layout probe checks that it did).
            overrides.pop("do_resize")
            batch = _call_image_processor(image_processor, images, overrides)
        return {k: v for k, v in batch.items() if isinstance(v, Tensor)}

    @cached_property
    def reads_plain_pixels(self) -> bool:
        """Whether the encoder reads plain `[B, 3, H, W]` pixels normalised with the processor's mean and std.

        Measured once, on a random probe at the native size: of what the image processor returns, `get_image_features`
        must read only `pixel_values`, shaped like the images and equal to `normalized_pixels`. Then `pixel_inputs`
        computes exactly that on the device and skips the CPU round trip (LLaVA, PaliGemma, InternVL, Gemma 3, any
        LLaVA-like VLM). Flat patches (Qwen), 5-D tiles with a pixel mask (Idefics3) or a processor that normalises
        otherwise keep the processor. A family adapter may declare it (`reads_plain_pixels = False`) instead.
        """
        mean, std = (getattr(self.image_processor, name, None) for name in ("image_mean", "image_std"))
        if mean is None or std is None:
            return False
        probe = torch.rand(2, 3, *self._probe_size, generator=torch.Generator().manual_seed(0))
        inputs = self.accepted_image_inputs(self.processor_inputs(probe))
        if set(inputs) != {"pixel_values"} or inputs["pixel_values"].shape != probe.shape:
            return False
        plain = normalized_pixels(probe, self.image_processor, torch.float32)
        return torch.allclose(inputs["pixel_values"].float(), plain, rtol=0, atol=1e-5)  # rounding, not another op

    def accepted_image_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries of `inputs` that the VLM's `get_image_features` takes by name (not Gemma 3's `num_crops`)."""
        accepted = inspect.signature(self._image_encoder).parameters
        return {k: v for k, v in inputs.items() if k in accepted}

    def image_features(self, inputs: dict[str, Tensor]) -> Any:
        """Call the VLM's `get_image_features` with the inputs its signature accepts; the ones it requires from the
        prompt side (InstructBLIP's `qformer_input_ids`) are the checkpoint's processor's for `IMAGE_INSTRUCTION`."""
        accepted = self.accepted_image_inputs(inputs)
        missing = [name for name in self._required_image_inputs if name not in accepted]
        if missing:
            accepted |= self.prompt_side_inputs(missing, images=len(pixel_values(inputs, self.model_type)))
        return self._image_encoder(**accepted)

    @cached_property
    def _image_encoder(self) -> Any:
        """`get_image_features` of `_feature_model`, or `get_video_features` of a VLM that reads images only as
        one-frame videos (`_video_only_model`)."""
        video = self._video_only_model
        return video.get_video_features if video is not None else self._feature_model.get_image_features

    def prompt_side_inputs(self, names: list[str], images: int) -> dict[str, Tensor]:
        """The `names` inputs of `get_image_features` as `prompt_processor` makes them of `IMAGE_INSTRUCTION`, one
        row per image, on the adapter's device.

        Raises:
            TypeError: the checkpoint has no processor that makes all of them.
        """
        unmade = [name for name in names if name not in self._prompt_encoding]
        if unmade:
            raise TypeError(
                f"{self.model_type}: its get_image_features needs {', '.join(unmade)}, which neither its image "
                "processor nor its processor (given a prompt) makes; override `image_features` in an adapter"
            )
        return {name: self._prompt_encoding[name].to(self.device).expand(images, -1) for name in names}

    @cached_property
    def _prompt_encoding(self) -> dict[str, Tensor]:
        """What `prompt_processor` makes of `IMAGE_INSTRUCTION` alone: one row of each text-side input (read once)."""
        if self.prompt_processor is None:
            return {}
        encoding = self.prompt_processor(text=[IMAGE_INSTRUCTION], return_tensors="pt")
        return {name: value for name, value in encoding.items() if isinstance(value, Tensor)}

    @cached_property
    def _required_image_inputs(self) -> list[str]:
        """The parameters `get_image_features` cannot do without (read once: `image_features` runs every step)."""
        parameters = inspect.signature(self._image_encoder).parameters.values()
        return [p.name for p in parameters if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]

    @cached_property
    def _feature_model(self) -> nn.Module:
        """The module whose `get_image_features` returns the tower's tokens with the projector's: the shallowest one in
        the VLM (the base model of a `*ForConditionalGeneration`, the VLM itself where it has no such split (BLIP-2),
        the multimodal encoder of an encoder-decoder LM (DiffusionGemma), the inner VLM of a wrapper (pi0)), else
        the vision tower and projector of a VLM that has none (`TowerFeatures`, GIT)."""
        by_depth = sorted(self.vlm.named_modules(), key=lambda named: len(named[0].split(".")) if named[0] else 0)
        candidates = [getattr(self.vlm, "model", None), *(module for _, module in by_depth)]
        found = next((module for module in candidates if hasattr(module, "get_image_features")), None)
        found = found or self._tower_features()
        if found is None:
            # Not an AttributeError: raised inside a property, that would read as the property missing.
            raise TypeError(
                f"{self.model_type}: the model has no `get_image_features` to read image tokens from; override "
                "`image_features` in an adapter (see examples/custom_adapter)"
            )
        return found

    def _tower_features(self) -> TowerFeatures | None:
        """`get_image_features` for VLMs that have none (GIT): the shallowest module configured by the vision
        sub-config is the tower; a module beside it whose linear layers go from the tower's width to the language
        model's is the projector. None where no module is configured so."""
        vision = image_sub_config(self.vlm.config)
        if vision is None:
            return None
        towers = [m for m in self.vlm.modules() if isinstance(m, PreTrainedModel) and type(m.config) is type(vision)]
        if not towers:
            return None
        tower = towers[0]
        parent = next(m for m in self.vlm.modules() if any(child is tower for child in m.children()))
        width, text_width = getattr(vision, "hidden_size", None), self.vlm.config.get_text_config().hidden_size
        projectors = [m for m in parent.children() if m is not tower and maps_width(m, width, text_width)]
        return TowerFeatures(self.vlm.config, tower, projectors[0] if len(projectors) == 1 else None)

    def select_features(self, output: Any, size: tuple[int, int], batch: int) -> Tensor:
        """Pick the configured feature source out of `output` (for `batch` images of `size`) as raster `[B, N, D]`.

        The tokens are matched to the patch layout the image processor gives images of this size
        (`vugen_adapters.token_layout`): padding slots and leading CLS / register tokens dropped, merge blocks and
        flat-patch orders put back in raster order. Learned query tokens are refused (`check_not_learned_queries`).
        """
        source = output.pooler_output if self.feature_source == "projector" else self.vision_tokens(output)
        if source is None:
            raise TypeError(
                f"{self.model_type}: no projector could be identified beside its vision tower; use "
                "feature_source='vision' or override `image_features`"
            )
        features = as_batch(source, batch)
        if self.feature_source == "vision":
            self.check_not_learned_queries(features)
        layout = self.patch_layout(*size)
        if self.feature_source == "vision" and not layout.is_raster:  # towers fed whole images (SAM's) undo their
            self.check_token_order(layout.rows, layout.cols)  # own windows; packed ones may not
        return to_raster(features, layout, self.model_type)

    def patch_layout(self, height: int, width: int) -> PatchLayout:
        """The encoder's patch grid and slot order for images of `height` x `width`, measured once per size on the
        checkpoint's own image processor (`measure_patch_layout`)."""
        key = (height, width)
        if key not in self._patch_layouts:
            self._patch_layouts[key] = measure_patch_layout(
                self.image_processor, self._process, height, width, self.vit_patch_size, self.model_type
            )
        return self._patch_layouts[key]

    @cached_property
    def _patch_layouts(self) -> dict[tuple[int, int], PatchLayout]:
        return {}

    @property
    def model_type(self) -> str:
        """The checkpoint's `model_type` (named in errors)."""
        return self.vlm.config.model_type

    def check_token_order(self, rows: int, cols: int) -> None:
        """Windowed packed towers (Qwen2.5-VL) return encoder tokens in window order, which we cannot read."""
        window = getattr(self.vision_config, "window_size", None)
        if window and "window_size" in self.vision_config.to_dict() and max(rows, cols) * self.vit_patch_size > window:
            raise ValueError(
                f"{type(self).__name__}: images of {rows}x{cols} patches span several attention windows of "
                f"{window} px, so the encoder's tokens come back in window order; use the family adapter "
                "(e.g. `qwen2_5_vl`), which undoes it, or feature_source='projector'"
            )

    def check_not_learned_queries(self, features: Tensor) -> None:
        """Towers that end in learned queries (DeepSeek-OCR 2's "visual causal flow") return one token per query, each
        reading the whole image, in an order the model learnt: no raster order to read, so say so rather than guess."""
        name = self._learned_query_tables.get(tuple(features.shape[1:]))
        if name is not None:
            raise LayoutNotDerivable(
                f"{self.model_type}: its vision tower returns {features.shape[1]} learned query tokens (`{name}`), in "
                "an order the model learnt, not a patch grid, so there is no raster order to read; override "
                "`vision_tokens` in an adapter to read a spatial stage of the tower (see examples/custom_adapter)"
            )

    @cached_property
    def _learned_query_tables(self) -> dict[tuple[int, int], str]:
        """`(rows, width)` -> name of each learned query table of the vision tower (`get_encoder(modality="image")`):
        an `nn.Embedding` or a bare parameter named like one (`_QUERY_TABLE_NAME`), not a projection's weight. Tables
        of the connector (Idefics2's Perceiver, BLIP-2's Q-Former) read tokens after the ones `vision_tokens` picks."""
        owner = self._image_encoder.__self__  # the module whose get_image_features (or get_video_features) we call
        tower = owner.get_encoder(modality="image")
        if not isinstance(tower, nn.Module) or tower is owner:  # none, or none apart from the connector
            return {}
        tables = {}
        for module_name, module in tower.named_modules():
            named = [(module_name, module.weight)] if isinstance(module, nn.Embedding) else []
            named += [(f"{module_name}.{name}".lstrip("."), p) for name, p in module.named_parameters(recurse=False)]
            for name, table in named:
                if _QUERY_TABLE_NAME.search(name.rsplit(".", 1)[-1]) and table.ndim >= 2:
                    tables[(table.numel() // table.shape[-1], table.shape[-1])] = f"{type(tower).__name__}.{name}"
        return tables

    def vision_tokens(self, output: Any) -> Tensor | list[Tensor]:
        """Encoder tokens the projector reads: the `vision_feature_layer` hidden state when configured."""
        layer = getattr(self.vlm.config, "vision_feature_layer", None)
        hidden_states = getattr(output, "hidden_states", None)
        if layer is None or hidden_states is None:
            if getattr(output, "last_hidden_state", None) is None:
                raise ValueError(
                    f"{self.model_type}: its get_image_features returns no encoder tokens (no last_hidden_state: "
                    "an image tokenizer that gives discrete codes); use feature_source='projector' (their embeddings)"
                )
            tokens = output.last_hidden_state
            # A video tokenizer's latent of a still image (Emu3's VQ encoder): [B, 1 frame, C, h, w].
            return tokens[:, 0] if tokens.ndim == 5 and tokens.shape[1] == 1 else tokens
        layers = [layer] if isinstance(layer, int) else list(layer)
        tokens = [hidden_states[i] for i in layers]
        if getattr(self.vlm.config, "vision_feature_select_strategy", "full") == "default":
            tokens = [t[:, 1:] for t in tokens]  # the projector drops CLS: so do we
        return torch.cat(tokens, dim=-1)


def _call_image_processor(image_processor: Any, images: list[Tensor], overrides: dict[str, Any]) -> Any:
    """`image_processor(images)`, as NumPy arrays where it takes no tensors (Emu3's reads only PIL or NumPy)."""
    try:
        return image_processor(images=images, return_tensors="pt", **overrides)
    except ValueError:
        return image_processor(images=[image.numpy() for image in images], return_tensors="pt", **overrides)


def image_sub_config(config: Any) -> Any:
    """The sub-config of what turns pixels into image tokens: `vision_config`, else the one sub-config that is not the
    language model's (a VQ tokenizer's `vq_config`), else None."""
    if getattr(config, "vision_config", None) is not None:
        return config.vision_config
    text = config.get_text_config()
    others = [getattr(config, name, None) for name in getattr(config, "sub_configs", {})]
    others = [other for other in others if other is not None and other is not text]
    return others[0] if len(others) == 1 else None


def normalized_pixels(images: Tensor, image_processor: Any, dtype: torch.dtype) -> Tensor:
    """Normalise `[0, 1]` images with the checkpoint's mean and std, on the images' device.

    Families whose encoders read plain `[B, 3, H, W]` pixels use this instead of the image processor:
    same numbers, no trip through the CPU.
    """
    mean = torch.tensor(image_processor.image_mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, device=images.device).view(1, -1, 1, 1)
    return ((images.float() - mean) / std).to(dtype)
