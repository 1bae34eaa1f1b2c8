"""PaliGemma adapter on a tiny checkpoint: prefix format, causal Gemma, the model's own text path."""

from __future__ import annotations

import pytest
import torch

from vugen_adapters.paligemma import PaliGemmaAdapter

SAME_LENGTH = ["a red circle", "a blue circle"]  # no padding: sdpa then skips the mask


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint) -> PaliGemmaAdapter:
    return PaliGemmaAdapter(str(tiny_checkpoint("paligemma")))


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_vision_tokens_are_what_the_projector_reads(adapter, tiny_checkpoint):
    x = images(seed=1)
    projector = PaliGemmaAdapter(str(tiny_checkpoint("paligemma")), feature_source="projector")
    expected = adapter.vlm.model.multi_modal_projector(adapter.encode_images(x))
    torch.testing.assert_close(projector.encode_images(x), expected, rtol=0, atol=1e-6)


def test_prompts_use_the_prefix_format(adapter):
    encoding = adapter.tokenize(["a red circle", "a small blue square"])
    texts = adapter.tokenizer.batch_decode(encoding["input_ids"], skip_special_tokens=False)
    pad = adapter.tokenizer.pad_token
    assert [t.replace(pad, "") for t in texts] == ["<s>a red circle\n", "<s>a small blue square\n"]
    assert encoding["attention_mask"][:, -1].all() and not encoding["attention_mask"][0, 0]


def test_language_model_is_causal_without_padding(adapter):
    # PaliGemma marks its Gemma bidirectional; without padding the mask is skipped and only `is_causal` remains.
    assert adapter.vlm.config.text_config.use_bidirectional_attention
    encoding = adapter.tokenize(SAME_LENGTH)
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    assert mask.all()
    full, _ = adapter.run_language_model(adapter.embed_tokens(ids), mask)
    prefix, cache = adapter.run_language_model(adapter.embed_tokens(ids[:, :-2]), mask[:, :-2])
    torch.testing.assert_close(prefix, full[:, :-2], rtol=1e-5, atol=1e-5)
    tail, _ = adapter.run_language_model(adapter.embed_tokens(ids[:, -2:]), mask, past_key_values=cache)
    torch.testing.assert_close(tail, full[:, -2:], rtol=1e-5, atol=1e-5)


def test_embeddings_and_language_model_match_the_models_text_path(adapter):
    # A padded batch makes PaliGemma's own forward causal too; the sqrt(hidden) scale is in the embedding module.
    encoding = adapter.tokenize(["a red circle", "a small blue square on the left"])
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    embeds = adapter.embed_tokens(ids)
    raw = adapter.vlm.get_input_embeddings().weight[ids]
    torch.testing.assert_close(embeds, raw * adapter.hidden_size**0.5, rtol=1e-6, atol=1e-6)
    hidden, _ = adapter.run_language_model(embeds, mask)
    # PaliGemma counts positions from 1, we from 0: RoPE sees only differences, so the states agree.
    reference = adapter.vlm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden[mask.bool()], reference[mask.bool()], rtol=1e-5, atol=1e-5)
