"""The VLM used as it is for understanding: image + prompt in, text out, through the checkpoint's own processor, chat
template and `generate`.

vugen never changes what a VLM understands; this is how a user (and `vugen describe`, the captioning recipe, the
understanding checks) asks it something. Images are given to the checkpoint's processor as RGB arrays with the
processor's own settings (resize, crop, tiling), exactly as the model card's example would, not vugen's encoding
settings (`AutoAdapter` turns resizing off for the latent path only).

Training examples (`answers` given) end with the chat template's own end of turn (e.g. `<|im_end|>`), so a model
trained on them learns to stop where its `generate` stops.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import BatchFeature

IGNORE_INDEX = -100  # what transformers' language-model losses skip


def user_turn(prompt: str, with_image: bool = True) -> list[dict[str, Any]]:
    """One user message: the image first, then the prompt (the order of the model cards' examples)."""
    content = [{"type": "image"}] if with_image else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]


def prompt_text(processor: Any, prompt: str) -> str:
    """The templated text of one user turn with an image and the generation prompt.

    Without a chat template the prompt follows the processor's image token (what LLaVA-style processors expand), or
    stands alone for processors that insert image tokens themselves (PaliGemma).
    """
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None)
    return f"{image_token}{prompt}" if isinstance(image_token, str) else prompt


def answer_text(processor: Any, prompt: str, answer: str) -> str:
    """What follows :func:`prompt_text` when the assistant answers: the answer and the template's end of turn.

    Read off the chat template (the whole conversation minus the prompt part); where the template rewrites earlier
    turns so the prompt is no prefix, or there is no template, the answer and the tokenizer's end-of-sequence token.
    """
    start = prompt_text(processor, prompt)
    if getattr(processor, "chat_template", None):
        reply = [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        whole = processor.apply_chat_template(user_turn(prompt) + reply, tokenize=False)
        if whole.startswith(start) and answer in whole[len(start) :]:
            return whole[len(start) :]
    return answer + (processor.tokenizer.eos_token or "")


def _as_arrays(images: Sequence[Any] | Tensor) -> list[np.ndarray]:
    """RGB ``uint8 [H, W, 3]`` arrays from PIL images or ``[3, H, W]`` tensors in ``[0, 1]`` (a batch tensor too)."""
    arrays = []
    for image in images:
        if isinstance(image, Image.Image):
            arrays.append(np.array(image.convert("RGB")))  # a writable copy: torch warns on read-only arrays
        elif isinstance(image, Tensor) and image.ndim == 3 and image.shape[0] == 3:
            pixels = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
            arrays.append(pixels.permute(1, 2, 0).cpu().numpy())
        else:
            kind = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"images must be PIL images or [3, H, W] tensors in [0, 1], got {kind}")
    return arrays


def _process(
    processor: Any, images: list[np.ndarray], texts: list[str], padding_side: str, **kwargs: Any
) -> BatchFeature:
    """The processor on one image per text; processors that want one list of images per text get that."""
    tokenizer = processor.tokenizer
    kept, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        try:
            return processor(images=images, text=texts, padding=True, return_tensors="pt", **kwargs)
        except (ValueError, TypeError):  # Idefics3 / SmolVLM: a list of images per text
            images_per_text = [[image] for image in images]
            return processor(images=images_per_text, text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = kept


def conversation_inputs(
    processor: Any,
    images: Sequence[Any] | Tensor,
    prompts: Sequence[str],
    answers: Sequence[str] | None = None,
) -> BatchFeature:
    """Model inputs for one image and one user prompt per example (see :meth:`vugen.adapter.VLMAdapter.conversation`).

    Args:
        processor: The checkpoint's processor (tokenizer, image processor and chat template).
        images: One image per prompt: PIL images or ``[3, H, W]`` tensors in ``[0, 1]``.
        prompts: The user prompts.
        answers: The assistant's answers (training), or None (generation).

    Returns:
        Without answers, the left-padded prompts ready for ``generate``. With answers, the right-padded conversations
        and ``labels``: the answer tokens and the end of turn, ``-100`` elsewhere (prompt, image tokens, padding).

    Raises:
        ValueError: If the numbers of images, prompts and answers differ, or an image has another form.
    """
    counts = {len(images), len(prompts), len(answers if answers is not None else prompts)}
    if len(counts) != 1 or isinstance(prompts, str):
        raise ValueError(f"conversation needs one image and one prompt (and answer) each, got {sorted(counts)}")
    arrays = _as_arrays(images)
    starts = [prompt_text(processor, prompt) for prompt in prompts]
    if answers is None:
        return _process(processor, arrays, starts, "left")
    if "suffix" in inspect.signature(processor.__call__).parameters:
        # A processor that builds training examples itself (PaliGemma: prefix-LM token types, labels)
        return _process(processor, arrays, starts, "right", suffix=list(answers))
    inputs = _process(processor, arrays, starts, "right")
    replies = [answer_text(processor, prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)]
    tokenizer = processor.tokenizer
    return _with_answers(inputs, tokenizer(replies, add_special_tokens=False)["input_ids"], tokenizer.pad_token_id or 0)


def _with_answers(inputs: BatchFeature, answer_ids: list[list[int]], pad_id: int) -> BatchFeature:
    """The processed prompts with each answer's tokens appended: the sequence the model's `generate` continues, so a
    trained model sees at training time exactly what it extends at answer time (tokenising the joined text could merge
    tokens across the boundary). Per-token inputs (token types) take the prompt's last value over the answer."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lengths = mask.sum(dim=1).tolist()
    total = max(length + len(answer) for length, answer in zip(lengths, answer_ids, strict=True))
    per_token = [key for key, value in inputs.items() if isinstance(value, Tensor) and value.shape == ids.shape]
    out = {key: ids.new_zeros(ids.shape[0], total, dtype=inputs[key].dtype) for key in per_token}
    out["labels"] = torch.full((ids.shape[0], total), IGNORE_INDEX, dtype=ids.dtype)
    for row, (length, answer) in enumerate(zip(lengths, answer_ids, strict=True)):
        end = length + len(answer)
        for key in per_token:
            out[key][row, :length] = inputs[key][row, :length]
            out[key][row, length:end] = inputs[key][row, length - 1]
        out["input_ids"][row, length:end] = torch.tensor(answer, dtype=ids.dtype)
        out["attention_mask"][row, :end] = 1
        out["labels"][row, length:end] = torch.tensor(answer, dtype=ids.dtype)
    out["input_ids"][out["attention_mask"] == 0] = pad_id
    return BatchFeature({**inputs, **out})


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None})


@torch.no_grad()
def generate_answer_ids(
    model: Any, processor: Any, inputs: BatchFeature, max_new_tokens: int, dtype: torch.dtype
) -> list[list[int]]:
    """Greedy answers of the model's own ``generate`` to :func:`conversation_inputs` without answers: the new token
    ids of each example, up to and without its first stop token."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    stops = stop_token_ids(model, processor.tokenizer)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
    return [_until_stop(row, set(stops)) for row in new_tokens]


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return next((tokens[:i] for i, token in enumerate(tokens) if token in stops), tokens)
