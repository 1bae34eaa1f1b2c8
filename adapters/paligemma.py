"""PaliGemma (`PaliGemmaForConditionalGeneration`): a SigLIP tower, a linear projector, a Gemma (1 or 2) LM.

What introspection alone gets wrong: PaliGemma has no chat template; its prompts are a prefix `<bos>{prompt}\\n`
(what `PaliGemmaProcessor` writes after the image tokens), so `tokenize` writes exactly that.

What `AutoAdapter` already does right for it:
- the pixels are plain `[B, 3, H, W]` at the tower's fixed size, normalised on the device (`reads_plain_pixels`);
- PaliGemma sets `use_bidirectional_attention` on its Gemma, so the attention modules are not causal and, when
  a batch has no padding (the mask is then skipped for sdpa / flash attention), every token sees the future.
  `run_language_model` asks for causal attention explicitly, so the prompt's KV cache is the same whatever
  follows it, and padded and unpadded batches agree.

Gemma's `sqrt(hidden_size)` embedding scale lives in the embedding module (`GemmaTextScaledWordEmbedding`), so
`embed_tokens` already returns what the decoder stack expects, as in the model's own text path.
"""

from __future__ import annotations

from transformers import BatchEncoding

from vugen_adapters.auto import AutoAdapter


class PaliGemmaAdapter(AutoAdapter):
    """PaliGemma and PaliGemma 2 checkpoints (`google/paligemma*`). Arguments as for `AutoAdapter`."""

    def tokenize(self, prompts: list[str]) -> BatchEncoding:
        """Left-padded prompts in PaliGemma's prefix format `<bos>{prompt}\\n` (the chat template if one is set)."""
        if self.use_chat_template and self.tokenizer.chat_template is not None:
            return super().tokenize(prompts)
        if isinstance(prompts, str) or not prompts:
            raise ValueError("tokenize expects a non-empty list of prompt strings")
        bos = self.tokenizer.bos_token or ""
        encoding = self.tokenizer(
            [f"{bos}{prompt}\n" for prompt in prompts],
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=self.max_prompt_tokens,
            add_special_tokens=False,
            return_tensors="pt",
        )
        return BatchEncoding({"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}).to(
            self.device
        )
