"""The decoder distillation stage: a one-step student of a trained pixel decoder, its export, and bundling it.

A random decoder export stands in for the trained teacher: what is tested is that the student learns the teacher's
multi-step result from the same noise (the gap to it falls far below the teacher's own one-step gap), that only the
student trains and is checkpointed, and that its export is a decoder export with the teacher's reducer byte for byte,
which `vugen export --decoder_export` then bundles.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from tests.fixtures_bundle import IMAGE_SIZE, make_decoder_export, make_stage
from tests.helpers import QUIET_TRAINER
from vugen.commands.export import export
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.decoder_export import read_decoder_export, write_decoder_export
from vugen.generation import SamplingConfig, decode_latents
from vugen.pipeline import VugenPipeline
from vugen.stages import DecoderDistillStage
from vugen_adapters.llava import LlavaAdapter

HEUN_10 = SamplingConfig(solver="heun", steps=10)


def make_distill(pretrained: Path, teacher: Path, **kwargs) -> DecoderDistillStage:
    arguments = {"teacher_sampling": HEUN_10, "optimizer": lambda params: torch.optim.Adam(params, lr=3e-3)} | kwargs
    return DecoderDistillStage(LlavaAdapter(str(pretrained)), str(teacher), **arguments)


def shapes(size: int = 8) -> ShapesDataModule:
    return ShapesDataModule(image_size=IMAGE_SIZE, train_size=size, val_size=size, test_size=size, batch_size=size)


def gap_to_teacher(stage: DecoderDistillStage, images: torch.Tensor, seed: int) -> float:
    """Mean squared distance between the student's sample and the teacher's, from the same (held-out) noise."""
    with torch.no_grad():
        latents, grid = stage.eval().encode(images)
        noise = torch.randn(len(images), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
        size = (IMAGE_SIZE, IMAGE_SIZE)
        teacher = decode_latents(stage.teacher, latents, grid, size, HEUN_10, noise=noise)
        student = decode_latents(stage.decoder, latents, grid, size, stage.sampling, noise=noise)
    return (student - teacher).square().mean().item()


def test_given_noise_is_the_noise_the_generator_would_draw(pretrained, decoder_export):
    """`decode_latents(noise=...)` is the generator path with that noise (what pairs a student with its teacher)."""
    _, decoder, _ = read_decoder_export(decoder_export)
    adapter = LlavaAdapter(str(pretrained))
    latents = torch.randn(2, adapter.token_grid(IMAGE_SIZE, IMAGE_SIZE)[0] ** 2, 8)
    grid, size = adapter.token_grid(IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE)
    noise = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    drawn = decode_latents(decoder, latents, grid, size, HEUN_10, torch.Generator().manual_seed(5))
    assert torch.equal(decode_latents(decoder, latents, grid, size, HEUN_10, noise=noise), drawn)
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 3, 16, 16\), got \(1, 3, 16, 16\)"):
        decode_latents(decoder, latents, grid, size, HEUN_10, noise=noise[:1])


def test_the_student_starts_as_the_teacher_and_trains_only_at_its_own_times(pretrained, decoder_export):
    stage = make_distill(pretrained, decoder_export)
    teacher, student = stage.teacher.state_dict(), stage.decoder.state_dict()
    assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in teacher)
    assert {name.split(".")[0] for name, p in stage.named_parameters() if p.requires_grad} == {"decoder"}
    assert stage.sampling == SamplingConfig(solver="euler", steps=1)
    assert torch.equal(stage.student_times(64, 768, torch.device("cpu")), torch.zeros(64))
    two = make_distill(pretrained, decoder_export, sampling=SamplingConfig(solver="euler", steps=2, time_shift=3.0))
    times = two.student_times(256, 768, torch.device("cpu"))
    assert sorted(set(times.tolist())) == [0.0, 0.25]  # the Euler grid's first two points, shifted: 0.5 -> 0.25
    stage.train()
    assert stage.decoder.training and not stage.teacher.training and not stage.reducer.training


def test_the_one_step_student_learns_the_teachers_ten_step_result(pretrained, decoder_export):
    """The gap to the teacher's 10 Heun steps from held-out noise falls well below the teacher's own one-step gap
    (the negative control: the untrained student is the teacher, sampled in one step)."""
    torch.manual_seed(0)
    stage = make_distill(pretrained, decoder_export)
    data = shapes()
    data.setup("fit")
    images = next(iter(data.train_dataloader()))["images"]
    before = gap_to_teacher(stage, images, seed=123)
    optimizer = stage.configure_optimizers()
    stage.train()
    losses = []
    for _ in range(60):
        latents, grid = stage.encode(images)
        loss = stage.distillation_loss(latents, grid, (IMAGE_SIZE, IMAGE_SIZE))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = gap_to_teacher(stage, images, seed=123)
    assert before > 1e-3, before  # one Euler step of the teacher is far from its ten Heun steps
    assert after < 0.25 * before, (before, after)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses


def test_fit_exports_the_student_with_the_teachers_reducer_and_checkpoints_only_the_student(
    pretrained, decoder_export, tmp_path
):
    stage = make_distill(pretrained, decoder_export, export_dir=str(tmp_path / "one-step"))
    trainer = Trainer(max_steps=2, default_root_dir=tmp_path, **QUIET_TRAINER | {"limit_val_batches": 1})
    trainer.fit(stage, datamodule=shapes(4))
    trainer.save_checkpoint(tmp_path / "distill.ckpt")

    reducer, student, sampling = read_decoder_export(tmp_path / "one-step")
    assert sampling == SamplingConfig(solver="euler", steps=1, time_shift=stage.teacher_sampling.time_shift)
    for name in ("reducer/model.safetensors", "reducer/config.json", "decoder/config.json"):
        assert (tmp_path / "one-step" / name).read_bytes() == (decoder_export / name).read_bytes(), name
    trained = stage.decoder.state_dict()
    assert all(torch.equal(student.state_dict()[k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], stage.teacher.state_dict()[k]) for k in trained)  # it did train

    saved = torch.load(tmp_path / "distill.ckpt", weights_only=True)["state_dict"]
    assert {key.split(".")[0] for key in saved} == {"decoder"}
    reloaded = DecoderDistillStage.load_from_checkpoint(tmp_path / "distill.ckpt", map_location="cpu")
    assert all(torch.equal(reloaded.decoder.state_dict()[k], trained[k]) for k in trained)
    assert reloaded.teacher_sampling == HEUN_10


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (SamplingConfig(solver="heun", steps=1), "sampling.solver must be 'euler'"),
        (SamplingConfig(solver="euler", steps=1, guidance_scale=2.0), "sampling.guidance_scale must be 1"),
    ],
)
def test_a_student_sampling_it_cannot_train_for_is_refused(pretrained, decoder_export, sampling, message):
    with pytest.raises(ValueError, match=message):
        make_distill(pretrained, decoder_export, sampling=sampling)


def test_a_missing_teacher_export_is_named(pretrained, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as raised:
        make_distill(pretrained, missing)
    assert str(raised.value) == (
        f"DecoderDistillStage teacher_export: no such folder '{missing}' (written as a path; a Hub id looks like "
        "'org/name')"
    )


# ---------------------------------------------------------------------------------------------------- bundling
def test_export_bundles_a_student_in_place_of_the_teacher(pretrained, decoder_export, tmp_path):
    """`vugen export --decoder_export` takes a decoder export with the same reducer (a distilled one), and refuses
    one whose reducer differs (its latents are another space), writing nothing."""
    sampler = make_stage(pretrained, decoder_export)
    trainer = Trainer(max_steps=1, default_root_dir=tmp_path, **QUIET_TRAINER | {"limit_val_batches": 0})
    trainer.fit(sampler, datamodule=shapes(2))
    trainer.save_checkpoint(tmp_path / "sampler.ckpt")
    student = make_distill(pretrained, decoder_export)
    torch.nn.init.normal_(student.decoder.latent_proj.weight, std=0.1)  # a student that differs from its teacher
    student.export(tmp_path / "one-step")

    bundle = export(str(tmp_path / "sampler.ckpt"), str(tmp_path / "bundle"), decoder_export=str(tmp_path / "one-step"))

    pipe = VugenPipeline.from_pretrained(bundle)
    assert pipe.decoder_sampling.steps == 1 and pipe.decoder_sampling.solver == "euler"
    assert "| pixel decoder | 1 euler step |" in (bundle / "README.md").read_text()  # the model card says so
    assert torch.equal(pipe.decoder.latent_proj.weight, student.decoder.latent_proj.weight)

    other = make_decoder_export(LlavaAdapter(str(pretrained)), tmp_path / "other")
    torch.manual_seed(1)
    reducer, decoder, sampling = read_decoder_export(other)
    torch.nn.init.normal_(next(reducer.parameters()))
    write_decoder_export(other, reducer, decoder, sampling)
    with pytest.raises(ValueError, match="its reducer is not the one .*sampler.ckpt trained with"):
        export(str(tmp_path / "sampler.ckpt"), str(tmp_path / "refused"), decoder_export=str(other))
    assert not (tmp_path / "refused").exists()
