"""`vugen export-geneval` and `vugen export-dpg`: a bundle's images in the layouts the GenEval and DPG-Bench scorers
read (:class:`~vugen.callbacks.GenEvalWriter`, :class:`~vugen.callbacks.DPGBenchWriter`).

The scorers run in their own environments (mmdet 2.x / modelscope stacks); vugen only writes their inputs. Both
commands are ``Trainer.predict`` of a :class:`~vugen.prediction.PipelinePredictor` over a
:class:`~vugen.data.prompts.PromptDataModule`: each prompt's images are one batch with seeds ``seed + i * n + k``,
so every file is the same on one process or many (how to start several: the commands' docstrings, and
:mod:`vugen.commands._predict`); rank ``r`` of ``W`` generates prompts ``r, r + W, ...``. Global rank 0 writes
``OUT/vugen_sampling.json`` last: every sampling setting, the seed rule, the bundle and the sha256 of its
``vugen.json``.
"""

from __future__ import annotations

from pathlib import Path

from vugen.callbacks.prediction_writers import DPG_IMAGES, DPGBenchWriter, GenEvalWriter
from vugen.commands._predict import predict, say_written
from vugen.data.prompts import PromptDataModule
from vugen.diffusion import Method
from vugen.prediction import PipelinePredictor

__all__ = ["export_dpg", "export_geneval"]


def export_geneval(
    bundle: str,
    metadata: str,
    out: str,
    n: int = 4,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    solver: Method | None = None,
    grid: bool = True,
    accelerator: str = "auto",
    devices: int | None = None,
    num_nodes: int | None = None,
    strategy: str = "auto",
) -> None:
    """`vugen export-geneval BUNDLE METADATA OUT`: images for GenEval, in its folder layout.

    Args:
        bundle: A vugen bundle folder.
        metadata: GenEval's ``prompts/evaluation_metadata.jsonl`` (one JSON object with a ``prompt`` per line).
        out: Output folder (``<index:05d>/metadata.jsonl``, ``<index:05d>/samples/<k:04d>.png``, ``grid.png``).
        n: Images per prompt (GenEval uses 4).
        seed: Base seed: image ``k`` of prompt ``i`` uses ``seed + i * n + k``.
        steps: Flow-matching steps (default: the bundle's).
        cfg: Classifier-free guidance scale (default: the bundle's).
        solver: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        grid: Also write each prompt's ``grid.png`` (one row).
        accelerator: Lightning accelerator: ``auto`` (a GPU when there is one), ``cpu``, ``gpu``, ...
        devices: Processes on this machine, one per device, started by Lightning (DDP; gloo on CPUs); default:
            what torchrun started (``torchrun --nproc_per_node N --no-python -- vugen COMMAND ...``), else 1.
        num_nodes: Machines; default: what torchrun started, else 1.
        strategy: Lightning strategy (``auto``: DDP for several devices).
    """
    if Path(metadata).suffix != ".jsonl":
        raise ValueError(f"metadata: expected GenEval's evaluation_metadata.jsonl (a .jsonl file), got {metadata}")
    data = PromptDataModule(metadata, images_per_prompt=n, seed=seed)
    predictor = PipelinePredictor(bundle, steps=steps, guidance_scale=cfg, solver=solver)
    predict(predictor, data, GenEvalWriter(out, grid=grid), accelerator, devices, num_nodes, strategy)
    prompts = len(data.prompts)
    layout = "<index>/samples/<k>.png" + (", <index>/grid.png" if grid else "")
    say_written("export-geneval", f"{prompts * n} images of {prompts} prompts", out, f"GenEval's layout: {layout}")


def export_dpg(
    bundle: str,
    prompts_dir: str,
    out: str,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    solver: Method | None = None,
    accelerator: str = "auto",
    devices: int | None = None,
    num_nodes: int | None = None,
    strategy: str = "auto",
) -> None:
    """`vugen export-dpg BUNDLE PROMPTS_DIR OUT`: images for DPG-Bench, ``OUT/<id>.png`` as 2x2 grids.

    Score with the DPG-Bench scorer's ``--resolution`` set to the bundle's image size (recorded in the sidecar).

    Args:
        bundle: A vugen bundle folder.
        prompts_dir: DPG-Bench's ``dpg_bench/prompts`` folder of ``<id>.txt`` files (one prompt each).
        out: Output folder.
        seed: Base seed: image ``k`` of prompt ``i`` (files in name order) uses ``seed + i * 4 + k``.
        steps: Flow-matching steps (default: the bundle's).
        cfg: Classifier-free guidance scale (default: the bundle's).
        solver: ``euler``, ``heun`` or ``sde`` (default: the bundle's).
        accelerator: Lightning accelerator: ``auto`` (a GPU when there is one), ``cpu``, ``gpu``, ...
        devices: Processes on this machine, one per device, started by Lightning (DDP; gloo on CPUs); default:
            what torchrun started (``torchrun --nproc_per_node N --no-python -- vugen COMMAND ...``), else 1.
        num_nodes: Machines; default: what torchrun started, else 1.
        strategy: Lightning strategy (``auto``: DDP for several devices).
    """
    if not Path(prompts_dir).is_dir():
        raise FileNotFoundError(f"prompts_dir: no such folder {prompts_dir} (DPG-Bench's dpg_bench/prompts)")
    data = PromptDataModule(prompts_dir, images_per_prompt=DPG_IMAGES, seed=seed)
    predictor = PipelinePredictor(bundle, steps=steps, guidance_scale=cfg, solver=solver)
    predict(predictor, data, DPGBenchWriter(out), accelerator, devices, num_nodes, strategy)
    prompts = len(data.prompts)
    say_written("export-dpg", f"{prompts} 2x2 grids of {DPG_IMAGES} images", out, "DPG-Bench's layout: <id>.png")
