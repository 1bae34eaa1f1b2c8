"""Stage 3 (`DecoderStage`) with the tiny LLaVA: reducer sources and their checks, joint vs frozen training,
the diffusion loss going down, deterministic sampling, VLM-free checkpoints, the atomic export, and options."""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from tests.helpers import QUIET_TRAINER
from vugen.cli import VugenCLI
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.generation import SamplingConfig
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage
from vugen_adapters.llava import LlavaAdapter

ROOT = Path(__file__).resolve().parents[1]
LATENT_DIM = 8
IMAGE_SIZE = 16
ADAM = functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.0)
QUIET = QUIET_TRAINER | {"num_sanity_val_steps": 0}


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint) -> LlavaAdapter:
    return LlavaAdapter(str(tiny_checkpoint("llava")))


def make_decoder(**kwargs) -> PixelDecoder:
    settings = {"latent_dim": LATENT_DIM, "patch_size": 4, "width": 32, "depth": 1, "num_heads": 2}
    return PixelDecoder(**(settings | {"image_size": IMAGE_SIZE} | kwargs))


def make_reducer(adapter, **kwargs) -> DimensionReducer:
    return DimensionReducer(adapter.feature_dim, LATENT_DIM, hidden_dim=32, num_blocks=1, **kwargs)


def make_stage(adapter, **kwargs) -> DecoderStage:
    settings = {"reducer": make_reducer(adapter), "sampling": SamplingConfig(solver="heun", steps=2), "optimizer": ADAM}
    return DecoderStage(adapter, make_decoder(), **(settings | kwargs))


def make_data(**kwargs) -> ShapesDataModule:
    settings = {"image_size": IMAGE_SIZE, "train_size": 256, "val_size": 32, "batch_size": 16}
    return ShapesDataModule(**(settings | kwargs))


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def test_the_reducer_comes_from_exactly_one_source(adapter, tmp_path):
    with pytest.raises(ValueError, match="exactly one of `reducer`"):
        DecoderStage(adapter, make_decoder())
    make_reducer(adapter).save_pretrained(tmp_path / "reducer")
    with pytest.raises(ValueError, match="exactly one of `reducer`"):
        DecoderStage(adapter, make_decoder(), reducer=make_reducer(adapter), reducer_path=str(tmp_path / "reducer"))


def test_mismatched_widths_name_both_values(adapter, tmp_path):
    with pytest.raises(ValueError, match=r"latent_dim=8 but the decoder expects latent_dim=4"):
        DecoderStage(adapter, make_decoder(latent_dim=4), reducer=make_reducer(adapter))
    wide = adapter.feature_dim + 1
    DimensionReducer(wide, LATENT_DIM).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=rf"wide.*feature_dim={wide} .*feature_dim={adapter.feature_dim}"):
        DecoderStage(adapter, make_decoder(), reducer_path=str(tmp_path / "wide"))


def test_a_loaded_reducer_is_used_as_saved_and_frozen_on_request(adapter, tmp_path):
    saved = make_reducer(adapter)
    saved.save_pretrained(tmp_path / "reducer")
    stage = make_stage(adapter, reducer=None, reducer_path=str(tmp_path / "reducer"), train_reducer=False)
    assert not stage.pca_init  # a loaded reducer is never overwritten by PCA
    for name, tensor in saved.state_dict().items():
        assert torch.equal(stage.reducer.state_dict()[name], tensor)
    assert not any(p.requires_grad for p in stage.reducer.parameters())
    trainable = {id(p) for group in stage.configure_optimizers().param_groups for p in group["params"]}
    assert trainable == {id(p) for p in stage.decoder.parameters()}


def test_the_default_time_shift_scales_with_the_image_side(adapter):
    stage = make_stage(adapter)
    for side, shift in ((256, 1.0), (448, 1.75), (32, 0.125)):
        assert stage.shift_for(torch.zeros(1, 3, side, side)) == pytest.approx(shift)
    assert make_stage(adapter, time_shift=1.0).shift_for(torch.zeros(1, 3, 448, 448)) == 1.0


def test_pca_init_of_a_fresh_reducer_on_the_first_batch(adapter):
    stage, data = make_stage(adapter), make_data()
    batch = next(iter(data.train_dataloader()))
    stage.on_train_batch_start(batch, 0)
    expected = make_reducer(adapter)
    expected.init_from_pca(stage.adapter.encode_images(batch["images"]))
    assert bool(stage.pca_fitted)
    torch.testing.assert_close(stage.reducer.in_proj.weight, expected.in_proj.weight)
    before = stage.reducer.in_proj.weight.clone()
    stage.on_train_batch_start(next(iter(make_data(seed=1).train_dataloader())), 1)
    assert torch.equal(stage.reducer.in_proj.weight, before), "PCA ran twice"


def decoder_conditions(stage: DecoderStage, batch: dict, step) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents of ``batch`` and the latents the decoder is given during ``step(batch, 0)``."""
    seen = []
    hook = stage.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[2].detach().clone()))
    try:
        with torch.no_grad():
            step(batch, 0)
    finally:
        hook.remove()
    stage.reducer.eval()
    with torch.no_grad():
        clean, _ = stage.encode(batch["images"])
    return clean, seen[0]


@pytest.mark.parametrize("latent_noise", [0.0, 0.5])
def test_latent_noise_perturbs_only_the_training_condition(adapter, latent_noise):
    torch.manual_seed(0)
    reducer = make_reducer(adapter, noise_gamma=0.0)  # the reducer's own noise off: what differs is latent_noise
    stage = make_stage(adapter, reducer=reducer, pca_init=False, latent_noise=latent_noise).train()
    batch = next(iter(make_data(batch_size=64).train_dataloader()))
    clean, given = decoder_conditions(stage, batch, stage.training_step)
    offset = (given - clean).flatten(1)
    if latent_noise == 0:
        assert torch.equal(given, clean)
    else:  # per image: sigma ~ U[0, 0.5], so the images' offsets spread over that range, none above it
        sigmas = offset.std(dim=1)
        assert sigmas.max() < 0.55 and sigmas.min() < 0.1 and sigmas.mean() == pytest.approx(0.25, abs=0.06)
    clean, given = decoder_conditions(stage, batch, stage.validation_step)
    assert torch.equal(given, clean), "validation must see clean latents"


def test_a_negative_latent_noise_is_refused_by_name(adapter):
    with pytest.raises(ValueError, match="latent_noise >= 0, got -0.1"):
        make_stage(adapter, latent_noise=-0.1)


@pytest.fixture(scope="module")
def trained(adapter):
    """Joint training on one repeated batch: the diffusion loss on that batch must fall."""
    seed_everything(0)
    stage = make_stage(adapter, feature_loss_weight=0.5, pca_init=False)
    batch = next(iter(make_data().train_dataloader()))
    reducer_before = {k: v.clone() for k, v in stage.reducer.state_dict().items()}
    loss_before = fixed_loss(stage, batch)
    trainer = Trainer(max_steps=40, limit_val_batches=0, **QUIET)
    trainer.fit(stage, train_dataloaders=DataLoader([batch] * 40, batch_size=None))
    return stage, trainer, batch, loss_before, reducer_before


def fixed_loss(stage: DecoderStage, batch: dict) -> float:
    """The diffusion loss on a batch at fixed noise and times (reducer noise off)."""
    stage.eval()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        with torch.no_grad():
            latents, grid = stage.encode(batch["images"])
            return float(stage._diffusion_loss(batch["images"], latents, grid))


def test_joint_training_lowers_the_loss_and_trains_both(trained):
    stage, trainer, batch, loss_before, reducer_before = trained
    assert trainer.global_step == 40
    assert fixed_loss(stage, batch) < 0.5 * loss_before
    changed = [k for k, v in stage.reducer.state_dict().items() if not torch.equal(v, reducer_before[k])]
    assert changed, "the diffusion loss did not reach the reducer"
    for name in ("loss", "diffusion", "feature"):
        assert math.isfinite(trainer.callback_metrics[f"train/{name}"])
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["train/loss"] == pytest.approx(logged["train/diffusion"] + 0.5 * logged["train/feature"])


def test_a_frozen_reducer_stays_as_it_was(adapter):
    seed_everything(0)
    stage = make_stage(adapter, train_reducer=False, pca_init=False)
    reducer_before = {k: v.clone() for k, v in stage.reducer.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in stage.decoder.state_dict().items()}
    Trainer(max_steps=3, limit_val_batches=0, **QUIET).fit(stage, make_data())
    assert all(torch.equal(v, reducer_before[k]) for k, v in stage.reducer.state_dict().items())
    assert any(not torch.equal(v, decoder_before[k]) for k, v in stage.decoder.state_dict().items())


def test_reconstructions_are_deterministic_images(trained):
    stage = trained[0].eval()
    x = images()
    first = stage.reconstruct(x, torch.Generator().manual_seed(7))
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, stage.reconstruct(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, stage.reconstruct(x, torch.Generator().manual_seed(8)))
    # One image alone gets the same reconstruction as inside the batch: no cross-sample coupling.
    alone = stage.reconstruct(x[:1], torch.Generator().manual_seed(7))
    torch.testing.assert_close(alone, first[:1], atol=1e-5, rtol=0)


def test_decode_follows_its_settings(trained):
    """Euler with one step from noise x0 with an x-predicting decoder returns the decoder's x-prediction at t=0."""
    stage = trained[0].eval()
    latents, grid = stage.encode(images())
    generator = torch.Generator().manual_seed(3)
    one_step = stage.decode(latents, grid, (IMAGE_SIZE, IMAGE_SIZE), generator, solver="euler", steps=1)
    noise = torch.randn(latents.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x_pred = stage.decoder(noise, torch.zeros(len(noise)), latents, grid)
    torch.testing.assert_close(one_step, ((x_pred + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    guided = stage.decode(latents, grid, (IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(3), guidance_scale=2)
    plain = stage.decode(latents, grid, (IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(3))
    assert not torch.equal(guided, plain)


def test_validation_logs_loss_and_psnr(trained):
    stage = trained[0]
    metrics = Trainer(limit_val_batches=1, **QUIET).validate(stage, make_data(), verbose=False)[0]
    assert set(metrics) == {"val/loss", "val/psnr"}
    assert 0 < metrics["val/psnr"] < 100


def test_checkpoint_holds_no_vlm_and_reloads_exactly(trained, tmp_path):
    stage, trainer, _, _, _ = trained
    path = tmp_path / "decoder.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert not [k for k in keys if k.startswith("adapter.")]
    assert {f"decoder.{k}" for k in stage.decoder.state_dict()} <= keys
    assert {f"reducer.{k}" for k in stage.reducer.state_dict()} <= keys
    assert checkpoint["hyper_parameters"]["decoder"]["class_path"] == "vugen.nn.pixel_decoder.PixelDecoder"

    reloaded = DecoderStage.load_from_checkpoint(path).eval()
    stage.eval()
    x = images()
    expected = stage.reconstruct(x, torch.Generator().manual_seed(0))
    assert torch.equal(reloaded.reconstruct(x, torch.Generator().manual_seed(0)), expected)


def test_export_round_trips_and_replaces_atomically(trained, tmp_path):
    stage = trained[0]
    directory = stage.export(tmp_path / "export")
    assert sorted(p.name for p in directory.iterdir()) == ["decoder", "reducer", "sampling.json", "training.json"]
    assert json.loads((directory / "sampling.json").read_text())["steps"] == 2
    decoder = PixelDecoder.from_pretrained(directory / "decoder")
    reducer = DimensionReducer.from_pretrained(directory / "reducer")
    for loaded, original in ((decoder, stage.decoder), (reducer, stage.reducer)):
        assert loaded.config == original.config
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.state_dict().items())

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    stage.decoder.save_pretrained = failing_save  # an instance attribute: the class is untouched
    try:
        with pytest.raises(OSError, match="disk full"):
            stage.export(directory)
    finally:
        del stage.decoder.save_pretrained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "a staging folder was left behind"
    assert PixelDecoder.from_pretrained(directory / "decoder").config == stage.decoder.config


def test_configure_model_options_are_idempotent_and_exact(adapter):
    seed_everything(0)
    plain, checkpointed = make_stage(adapter), make_stage(adapter, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    for stage in (plain, checkpointed):
        stage.configure_model()
        stage.configure_model()
    assert checkpointed.decoder.gradient_checkpointing and not plain.decoder.gradient_checkpointing
    batch = {"images": images(2)}
    grads = []
    for stage in (plain, checkpointed):
        torch.manual_seed(0)
        stage.training_step(batch, 0).backward()
        grads.append([p.grad.clone() for p in stage.decoder.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def demo_config(tmp_path, tiny_llava: str) -> str:
    """configs/demo/decoder.yaml with every output path and the VLM moved under `tmp_path`."""
    text = (ROOT / "configs/demo/decoder.yaml").read_text()
    for old, new in (
        ("outputs/demo/logs", tmp_path / "logs"),
        ("dirpath: outputs/demo", f"dirpath: {tmp_path}"),
        ("outputs/demo/decoder-stage", tmp_path / "export"),
        ("outputs/demo/reducer", tmp_path / "reducer"),
        ("outputs/demo/tiny-llava", tiny_llava),
    ):
        assert str(old) in text, old
        text = text.replace(str(old), str(new))
    path = tmp_path / "decoder.yaml"
    path.write_text(text)
    return str(path)


def test_vugen_fit_then_test_with_the_demo_config(adapter, tiny_checkpoint, tmp_path, caplog):
    make_reducer(adapter).save_pretrained(tmp_path / "reducer")  # stands in for stage 1's export
    config = demo_config(tmp_path, str(tiny_checkpoint("llava")))
    quick = ["--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=8"]
    fit = VugenCLI(args=["fit", "--config", config, "--trainer.max_steps=2", "--trainer.val_check_interval=2", *quick])
    assert fit.trainer.global_step == 2
    log_dir = Path(fit.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()
    events = EventAccumulator(str(log_dir)).Reload()
    assert "reconstructions" in events.Tags()["images"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "decoder",
        "reducer",
        "sampling.json",
        "training.json",
    ]
    record = json.loads((tmp_path / "export" / "training.json").read_text())
    assert record["stage"] == "DecoderStage" and record["global_step"] == 2 and "val/loss" in record["metrics"]

    with caplog.at_level(logging.INFO):
        test = VugenCLI(
            args=[
                "test",
                "--config",
                config,
                f"--ckpt_path={tmp_path / 'decoder.ckpt'}",
                "--data.init_args.heldout_size=8",
                *quick,
            ]
        )
    metrics = test.trainer.callback_metrics
    assert {"test/psnr", "test/ssim"} <= set(metrics) and math.isfinite(metrics["test/psnr"])
    assert "LPIPS skipped" in caplog.text and "lpips_weights" in caplog.text


@pytest.mark.slow
@pytest.mark.heavy  # six CPU-minutes, a third of `make test`'s wall time: CI runs it with `make test-heavy`
def test_demo_reaches_30_db_on_heldout_compositions(tiny_checkpoint, tmp_path):
    """Stage 1 then stage 3 as shipped (configs/demo/*.yaml): held-out PSNR of sampled reconstructions >= 30 dB."""
    tiny_llava = str(tiny_checkpoint("llava"))
    quiet = "--trainer.enable_progress_bar=false"
    stage1 = ["fit", "--config", str(ROOT / "configs/demo/reducer.yaml"), quiet]
    stage1 += [f"--model.init_args.adapter.init_args.pretrained={tiny_llava}"]
    stage1 += [
        f"--model.init_args.export_dir={tmp_path / 'reducer'}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    VugenCLI(args=stage1)
    config = demo_config(tmp_path, tiny_llava)
    VugenCLI(args=["fit", "--config", config, quiet])
    test = VugenCLI(args=["test", "--config", config, f"--ckpt_path={tmp_path / 'decoder.ckpt'}", quiet])
    metrics = test.trainer.callback_metrics
    print(f"\ndemo held-out PSNR {float(metrics['test/psnr']):.2f} dB, SSIM {float(metrics['test/ssim']):.3f}")
    assert metrics["test/psnr"] >= 30.0
    assert metrics["test/ssim"] >= 0.9
