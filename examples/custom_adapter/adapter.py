"""`ToyVLMAdapter`: the whole `VLMAdapter` contract for a VLM that is not a transformers model.

Copy this file next to your own model and replace the `ToyVLM` calls with your model's: vugen's stages see
nothing but the members below. Members without a docstring here are documented on `VLMAdapter`.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformers import BatchEncoding

from vugen.adapter import DType, VLMAdapter

from .toy_vlm import TOKENIZER_FILE, Block, ToyVLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": torch.float32}


class ToyVLMAdapter(VLMAdapter):
    """The frozen ToyVLM seen through vugen's adapter contract.

    Args:
        pretrained: folder written by `save_pretrained` (or `python -m examples.custom_adapter.toy_vlm DIR`).
        revision: contract parity only: a local folder has no revisions to pin.
        dtype: weight dtype; `auto` is float32, the dtype ToyVLM is built in.
        trust_remote_code: contract parity only: ToyVLM's code is this package's own, never the checkpoint's.
    """

    # Constant parts of the contract can be plain class attributes. `lora_target_modules` needs none: the contract
    # derives it from `language_model` (ToyVLM's LM linear layers; the same names in the vision tower are not
    # touched, LoRA only ever wraps `language_model`).
    block_classes: set[type[nn.Module]] = {Block}  # FSDP / activation-checkpointing units

    def __init__(
        self, pretrained: str, revision: str | None = None, dtype: DType = "float32", trust_remote_code: bool = False
    ) -> None:
        super().__init__()
        folder, self.pretrained = Path(pretrained).expanduser(), str(pretrained)
        if not (folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"ToyVLMAdapter `pretrained`: no {TOKENIZER_FILE} in folder {pretrained!r}")
        if dtype not in DTYPES:
            raise ValueError(f"ToyVLMAdapter `dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.vlm = ToyVLM.from_pretrained(folder).to(DTYPES[dtype])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.enable_padding(direction="left", pad_id=self.tokenizer.token_to_id("<pad>"), pad_token="<pad>")
        self._freeze()

    @property
    def feature_dim(self) -> int:
        return self.vlm.vision_width

    @property
    def patch_stride(self) -> int:
        return self.vlm.patch_size

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        return (self.vlm.image_size // self.vlm.patch_size,) * 2  # every image is resized to the encoder's size

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        size = (self.vlm.image_size,) * 2
        if images.shape[-2:] != size:
            images = nn.functional.interpolate(images.float(), size, mode="bilinear", antialias=True).clamp(0, 1)
        return self.vlm.vision(images.to(self.device, self.dtype))  # the encoder's tokens are raster already

    @property
    def hidden_size(self) -> int:
        return self.vlm.text_width

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.language_model

    def tokenize(self, prompts: list[str]) -> BatchEncoding:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("tokenize expects a non-empty list of prompt strings")
        # The toy model's whole chat template: one user turn, then the assistant's cue.
        encodings = self.tokenizer.encode_batch([f"user: {prompt} assistant:" for prompt in prompts])
        columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings]}
        return BatchEncoding(columns, tensor_type="pt").to(self.device)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.language_model.embed_tokens(input_ids)

    def run_language_model(self, inputs_embeds, attention_mask, position_ids=None, past_key_values=None):
        # Types as on VLMAdapter. ToyVLM's LM already speaks the contract: a padding mask or the latent sampler's
        # 4-D attention mask (used as given), left-padding-aware positions when None, and a `KVCache` (a list of
        # per-layer (k, v) tensors) in and out.
        return self.language_model(inputs_embeds, attention_mask, position_ids, past_key_values)

    def save_pretrained(self, directory: str | Path) -> None:
        self.vlm.save_pretrained(directory)  # config.json + model.safetensors
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))
