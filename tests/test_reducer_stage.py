"""Stage 1 (`ReducerStage`) with the tiny LLaVA: PCA init against numpy, learning beyond PCA, VLM-free
checkpoints that reload, export, and the `vugen fit` path with the demo config."""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from tests.helpers import QUIET_TRAINER
from vugen.cli import VugenCLI
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.nn import DimensionReducer
from vugen.stages import ReducerStage
from vugen_adapters.llava import LlavaAdapter

ROOT = Path(__file__).resolve().parents[1]
LATENT_DIM = 8
ADAM = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
QUIET = QUIET_TRAINER


@pytest.fixture(scope="module")
def tiny_llava(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llava"))


@pytest.fixture(scope="module")
def adapter(tiny_llava) -> LlavaAdapter:
    return LlavaAdapter(tiny_llava)


def make_stage(adapter, **kwargs) -> ReducerStage:
    # Linear-exact settings: without latent normalisation and noise, the PCA init is exactly PCA.
    settings = {"latent_dim": LATENT_DIM, "hidden_dim": 64, "normalize_latents": False, "noise_gamma": 0.0}
    reducer = DimensionReducer(adapter.feature_dim, **(settings | kwargs))
    return ReducerStage(adapter, reducer, optimizer=ADAM)


def make_data() -> ShapesDataModule:
    return ShapesDataModule(train_size=1024, val_size=64, batch_size=32, seed=0)


def first_batch(data: ShapesDataModule) -> dict:
    return next(iter(data.train_dataloader()))


def numpy_pca_explained_variance(features: torch.Tensor, k: int) -> float:
    flat = features.reshape(-1, features.shape[-1]).double().numpy()
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reconstruction = centred @ vt[:k].T @ vt[:k]
    return 1.0 - ((centred - reconstruction) ** 2).sum() / (centred**2).sum()


def reducer_explained_variance(stage: ReducerStage, features: torch.Tensor) -> float:
    stage.reducer.eval()
    with torch.no_grad():
        reconstruction = stage.reducer(features)[1].double()
    target = features.reshape(-1, features.shape[-1]).double()
    residual = (target - reconstruction.reshape(target.shape)).square().sum()
    return float(1.0 - residual / (target - target.mean(0)).square().sum())


def test_pca_init_is_pca_of_the_first_training_batch_and_runs_once(adapter):
    stage, data = make_stage(adapter), make_data()
    batch = first_batch(data)
    stage.on_train_batch_start(batch, 0)
    features = stage.encode_features(batch["images"])
    assert features.shape == (32, 64, adapter.feature_dim)
    assert reducer_explained_variance(stage, features) == pytest.approx(
        numpy_pca_explained_variance(features, LATENT_DIM), abs=1e-5
    )
    assert bool(stage.pca_fitted)
    fitted = {k: v.clone() for k, v in stage.reducer.state_dict().items()}
    stage.on_train_batch_start({"images": torch.rand(4, 3, 32, 32)}, 1)  # a later batch: no refit
    assert all(torch.equal(v, stage.reducer.state_dict()[k]) for k, v in fitted.items())


@pytest.fixture(scope="module")
def trained(adapter):
    """A stage PCA-initialised on the first batch, validated, trained 60 steps, validated again."""
    seed_everything(0)
    stage, data = make_stage(adapter), make_data()
    stage.on_train_batch_start(first_batch(data), 0)
    before = Trainer(**QUIET).validate(stage, data, verbose=False)[0]
    trainer = Trainer(max_steps=60, num_sanity_val_steps=0, limit_val_batches=0, **QUIET)
    trainer.fit(stage, data)
    after = Trainer(**QUIET).validate(stage, data, verbose=False)[0]
    return stage, trainer, before, after


def test_training_reduces_the_loss_and_beats_pca(trained):
    stage, trainer, before, after = trained
    assert trainer.global_step == 60
    assert after["val/loss"] < 0.8 * before["val/loss"]
    assert after["val/mse"] < before["val/mse"] and after["val/cosine"] > before["val/cosine"]
    # PCA at the same d, fitted on each validation batch itself: an in-sample bound for linear reducers.
    assert before["val/explained_variance"] < before["val/pca_explained_variance"]
    assert after["val/explained_variance"] > after["val/pca_explained_variance"] + 0.01
    for name in ("loss", "mse", "cosine", "explained_variance"):
        assert math.isfinite(trainer.callback_metrics[f"train/{name}"])
    print(
        f"\nval explained variance, d={LATENT_DIM} of D={stage.reducer.feature_dim}: PCA init "
        f"{before['val/explained_variance']:.3f}, after 60 steps {after['val/explained_variance']:.3f}, "
        f"PCA in-sample {after['val/pca_explained_variance']:.3f}"
    )


def test_checkpoint_holds_no_vlm_and_reloads(trained, tmp_path):
    stage, trainer, _, _ = trained
    path = tmp_path / "reducer.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain data only: no pickled VLM in the hparams either
    assert checkpoint["state_dict"], "empty state dict"
    assert not [k for k in checkpoint["state_dict"] if k.startswith("adapter.")]
    assert set(checkpoint["state_dict"]) == {f"reducer.{k}" for k in stage.reducer.state_dict()} | {"pca_fitted"}
    assert checkpoint["hyper_parameters"]["adapter"]["class_path"] == "vugen_adapters.llava.LlavaAdapter"

    reloaded = ReducerStage.load_from_checkpoint(path)  # rebuilds the adapter from the recorded config
    assert isinstance(reloaded.adapter, LlavaAdapter) and reloaded.adapter is not stage.adapter
    assert bool(reloaded.pca_fitted)
    assert reloaded.configure_optimizers().defaults["weight_decay"] == 0.0  # the partial's, not AdamW's default
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stage.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_features(images), stage.encode_features(images), rtol=0, atol=0)
        assert torch.equal(reloaded(images), stage(images))


def test_reload_refuses_a_checkpoint_without_reducer_weights(trained, tmp_path):
    stage, trainer, _, _ = trained
    path = tmp_path / "broken.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["reducer.in_proj.weight"]
    torch.save(checkpoint, path)
    with pytest.raises(RuntimeError, match="reducer.in_proj.weight"):
        ReducerStage.load_from_checkpoint(path)


def test_export_reducer_round_trip(trained, tmp_path):
    stage, _, _, _ = trained
    directory = stage.export_reducer(tmp_path / "reducer")
    loaded = DimensionReducer.from_pretrained(directory).eval()
    assert loaded.config == stage.reducer.config
    features = torch.randn(2, 64, stage.reducer.feature_dim)
    stage.reducer.eval()
    with torch.no_grad():
        assert torch.equal(loaded(features)[1], stage.reducer(features)[1])


def test_bad_inputs_name_the_argument(adapter):
    with pytest.raises(TypeError, match="adapter must be a VLMAdapter"):
        ReducerStage(adapter={"class_path": "vugen_adapters.llava.LlavaAdapter"}, reducer=DimensionReducer(32, 8))
    with pytest.raises(
        ValueError, match="reads feature_dim=48 channels but the adapter's features have feature_dim=32"
    ):
        ReducerStage(adapter, DimensionReducer(48, 8))
    with pytest.raises(ValueError, match="'images'"):
        make_stage(adapter).training_step({"captions": ["a red circle"]}, 0)


def fit_demo(tiny_llava: str, tmp_path: Path, *overrides: str) -> VugenCLI:
    """`vugen fit --config configs/demo/reducer.yaml` on the tiny VLM, writing only under `tmp_path`."""
    args = ["fit", "--config", str(ROOT / "configs/demo/reducer.yaml")]
    args += [f"--model.init_args.adapter.init_args.pretrained={tiny_llava}"]
    args += [f"--model.init_args.export_dir={tmp_path / 'reducer'}"]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false"]
    return VugenCLI(args=[*args, *overrides])


def test_vugen_fit_with_the_demo_config(tiny_llava, tmp_path):
    logs, export = tmp_path / "logs", tmp_path / "reducer"
    cli = fit_demo(
        tiny_llava,
        tmp_path,
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--data.init_args.train_size=96",
        '--model.init_args.lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", '
        '"init_args": {"step_size": 1, "gamma": 0.5}}',
    )
    assert cli.trainer.global_step == 3
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.is_relative_to(logs) and (log_dir / "config.yaml").is_file()
    assert list(log_dir.glob("events.out.tfevents.*"))
    # The scheduler steps once per optimizer step: 3 halvings.
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 / 8)
    assert {"val/explained_variance", "val/pca_explained_variance"} <= set(cli.trainer.callback_metrics)

    (checkpoint,) = log_dir.glob("checkpoints/*.ckpt")
    reloaded = ReducerStage.load_from_checkpoint(checkpoint)
    exported = DimensionReducer.from_pretrained(export).eval()
    features = torch.randn(2, 64, exported.feature_dim)
    reloaded.reducer.eval()
    with torch.no_grad():
        assert torch.equal(exported(features)[1], reloaded.reducer(features)[1])


@pytest.mark.slow
def test_demo_config_beats_pca(tiny_llava, tmp_path):
    """The demo as shipped (300 steps, normalised noisy latents): learned explained variance well above PCA's."""
    cli = fit_demo(tiny_llava, tmp_path)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 300
    assert metrics["val/explained_variance"] > metrics["val/pca_explained_variance"] + 0.04
    print(
        f"\ndemo after 300 steps: val explained variance {float(metrics['val/explained_variance']):.3f}, "
        f"PCA {float(metrics['val/pca_explained_variance']):.3f}"
    )


DDP_SCRIPT = """
import sys, torch
from lightning.pytorch import Trainer, seed_everything
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.nn import DimensionReducer
from vugen.stages import ReducerStage
from vugen_adapters.llava import LlavaAdapter

class Probe(ReducerStage):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 0:
            checksum = sum(float(v.double().sum()) for v in self.reducer.state_dict().values())
            # One file per rank: prints from two processes can interleave on one line of a shared pipe.
            with open(f"rank{self.global_rank}.txt", "w") as out:
                out.write(f"{self.global_rank} {float(batch['images'].sum()):.3f} {checksum:.10f}")

if __name__ == "__main__":
    torch.set_num_threads(1)
    seed_everything(0)
    adapter = LlavaAdapter(sys.argv[1])
    stage = Probe(adapter, DimensionReducer(adapter.feature_dim, latent_dim=8, hidden_dim=64))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(stage, ShapesDataModule(train_size=256, batch_size=16))
"""


@pytest.mark.slow
def test_ddp_ranks_share_rank_zeros_pca_init(tiny_llava, tmp_path):
    """Each rank fits PCA on its own first batch; the broadcast leaves every rank with rank 0's reducer."""
    script = tmp_path / "ddp_reducer.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    # A subprocess: Lightning's DDP launcher re-runs the command line as rank 1 (it would re-run pytest).
    run = subprocess.run(
        [sys.executable, str(script), tiny_llava], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = sorted((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert [rank for rank, _, _ in ranks] == ["0", "1"]
    assert ranks[0][1] != ranks[1][1], "both ranks saw the same first batch: the test would prove nothing"
    assert ranks[0][2] == ranks[1][2]
