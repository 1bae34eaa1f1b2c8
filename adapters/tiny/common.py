"""What every tiny recipe shares: a byte-level BPE tokenizer trained in milliseconds, a chat template, and the
widths of the tiny language model and vision tower."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Enough words for Shapes captions and chat turns; byte-level BPE still encodes any text.
_CORPUS = [
    "a small large red green blue yellow magenta cyan white circle square triangle",
    "on the left right at the top bottom in the center to the left of right of above below",
    "user assistant system describe the image draw generate picture photo of an and with",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}IMAGE_PLACEHOLDER{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_tokenizer(
    special_tokens: list[str],
    image_placeholder: str,
    vocab_size: int = 384,
    extra_special_tokens: dict[str, str] | None = None,
    **roles: str,
):
    """A byte-level BPE tokenizer trained in milliseconds on an in-code corpus.

    Args:
        special_tokens: the family's extra special tokens (image token, vision start/end, ...).
        image_placeholder: what the chat template writes for an image in a message.
        vocab_size: target vocabulary size of the BPE trainer.
        extra_special_tokens: named tokens a processor reads as attributes (`tokenizer.image_token` -> `<image>`);
            their values must be among `special_tokens`.
        **roles: overrides of the tokenizer's named special tokens (e.g. `bos_token`).
    """
    base = ["<|endoftext|>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base + special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    names = {
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "bos_token": "<s>",
    }
    named = {"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **(names | roles | named))
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.chat_template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", image_placeholder)
    return tokenizer


def token_id(tokenizer: Any, token: str) -> int:
    """The id of a special token, which must exist."""
    index = tokenizer.convert_tokens_to_ids(token)
    if index is None or index == tokenizer.unk_token_id:
        raise KeyError(f"token {token!r} is not in the tiny tokenizer")
    return index
