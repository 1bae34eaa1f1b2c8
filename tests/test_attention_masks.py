"""The latent sampler's 4-D attention mask through `AutoAdapter.run_language_model` (`vugen_adapters.attention_masks`):
eager attention reads it as sdpa does, on a plain decoder (LLaVA) and on one with sliding-window layers (Gemma 3), and
a mask that does not fit is refused in one line."""

from __future__ import annotations

import pytest
import torch

from vugen.adapter import latent_attention_mask, positions_from_mask
from vugen.conformance import PROMPTS, check_latent_attention
from vugen_adapters.auto import AutoAdapter

LATENTS = 12  # longer than the tiny Gemma 3's window of 8


def latent_pass(adapter: AutoAdapter) -> torch.Tensor:
    """Hidden states of ``[prompt][latent block]`` under the sampler's bidirectional mask."""
    encoding = adapter.tokenize(PROMPTS)
    prompt_mask = encoding["attention_mask"]
    block = torch.randn(len(PROMPTS), LATENTS, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds = torch.cat([adapter.embed_tokens(encoding["input_ids"]), block], dim=1)
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(PROMPTS), LATENTS)], dim=1)
    positions = positions_from_mask(full_mask, embeds.shape[1])
    hidden, _ = adapter.run_language_model(embeds, latent_attention_mask(prompt_mask, LATENTS), positions)
    return hidden


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_eager_attention_reads_the_mask_as_sdpa_does(family, tiny_checkpoint):
    """Eager attention adds its mask to the scores: a bool mask passed as it is would add 1 where it allows."""
    sdpa = AutoAdapter(str(tiny_checkpoint(family)), attn_implementation="sdpa")
    eager = AutoAdapter(str(tiny_checkpoint(family)), attn_implementation="eager")
    torch.testing.assert_close(latent_pass(eager), latent_pass(sdpa), atol=1e-5, rtol=1e-4)
    check_latent_attention(eager, 32)  # the prompt's cache too


def test_a_4d_mask_that_does_not_fit_is_refused(tiny_checkpoint):
    adapter = AutoAdapter(str(tiny_checkpoint("gemma3")))
    embeds, positions = torch.zeros(1, 3, adapter.hidden_size), torch.arange(3)[None]
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"must be bool \[B, 1, 3, 3\] \(0 cached \+ 3 new tokens\), got .*float"):
        adapter.run_language_model(embeds, mask.float(), positions)
    with pytest.raises(ValueError, match=r"must be bool \[B, 1, 3, 3\] .* got torch.bool \[1, 1, 3, 4\]"):
        adapter.run_language_model(embeds, torch.ones(1, 1, 3, 4, dtype=torch.bool), positions)
    with pytest.raises(ValueError, match="needs position_ids with a 4-D attention_mask"):
        adapter.run_language_model(embeds, mask)
