"""Train the reducer, decoder and sampler stages a few steps under one strategy; write what the distributed tests
compare.

    python tests/distributed_fit.py {single,ddp,fsdp} OUT_DIR TINY_LLAVA_DIR [--stages ...] [--pca-init] [--resume]
        [--decoder-export DIR]

A script, not a test module: Lightning's launcher re-runs this command line as rank 1 (under pytest it would re-run
pytest). Every run trains on the same ``STEPS`` global batches of ``GLOBAL_BATCH`` examples (Shapes images; for the
sampler stage, Shapes captions with fixed random latents, so the vision tower never runs), rank ``r`` taking the
``r``-th contiguous half of each, so a 2-rank run must end with the single process's weights. The randomness of a
step (reducer noise, condition and prompt dropout, diffusion noise and times: torch's global RNG) is seeded per
*micro-batch* of ``RANK_BATCH`` examples, so a rank draws exactly what the single process draws for the same examples
where the single process sees the global batch as ``WORLD_SIZE`` accumulated micro-batches (the decoder and sampler
stages; the reducer stage draws nothing and the single process takes each global batch whole). The sampler stage is
built on ``--decoder-export`` (a decoder-stage export folder).

Per stage, each rank writes ``{stage}-rank{r}.json`` (one file per rank: two ranks' stdout interleave): the
per-example checksums of its batches, the FSDP2 sharding it saw, whether a second ``configure_model`` changed
anything, and the error of the export, if any. Rank 0 writes ``{stage}-initial-weights.pt`` (the trainable weights
the first optimizer step starts from: after PCA with ``--pca-init``), ``{stage}-weights.pt`` (after training), the
checkpoint ``{stage}.ckpt`` (a folder under FSDP2) and the ``export_dir`` export ``{stage}-export`` (stages with an
``export_dir``). ``--resume``
then restarts from that checkpoint for one more step: ``{stage}-restored-weights.pt`` and ``{stage}-resumed.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset, Subset

from vugen.data.shapes import ShapesDataset
from vugen.generation import LatentSamplerConfig
from vugen.nn import DimensionReducer, LatentBridge, PixelDecoder
from vugen.stages import DecoderStage, ReducerStage
from vugen.stages.base import AdapterStage
from vugen.stages.sampler import SamplerStage
from vugen_adapters.llava import LlavaAdapter

STAGES = ("reducer", "decoder", "sampler")
STRATEGIES = ("single", "ddp", "fsdp")
WORLD_SIZE = 2
RANK_BATCH = 8
GLOBAL_BATCH = WORLD_SIZE * RANK_BATCH
STEPS = 3
IMAGE_SIZE = 16
LATENT_DIM = 8
SEED = 0
# Plain SGD: the update is linear in the gradient, so rounding differences in the gradient averaging stay at their
# size in the weights (Adam's normalisation can turn a rounding-level gradient into an lr-sized step).
SGD = functools.partial(torch.optim.SGD, lr=0.05)
# The decoder's diffusion loss starts near 1e2: at lr 0.05 it reached 3e17 by step 3 and NaN at the resumed step 4
# (which NonFiniteGuard stops); at 0.005 it falls steadily (130 -> 19 over those 4 steps).
DECODER_SGD = functools.partial(torch.optim.SGD, lr=0.005)


def training_images() -> ShapesDataset:
    """The ``STEPS * GLOBAL_BATCH`` images of every run, in global order."""
    return ShapesDataset("train", STEPS * GLOBAL_BATCH, image_size=IMAGE_SIZE, seed=SEED)


BRIDGE_METHODS = ("embed", "begin_image", "velocity")
BRIDGE_PATH = "latent_sampler.bridge"  # the sampler stage's latent bridge, as the stage's module names give it


def sampler_bridge(stage: LightningModule) -> LatentBridge | None:
    """The sampler stage's latent bridge (None for other stages)."""
    return stage.get_submodule(BRIDGE_PATH) if isinstance(stage, SamplerStage) else None


def bridge_methods(stage: LightningModule) -> dict[str, int]:
    """Identity of the functions behind the sampler bridge's forward methods (empty for other stages)."""
    bridge = sampler_bridge(stage)
    return {name: id(getattr(bridge, name).__func__) for name in BRIDGE_METHODS} if bridge is not None else {}


class CaptionedLatents(Dataset):
    """The sampler stage's examples: the Shapes captions with fixed random ``[num_tokens, LATENT_DIM]`` latents.

    Args:
        num_tokens: Latent tokens per example (the latent bridge's ``num_tokens``).
    """

    def __init__(self, num_tokens: int) -> None:
        images = training_images()
        self.captions = [images[index]["captions"] for index in range(len(images))]
        self.num_tokens = num_tokens

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        generator = torch.Generator().manual_seed(SEED + index)  # the example's latents, whatever loads it
        latents = torch.randn(self.num_tokens, LATENT_DIM, generator=generator)
        return {"latents": latents, "captions": self.captions[index]}


def training_data(stage: AdapterStage) -> Dataset:
    """The examples of every run of ``stage``, in global order."""
    bridge = sampler_bridge(stage)
    return CaptionedLatents(bridge.num_tokens) if bridge is not None else training_images()


class GlobalBatches(LightningDataModule):
    """``STEPS`` global batches of ``GLOBAL_BATCH`` examples; each rank loads its contiguous slice of each.

    Explicit slices rather than Lightning's ``DistributedSampler``, which Lightning always shuffles for training
    (whatever the loader's ``shuffle``): the Trainer runs with ``use_distributed_sampler=False``.

    Args:
        batch_size: Examples per rank and step (per micro-batch where the single process accumulates).
    """

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        """Rank ``r`` of ``w``: examples ``[k*b*w + r*b, k*b*w + (r+1)*b)`` at step ``k``, for batch size ``b``."""
        examples = training_data(self.trainer.lightning_module)
        rank, span = self.trainer.global_rank, self.batch_size * self.trainer.world_size
        starts = range(rank * self.batch_size, len(examples), span)
        indices = [start + i for start in starts for i in range(self.batch_size)]
        return DataLoader(Subset(examples, indices), batch_size=self.batch_size, shuffle=False)


def build_stage(name: str, checkpoint: str, pca_init: bool = False, decoder_export: str | None = None) -> AdapterStage:
    """A small stage of ``name`` (the sampler on ``decoder_export``), with the same initial weights in every process."""
    seed_everything(SEED, verbose=False)
    adapter = LlavaAdapter(checkpoint)
    if name == "sampler":
        if decoder_export is None:
            raise ValueError("the sampler stage needs --decoder-export")
        stage = SamplerStage(
            adapter,
            decoder_export,
            latent_sampler=LatentSamplerConfig(lora_rank=4, head_width=32, head_depth=1),
            prompt_dropout=0.25,
            optimizer=functools.partial(torch.optim.SGD, lr=0.5),  # its gradients are ~10x smaller than the others'
        )
        # LoRA B and the flow head's output start at zero: no gradient would reach the LM (nor LoRA A) in the first
        # step. Noise makes every trainable weight move from step one, so the comparison covers all of them.
        with torch.no_grad():
            for parameter in stage.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.05 * torch.randn_like(parameter))
        return stage
    if name == "reducer":  # no latent noise: the single process takes a whole global batch, not micro-batches
        reducer = DimensionReducer(adapter.feature_dim, LATENT_DIM, hidden_dim=32, num_blocks=1, noise_gamma=0.0)
        return ReducerStage(adapter, reducer, pca_init=pca_init, optimizer=SGD)
    decoder = PixelDecoder(
        LATENT_DIM, patch_size=4, width=32, depth=2, num_heads=2, image_size=IMAGE_SIZE, cond_drop_prob=0.25
    )
    reducer = DimensionReducer(adapter.feature_dim, LATENT_DIM, hidden_dim=32, num_blocks=1, noise_gamma=0.1)
    # feature_loss_weight > 0: every trainable parameter gets a gradient (DDP refuses unused ones).
    return DecoderStage(
        adapter, decoder, reducer=reducer, pca_init=pca_init, feature_loss_weight=0.1, optimizer=DECODER_SGD
    )


def full_trainable_weights(stage: AdapterStage) -> dict[str, torch.Tensor]:
    """The trainable weights as full tensors; every rank must call it (gathering FSDP2 shards is collective)."""
    trainable = {name for name, p in stage.named_parameters() if p.requires_grad}
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()
        for name, value in stage.state_dict().items()
        if name in trainable
    }


def sharding_report(stage: AdapterStage, block_names: list[str]) -> dict[str, Any]:
    """How parameters are laid out: the trainable ones, and the adapter's FSDP2 units vs its other weights."""
    adapter_units = [m for m in stage.adapter.modules() if isinstance(m, FSDPModule)]
    in_units = {id(p) for m in adapter_units for p in m.parameters()}

    def describe(params: list[torch.nn.Parameter]) -> dict[str, int]:
        dtensors = [p for p in params if isinstance(p, DTensor)]
        return {
            "count": len(params),
            "dtensors": len(dtensors),
            "dim0_shards_of_2": sum(p.device_mesh.size() == 2 and p.placements == (Shard(0),) for p in dtensors),
            "global_numel": sum(p.numel() for p in params),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        }

    adapter_params = list(stage.adapter.parameters())
    return {
        "units": sorted(name for name, m in stage.named_modules() if isinstance(m, FSDPModule)),
        # Trainable weights outside FSDP2 (plain tensors): nothing averages their gradients across ranks.
        "trainable_plain": sorted(
            n for n, p in stage.named_parameters() if p.requires_grad and not isinstance(p, DTensor)
        ),
        "block_classes": block_names,
        # FSDP2 swaps a sharded module's class for a subclass named FSDP<class>.
        "adapter_unit_classes": sorted({type(m).__name__.removeprefix("FSDP") for m in adapter_units}),
        "trainable": describe([p for p in stage.parameters() if p.requires_grad]),
        "adapter_units": describe([p for p in adapter_params if id(p) in in_units]),
        "adapter_rest": describe([p for p in adapter_params if id(p) not in in_units]),
    }


class MicroBatchSeed(Callback):
    """Seeds torch's global RNG per micro-batch of global images, before the stage draws its training noise."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(1000 + batch_idx * trainer.world_size + trainer.global_rank)


class Probe(Callback):
    """Records on each rank what the tests check (see the module docstring)."""

    def __init__(self, out_dir: Path, stage_name: str) -> None:
        self.out_dir, self.stage_name = out_dir, stage_name
        self.report: dict[str, Any] = {"checksums": []}
        self.block_names: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Before configure_model: sharding renames the classes that `block_classes` looks for.
        self.block_names = sorted(c.__name__ for c in pl_module.adapter.block_classes)
        self.report["lora_layers"] = sorted(n for n, m in pl_module.named_modules() if hasattr(m, "lora_A"))
        # The sampler's bridge and each of its children, by their names in the stage (as the FSDP2 units are named).
        bridge = sampler_bridge(pl_module)
        self.report["bridge_modules"] = (
            [BRIDGE_PATH, *(f"{BRIDGE_PATH}.{name}" for name, _ in bridge.named_children())]
            if bridge is not None
            else []
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(trainer.strategy, ModelParallelStrategy):
            # Lightning has called configure_model: a second call must neither fail nor re-wrap anything.
            before = {name: id(p) for name, p in pl_module.named_parameters()}
            methods = bridge_methods(pl_module)
            pl_module.configure_model()
            after = {name: id(p) for name, p in pl_module.named_parameters()}
            self.report["configure_model_twice_same_params"] = before == after
            self.report["configure_model_twice_same_bridge_methods"] = methods == bridge_methods(pl_module)
            # FSDP2 gathers the bridge's parameters in its registered methods: they are wrapped (instance attributes).
            bridge = sampler_bridge(pl_module)
            self.report["bridge_methods_wrapped"] = sorted(m for m in BRIDGE_METHODS if bridge and m in vars(bridge))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        examples = batch["latents" if "latents" in batch else "images"]
        self.report["checksums"].append(examples.flatten(1).sum(1).tolist())
        if batch_idx == 0 and isinstance(trainer.strategy, ModelParallelStrategy):
            self.report["sharding"] = sharding_report(pl_module, self.block_names)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if trainer.global_step == 0:
            save_on_rank_zero(
                trainer, full_trainable_weights(pl_module), self.out_dir / f"{self.stage_name}-initial-weights.pt"
            )


def save_on_rank_zero(trainer: Trainer, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` the weights from rank 0 only (every rank gathered them)."""
    if trainer.is_global_zero:
        torch.save(weights, path)


def make_trainer(strategy: str, stage_name: str, callbacks: list[Callback], max_steps: int = STEPS) -> Trainer:
    """The Trainer of ``strategy``; the single process accumulates the decoder's micro-batches (see module doc)."""
    distributed = strategy != "single"
    strategies = {
        "single": "auto",
        "ddp": "ddp",
        "fsdp": ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1),
    }
    return Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE if distributed else 1,
        strategy=strategies[strategy],
        precision="32-true",
        max_steps=max_steps,
        accumulate_grad_batches=1 if distributed or stage_name == "reducer" else WORLD_SIZE,
        callbacks=[MicroBatchSeed(), *callbacks],
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def batch_size(strategy: str, stage_name: str) -> int:
    """Images per rank and step: the single process takes the reducer's global batches whole."""
    return GLOBAL_BATCH if strategy == "single" and stage_name == "reducer" else RANK_BATCH


def export_error(stage: AdapterStage, directory: Path) -> str | None:
    """Run the stage's ``export_dir`` export as Lightning does at the end of ``fit`` (every rank calls the hook)."""
    stage.export_dir = str(directory)
    try:
        stage.on_fit_end()
    except Exception as error:  # recorded for the test to report; the other checks still run
        return f"{type(error).__name__}: {error}"
    return None


def fit(
    stage_name: str,
    strategy: str,
    out_dir: Path,
    checkpoint: str,
    pca_init: bool = False,
    decoder_export: str | None = None,
) -> Path:
    """Train one stage under ``strategy`` and write its files to ``out_dir``; returns the checkpoint path."""
    stage = build_stage(stage_name, checkpoint, pca_init, decoder_export)
    probe = Probe(out_dir, stage_name)
    trainer = make_trainer(strategy, stage_name, [probe])
    trainer.fit(stage, GlobalBatches(batch_size(strategy, stage_name)))
    save_on_rank_zero(trainer, full_trainable_weights(stage), out_dir / f"{stage_name}-weights.pt")
    path = out_dir / f"{stage_name}.ckpt"
    trainer.save_checkpoint(path)
    if hasattr(stage, "export_dir"):
        probe.report["export_error"] = export_error(stage, out_dir / f"{stage_name}-export")
    (out_dir / f"{stage_name}-rank{trainer.global_rank}.json").write_text(json.dumps(probe.report))
    return path


class RestoredWeights(Callback):
    """Saves the trainable weights a resumed run starts from (restored from the checkpoint before training)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        save_on_rank_zero(trainer, full_trainable_weights(pl_module), self.path)


def resume(
    stage_name: str, strategy: str, out_dir: Path, checkpoint: str, path: Path, decoder_export: str | None = None
) -> None:
    """Restart a fresh stage from ``path`` under ``strategy`` for one more step."""
    stage = build_stage(stage_name, checkpoint, decoder_export=decoder_export)
    restored = RestoredWeights(out_dir / f"{stage_name}-restored-weights.pt")
    trainer = make_trainer(strategy, stage_name, [restored], max_steps=STEPS + 1)
    trainer.fit(stage, GlobalBatches(batch_size(strategy, stage_name)), ckpt_path=path)
    if trainer.is_global_zero:
        (out_dir / f"{stage_name}-resumed.json").write_text(json.dumps({"global_step": trainer.global_step}))


def run(
    strategy: str,
    out_dir: Path,
    checkpoint: str,
    stages: tuple[str, ...] = STAGES,
    pca_init: bool = False,
    resume_too: bool = False,
    decoder_export: str | None = None,
) -> None:
    """Train each stage in turn under ``strategy`` (and resume it with ``resume_too``), writing to ``out_dir``."""
    torch.set_num_threads(1)  # tiny models: a second thread per process only adds contention
    out_dir.mkdir(parents=True, exist_ok=True)
    for stage_name in stages:
        path = fit(stage_name, strategy, out_dir, checkpoint, pca_init, decoder_export)
        if resume_too:
            resume(stage_name, strategy, out_dir, checkpoint, path, decoder_export)


def main() -> None:
    """Parse the command line (see the module docstring) and :func:`run`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategy", choices=STRATEGIES)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("checkpoint", help="a tiny LLaVA folder (vugen_adapters.tiny.build_tiny_vlm)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--pca-init", action="store_true", help="initialise the reducers by PCA")
    parser.add_argument("--resume", action="store_true", help="then resume each stage from its checkpoint")
    parser.add_argument("--decoder-export", help="a decoder-stage export folder, to build the sampler stage on")
    args = parser.parse_args()
    if "sampler" in args.stages and args.decoder_export is None:
        parser.error("the sampler stage needs --decoder-export")
    run(
        args.strategy,
        args.out_dir,
        args.checkpoint,
        tuple(args.stages),
        args.pca_init,
        args.resume,
        args.decoder_export,
    )


if __name__ == "__main__":
    main()
