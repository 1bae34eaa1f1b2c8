"""`make bench`'s one-step rows: the speed row on any decoder, and `--decoder-distilled CONFIG` on a trained
distillation's YAML (here a tiny one: a random teacher export and its copied student)."""

from __future__ import annotations

import math

import torch
import yaml

from benchmarks import decoder as decoder_bench
from benchmarks.common import Settings
from tests.fixtures_bundle import IMAGE_SIZE
from tests.test_distill_stage import make_distill
from vugen.decoder_export import read_decoder_export
from vugen_adapters.llava import LlavaAdapter

CPU = Settings(torch.device("cpu"), "32-true", quick=True)


def distill_config(pretrained, teacher, student, path):
    config = {
        "model": {
            "class_path": "vugen.stages.DecoderDistillStage",
            "init_args": {
                "adapter": {
                    "class_path": "vugen_adapters.llava.LlavaAdapter",
                    "init_args": {"pretrained": str(pretrained)},
                },
                "teacher_export": str(teacher),
                "teacher_sampling": {"solver": "heun", "steps": 10},
                "export_dir": str(student),
            },
        },
        "data": {
            "class_path": "vugen.data.shapes_datamodule.ShapesDataModule",
            "init_args": {"image_size": IMAGE_SIZE, "train_size": 4, "val_size": 4, "test_size": 6, "batch_size": 4},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_distilled_rows_compare_the_student_with_its_teacher_on_the_test_set(pretrained, decoder_export, tmp_path):
    stage = make_distill(pretrained, decoder_export)
    torch.nn.init.normal_(stage.decoder.latent_proj.weight, std=0.2)  # a student that differs from its teacher
    stage.export(tmp_path / "one-step")
    (tmp_path / "run").mkdir()
    config = distill_config(pretrained, decoder_export, tmp_path / "one-step", tmp_path / "run" / "distill.yaml")

    speed, quality = decoder_bench.distilled_rows(str(config), repeats=2, settings=CPU)

    assert speed.name == "decoder/one_step_vs_teacher/run" and speed.compares == "euler 1 / heun 10"
    assert speed.target == 0.1 and 0 < speed.ratio < 0.5  # 1 network call against 19
    assert quality.name == "decoder/one_step_vs_teacher/run/psnr" and "6 test images" in quality.detail
    student_db, teacher_db = (-10 * math.log10(value) for value in (quality.measured, quality.reference))
    assert f"{student_db:.2f} vs {teacher_db:.2f} dB" in quality.detail
    assert math.isclose(quality.ratio, 10 ** ((teacher_db - student_db) / 10), rel_tol=1e-9)
    assert quality.target == decoder_bench.WITHIN_ONE_DB and student_db != teacher_db


def test_one_step_speed_row_times_one_call_against_nineteen(pretrained, decoder_export):
    _, decoder, _ = read_decoder_export(decoder_export)
    grid = LlavaAdapter(str(pretrained)).token_grid(IMAGE_SIZE, IMAGE_SIZE)
    latents = torch.randn(4, grid[0] * grid[1], 8)
    row = decoder_bench.one_step_speed_row("", decoder, decoder, latents, grid, repeats=3, settings=CPU)
    assert row.name == "decoder/one_step_vs_teacher" and row.unit == "ms/image"
    assert row.measured > 0 and row.ratio < 0.5, row
