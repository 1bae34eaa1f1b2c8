"""ToyVLM: a small vision-language model in plain PyTorch, standing in for "your own model".

Nothing here knows about vugen: a patch-embedding transformer vision encoder, a projector, and a causal
transformer language model with a KV cache (a list of per-layer `(k, v)` tensors), left-padding-aware
attention masks and learned position embeddings. Weights save as safetensors plus a JSON config through
huggingface_hub's `PyTorchModelHubMixin`; the word-level tokenizer saves as `tokenizer.json`.

    python -m examples.custom_adapter.toy_vlm checkpoints/toy-vlm    # writes a seeded checkpoint
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import Tensor, nn

# Every word of the Shapes captions, the chat template's roles, and the two special tokens.
VOCAB = [
    "<pad>", "<unk>", "user", "assistant", ":", "a", "an", "of", "the", "on", "in", "at", "to", "and",
    "small", "large", "red", "green", "blue", "yellow", "magenta", "cyan", "white",
    "circle", "square", "triangle", "left", "right", "top", "bottom", "center", "above", "below",
]  # fmt: skip
TOKENIZER_FILE = "tokenizer.json"
KVCache = list[tuple[Tensor, Tensor]]  # one (k, v) pair per layer, each [B, heads, tokens, head_dim]


def build_tokenizer() -> Tokenizer:
    """A lowercase word-level tokenizer over `VOCAB`; unknown words become `<unk>`."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # "user:" -> "user", ":"
    return tokenizer


class Attention(nn.Module):
    """Multi-head attention; with a cache, the new keys and values are appended to the cached ones."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, cache: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """`[B, T, W]` -> `[B, T, W]` and the `(k, v)` of every position so far, each `[B, heads, S, W / heads]`."""
        batch, tokens, _ = x.shape
        q, k, v = (
            p(x).view(batch, tokens, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block, shared by the vision encoder (no mask) and the language model (causal)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.up_proj = nn.Linear(width, 2 * width)
        self.down_proj = nn.Linear(2 * width, width)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, cache: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One block; returns the new hidden states and this layer's `(k, v)` cache."""
        attended, cache = self.attn(self.attn_norm(x), mask, cache)
        x = x + attended
        return x + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(x)))), cache


class VisionEncoder(nn.Module):
    """Images `[B, 3, S, S]` in `[0, 1]` -> `[B, (S / patch)^2, width]` tokens in raster order."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Parameter(0.02 * torch.randn(1, (image_size // patch_size) ** 2, width))
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, images: Tensor) -> Tensor:
        """Encode images of exactly `image_size` pixels per side."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"VisionEncoder takes {self.image_size}x{self.image_size} images, got {tuple(images.shape)}"
            )
        x = self.patch_embed(images * 2 - 1).flatten(2).transpose(1, 2) + self.position_embedding
        for layer in self.layers:
            x, _ = layer(x)
        return self.norm(x)


def causal_padding_mask(attention_mask: Tensor, new_tokens: int) -> Tensor:
    """`[B, S]` padding mask over cached + new tokens -> boolean `[B, 1, new_tokens, S]` attention mask.

    A new token sees earlier unpadded tokens and itself. Letting padding see itself keeps every row of the
    softmax non-empty: an all-masked row would be NaN, and NaN values leak through even masked attention.
    """
    total = attention_mask.shape[1]
    query = torch.arange(total - new_tokens, total, device=attention_mask.device)[:, None]
    key = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = (key <= query) & attention_mask.bool()[:, None, :]
    return (allowed | (key == query))[:, None]


class LanguageModel(nn.Module):
    """Causal transformer decoder on embeddings, with a KV cache: a list of per-layer `(k, v)` tensors."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, width)
        self.embed_positions = nn.Embedding(max_positions, width)
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Hidden states `[B, T, W]` of the new tokens and the cache extended by them.

        Args:
            inputs_embeds: `[B, T, W]` embeddings of the new tokens.
            attention_mask: over cached and new tokens, either a `[B, past + T]` padding mask (1: token, 0: padding),
                attended causally, or a ready `[B, 1, T, past + T]` attention mask, used as given (boolean, True: may
                attend, or additive float, as `scaled_dot_product_attention` reads them; as transformers' language
                models take either form).
            position_ids: `[B, T]` positions of the new tokens; None: counted from a padding mask, skipping padding.
            past_key_values: the cache from an earlier call, or None.
        """
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        new_tokens = inputs_embeds.shape[1]
        if attention_mask.shape[-1] != past + new_tokens:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {past} cached + {new_tokens} new"
            )
        if attention_mask.ndim == 4:
            if position_ids is None:
                raise ValueError("a 4-D attention_mask needs position_ids")
            mask = attention_mask
        else:
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]
            mask = causal_padding_mask(attention_mask, new_tokens)
        x = inputs_embeds + self.embed_positions(position_ids)
        cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, mask, None if past_key_values is None else past_key_values[i])
            cache.append(layer_cache)
        return self.norm(x), cache


class ToyVLM(nn.Module, PyTorchModelHubMixin):
    """Vision encoder -> projector -> language model -> LM head; weights drawn deterministically from `seed`.

    Args:
        vocab_size: size of the tokenizer's vocabulary.
        image_size: side in pixels of the encoder's input.
        patch_size: side in pixels of a patch (one vision token).
        vision_width: channels of the vision tokens.
        text_width: width of the language model.
        layers: transformer blocks in the encoder and in the language model.
        heads: attention heads per block.
        max_positions: longest sequence the language model's position embedding covers.
        seed: seed of the random initial weights.
    """

    def __init__(
        self,
        vocab_size: int = len(VOCAB),
        image_size: int = 32,
        patch_size: int = 4,
        vision_width: int = 32,
        text_width: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_positions: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.vision_width, self.text_width = vision_width, text_width
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            self.vision = VisionEncoder(image_size, patch_size, vision_width, layers, heads)
            self.projector = nn.Linear(vision_width, text_width)
            self.language_model = LanguageModel(vocab_size, text_width, layers, heads, max_positions)
            self.lm_head = nn.Linear(text_width, vocab_size, bias=False)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Next-token logits `[B, N + T, vocab]` for the image tokens followed by a left-padded prompt."""
        image_embeds = self.projector(self.vision(images))
        embeds = torch.cat([image_embeds, self.language_model.embed_tokens(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(image_embeds.shape[:2]), attention_mask], dim=1)
        hidden, _ = self.language_model(embeds, mask)
        return self.lm_head(hidden)


def save_toy_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write a seeded ToyVLM (`config.json`, `model.safetensors`) and its `tokenizer.json` to `directory`."""
    directory = Path(directory)
    ToyVLM(seed=seed).save_pretrained(directory)
    build_tokenizer().save(str(directory / TOKENIZER_FILE))
    return directory


def main() -> None:
    """Command line: write a toy checkpoint to the given folder."""
    parser = argparse.ArgumentParser(description="Write a seeded ToyVLM checkpoint.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_toy_checkpoint(args.directory, args.seed))


if __name__ == "__main__":
    main()
