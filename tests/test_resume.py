"""Exact resume: a `vugen fit` SIGKILLed mid-run and resumed with ``--ckpt_path last.ckpt`` ends at the weights of the
run that was not interrupted (max abs diff <= 1e-6 on CPU; measured 0.0), for every stage on its demo config; the
resumable loader and the image-text sources resume at the right batch.

Per stage, the uninterrupted and the resumed runs run in this process (``VugenCLI``), the killed one as a subprocess
(a real SIGKILL; ~10 s of imports), killed after a step that is not a checkpoint step so that the resumed run
replays steps. Epochs are 6 batches (48 samples, batch 8); validation every 10 steps. The stages cover the kinds of
resume point: the reducer's ``last.ckpt`` is step 20's, saved again at the end of that step's validation (batch 2 of
epoch 3: Lightning fast-forwards the validation on resume); the decoder's is step 24, the last batch of epoch 3 (an
epoch boundary); the sampler's step 28, batch 4 of epoch 4 (mid-epoch, saved at a training batch's end). The
negative controls resume without the data position or the random states (diffs of ~1e-3); a 2-process DDP run
resumes each rank's own random state and data share.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from tests.fixtures_bundle import make_decoder_export
from tests.helpers import QUIET_TRAINER
from tests.resume_callbacks import SaveWeights
from tests.test_distributed import launch_env
from tests.test_image_text_data import caption, write_folder, write_shards
from vugen.callbacks import ExactResume
from vugen.cli import VugenCLI
from vugen.data.image_text import ImageTextDataModule
from vugen.data.latent_writer import write_latent_cache
from vugen.data.resumable import ResumableDataLoader, ResumableSampler
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.nn import DimensionReducer
from vugen.stages import ReducerStage
from vugen_adapters.llava import LlavaAdapter

ROOT = Path(__file__).resolve().parents[1]
STEPS, TRAIN_SIZE, BATCH, VAL_EVERY = 40, 48, 8, 10
TOLERANCE = 1e-6


class StageRun(NamedTuple):
    """How a stage is trained, checkpointed and killed."""

    config: str  # under configs/demo
    every: int  # ModelCheckpoint(every_n_train_steps)
    kill_at: int  # SIGKILL after this optimizer step
    resumes_at: dict[str, int]  # the position saved in last.ckpt: {"epoch", "batches"}


STAGES = {
    "reducer": StageRun("reducer.yaml", every=5, kill_at=23, resumes_at={"epoch": 3, "batches": 2}),
    "decoder": StageRun("decoder.yaml", every=6, kill_at=27, resumes_at={"epoch": 4, "batches": 0}),
    "sampler": StageRun("sampler.yaml", every=7, kill_at=30, resumes_at={"epoch": 4, "batches": 4}),
}


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_llava(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llava"))


@pytest.fixture(scope="module")
def reducer_export(tiny_llava, tmp_path_factory) -> Path:
    """A random reducer export: the decoder stage's ``reducer_path`` (stage 1's output)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("reducer") / "reducer"
    DimensionReducer(LlavaAdapter(tiny_llava).feature_dim, 8, hidden_dim=16, num_blocks=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sampler_inputs(tiny_llava, tmp_path_factory) -> dict[str, Path]:
    """A random decoder export (16 px) and the train / val latent caches of Shapes under its reducer."""
    root = tmp_path_factory.mktemp("sampler-inputs")
    adapter = LlavaAdapter(tiny_llava, dtype="float32")  # as in the sampler config
    export = make_decoder_export(adapter, root / "decoder-stage")
    reducer = DimensionReducer.from_pretrained(export / "reducer")
    shapes = ShapesDataModule(image_size=16, train_size=TRAIN_SIZE, val_size=BATCH, batch_size=BATCH)
    for split in ("train", "val"):
        write_latent_cache(shapes, adapter, reducer, root / split, split=split, progress=False)
    return {"export": export, "train": root / "train", "val": root / "val"}


def stage_args(stage: str, tiny_llava: str, reducer: Path | None, sampler_inputs: dict[str, Path] | None) -> list[str]:
    """Small sizes of the stage's model and data on top of its demo config."""
    model = [f"--model.init_args.adapter.init_args.pretrained={tiny_llava}", "--model.init_args.export_dir=null"]
    if stage == "reducer":
        model += [
            "--model.init_args.reducer.init_args.hidden_dim=16",
            "--model.init_args.reducer.init_args.num_blocks=1",
        ]
    elif stage == "decoder":
        decoder = {"width": 32, "depth": 1, "num_heads": 2, "patch_size": 8}
        model += [f"--model.init_args.decoder.init_args.{key}={value}" for key, value in decoder.items()]
        model += [f"--model.init_args.reducer_path={reducer}", "--model.init_args.sampling.steps=2"]
    else:
        shape = {"lora_rank": 4, "lora_alpha": 4.0, "head_width": 32, "head_depth": 1}
        sampler = {f"latent_sampler.{key}": value for key, value in shape.items()} | {"sampling.steps": 2}
        model = [arg for arg in model if "export_dir" not in arg]
        model += [f"--model.init_args.{key}={value}" for key, value in sampler.items()]
        model += [f"--model.init_args.decoder_export={sampler_inputs['export']}"]
        data = [f"--data.init_args.cache_dir={sampler_inputs['train']}", f"--data.init_args.batch_size={BATCH}"]
        return model + data + [f"--data.init_args.val_cache_dir={sampler_inputs['val']}"]
    data = [f"--data.init_args.train_size={TRAIN_SIZE}", f"--data.init_args.batch_size={BATCH}"]
    return model + data + [f"--data.init_args.val_size={BATCH}"]


def trainer_config(
    out: Path, stage: str, every: int, kill_at: int | None = None, extra: tuple[str, ...] = (), **trainer: Any
) -> Path:
    """A config layered over the stage's: its callbacks (checkpoints of every ``every`` steps, the final weights,
    the decoder's EMA and grids, the ``extra`` callback classes) and quick settings."""
    checkpoints = {"dirpath": str(out / "checkpoints"), "filename": "{step}", "every_n_train_steps": every}
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": checkpoints | {"save_last": True, "save_top_k": -1},
        },
        {"class_path": "tests.resume_callbacks.SaveWeights", "init_args": {"path": str(out / "weights.pt")}},
    ]
    if stage == "decoder":  # as its demo config: the EMA and the grids (whose loader draws from the global RNG)
        callbacks += [
            {"class_path": "vugen.callbacks.EMA", "init_args": {"decay": 0.9}},
            {"class_path": "vugen.callbacks.ReconstructionGrid", "init_args": {"num_images": 4}},
        ]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.resume_callbacks.KillAfterStep", "init_args": {"step": kill_at}})
    callbacks += [{"class_path": class_path} for class_path in extra]
    logger = False
    if stage == "decoder":
        tensorboard = {"save_dir": str(out / "logs"), "name": "decoder"}
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": tensorboard}
    settings = {"max_steps": STEPS, "val_check_interval": VAL_EVERY, "limit_val_batches": 1, "logger": logger}
    settings["default_root_dir"] = str(out)  # where LightningCLI writes the run's config.yaml without a logger
    settings |= {"enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks}
    path = out / "trainer.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"trainer": settings | trainer}))
    return path


class Runs:
    """The runs of one stage: ``fit(name, ...)`` in this process, ``killed()`` as a subprocess; outputs under
    ``root / name``."""

    def __init__(self, stage: str, root: Path, args: list[str], extra: tuple[str, ...] = ()) -> None:
        self.stage, self.root, self.args, self.extra = stage, root, args, extra
        self.spec = STAGES[stage]

    def command(self, name: str, kill_at: int | None = None, ckpt: Path | None = None, **trainer: Any) -> list[str]:
        config = trainer_config(self.root / name, self.stage, self.spec.every, kill_at, self.extra, **trainer)
        args = ["fit", "--config", str(ROOT / "configs/demo" / self.spec.config), "--config", str(config), *self.args]
        return args + ([f"--ckpt_path={ckpt}"] if ckpt is not None else [])

    def fit(self, name: str, ckpt: Path | None = None, **trainer: Any) -> dict[str, torch.Tensor]:
        """Train in this process; the final weights."""
        VugenCLI(args=self.command(name, ckpt=ckpt, **trainer))
        return self.weights(name)

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        return torch.load(self.root / name / "weights.pt", weights_only=True)

    def checkpoint(self, name: str, file: str = "last.ckpt") -> Path:
        return self.root / name / "checkpoints" / file

    @functools.cached_property
    def uninterrupted(self) -> dict[str, torch.Tensor]:
        return self.fit("uninterrupted")

    def launch(self, name: str, kill_at: int | None = None, ckpt: Path | None = None, **trainer: Any) -> int:
        """Train in a subprocess (``vugen fit``, which may launch more ranks); its exit status."""
        command = [sys.executable, "-m", "vugen.cli", *self.command(name, kill_at, ckpt, **trainer)]
        env = launch_env()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode in (0, -9), result.stderr[-4000:]
        return result.returncode

    @functools.cached_property
    def killed(self) -> Path:
        """``last.ckpt`` of the run SIGKILLed after step ``kill_at``."""
        assert self.launch("killed", kill_at=self.spec.kill_at) == -9  # killed, not finished
        return self.checkpoint("killed")


@pytest.fixture(scope="module")
def runs(request, tiny_llava, tmp_path_factory) -> Callable[[str], Runs]:
    """``runs(stage)``: the stage's runs, each made once per module (with the inputs the stage needs)."""
    made: dict[str, Runs] = {}

    def get(stage: str) -> Runs:
        if stage not in made:
            reducer = request.getfixturevalue("reducer_export") if stage == "decoder" else None
            inputs = request.getfixturevalue("sampler_inputs") if stage == "sampler" else None
            args = stage_args(stage, tiny_llava, reducer, inputs)
            made[stage] = Runs(stage, tmp_path_factory.mktemp(stage), args)
        return made[stage]

    return get


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


def data_position(checkpoint: Path) -> dict[str, int]:
    (state,) = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state


def without(checkpoint: Path, out: Path, data_position: bool = False, random_states: bool = False) -> Path:
    """A copy of ``checkpoint`` without the loader state and / or the random states (as before exact resume)."""
    state = torch.load(checkpoint, weights_only=True)
    if data_position:
        del state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    if random_states:
        del state["callbacks"]["ExactResume"]
    torch.save(state, out)
    return out


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    "stage", ["reducer", *(pytest.param(stage, marks=pytest.mark.slow) for stage in ("decoder", "sampler"))]
)
def test_a_killed_fit_resumes_to_the_weights_of_the_uninterrupted_run(runs, stage):
    run = runs(stage)
    killed = run.killed
    assert data_position(killed) | STAGES[stage].resumes_at == data_position(killed)
    resumed = run.fit("resumed", ckpt=killed)
    start = torch.load(killed, weights_only=True)["state_dict"]
    assert max_diff(resumed, start) > 100 * TOLERANCE  # what training did after the resume point is far above it
    assert max_diff(resumed, run.uninterrupted) <= TOLERANCE


def test_without_the_data_position_or_the_random_states_a_resume_differs(runs, tmp_path):
    """The negative controls: the checkpoint of the killed run without what exact resume adds."""
    run = runs("reducer")
    for name, removed in (("no-position", {"data_position": True}), ("no-rng", {"random_states": True})):
        checkpoint = without(run.killed, tmp_path / f"{name}.ckpt", **removed)
        assert max_diff(run.fit(name, ckpt=checkpoint), run.uninterrupted) > 100 * TOLERANCE, name


def test_a_second_resume_in_the_same_epoch_is_exact(runs):
    """From step 25 (batch 1 of epoch 4) saved by the resumed run: positions count across resumes."""
    run = runs("reducer")
    if not run.checkpoint("resumed", "step=25.ckpt").is_file():
        run.fit("resumed", ckpt=run.killed)
    second = run.checkpoint("resumed", "step=25.ckpt")
    assert data_position(second) | {"epoch": 4, "batches": 1} == data_position(second)
    assert max_diff(run.fit("resumed-twice", ckpt=second), run.uninterrupted) <= TOLERANCE


def test_training_does_not_depend_on_validation(runs, monkeypatch):
    """Validation and the sanity check run on a fork of the random state: a run without them trains the same, which
    it does not when the fork is switched off (the reducer's validation draws from the global RNG)."""
    run = runs("reducer")
    unvalidated = run.fit("unvalidated", limit_val_batches=0, num_sanity_val_steps=0)
    assert max_diff(unvalidated, run.uninterrupted) == 0.0
    for hook in ("on_validation_end", "on_sanity_check_end"):
        monkeypatch.setattr(ExactResume, hook, lambda *args: None)
    assert max_diff(run.fit("validated-unforked"), unvalidated) > 100 * TOLERANCE


def test_the_sampler_resumes_exactly_from_image_batches(runs, tmp_path):
    """The sampler stage on Shapes images (the VLM encodes them) instead of a latent cache."""
    run = runs("sampler")
    shapes = {"class_path": "vugen.data.shapes_datamodule.ShapesDataModule"}
    shapes["init_args"] = {"image_size": 16, "train_size": TRAIN_SIZE, "val_size": BATCH, "batch_size": BATCH}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": shapes}))
    images = Runs("sampler", tmp_path, [arg for arg in run.args if not arg.startswith("--data.")])
    images.args += ["--config", str(tmp_path / "data.yaml")]
    uninterrupted = images.fit("uninterrupted")
    checkpoint = images.checkpoint("uninterrupted", "step=21.ckpt")  # batch 3 of epoch 3
    assert data_position(checkpoint) | {"epoch": 3, "batches": 3} == data_position(checkpoint)
    assert max_diff(images.fit("resumed", ckpt=checkpoint), uninterrupted) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------- the loader
class Indices(Dataset):
    """Item ``i`` is ``i``; records every index loaded."""

    def __init__(self, size: int) -> None:
        self.size, self.loaded = size, []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        self.loaded.append(index)
        return index


def batches(loader: ResumableDataLoader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("used", [0, 2, 5])
def test_a_loader_resumes_with_the_rest_of_its_epoch_then_the_same_epochs(used):
    def loader(dataset: Dataset) -> ResumableDataLoader:
        return ResumableDataLoader(dataset, batch_size=3, shuffle=True, seed=4, drop_last=True)

    reference = loader(Indices(17))
    epochs = [batches(reference) for _ in range(3)]
    assert len({tuple(map(tuple, epoch)) for epoch in epochs}) == 3 and all(len(epoch) == 5 for epoch in epochs)
    interrupted = loader(Indices(17))
    iterator = iter(interrupted)
    assert [next(iterator).tolist() for _ in range(used)] == epochs[0][:used]
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"]) == (0, used)

    dataset = Indices(17)
    resumed = loader(dataset)
    resumed.load_state_dict(state)
    assert batches(resumed) == epochs[0][used:]
    assert dataset.loaded == [i for batch in epochs[0][used:] for i in batch]  # the skipped batches were not loaded
    assert [batches(resumed), batches(resumed)] == epochs[1:]


def test_the_trainers_count_sets_the_position_and_an_epoch_end_the_next_epoch():
    def shuffled() -> ResumableDataLoader:
        return ResumableDataLoader(Indices(12), batch_size=2, shuffle=True)

    loader = shuffled()
    iterator = iter(loader)
    next(iterator), next(iterator), next(iterator)  # the trainer fetched 3 and trained 2
    loader.report_progress(2, epoch_done=False)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches"]) == (0, 2)
    loader.report_progress(6, epoch_done=True)  # also an epoch cut short (limit_train_batches)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches"]) == (1, 0)
    resumed, reference = shuffled(), shuffled()
    resumed.load_state_dict(loader.state_dict())
    reference.set_epoch(1)
    assert batches(resumed) == batches(reference) != batches(shuffled())


def test_ranks_share_each_epoch_and_resume_their_share():
    def rank_loader(rank: int) -> ResumableDataLoader:
        sampler = ResumableSampler(Indices(10), shuffle=True, seed=1, num_replicas=2, rank=rank)
        return ResumableDataLoader(Indices(10), batch_size=2, sampler=sampler)

    shares = [batches(rank_loader(rank)) for rank in range(2)]
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(10))
    for rank, share in enumerate(shares):
        interrupted = rank_loader(rank)
        next(iter(interrupted))
        resumed = rank_loader(rank)
        resumed.load_state_dict(interrupted.state_dict() | {"world_size": 2})
        assert batches(resumed) == share[1:]


def test_another_batch_size_warns_and_starts_the_epoch_again():
    loader = ResumableDataLoader(Indices(12), batch_size=2, shuffle=True)
    next(iter(loader))
    other = ResumableDataLoader(Indices(12), batch_size=3, shuffle=True)
    with pytest.warns(UserWarning, match=r"batch_size': 2.*batch_size': 3.*starts again from its first batch"):
        other.load_state_dict(loader.state_dict())
    assert len(batches(other)) == 4
    with pytest.raises(ValueError, match="a ResumableDataLoader state has the keys"):
        other.load_state_dict({"epoch": 0})


def test_iterating_draws_nothing_from_the_global_random_state():
    state = torch.get_rng_state()
    for loader in (ResumableDataLoader(Indices(8), batch_size=2, shuffle=True), ResumableDataLoader(Indices(8))):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)
    next(iter(DataLoader(Indices(8), batch_size=2, shuffle=True)))  # the control: torch's draws its seeds there
    assert not torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------- image-text data
@pytest.mark.parametrize(
    ("source", "workers"), [("folder", 0), ("folder", 2), ("shards", 0), ("shards", 2)], ids=lambda value: str(value)
)
def test_image_text_training_batches_resume_at_the_right_position(tmp_path, source, workers):
    """An image folder (map-style, skipped by index) and WebDataset shards (iterable, shuffled per worker in a
    shared-memory epoch: persistent workers see it too; skipped by loading)."""
    if source == "folder":
        options = {"root": str(write_folder(tmp_path, 12, "jsonl"))}
    else:
        options = {"shards": write_shards(tmp_path, num_shards=4, per_shard=3), "shuffle_buffer": 4}

    def loader() -> ResumableDataLoader:
        datamodule = ImageTextDataModule(**options, image_size=16, batch_size=2, num_workers=workers, seed=5)
        datamodule.setup("fit")
        return datamodule.train_dataloader()

    def captions(loader: ResumableDataLoader) -> list[list[str]]:
        return [batch["captions"] for batch in loader]

    reference = loader()
    epochs = [captions(reference) for _ in range(2)]
    assert epochs[0] != epochs[1] and sorted(sum(epochs[0], [])) == sorted(caption(i) for i in range(12))
    interrupted = loader()
    iterator = iter(interrupted)
    for _ in range(4):
        next(iterator)
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    assert [captions(resumed), captions(resumed)] == [epochs[0][4:], epochs[1]]
    # Shut the workers down now: the datamodules sit in reference cycles that hold this frame (Lightning's
    # save_hyperparameters inspects the calling frames), and workers that the cyclic GC collects later, e.g. inside
    # an import, wait 5 s each to shut down.
    del reference, interrupted, iterator, resumed


def test_shards_resume_exactly_under_lightning(tiny_llava, tmp_path):
    """WebDataset shards with 2 workers under Lightning, which fetches one batch ahead of an unsized loader."""
    pattern = write_shards(tmp_path, num_shards=4, per_shard=3)

    def fit(name: str, ckpt: Path | None = None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        adapter = LlavaAdapter(tiny_llava)
        stage = ReducerStage(adapter, DimensionReducer(adapter.feature_dim, 8, hidden_dim=16, num_blocks=1))
        data = ImageTextDataModule(shards=pattern, image_size=16, batch_size=2, num_workers=2, shuffle_buffer=4)
        checkpoints = ModelCheckpoint(tmp_path / name, every_n_train_steps=5, save_top_k=-1, filename="{step}")
        callbacks = [checkpoints, SaveWeights(str(tmp_path / f"{name}.pt"))]
        settings = QUIET_TRAINER | {"enable_checkpointing": True, "max_steps": 16, "callbacks": callbacks}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning on unsized loaders and few batches
            Trainer(**settings).fit(stage, datamodule=data, ckpt_path=ckpt)
        return torch.load(tmp_path / f"{name}.pt", weights_only=True)

    uninterrupted = fit("uninterrupted")
    checkpoint = tmp_path / "uninterrupted" / "step=10.ckpt"  # batch 4 of epoch 1 (6 batches: 2 workers x 3)
    assert data_position(checkpoint) | {"epoch": 1, "batches": 4} == data_position(checkpoint)
    assert max_diff(fit("resumed", ckpt=checkpoint), uninterrupted) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_ddp_processes_resume_their_own_random_states_and_data_shares(tiny_llava, tmp_path):
    """2-process DDP (gloo, ``vugen fit`` launching rank 1): each rank restores its own random state (the ranks are
    seeded apart, so rank 0's state on both would differ) and its share of the epoch (3 batches of 8 per rank)."""
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    run = Runs(
        "reducer",
        tmp_path,
        stage_args("reducer", tiny_llava, None, None) + ddp,
        ("tests.resume_callbacks.SeedPerRank",),
    )
    assert run.launch("uninterrupted", max_steps=20) == 0
    checkpoint = run.checkpoint("uninterrupted", "step=10.ckpt")  # batch 1 of epoch 3
    assert data_position(checkpoint) | {"epoch": 3, "batches": 1, "world_size": 2} == data_position(checkpoint)
    streams = torch.load(checkpoint, weights_only=True)["callbacks"]["ExactResume"]["rng"]
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])
    assert run.launch("resumed", ckpt=checkpoint, max_steps=20) == 0
    assert max_diff(run.weights("resumed"), run.weights("uninterrupted")) <= TOLERANCE
