"""`vugen tiny FAMILY DIR`: a tiny random offline VLM checkpoint (tests, the demo) of a hand-tuned recipe or of any
architecture of transformers' image-text-to-text mapping.

The only vugen module besides the registry that imports the bundled adapters package: the tiny checkpoints are
built from each family's own config class there.
"""

from __future__ import annotations

__all__ = ["tiny"]


def tiny(family: str, directory: str, seed: int = 0) -> None:
    """`vugen tiny FAMILY DIR`: write a tiny random offline checkpoint of a VLM (tests, demo).

    Args:
        family: a recipe of `vugen_adapters.tiny.TINY_FAMILIES` (llava, qwen2_vl, ...) or any model_type of
            transformers' image-text-to-text mapping (glm4v, lfm2_vl, ...); an unknown name lists them all.
        directory: output folder; load it with an adapter (or the Auto classes) as `pretrained`.
        seed: seed of the random weights.
    """
    # Imported here: the recipes import every family's transformers classes (~0.6 s), which no other command needs.
    from vugen_adapters.tiny import build_tiny_vlm

    print(build_tiny_vlm(family, directory, seed=seed))
