"""The VLM asked as it is (`VLMAdapter.conversation`, `answer_ids`, `answer`): the checkpoint's processor and chat
template, training labels on the answer only, and greedy answers that stop at the end of turn."""

from __future__ import annotations

import pytest
import torch

from vugen.data.shapes import ShapesDataset
from vugen.registry import get_adapter_class
from vugen_adapters.conversation import IGNORE_INDEX

FAMILIES = ["llava", "qwen2_vl", "idefics3", "paligemma", "gemma3", "internvl"]


def _examples(n: int = 3) -> tuple[list[torch.Tensor], list[str]]:
    data = ShapesDataset("train", n, image_size=32, seed=3)
    return [data[i]["images"] for i in range(n)], [data[i]["captions"] for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_answer_and_end_of_turn(tiny_checkpoint, family):
    adapter = get_adapter_class(family)(pretrained=str(tiny_checkpoint(family)))
    images, captions = _examples()
    inputs = adapter.conversation(images, ["describe:"] * 3, captions)
    tokenizer = adapter.chat_processor.tokenizer
    for row, caption in zip(inputs["labels"], captions, strict=True):
        answer = tokenizer.decode(row[row != IGNORE_INDEX])
        assert answer.startswith(caption)
        assert tokenizer.eos_token in answer  # the model learns to stop where `generate` stops
    # Labels sit where the inputs hold the same tokens; the prompt, image tokens and padding are ignored.
    kept = inputs["labels"] != IGNORE_INDEX
    assert torch.equal(inputs["labels"][kept], inputs["input_ids"][kept])
    assert (inputs["attention_mask"][kept] == 1).all()
    loss = adapter.vlm(**inputs).loss
    assert torch.isfinite(loss) and loss > 0


def test_answer_tokens_follow_the_prompt_exactly(tiny_checkpoint):
    """The answer is appended to the processed prompt's tokens (what `generate` extends), not re-tokenised with it."""
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    images, captions = _examples(2)
    prompts = ["describe:", "what is in the image? answer briefly"]  # different lengths: padding in between
    trained = adapter.conversation(images, prompts, captions)
    asked = adapter.conversation(images, prompts)
    for row in range(2):
        prompt = asked["input_ids"][row][asked["attention_mask"][row] == 1]
        sequence = trained["input_ids"][row][trained["attention_mask"][row] == 1]
        assert torch.equal(sequence[: len(prompt)], prompt)
        assert (trained["labels"][row][: len(prompt)] == IGNORE_INDEX).all()
    assert asked["attention_mask"][:, -1].all(), "generation prompts are left-padded"


def test_answer_is_the_models_greedy_generate_until_end_of_turn(tiny_checkpoint):
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    images, _ = _examples(2)
    inputs = adapter.conversation(images, ["describe:"] * 2)
    ids = adapter.answer_ids(images, ["describe:"] * 2, max_new_tokens=6)
    reference = adapter.vlm.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    stop = adapter.chat_processor.tokenizer.eos_token_id
    for row, answer in zip(reference.tolist(), ids, strict=True):
        expected = row[: row.index(stop)] if stop in row else row
        assert answer == expected
    texts = adapter.answer(images, ["describe:"] * 2, max_new_tokens=6)
    assert texts == [adapter.chat_processor.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]


def test_mismatched_lengths_are_one_clear_error(tiny_checkpoint):
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    images, captions = _examples(2)
    with pytest.raises(ValueError, match="one image and one prompt"):
        adapter.conversation(images, ["describe:"], captions)
    with pytest.raises(ValueError, match=r"PIL images or \[3, H, W\] tensors"):
        adapter.conversation([torch.zeros(32, 32)], ["describe:"])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_adapter_asks_the_vlm_as_before(tiny_checkpoint, family, tmp_path):
    """`save_pretrained` writes the whole processor (LLaVA's `patch_size` lives in processor_config.json only): the
    reloaded adapter builds the same conversations."""
    adapter = get_adapter_class(family)(pretrained=str(tiny_checkpoint(family)))
    adapter.save_pretrained(tmp_path)
    reloaded = get_adapter_class(family)(pretrained=str(tmp_path))
    images, captions = _examples(2)
    for answers in (None, captions):
        expected = adapter.conversation(images, ["describe:"] * 2, answers)
        got = reloaded.conversation(images, ["describe:"] * 2, answers)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected)
