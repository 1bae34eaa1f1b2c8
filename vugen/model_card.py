"""The texts a bundle carries: its model card (``README.md``, what the Hugging Face Hub shows) and
``lora/README.md`` (what the LoRA is and why plain peft must not load it).

The card's metadata is the Hub's: ``library_name: vugen``, ``pipeline_tag: text-to-image``, the base VLM as
``base_model`` when it is a Hub id, and the scores a bundle was evaluated with as ``model-index``
(:func:`vugen.bundle_hub.push_bundle` writes the card with the repo id and metrics; a saved bundle's card has
neither).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vugen.generation import SamplingConfig

__all__ = ["lora_readme", "model_card"]


def model_card(
    record: Mapping[str, Any],
    decoder_sampling: SamplingConfig,
    repo_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    metrics_dataset: str | None = None,
) -> ModelCard:
    """The bundle's model card (``README.md``): the Hub's metadata (``library_name: vugen``, the base VLM as
    ``base_model``, ``model-index`` for ``metrics``), how to load it, the recipe and what it does to understanding.

    Args:
        record: The bundle's ``vugen.json`` record.
        decoder_sampling: The pixel decoder's sampling settings (its step count: 1 for a distilled decoder).
        repo_id: The Hub repo it is pushed to, for the loading snippet (``BUNDLE`` when None).
        metrics: Scores the bundle was evaluated with, by name (e.g. ``{"shapeeval/accuracy": 0.93}``).
        metrics_dataset: What ``metrics`` were measured on (required with them).
    """
    init_args = record["adapter"]["init_args"]
    if metrics and not metrics_dataset:
        raise ValueError("metrics_dataset: name what the metrics were measured on (e.g. 'Shapes held-out')")
    results = [
        EvalResult("text-to-image", "custom", metrics_dataset, name, float(value), metric_name=name)
        for name, value in (metrics or {}).items()
    ]
    data = ModelCardData(
        base_model=_hub_id(init_args.get("pretrained"), record),
        library_name="vugen",
        pipeline_tag="text-to-image",
        tags=["vugen", "text-to-image", "image-generation", "lora"],
        model_name=repo_id.split("/")[-1] if repo_id and results else None,
        eval_results=results or None,
    )
    settings = {**record["latent_sampler"], **record["sampling"]}
    settings = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    # how many network calls an image's pixels cost: 1 for a distilled one-step decoder (DecoderDistillStage)
    steps = decoder_sampling.steps
    settings += f"\n| pixel decoder | {steps} {decoder_sampling.solver} step{'s' * (steps != 1)} |"
    scores = "".join(f"| {name} | {float(value):.4g} |\n" for name, value in (metrics or {}).items())
    evaluation = (
        f"## Evaluation\n\nOn {metrics_dataset}:\n\n| metric | value |\n|---|---|\n{scores}\n" if scores else ""
    )
    source = repr(repo_id) if repo_id else "BUNDLE"
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# vugen text-to-image bundle\n\n"
        f"Image generation for the VLM `{init_args.get('pretrained')}` (adapter `{record['adapter']['class_path']}`, "
        f"revision `{init_args.get('revision')}`), trained with [vugen](https://arxiv.org/abs/2510.06529): LoRA on "
        f"its language model samples reduced vision latents, a pixel diffusion decoder renders them.\n\n"
        f"```python\nfrom vugen.pipeline import VugenPipeline\n\npipe = VugenPipeline.from_pretrained({source})\n"
        f'images = pipe("a large red circle on the left", seed=0)\n```\n\n'
        f"Or `vugen generate --bundle {repo_id or 'BUNDLE'} --prompt TEXT --out DIR`, `vugen serve --bundle "
        f"{repo_id or 'BUNDLE'}` for a page in the browser.\n\n"
        f"## Recipe\n\n| setting | value |\n|---|---|\n{settings}\n\n{evaluation}"
        f"## Understanding\n\n`describe` asks the bundle's VLM about images through its own processor, chat template "
        f"and greedy `generate`.\n\n```python\n{_DESCRIBE_CALL}\n```\n\n"
        f"{_UNDERSTANDING[record['latent_sampler']['lora_scope']]} Load the LoRA only through "
        "`VugenPipeline.from_pretrained` (`lora/README.md` says why).\n"
    )


def _hub_id(pretrained: str | None, record: Mapping[str, Any]) -> str | None:
    """``pretrained`` when it is a Hub id (the card's ``base_model`` links to it), else None: a local folder means
    nothing on the Hub, and the Hub rejects a ``base_model`` that is no repo id."""
    return pretrained if (record.get("vlm") or {}).get("kind") == "hub" else None


_DESCRIBE_CALL = 'answers = pipe.describe(images, "Describe the image.")  # PIL images, or [3, H, W] in [0, 1]'
# What the LoRA does to understanding, by lora_scope: for the model card and lora/README.md
_LORA_SCOPE = {
    "image_tokens": "It acts only on the BOI token and the latent image tokens (`lora_scope: image_tokens`): on every "
    "other token, and whenever vugen is not generating an image, the VLM is its base model, bit for bit.",
    "all": "It acts on every token (`lora_scope: all`): with it, the VLM no longer answers as the base VLM.",
}
_UNDERSTANDING = {
    "image_tokens": "Outside image generation the LoRA is inactive: `pipe.describe` gives exactly the base VLM's "
    "answers, token for token, and `pipe.adapter.vlm` is the base VLM as it is.",
    "all": "The LoRA acts on every token (`lora_scope: all`): `pipe.describe` and `pipe.adapter.vlm` answer with it, "
    "not as the base VLM; for understanding, load the base VLM itself.",
}


def lora_readme(lora_scope: str) -> str:
    """``lora/README.md``: what the LoRA is and how to load it without changing what the VLM understands."""
    return (
        "# The latent sampler's LoRA (vugen bundle)\n\n"
        "LoRA weights (`adapter_model.safetensors`, peft's tensor names) for the language model of the VLM that "
        f"`../vugen.json` names, trained by vugen to generate images. {_LORA_SCOPE[lora_scope]}\n\n"
        "Their config is `scoped_lora_config.json` (a peft `LoraConfig`), not peft's `adapter_config.json`, so "
        '`PeftModel.from_pretrained(language_model, "lora")` finds no adapter here and raises, on purpose: peft '
        "would apply the LoRA to every token, and the VLM would no longer answer as the base VLM.\n\n"
        "Load the whole bundle:\n\n"
        "```python\nfrom vugen.pipeline import VugenPipeline\n\n"
        "pipe = VugenPipeline.from_pretrained(BUNDLE)  # the VLM, this LoRA in its scope, the bridge, the decoder\n"
        f'images = pipe("a large red circle on the left", seed=0)\n{_DESCRIBE_CALL}\n```\n\n'
        f"{_UNDERSTANDING[lora_scope]}\n"
    )
