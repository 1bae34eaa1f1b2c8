"""NaN and Inf in training: the NonFiniteGuard every stage adds (stop, or skip within a budget), checkpoints and
exports that refuse non-finite weights, exports only after a fit that trained, and the training.json record.

Real tiny stages on the tiny LLaVA in real Trainers; a NaN is injected as one NaN pixel in a batch (the vision tower
spreads it over the image's features, so that batch's loss is NaN) or comes from a learning rate that diverges.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tests.fixtures_bundle import make_stage as make_sampler_stage
from tests.helpers import QUIET_TRAINER
from vugen.callbacks import NonFiniteGuard
from vugen.finite import NonFiniteError, first_non_finite, require_finite
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage, ReducerStage
from vugen.stages.training_record import TRAINING_FILE, read_training_record
from vugen_adapters.llava import LlavaAdapter

QUIET = QUIET_TRAINER | {"num_sanity_val_steps": 0, "limit_val_batches": 0}
GUARD_KEY = "NonFiniteGuard"


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint) -> LlavaAdapter:
    return LlavaAdapter(str(tiny_checkpoint("llava")))


def reducer_stage(adapter: LlavaAdapter, lr: float = 1e-3, cls: type = ReducerStage, **kwargs) -> ReducerStage:
    """A small reducer stage, the same initial weights every time, deterministic training (no noise, no PCA)."""
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    reducer = DimensionReducer(adapter.feature_dim, 8, hidden_dim=32, num_blocks=1, noise_gamma=0.0)
    return cls(adapter, reducer, pca_init=False, optimizer=optimizer, **kwargs)


def good_batches(n: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"images": torch.rand(4, 3, 32, 32, generator=generator)} for _ in range(n)]


def nan_batch() -> dict[str, Tensor]:
    images = torch.rand(4, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    return {"images": images}


def fit(
    stage: LightningModule, batches: list, callbacks: list | None = None, ckpt_path=None, **trainer_args
) -> Trainer:
    trainer = Trainer(callbacks=callbacks or [], **({"max_steps": len(batches)} | QUIET | trainer_args))
    trainer.fit(stage, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def all_finite(module: nn.Module) -> bool:
    return all(bool(t.isfinite().all()) for t in module.state_dict().values() if t.is_floating_point())


class Unguarded(ReducerStage):
    """The stage as it was before the guard: no NonFiniteGuard (the negative control)."""

    def configure_callbacks(self) -> list:
        return []


# ------------------------------------------------------------------------------------------------ the check itself
def test_first_non_finite_names_the_first_bad_floating_tensor():
    tensors = {
        "steps": torch.tensor([1, 2]),  # integers are never NaN: skipped
        "ok": torch.ones(3),
        "inf": torch.tensor([1.0, float("inf")]),
        "nan": torch.tensor([float("nan")]),
        "empty": torch.ones(0),
    }
    assert first_non_finite(tensors.items()) == "inf"
    assert first_non_finite([("ok", torch.ones(2)), ("flag", True)]) is None
    with pytest.raises(NonFiniteError, match=r"^export x: nan holds NaN or Inf values; do y$"):
        require_finite([("ok", torch.ones(1)), ("nan", torch.tensor(float("nan")))], "export x", advice="do y")
    with pytest.raises(NonFiniteError, match="a tensor shard of another rank"):  # finite here, not on another rank
        require_finite([("ok", torch.ones(1))], "export x", agree=lambda decision: False)


# ------------------------------------------------------------------------------------------------ stop and skip
def test_every_stage_gets_a_guard_unless_the_trainer_has_one(adapter):
    trainer = fit(reducer_stage(adapter), good_batches(1))
    assert [c.max_skipped_steps for c in trainer.callbacks if isinstance(c, NonFiniteGuard)] == [0]
    configured = NonFiniteGuard(max_skipped_steps=5)
    trainer = fit(reducer_stage(adapter), good_batches(1), callbacks=[configured])
    assert [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)] == [configured]


def test_a_nan_loss_stops_the_run_naming_step_stage_and_last_checkpoint(adapter, tmp_path):
    stage = reducer_stage(adapter)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    batches = [*good_batches(3), nan_batch(), *good_batches(2)]
    with pytest.raises(NonFiniteError) as error:
        fit(stage, batches, callbacks=[checkpoints], enable_checkpointing=True)
    message = str(error.value)
    assert "ReducerStage: the training loss is NaN or Inf at step 3 (epoch 0, batch 3)" in message
    assert f"last good checkpoint: {tmp_path / 'epoch=0-step=2.ckpt'}" in message
    assert "lower learning rate" in message and "max_skipped_steps" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt"]
    assert all_finite(stage.reducer), "the NaN step reached the weights"


def test_a_diverging_learning_rate_stops_before_any_nan_weight(adapter):
    stage = reducer_stage(adapter, lr=1e30)
    with pytest.raises(NonFiniteError, match=r"ReducerStage: the training loss is NaN or Inf at step 1 .*none written"):
        fit(stage, good_batches(6))
    assert all_finite(stage.reducer)


def test_without_the_guard_the_same_runs_train_on_into_nan_weights(adapter):
    """Negative control: the NaN batch and the learning rate above really make NaN weights when nothing stops them."""
    stage = reducer_stage(adapter, cls=Unguarded)
    trainer = fit(stage, [*good_batches(3), nan_batch(), *good_batches(2)])
    assert trainer.global_step == 6 and not all_finite(stage.reducer)
    stage = reducer_stage(adapter, lr=1e30, cls=Unguarded)
    trainer = fit(stage, good_batches(6))
    assert trainer.global_step == 6 and not all_finite(stage.reducer)


def test_a_budget_skips_bad_steps_as_if_their_batches_were_not_there(adapter, tmp_path, caplog):
    good = good_batches(4)
    guard = NonFiniteGuard(max_skipped_steps=2)
    skipping = reducer_stage(adapter)
    with caplog.at_level(logging.WARNING):
        trainer = fit(skipping, [good[0], good[1], nan_batch(), good[2], nan_batch(), good[3]], callbacks=[guard])
    assert [r.getMessage() for r in caplog.records if "NonFiniteGuard" in r.getMessage()] == [
        f"NonFiniteGuard: skipped step {step} of ReducerStage (the training loss is NaN or Inf); {used} of "
        "max_skipped_steps=2 used"
        for step, used in ((2, 1), (4, 2))
    ]
    assert trainer.global_step == 6 and guard.skipped_steps == 2 and guard.applied_steps(trainer) == 4
    reference = reducer_stage(adapter)
    fit(reference, good)
    for name, value in reference.reducer.state_dict().items():
        assert torch.equal(skipping.reducer.state_dict()[name], value), name

    trainer.save_checkpoint(tmp_path / "skipped.ckpt")
    assert torch.load(tmp_path / "skipped.ckpt", weights_only=True)["callbacks"][GUARD_KEY] == {"skipped_steps": 2}
    # A resumed run continues the count: its first bad step is beyond the budget.
    resumed, guard = reducer_stage(adapter), NonFiniteGuard(max_skipped_steps=2)
    with pytest.raises(NonFiniteError, match=r"at step 6 .* after 2 skipped steps \(max_skipped_steps\)"):
        fit(resumed, [nan_batch()] * 7, callbacks=[guard], max_steps=7, ckpt_path=tmp_path / "skipped.ckpt")


def test_the_decoder_and_sampler_stages_stop_at_a_nan_batch_too(adapter, pretrained, decoder_export):
    def batches(captions: bool) -> list[dict]:
        good, bad = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
        bad[1, 2, 3, 4] = float("nan")
        return [{"images": images} | ({"captions": ["a", "b"]} if captions else {}) for images in (good, bad)]

    decoder = PixelDecoder(latent_dim=8, patch_size=4, width=32, depth=1, num_heads=2, image_size=16)
    reducer = DimensionReducer(adapter.feature_dim, 8, hidden_dim=32, num_blocks=1)
    with pytest.raises(NonFiniteError, match="DecoderStage: the training loss is NaN or Inf at step 1"):
        fit(DecoderStage(adapter, decoder, reducer=reducer, pca_init=False), batches(captions=False))
    with pytest.raises(NonFiniteError, match="SamplerStage: the training loss is NaN or Inf at step 1"):
        fit(make_sampler_stage(pretrained, decoder_export), batches(captions=True))


class SqrtOfZero(LightningModule):
    """A finite loss (0) whose gradient is NaN: d/dw sqrt(|w * 0|)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return (self.w * batch).abs().sqrt().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_nan_gradient_under_a_finite_loss_is_caught():
    batches = [torch.ones(2), torch.zeros(2), torch.ones(2)]
    with pytest.raises(NonFiniteError, match=r"SqrtOfZero: the gradient of w is NaN or Inf at step 1"):
        fit(SqrtOfZero(), batches, callbacks=[NonFiniteGuard()])


def test_under_fp16_the_grad_scaler_handles_inf_gradients_and_the_guard_the_loss():
    """fp16 mixed precision: a NaN gradient is the GradScaler's to skip (it lowers its scale), not a skipped step;
    a NaN loss still is."""
    guard = NonFiniteGuard(max_skipped_steps=1)
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = SqrtOfZero()
    trainer = fit(module, [torch.ones(2), torch.zeros(2), torch.ones(2)], callbacks=[guard], plugins=[fp16])
    assert trainer.global_step == 3 and guard.skipped_steps == 0
    assert fp16.scaler.get_scale() < 2.0**16  # the scaler saw the Inf and skipped that step itself
    assert bool(module.w.isfinite().all())
    with pytest.raises(NonFiniteError, match="training loss is NaN or Inf at step 1"):
        fit(SqrtOfZero(), [torch.ones(2), torch.full((2,), float("nan"))], callbacks=[NonFiniteGuard()], plugins=[fp16])


# ------------------------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_with_nan_weights_is_refused(adapter, tmp_path):
    stage = reducer_stage(adapter)
    trainer = fit(stage, good_batches(2))
    with torch.no_grad():
        stage.reducer.out_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"refusing to write a checkpoint at step 2: reducer.out_proj.weight"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    with pytest.raises(NonFiniteError, match="reducer.out_proj.weight"):  # the weights-only path too
        trainer.save_checkpoint(tmp_path / "bad.ckpt", weights_only=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ exports
def test_exports_happen_only_after_a_fit_that_trained(adapter, tmp_path, caplog):
    export = tmp_path / "reducer"
    stage = reducer_stage(adapter, export_dir=str(export))
    fit(stage, good_batches(3))
    record = read_training_record(export)
    assert record["stage"] == "ReducerStage" and record["global_step"] == 3
    assert set(record["metrics"]) == {"train/loss"} and record["metrics"]["train/loss"] > 0
    before = snapshot(export)

    # 8 images in batches of 32, drop_last: "Trainer.fit stopped: No training batches"
    images = [{"images": image} for image in torch.rand(8, 3, 32, 32)]
    untrained = reducer_stage(adapter, export_dir=str(export))
    with caplog.at_level(logging.INFO):
        Trainer(max_steps=5, **QUIET).fit(untrained, DataLoader(images, batch_size=32, drop_last=True))
    assert snapshot(export) == before
    assert "ReducerStage: no optimizer step ran in this fit; " + f"{export} left as it was" in caplog.text

    # A resumed fit whose max_steps is already reached trains nothing either.
    trainer = fit(stage, good_batches(3))
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    before = snapshot(export)
    fit(reducer_stage(adapter, export_dir=str(export)), good_batches(3), ckpt_path=tmp_path / "done.ckpt")
    assert snapshot(export) == before


def test_replacing_a_better_export_says_so(adapter, tmp_path, caplog):
    export = tmp_path / "reducer"
    fit(reducer_stage(adapter, export_dir=str(export)), good_batches(4))
    with caplog.at_level(logging.WARNING):
        fit(reducer_stage(adapter, export_dir=str(export)), good_batches(2))
    (line,) = [r.getMessage() for r in caplog.records if "replaced the export" in r.getMessage()]
    assert line.startswith(f"replaced the export in {export} (ReducerStage, 4 steps, train/loss ")
    assert "with one of fewer steps (ReducerStage, 2 steps, train/loss " in line and "\n" not in line
    assert read_training_record(export)["global_step"] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fit(reducer_stage(adapter, export_dir=str(export)), good_batches(3))  # more steps: nothing to say
    assert "replaced the export" not in caplog.text
    assert read_training_record(export)["global_step"] == 3


def test_an_export_of_nan_weights_is_refused_and_the_old_export_kept(adapter, tmp_path):
    export = tmp_path / "reducer"
    stage = reducer_stage(adapter, export_dir=str(export))
    fit(stage, good_batches(2))
    before = snapshot(export)
    with torch.no_grad():
        stage.reducer.in_proj.bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"refusing to export the reducer to {export}: reducer.in_proj.bias"):
        stage.export_reducer(export)
    assert snapshot(export) == before and sorted(p.name for p in tmp_path.iterdir()) == ["reducer"]


def test_a_decoder_export_of_nan_weights_is_refused(adapter, tmp_path):
    decoder = PixelDecoder(latent_dim=8, patch_size=4, width=32, depth=1, num_heads=2, image_size=16)
    reducer = DimensionReducer(adapter.feature_dim, 8, hidden_dim=32, num_blocks=1)
    stage = DecoderStage(adapter, decoder, reducer=reducer)
    with torch.no_grad():
        decoder.latent_proj.weight[0, 0] = float("nan")
    with pytest.raises(
        NonFiniteError,
        match=r"DecoderStage: refusing to export the reducer and decoder to .*: decoder.latent_proj.weight",
    ):
        stage.export(tmp_path / "export")
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad():
        decoder.latent_proj.weight[0, 0] = 0.0
    directory = stage.export(tmp_path / "export")
    assert read_training_record(directory)["global_step"] is None  # exported outside a run: steps unknown
    assert sorted(p.name for p in directory.iterdir()) == ["decoder", "reducer", "sampling.json", TRAINING_FILE]


def test_a_bundle_of_nan_weights_is_refused(pretrained, decoder_export, tmp_path):
    pipeline = make_sampler_stage(pretrained, decoder_export).pipeline()
    with torch.no_grad():
        pipeline.latent_sampler.lora_b_layers()[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to write the bundle .*bundle: lora\..*lora_B\.weight"):
        pipeline.save_pretrained(tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []
