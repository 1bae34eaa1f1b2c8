"""EMA and ReconstructionGrid callbacks, run inside real Lightning Trainers with tiny modules."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from vugen.callbacks import EMA, ReconstructionGrid
from vugen.data.shapes_datamodule import ShapesDataModule

QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
TRAINABLE = {"net.weight", "net.bias"}

# ---------------------------------------------------------------------------------------------------------------- EMA


class TinyRegression(LightningModule):
    """A trainable Linear beside a frozen one; records the weights its validation and test steps see."""

    def __init__(self, check_ema_in_eval: bool = False, shard: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Linear(4, 2)
            self.frozen = nn.Linear(4, 2).requires_grad_(False)
        self.frozen_init = self.frozen.weight.detach().clone()
        self.check_ema_in_eval = check_ema_in_eval
        self.shard = shard
        self.eval_weights: list[tuple[int, Tensor]] = []

    def configure_model(self) -> None:
        if self.shard and not isinstance(self.net.weight, DTensor):
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x) + self.frozen(x), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        if self.check_ema_in_eval:
            ema = next(callback for callback in self.trainer.callbacks if isinstance(callback, EMA))
            assert torch.equal(self.net.weight, ema.averages["net.weight"])
            assert torch.equal(self.net.bias, ema.averages["net.bias"])
        self.eval_weights.append((self.trainer.global_step, _full(self.net.weight).clone()))

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.2, momentum=0.9)


class Trajectory(Callback):
    """Records the trainable weights at the start and after every optimizer step: ``[(global_step, {name: w})]``."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, Tensor]]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.global_step != self.steps[-1][0]:
            self._record(trainer, pl_module)

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights = {name: _full(p).clone() for name, p in pl_module.named_parameters() if p.requires_grad}
        self.steps.append((trainer.global_step, weights))


def _full(tensor: Tensor) -> Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def _loader(batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :2] * 2.0 - 1.0), batch_size=batch_size)  # fixed order


def _fit(
    model: TinyRegression,
    callbacks: list[Callback],
    batch_size: int = 4,
    val: bool = False,
    ckpt_path: str | None = None,
    **kwargs: object,
) -> None:
    kwargs = {"logger": False, "enable_checkpointing": False, "num_sanity_val_steps": 0, **QUIET, **kwargs}
    if val:
        kwargs.update(val_check_interval=2, limit_val_batches=1)
    loaders = (_loader(batch_size), _loader() if val else None)
    Trainer(callbacks=callbacks, **kwargs).fit(model, *loaders, ckpt_path=ckpt_path)


def reference_ema(
    trajectory: list[tuple[int, dict[str, Tensor]]], decay: float, warmup: bool = True, every: int = 1, start: int = 0
) -> tuple[dict[int, dict[str, Tensor]], int]:
    """The EMA recursion in float64 over a recorded trajectory: the average after each step, and the update count."""
    (_, initial), *steps = trajectory
    average = {name: w.double() for name, w in initial.items()}
    history, updates = {0: average}, 0
    for step, weights in steps:
        if step <= start:
            average = {name: w.double() for name, w in weights.items()}
        elif step % every == 0:
            d = min(decay, (1 + updates) / (10 + updates)) if warmup else decay
            average = {name: d * average[name] + (1 - d) * weights[name].double() for name in average}
            updates += 1
        history[step] = average
    return history, updates


def _assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(_full(actual[name]).double(), expected[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {"decay": 0.9},
        {"decay": 0.7, "warmup": False, "update_every_n_steps": 2, "start_step": 3},
    ],
)
def test_ema_matches_reference_recursion_once_per_optimizer_step(options: dict) -> None:
    model, trajectory, ema = TinyRegression(), Trajectory(), EMA(**options)
    _fit(model, [trajectory, ema], max_steps=6, accumulate_grad_batches=2)

    assert [step for step, _ in trajectory.steps] == list(range(7))  # 12 batches, one record per optimizer step
    every, start = options.get("update_every_n_steps", 1), options.get("start_step", 0)
    history, updates = reference_ema(trajectory.steps, options["decay"], options.get("warmup", True), every, start)
    assert ema.num_updates == updates == (6 if every == 1 else 2)
    assert set(ema.averages) == TRAINABLE  # the frozen Linear is not tracked
    assert all(average.dtype == torch.float32 for average in ema.averages.values())
    _assert_close(ema.averages, history[6])
    # apply_at_end: the model now holds the averages, which differ from the last training weights; frozen untouched.
    _assert_close(dict(model.net.named_parameters(prefix="net")), history[6])
    assert not torch.allclose(model.net.weight, trajectory.steps[-1][1]["net.weight"], atol=1e-3)
    assert torch.equal(model.frozen.weight, model.frozen_init)


def test_ema_validates_with_averages_and_restores_training_weights() -> None:
    model, trajectory = TinyRegression(check_ema_in_eval=True), Trajectory()
    _fit(model, [trajectory, EMA(decay=0.9, apply_at_end=False)], val=True, max_steps=6)
    plain, plain_trajectory = TinyRegression(), Trajectory()
    _fit(plain, [plain_trajectory], val=True, max_steps=6)

    history, _ = reference_ema(trajectory.steps, 0.9)
    weights = dict(trajectory.steps)
    assert [step for step, _ in model.eval_weights] == [2, 4, 6]
    for step, seen in model.eval_weights:
        torch.testing.assert_close(seen.double(), history[step]["net.weight"], atol=1e-6, rtol=0)
        assert not torch.allclose(seen, weights[step]["net.weight"], atol=1e-3)
    # Training went on from the training weights: the same trajectory as without EMA, and no averages applied.
    for (step, ours), (plain_step, theirs) in zip(trajectory.steps, plain_trajectory.steps, strict=True):
        assert step == plain_step and torch.equal(ours["net.weight"], theirs["net.weight"])
    assert torch.equal(model.net.weight, weights[6]["net.weight"])


def _resume_case(tmp_path: Path, shard: bool = False) -> None:
    """Fit 4 steps with a checkpoint, resume to 8: the averages equal an uninterrupted 8-step run's.

    One batch per epoch: Lightning 2.6 resumes an epoch-end checkpoint of a plain DataLoader with one extra batch of
    the old epoch (measured), which would change the data order, not the EMA's correctness.
    """

    def sharding() -> dict:  # a fresh strategy per Trainer
        return {"strategy": ModelParallelStrategy(), "devices": 1} if shard else {}

    whole, whole_ema = TinyRegression(shard=shard), EMA(decay=0.9)
    _fit(whole, [whole_ema], batch_size=16, max_steps=8, **sharding())

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="first")
    first, first_trajectory = TinyRegression(shard=shard), Trajectory()
    first_callbacks = [first_trajectory, EMA(decay=0.9), checkpoint]
    _fit(first, first_callbacks, batch_size=16, max_steps=4, enable_checkpointing=True, **sharding())
    path = checkpoint.best_model_path

    resumed, resumed_ema = TinyRegression(shard=shard), EMA(decay=0.9)
    _fit(resumed, [resumed_ema], batch_size=16, max_steps=8, ckpt_path=path, **sharding())

    assert resumed_ema.num_updates == whole_ema.num_updates == 8
    _assert_close(resumed_ema.averages, {name: _full(t).double() for name, t in whole_ema.averages.items()})
    if shard:
        assert all(isinstance(average, DTensor) for average in whole_ema.averages.values())
        return
    # The checkpoint holds the training weights in the model's state_dict, the averages in the callback's state.
    saved = torch.load(path, weights_only=False)
    history, _ = reference_ema(first_trajectory.steps, 0.9)
    assert torch.equal(saved["state_dict"]["net.weight"], first_trajectory.steps[-1][1]["net.weight"])
    (state,) = [s for key, s in saved["callbacks"].items() if key.startswith("EMA")]
    _assert_close(state["averages"], history[4])
    # Testing from the checkpoint with the callback uses its averages.
    tested = TinyRegression()
    Trainer(callbacks=[EMA(decay=0.9)], logger=False, enable_checkpointing=False, **QUIET).test(
        tested, _loader(16), ckpt_path=path
    )
    assert len(tested.eval_weights) == 1
    torch.testing.assert_close(tested.eval_weights[0][1].double(), history[4]["net.weight"], atol=1e-6, rtol=0)
    assert torch.equal(tested.net.weight, saved["state_dict"]["net.weight"])  # swapped back after testing


def test_ema_resume_from_checkpoint_equals_uninterrupted_run(tmp_path: Path) -> None:
    _resume_case(tmp_path)


@pytest.fixture
def single_process_group():
    """Keep what ModelParallelStrategy sets up in this process (a 1-rank process group, MASTER_PORT, LOCAL_RANK,
    OMP_NUM_THREADS and the torch thread count) from leaking into later tests."""
    environment, threads = dict(os.environ), torch.get_num_threads()
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)


def test_ema_of_sharded_parameters_keeps_dtensor_shards_and_resumes(tmp_path: Path, single_process_group) -> None:
    _resume_case(tmp_path, shard=True)


_TWO_RANK_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from tests.test_callbacks import EMA, TinyRegression, _fit, _full

def run(max_steps, callbacks, **kwargs):
    kwargs.update(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2)
    _fit(TinyRegression(shard=True), callbacks, batch_size=8, max_steps=max_steps, **kwargs)

whole, checkpoint, resumed = EMA(decay=0.9), ModelCheckpoint(dirpath={out!r}, filename="first"), EMA(decay=0.9)
run(8, [whole])
run(4, [EMA(decay=0.9), checkpoint], enable_checkpointing=True)
run(8, [resumed], ckpt_path=checkpoint.best_model_path)
result = {{
    "local_shapes": {{name: list(average.to_local().shape) for name, average in whole.averages.items()}},
    "whole": {{name: _full(average).tolist() for name, average in whole.averages.items()}},
    "resumed": {{name: _full(average).tolist() for name, average in resumed.averages.items()}},
}}
if torch.distributed.get_rank() == 0:
    json.dump(result, open({result!r}, "w"))
"""


@pytest.mark.slow
def test_ema_on_two_fsdp2_ranks_equals_unsharded_run(tmp_path: Path) -> None:
    """Two CPU ranks, each holding half of every average: resuming is exact, and the averages are the
    single-process ones (the two ranks' half batches average to the full batch)."""
    script, result = tmp_path / "two_ranks.py", tmp_path / "result.json"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(_TWO_RANK_SCRIPT.format(root=root, out=str(tmp_path), result=str(result)))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = json.loads(result.read_text())
    assert ranks["local_shapes"] == {"net.weight": [1, 4], "net.bias": [1]}

    plain = EMA(decay=0.9)
    _fit(TinyRegression(), [plain], batch_size=16, max_steps=8)
    for name, average in plain.averages.items():
        assert torch.equal(torch.tensor(ranks["resumed"][name]), torch.tensor(ranks["whole"][name]))
        torch.testing.assert_close(torch.tensor(ranks["whole"][name]), average, atol=1e-6, rtol=0)


def test_ema_rejects_a_state_that_does_not_match_the_module() -> None:
    ema = EMA()
    ema.load_state_dict({"num_updates": 1, "averages": {"net.weight": torch.zeros(3, 4), "extra": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"TinyRegression.*missing \['net.bias'\], unexpected \['extra'\].*net.weight"):
        _fit(TinyRegression(), [ema], max_steps=1)
    with pytest.raises(ValueError, match="keys"):
        EMA().load_state_dict({"ema": {}})
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


# ------------------------------------------------------------------------------------------------- ReconstructionGrid
SIZE = 16  # image side


class TinyAutoencoder(LightningModule):
    """``reconstruct`` = images * gain + noise drawn from the generator; records its mode on each call."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(1, 1).eval()
        self.calls: list[tuple[bool, bool]] = []

    def reconstruct(self, images: Tensor, generator: torch.Generator) -> Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        noise = torch.rand(images.shape, generator=generator, device=images.device)
        return images * self.gain + 0.2 * noise

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return (self.gain - 0.5) ** 2 + 0 * batch["images"].mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> ShapesDataModule:
    return ShapesDataModule(image_size=SIZE, train_size=16, val_size=8, test_size=8, batch_size=4, seed=3)


def _grid_trainer(log_dir: Path | None, callback: ReconstructionGrid, **kwargs: object) -> Trainer:
    logger = TensorBoardLogger(log_dir, name="", version="") if log_dir else False
    return Trainer(
        callbacks=[callback], logger=logger, enable_checkpointing=False, limit_val_batches=1, **QUIET, **kwargs
    )


def _images(log_dir: Path, tag: str) -> list[tuple[int, np.ndarray]]:
    """``[(step, HxWx3 uint8)]`` of the TensorBoard images under ``tag``."""
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    decoded = []
    for event in events.Images(tag):
        pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert pixels.shape == (event.height, event.width, 3)
        decoded.append((event.step, pixels))
    return decoded


def _row(grid: np.ndarray, row: int, count: int) -> list[np.ndarray]:
    """The ``count`` tiles of ``row`` (0 inputs, 1 reconstructions, 2 differences) of a grid with padding 2."""
    top = 2 + row * (SIZE + 2)
    return [grid[top : top + SIZE, 2 + i * (SIZE + 2) : 2 + i * (SIZE + 2) + SIZE] for i in range(count)]


def _as_uint8(images: Tensor) -> list[np.ndarray]:
    """What TensorBoard stores for float images in [0, 1]: x * 255 truncated."""
    return [(image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8) for image in images]


def test_grid_logged_on_fixed_images_at_each_validation_and_at_test(tmp_path: Path) -> None:
    count = 5
    model, data = TinyAutoencoder(), _data()
    trainer = _grid_trainer(tmp_path, ReconstructionGrid(num_images=count), max_steps=4, val_check_interval=2)
    trainer.fit(model, data)  # the sanity check runs and is skipped
    trainer.test(model, data)

    logged = _images(tmp_path, "reconstructions")
    assert [step for step, _ in logged] == [2, 4]
    width, height = count * SIZE + (count + 1) * 2, 3 * SIZE + 4 * 2
    val_images = torch.stack([data.dataset("val")[i]["images"] for i in range(count)])
    expected_inputs = _as_uint8(val_images)
    for _, grid in logged:
        assert grid.shape == (height, width, 3)
        for tile, expected in zip(_row(grid, 0, count), expected_inputs, strict=True):
            np.testing.assert_array_equal(tile, expected)
        inputs, recons, diffs = (np.stack(_row(grid, r, count)).astype(int) for r in range(3))
        assert np.abs(diffs - np.abs(inputs - recons)).max() <= 1  # |input - recon|, up to the uint8 truncations
        assert diffs.max() > 0
    # The gain trained between the two validations, so the reconstructions moved while the inputs did not.
    assert not np.array_equal(_row(logged[0][1], 1, count)[0], _row(logged[1][1], 1, count)[0])
    assert set(model.calls) == {(False, False)}  # eval mode, no grad

    ((step, test_grid),) = _images(tmp_path, "reconstructions/test")
    assert step == 4 and test_grid.shape == (height, width, 3)
    test_images = torch.stack([data.dataset("test")[i]["images"] for i in range(count)])
    for tile, expected in zip(_row(test_grid, 0, count), _as_uint8(test_images), strict=True):
        np.testing.assert_array_equal(tile, expected)


def test_grid_every_n_validations_on_train_images(tmp_path: Path) -> None:
    callback = ReconstructionGrid(num_images=3, every_n_validations=2, split="train", tag="train_recon")
    data = _data()
    _grid_trainer(tmp_path, callback, max_steps=4, val_check_interval=1, num_sanity_val_steps=0).fit(
        TinyAutoencoder(), data
    )
    logged = _images(tmp_path, "train_recon")
    assert [step for step, _ in logged] == [2, 4]
    # The first dataset samples, not the shuffled first batch.
    train_images = torch.stack([data.dataset("train")[i]["images"] for i in range(3)])
    for tile, expected in zip(_row(logged[0][1], 0, 3), _as_uint8(train_images), strict=True):
        np.testing.assert_array_equal(tile, expected)


def test_grid_reconstructions_are_fixed_by_the_seed(tmp_path: Path) -> None:
    def validate(name: str, seed: int) -> np.ndarray:
        _grid_trainer(tmp_path / name, ReconstructionGrid(num_images=2, seed=seed)).validate(TinyAutoencoder(), _data())
        ((step, grid),) = _images(tmp_path / name, "reconstructions")
        assert step == 0
        return grid

    first, again, other = validate("a", 0), validate("b", 0), validate("c", 1)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(_row(first, 0, 2), _row(other, 0, 2))
    assert not np.array_equal(_row(first, 1, 2), _row(other, 1, 2))


def test_grid_restores_module_modes() -> None:
    model = TinyAutoencoder().train()
    model.frozen.eval()
    images = _data().dataset("val")[0]["images"][None]
    grid = ReconstructionGrid(num_images=1).grid(model, images)
    assert grid.shape == (3, 3 * SIZE + 8, SIZE + 4)
    torch.testing.assert_close(grid[:, 2 : 2 + SIZE, 2 : 2 + SIZE], images[0])
    assert model.calls == [(False, False)]
    assert model.training and not model.frozen.training


def test_grid_without_tensorboard_logger_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    model, callback = TinyAutoencoder(), ReconstructionGrid()
    with caplog.at_level(logging.INFO):
        _grid_trainer(None, callback, max_steps=2, val_check_interval=1, num_sanity_val_steps=0).fit(model, _data())
    said = [record.getMessage() for record in caplog.records if "ReconstructionGrid" in record.getMessage()]
    assert said == ["ReconstructionGrid: the trainer has no TensorBoardLogger, no grids are logged"]
    assert model.calls == []  # two validations, nothing reconstructed


class NoReconstruct(TinyAutoencoder):
    reconstruct = None


def test_grid_requires_reconstruct() -> None:
    with pytest.raises(TypeError, match=r"NoReconstruct\.reconstruct\(images"):
        _grid_trainer(None, ReconstructionGrid()).validate(NoReconstruct(), _data())
