"""`vugen generate`: text -> PNGs from a bundle (:class:`~vugen.callbacks.ImageFolderWriter`'s layout).

``Trainer.predict`` of a :class:`~vugen.prediction.PipelinePredictor` over a
:class:`~vugen.data.prompts.PromptDataModule`; image ``k`` of prompt ``i`` uses seed ``seed + i * n + k``, as
everywhere, so the files are the same on one process or many (``--devices N``, or torchrun).
"""

from __future__ import annotations

from pathlib import Path

from vugen.callbacks.prediction_writers import ImageFolderWriter
from vugen.commands._predict import predict, say_written
from vugen.data.prompts import PromptDataModule
from vugen.diffusion import Method
from vugen.prediction import PipelinePredictor

__all__ = ["generate"]


def generate(
    *,
    bundle: str,
    out: str,
    prompt: str | None = None,
    prompts: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    solver: Method | None = None,
    num_images_per_prompt: int = 1,
    batch_size: int = 8,
    accelerator: str = "auto",
    devices: int | None = None,
    num_nodes: int | None = None,
    strategy: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> list[Path]:
    """`vugen generate --bundle DIR --prompt TEXT | --prompts FILE --out DIR`: write PNGs of generated images.

    Writes ``OUT/<index:05d>-<slug>-<k>.png`` (image ``k`` of prompt ``index``, seed ``seed + index * n + k``),
    ``OUT/grid.png`` (one row per prompt when ``num_images_per_prompt > 1``, else rows of 8) and
    ``OUT/vugen_sampling.json`` (the settings used).

    Args:
        bundle: A bundle folder (``VugenPipeline.save_pretrained``, ``vugen export``) or a Hub repo id (``org/name``,
            downloaded into the local Hugging Face cache once; offline from there).
        out: Output folder (created).
        prompt: One prompt. Give this or ``prompts``.
        prompts: A prompt set: a text file with one prompt per line (blank lines skipped), a ``.jsonl`` file of
            objects with a ``prompt``, or a folder of ``<id>.txt`` files.
        steps: Flow-matching steps (default: the bundle's).
        cfg: Classifier-free guidance scale (default: the bundle's; 1 = none).
        seed: Base seed.
        solver: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        num_images_per_prompt: Images per prompt (generated together).
        batch_size: Prompts per prediction batch (changes no image).
        accelerator: Lightning accelerator: ``auto`` (a GPU when there is one), ``cpu``, ``gpu``, ...
        devices: Processes on this machine, one per device, started by Lightning (DDP; gloo on CPUs); default:
            what torchrun started (``torchrun --nproc_per_node N --no-python -- vugen COMMAND ...``), else 1.
        num_nodes: Machines; default: what torchrun started, else 1.
        strategy: Lightning strategy (``auto``: DDP for several devices).
        trust_remote_code: Let the VLM checkpoint run its own modelling code (pin its revision). Never taken from the
            bundle.
        revision: For a Hub repo id: a branch, tag or commit sha of the bundle.

    Returns:
        The PNG files of every prompt, grid last.
    """
    if (prompt is None) == (prompts is None):
        raise ValueError(
            "give exactly one of --prompt (one prompt) and --prompts (a prompt file or folder), "
            f"got prompt={prompt!r} and prompts={prompts!r}"
        )
    data = PromptDataModule(
        [prompt] if prompt is not None else prompts,
        images_per_prompt=num_images_per_prompt,
        seed=seed,
        batch_size=batch_size,
    )
    writer = ImageFolderWriter(out)
    predictor = PipelinePredictor(
        bundle, steps=steps, guidance_scale=cfg, solver=solver, trust_remote_code=trust_remote_code, revision=revision
    )
    predict(predictor, data, writer, accelerator, devices, num_nodes, strategy)
    images = writer.image_paths(data)
    count, prompts = len(images), len(images) // num_images_per_prompt
    written = f"{count} image{'s' * (count != 1)} of {prompts} prompt{'s' * (prompts != 1)}"
    say_written("generate", written, writer.out_dir, "<index>-<slug>-<k>.png, grid.png")
    return [*images, writer.out_dir / "grid.png"]
