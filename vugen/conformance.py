"""The adapter conformance checks, written once as plain functions: what every `VLMAdapter` must do.

Each check takes an adapter and an image side it accepts, and raises :class:`AssertionError` (or the adapter's own
error) with a reason in one line when the adapter breaks the contract; it returns None when it holds. Two users run
the same functions: the pytest suite :class:`vugen.testing.AdapterConformance` that every adapter's tests subclass,
and ``vugen check PRETRAINED``, which runs them on a user's checkpoint (:func:`vugen.check_runner.run_checks`) and
prints a table (:data:`ADAPTER_CHECKS` says, per check, the adapter hook to override when it fails).

The checks measure values, not only shapes: the raster order is read from images whose halves differ, the KV cache
against the full pass, LoRA with random (non-zero) ``lora_B`` against the features it must not touch and the language
model it must reach, the latent sampler's 4-D attention mask on the cache against the whole sequence.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model

from vugen.adapter import VLMAdapter, latent_attention_mask, positions_from_mask
from vugen.check_runner import Check, CheckSkipped, expect, failure_reason

__all__ = [
    "ADAPTER_CHECKS",
    "PROMPTS",
    "random_images",
]

PROMPTS = ["a large red circle on the left", "a small blue square"]
RASTER_AUC = 0.95  # tokens of the changed half must score above the others this often


def random_images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``batch`` random images ``[B, 3, size, size]`` in ``[0, 1]``, the same for the same seed."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# The probe's bright colour: not gray, since an encoder that normalises each raw patch over its pixels and channels
# (Gemma 4 Unified's encoder-free embedder) makes every uniform gray patch, black or white, the same token.
BRIGHT = (1.0, 0.75, 0.5)


def striped_images(size: int, axis: int, lines: int) -> torch.Tensor:
    """Three images of a dark and a `BRIGHT` stripe, the last two with the colours of one half swapped.

    The two stripes run along `axis` and follow each other across it, each of whole lines of tokens (`lines` of them
    across `axis`), so that every token of a swapped half changes colour; wide stripes, as a dark and a bright half
    would be, move the tokens of an encoder whose receptive fields are large more than thin ones. Swapping the colours
    of a half keeps each channel's pixel values (up to one line of tokens when `lines` is odd), so a processor that
    standardises each image by its own mean and std (Kosmos-2.5's) leaves the other half as it was; brightening a half
    instead would shift the mean, and after standardisation both halves would move alike, one up and one down.

    Args:
        size: The side of the square images in pixels.
        axis: The axis split into halves: 3 splits left | right, 2 splits top / bottom.
        lines: How many lines of tokens there are across `axis` (rows for 3, columns for 2).

    Returns:
        ``[3, 3, size, size]`` images in ``[0, 1]``: the reference, then its second half (right or bottom) swapped,
        then its first half swapped.
    """
    shape = [1, 1, 1, 1]
    shape[5 - axis] = size  # 2 <-> 3: the stripes follow each other across the split axis
    line = torch.arange(size) * lines // size  # the line of tokens each line of pixels falls in
    reference = (line * 2 >= lines).float().view(shape).expand(1, 1, size, size)
    second, first = reference.clone(), reference.clone()
    second.narrow(axis, size // 2, size - size // 2).neg_().add_(1)
    first.narrow(axis, 0, size // 2).neg_().add_(1)
    return torch.cat([reference, second, first]) * torch.tensor(BRIGHT).view(1, 3, 1, 1)


def separation_auc(score: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a positive token scores above a negative one (1.0: perfect separation)."""
    pos, neg = score[positive], score[negative]
    return (pos[:, None] > neg[None, :]).float().mean().item()


def _images_for(adapter: VLMAdapter, size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return random_images(size, batch, seed).to(adapter.device)


def _run_text(adapter: VLMAdapter, prompts: list[str]) -> torch.Tensor:
    encoding = adapter.tokenize(prompts)
    hidden, _ = adapter.run_language_model(adapter.embed_tokens(encoding["input_ids"]), encoding["attention_mask"])
    return hidden


# ---------------------------------------------------------------------------------------------------- vision
def check_feature_shape(adapter: VLMAdapter, image_size: int) -> None:
    """`encode_images` gives `[B, rows * cols, feature_dim]` finite, non-constant floats for `token_grid`."""
    rows, cols = adapter.token_grid(image_size, image_size)
    features = adapter.encode_images(_images_for(adapter, image_size))
    expected = (2, rows * cols, adapter.feature_dim)
    expect(
        tuple(features.shape) == expected,
        f"encode_images of 2 images of {image_size} px gave {tuple(features.shape)}, expected {expected} "
        f"(token_grid {rows}x{cols}, feature_dim {adapter.feature_dim})",
    )
    expect(features.is_floating_point(), f"features are {features.dtype}, expected floats")
    expect(torch.isfinite(features).all(), "features hold NaN or Inf")
    expect(features.std() > 0, "features are constant")


def check_raster_order(adapter: VLMAdapter, image_size: int, axes: Iterable[int] = (3, 2)) -> None:
    """Tokens come row by row: changing the colours of one half of an image changes the tokens of that half most.

    From an image of two stripes (:func:`striped_images`), the tokens we index as the right half must change more
    when the right half's colours swap than when the left half's do: if the order were not raster, they would be a mix
    of both halves.
    """
    rows, cols = adapter.token_grid(image_size, image_size)
    for axis in axes:
        images = striped_images(image_size, axis, rows if axis == 3 else cols)
        features = adapter.encode_images(images.to(adapter.device)).float()
        change = (features[1:] - features[:1]).norm(dim=-1)  # [2, N]: second half swapped, first half swapped
        score = (change[0] - change[1]).reshape(rows, cols).cpu()
        count = cols if axis == 3 else rows
        first, second = (torch.arange(count) * 2 + 2 <= count), (torch.arange(count) * 2 >= count)
        score = score if axis == 3 else score.T  # lines along the split axis become columns
        positive = second.expand(score.shape[0], -1).reshape(-1)
        negative = first.expand(score.shape[0], -1).reshape(-1)
        auc = separation_auc(score.reshape(-1), positive, negative)
        half = "right" if axis == 3 else "bottom"
        expect(
            auc >= RASTER_AUC,
            f"tokens are not in raster order: swapping the colours of the {half} half moves the tokens indexed as "
            f"the {half} half most only {auc:.0%} of the time (expected >= {RASTER_AUC:.0%} on a {rows}x{cols} grid)",
        )


def check_deterministic_encoding(adapter: VLMAdapter, image_size: int) -> None:
    """The same images give bit-identical features twice."""
    images = _images_for(adapter, image_size)
    expect(torch.equal(adapter.encode_images(images), adapter.encode_images(images)), "encoding is not deterministic")


def check_frozen(adapter: VLMAdapter, image_size: int) -> None:
    """The VLM stays frozen and in eval mode, whatever `train()` says; features carry no gradient."""
    adapter.train()
    training = [name or type(adapter).__name__ for name, m in adapter.named_modules() if m.training]
    expect(not training, f"modules in training mode after adapter.train(): {_some(training)}")
    trainable = [name for name, p in adapter.named_parameters() if p.requires_grad]
    expect(not trainable, f"trainable VLM parameters: {_some(trainable)} (call self._freeze() in __init__)")
    expect(not adapter.encode_images(_images_for(adapter, image_size)).requires_grad, "features require grad")


# ---------------------------------------------------------------------------------------------------- language
def check_tokenize(adapter: VLMAdapter, image_size: int) -> None:
    """Prompts are left-padded to one length, keep their text and are wrapped in the chat template when it has one."""
    encoding = adapter.tokenize(PROMPTS)
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    expect(
        ids.shape == mask.shape and ids.dtype == torch.long and ids.shape[0] == len(PROMPTS),
        f"expected input_ids and attention_mask of shape [{len(PROMPTS)}, T] (long), got {tuple(ids.shape)} "
        f"{ids.dtype} and {tuple(mask.shape)}",
    )
    expect(mask[:, -1].all(), "prompts must end at the same position (left padding)")
    lengths = mask.sum(-1)
    expect(lengths[0] > lengths[1] and not mask[1, 0], "the shorter prompt is not padded on the left")
    expect(mask[1, -int(lengths[1]) :].all(), "the shorter prompt has padding inside it")
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        return  # an adapter without a Hugging Face tokenizer: the text itself cannot be read back
    for row, prompt in enumerate(PROMPTS):
        text = tokenizer.decode(ids[row][mask[row].bool()].tolist())
        expect(prompt in text, f"the tokens of {prompt!r} decode to {text!r}: the prompt's text is lost")
        templated = getattr(tokenizer, "chat_template", None) and getattr(adapter, "use_chat_template", True)
        expect(
            not templated or text.strip() != prompt,
            f"the tokenizer has a chat template but {prompt!r} was not wrapped in it (decoded: {text!r})",
        )


def check_embeddings(adapter: VLMAdapter, image_size: int) -> None:
    """`embed_tokens` gives `[B, T, hidden_size]`."""
    ids = adapter.tokenize(PROMPTS)["input_ids"]
    embeds = adapter.embed_tokens(ids)
    expected = (*ids.shape, adapter.hidden_size)
    expect(tuple(embeds.shape) == expected, f"embed_tokens gave {tuple(embeds.shape)}, expected {expected}")


def check_gradients(adapter: VLMAdapter, image_size: int) -> None:
    """Gradients flow through the language model to its input embeddings, and into none of the VLM's weights."""
    encoding = adapter.tokenize(PROMPTS)
    embeds = adapter.embed_tokens(encoding["input_ids"]).detach().float().requires_grad_(True)
    hidden, _ = adapter.run_language_model(embeds.to(adapter.dtype), encoding["attention_mask"])
    hidden.float().square().mean().backward()
    expect(embeds.grad is not None and embeds.grad.abs().sum() > 0, "no gradient reaches the input embeddings")
    touched = [name for name, p in adapter.named_parameters() if p.grad is not None]
    expect(not touched, f"gradients reached VLM weights: {_some(touched)}")


def check_kv_cache(adapter: VLMAdapter, image_size: int) -> None:
    """Running the last tokens on the cache of the first ones gives the full pass's hidden states."""
    encoding = adapter.tokenize(PROMPTS)
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    full, _ = adapter.run_language_model(adapter.embed_tokens(ids), mask)
    split = ids.shape[1] - 3
    _, cache = adapter.run_language_model(adapter.embed_tokens(ids[:, :split]), mask[:, :split])
    tail, _ = adapter.run_language_model(adapter.embed_tokens(ids[:, split:]), mask, past_key_values=cache)
    _expect_close(tail, full[:, split:], "hidden states after the KV cache differ from the full pass")


def check_padding(adapter: VLMAdapter, image_size: int) -> None:
    """Left padding does not change a prompt's hidden states (positions and mask skip the padding)."""
    alone = _run_text(adapter, PROMPTS[1:])
    batch = _run_text(adapter, PROMPTS)
    _expect_close(batch[1, -1], alone[0, -1], "a left-padded prompt's last hidden state differs from the prompt alone")


def check_positions(adapter: VLMAdapter, image_size: int) -> None:
    """An unpadded prompt gets the hidden states of the language model's own pass, where it numbers the tokens itself
    (no `position_ids`): run_language_model's positions count from where the model counts (Kosmos-2: past its padding
    row), not from 0 by habit."""
    encoding = adapter.tokenize(PROMPTS[:1])
    embeds, mask = adapter.embed_tokens(encoding["input_ids"]), encoding["attention_mask"]
    expect(mask.all(), "tokenize padded a single prompt")
    # each pass on its own copy: some language models add their positions to the embeddings in place (GIT)
    ours, _ = adapter.run_language_model(embeds.clone(), mask)
    language_model = adapter.language_model
    try:
        own = language_model(inputs_embeds=embeds.clone(), attention_mask=mask, **_causal(language_model))
    except Exception as error:  # noqa: BLE001  a model that must be told its positions has no own numbering
        raise CheckSkipped(f"the language model does not run without position_ids ({failure_reason(error)})") from None
    # own[0]: a transformers model's last_hidden_state, or the first of a plain module's outputs
    _expect_close(ours, own[0], "run_language_model's positions differ from the language model's own")


def check_latent_attention(adapter: VLMAdapter, image_size: int) -> None:
    """The latent sampler's 4-D mask is obeyed, with and without the prompt's KV cache (what training and generation
    pass: `latent_attention_mask` over `[prompt][latent block]`, the block as long as `token_grid(image_size)`).

    The prompt must get the hidden states of its own causal pass (it does not see the block, and a sliding window
    still applies), the first latent token must see the last one (the mask is not replaced by a causal one), and the
    block run on the prompt's cache must give the whole sequence's hidden states.
    """
    if not adapter.bidirectional_latents:
        raise CheckSkipped(
            "the language model takes no bidirectional mask (bidirectional_latents): the sampler runs causal"
        )
    encoding = adapter.tokenize(PROMPTS)
    prompt_mask = encoding["attention_mask"]
    prompt = adapter.embed_tokens(encoding["input_ids"])
    rows, cols = adapter.token_grid(image_size, image_size)
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(len(PROMPTS), rows * cols, adapter.hidden_size, generator=generator) * prompt.std().cpu()
    block = block.to(prompt.device, prompt.dtype)
    p, n = prompt.shape[1], block.shape[1]
    positions = positions_from_mask(torch.cat([prompt_mask, prompt_mask.new_ones(len(PROMPTS), n)], dim=1), p + n)
    alone, cache = adapter.run_language_model(prompt, prompt_mask, positions[:, :p])
    mask = latent_attention_mask(prompt_mask, n)
    full, _ = adapter.run_language_model(torch.cat([prompt, block], dim=1), mask, positions)
    tokens = prompt_mask.bool()
    _expect_close(
        full[:, :p][tokens], alone[tokens], "under the 4-D mask the prompt's hidden states differ from its causal pass"
    )
    changed = block.clone()
    changed[:, -1] = -changed[:, -1]
    other, _ = adapter.run_language_model(torch.cat([prompt, changed], dim=1), mask, positions)
    expect(
        not torch.allclose(other[:, p], full[:, p]),
        "the first latent token does not see the last one: the 4-D attention mask is not obeyed (causal instead?)",
    )
    cached, _ = adapter.run_language_model(
        block, latent_attention_mask(prompt_mask, n, n), positions[:, p:], past_key_values=cache
    )
    _expect_close(cached, full[:, p:], "the latent block on the prompt's KV cache differs from the whole sequence")


# ---------------------------------------------------------------------------------------------------- training plumbing
def check_lora_targets(adapter: VLMAdapter, image_size: int) -> None:
    """LoRA on `lora_target_modules` sits inside the language model only: with random (non-zero) LoRA weights, no
    LoRA layer runs while encoding images, the features stay bit-identical, and the language model's output changes.

    Runs on a copy: the adapter itself is left without LoRA.
    """
    images = _images_for(adapter, image_size)
    clone = copy.deepcopy(adapter)
    # The copy's own outputs, not the adapter's: a copy's weights sit at other addresses, and CPU kernels that pick
    # their path by alignment round differently (Gemma 3n's 1x1 convolutions, as loaded from safetensors)
    before_features, before_text = clone.encode_images(images), _run_text(clone, PROMPTS)
    targets = clone.lora_target_modules
    config = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)  # random lora_B: not a no-op
    inject_adapter_in_model(config, clone.language_model)
    lora_layers = {name: m for name, m in clone.named_modules() if hasattr(m, "lora_A")}
    expect(lora_layers, f"lora_target_modules {targets!r} matched no layer of the language model")
    in_language_model = {id(m) for m in clone.language_model.modules()}
    outside = [name for name, m in lora_layers.items() if id(m) not in in_language_model]
    expect(not outside, f"LoRA layers outside the language model: {_some(outside)}")
    ran = _modules_run(lora_layers, lambda: clone.encode_images(images))
    expect(not ran, f"LoRA layers run while encoding images (in the vision tower or projector): {_some(ran)}")
    expect(
        torch.equal(clone.encode_images(images), before_features),
        f"LoRA on {targets!r} changes encode_images: it must wrap the language model only",
    )
    expect(
        not torch.equal(_run_text(clone, PROMPTS), before_text),
        f"LoRA on {targets!r} does not change the language model's output: run_language_model never runs them",
    )


def check_block_classes(adapter: VLMAdapter, image_size: int) -> None:
    """`block_classes` are classes of the VLM's modules, one of them inside the language model."""
    classes = adapter.block_classes
    expect(classes, "no FSDP / activation-checkpointing unit")
    missing = classes - {type(m) for m in adapter.modules()}
    expect(not missing, f"block classes that are no module of the VLM: {_some([c.__name__ for c in missing])}")
    expect(
        any(isinstance(m, tuple(classes)) for m in adapter.language_model.modules()),
        f"no block class ({', '.join(sorted(c.__name__ for c in classes))}) inside the language model",
    )


def check_save_and_reload(adapter: VLMAdapter, image_size: int, directory: str | Path | None = None) -> None:
    """`save_pretrained`, then the adapter rebuilt from the saved folder with its other options as they were, gives
    identical features and tokens.

    Args:
        adapter: The adapter.
        image_size: Side of the test images.
        directory: Where to save; None: a temporary folder, removed after.
    """
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="vugen-check-") as folder:
            return check_save_and_reload(adapter, image_size, folder)
    adapter.save_pretrained(directory)
    options = adapter.init_config()["init_args"] | {"pretrained": str(directory)}  # same feature source, size, ...
    reloaded = type(adapter)(**options).to(adapter.device)
    images = _images_for(adapter, image_size)
    expect(
        torch.equal(reloaded.encode_images(images), adapter.encode_images(images)),
        "the reloaded adapter encodes images differently",
    )
    expect(
        torch.equal(reloaded.tokenize(PROMPTS)["input_ids"].cpu(), adapter.tokenize(PROMPTS)["input_ids"].cpu()),
        "the reloaded adapter tokenizes prompts differently (is the tokenizer / chat template saved?)",
    )


def check_describe(adapter: VLMAdapter, image_size: int) -> None:
    """`describe()` names the adapter's own importable class and its `pretrained`."""
    record = adapter.describe()
    module, _, name = record["class_path"].rpartition(".")
    found = getattr(importlib.import_module(module), name, None)
    expect(found is type(adapter), f"describe()['class_path'] {record['class_path']!r} is not {type(adapter)!r}")
    expect(
        record["pretrained"] == adapter.pretrained,
        f"describe()['pretrained'] {record['pretrained']!r} is not {adapter.pretrained!r}",
    )


# ---------------------------------------------------------------------------------------------------- helpers
def _expect_close(actual: torch.Tensor, expected: torch.Tensor, reason: str) -> None:
    try:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    except AssertionError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "Greatest absolute" in line), "")
        raise AssertionError(f"{reason}{': ' + detail if detail else ''}") from None


def _causal(language_model: torch.nn.Module) -> dict[str, bool]:
    """`is_causal=True` where the forward takes it: vugen runs language models causal, and some VLMs mark theirs
    bidirectional for the image prefix (PaliGemma)."""
    parameters = inspect.signature(language_model.forward).parameters.values()
    takes = any(p.name == "is_causal" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return {"is_causal": True} if takes else {}


def _modules_run(modules: dict[str, torch.nn.Module], action: Callable[[], Any]) -> list[str]:
    """The names among ``modules`` whose forward runs during ``action()``."""
    ran: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=name: ran.append(n)) for name, m in modules.items()]
    try:
        action()
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(ran))


def _some(names: list[str], shown: int = 3) -> str:
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


ADAPTER_CHECKS: tuple[Check, ...] = (
    Check("features", check_feature_shape, "token_grid / select_features"),
    Check("raster_order", check_raster_order, "select_features / patch_layout", needs=("features",)),
    Check("deterministic", check_deterministic_encoding, "encode_images / pixel_inputs", needs=("features",)),
    Check("frozen", check_frozen, "__init__ (call self._freeze())"),
    Check("tokenize", check_tokenize, "tokenize / chat_messages"),
    Check("embeddings", check_embeddings, "embed_tokens", needs=("tokenize",)),
    Check("gradients", check_gradients, "run_language_model", needs=("embeddings",)),
    Check("kv_cache", check_kv_cache, "run_language_model", needs=("embeddings",)),
    Check("padding", check_padding, "run_language_model / tokenize", needs=("embeddings",)),
    Check("positions", check_positions, "run_language_model (position_ids)", needs=("embeddings",)),
    Check(
        "latent_mask",
        check_latent_attention,
        "run_language_model (4-D attention mask)",
        needs=("embeddings", "kv_cache"),
    ),
    Check("lora_targets", check_lora_targets, "lora_target_modules / language_model", needs=("features", "embeddings")),
    Check("block_classes", check_block_classes, "block_classes"),
    Check("save_reload", check_save_and_reload, "save_pretrained", needs=("features", "tokenize")),
    Check("describe", check_describe, "describe / init_config"),
)
"""The adapter contract's checks, in the order they run (what `AdapterConformance` and `vugen check` run)."""
