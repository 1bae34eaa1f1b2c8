"""`vugen tiny FAMILY DIR`: a tiny random offline VLM checkpoint (tests, the demo) of a hand-tuned recipe or of any
architecture of transformers' image-text-to-text mapping; with `--understand shapes`, trained to understand Shapes.

The only vugen module besides the registry that imports the bundled adapters package: the tiny checkpoints are
built from each family's own config class there.
"""

from __future__ import annotations

from vugen.errors import check_positive
from vugen.understanding_recipe import UnderstandingRecipe

__all__ = ["tiny"]

UNDERSTAND_STEPS = 1200  # 86 s of training on one CPU thread with the default recipe (docs/understanding.md)


def tiny(
    family: str,
    directory: str,
    seed: int = 0,
    understand: str | None = None,
    understand_steps: int = UNDERSTAND_STEPS,
    understand_recipe: UnderstandingRecipe = UnderstandingRecipe(),  # noqa: B008 (frozen: one shared default is safe)
) -> None:
    """`vugen tiny FAMILY DIR`: write a tiny random offline checkpoint of a VLM (tests, demo).

    Args:
        family: a recipe of `vugen_adapters.tiny.TINY_FAMILIES` (llava, qwen2_vl, ...) or any model_type of
            transformers' image-text-to-text mapping (glm4v, lfm2_vl, ...); an unknown name lists them all.
        directory: output folder; load it with an adapter (or the Auto classes) as `pretrained`.
        seed: seed of the random weights.
        understand: `shapes`: then train the tiny VLM to understand Shapes (captions and attribute questions, its own
            language-model loss), save it over DIR like any checkpoint, score its captions on the test and held-out
            splits, and write DIR/understanding.json.
        understand_steps: training steps of `--understand`.
        understand_recipe: what trains and on what (docs/understanding.md: the ablation behind the default).
    """
    # Imported here, not at the top, so that `vugen tiny --help` and parsing stay light: the recipes import every
    # family's transformers classes (seconds with torch), which no other command needs.
    from transformers.utils import logging as transformers_logging

    from vugen_adapters.tiny import build_tiny_vlm

    if understand is not None:
        from vugen.commands import _understanding  # the training machinery: Lightning, the stage, the data
        from vugen.commands.check import default_adapter, read_config
        from vugen.registry import get_adapter_class

        _understanding.check_task(understand)
        check_positive("understand_steps", understand_steps)
    transformers_logging.disable_progress_bar()  # a bar over the one shard of a tiny checkpoint says nothing
    path = build_tiny_vlm(family, directory, seed=seed)
    if understand is None:
        print(f"vugen tiny: a tiny random {family} VLM (seed {seed}) written to {path}")
        return
    adapter_name = default_adapter(read_config(str(path))[0].get("model_type"))
    adapter_class = get_adapter_class(adapter_name)
    adapter = adapter_class(pretrained=str(path))
    fit = _understanding.train_understanding(adapter, path, understand_steps, understand_recipe)
    scores = _understanding.score_captions(adapter_class(pretrained=str(path)))  # as saved, reloaded
    record = _understanding.write_record(path, fit, understand_recipe, scores)
    print(f"{path}: {fit['steps']} steps in {fit['seconds']} s ({adapter_name} adapter); caption accuracy:")
    print(_understanding.understanding_table(scores))
    print(f"record: {record}")
