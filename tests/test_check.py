"""`vugen check PRETRAINED`: every check passes on the tiny LLaVA (exit 0, a row per check, the JSON record); a
deliberately broken adapter fails the check that covers it, with the reason and the hook, and exit 1 (negative
controls: the checks really detect it); a checkpoint vugen cannot use ends in one line."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from tests.cli_harness import assert_one_line_error, run_vugen
from vugen.applicability import NotApplicableError, check_recipe_applies
from vugen.cli import main
from vugen.commands import _recipe_checks
from vugen.commands.check import check_checkpoint, smallest_image_size
from vugen.conformance import ADAPTER_CHECKS, check_save_and_reload
from vugen_adapters.auto import AutoAdapter
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.tiny import build_tiny_vlm

ADAPTER_CHECK_NAMES = [check.name for check in ADAPTER_CHECKS]
STAGE_CHECK_NAMES = ["decoder_stage", "cache_latents", "sampler_stage", "export", "generate"]
EVERY_CHECK = ["load", *ADAPTER_CHECK_NAMES, "understanding", *STAGE_CHECK_NAMES]


class ColumnMajorLlava(LlavaAdapter):
    """Broken on purpose: feature tokens column by column instead of row by row."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        features = super().encode_images(images)
        b, n, d = features.shape
        side = math.isqrt(n)  # the tiny LLaVA's grid is square
        return features.reshape(b, side, side, d).transpose(1, 2).reshape(b, n, d)


class VisionLoraLlava(LlavaAdapter):
    """Broken on purpose: its `language_model` is the whole VLM body, so LoRA targets reach the vision tower."""

    @property
    def language_model(self) -> torch.nn.Module:
        return self.vlm.model


class BrokenEncoder(LlavaAdapter):
    """Broken on purpose: encoding images raises."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("encoder broken")


@pytest.fixture(scope="module")
def tiny_llava(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llava"))


def run_check(capsys, *args: str) -> tuple[int, str, str]:
    """``vugen check ARGS`` in this process as the console script runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()  # what building the checkpoint printed
    try:
        main(["check", *args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(stdout: str) -> dict[str, str]:
    """Check name -> its table row."""
    return {line.split()[0]: line for line in stdout.splitlines() if line.split() and line.split()[0] in EVERY_CHECK}


def test_every_check_passes_on_the_tiny_llava(tiny_llava, tmp_path, capsys):
    code, out, err = run_check(capsys, tiny_llava, "--json", str(tmp_path / "record.json"))

    assert code == 0, out + err
    table = rows(out)
    assert list(table) == EVERY_CHECK
    assert all(row.split()[1] == "pass" for row in table.values()), out
    assert "adapter llava (vugen_adapters.llava.LlavaAdapter), images 32 px" in out
    assert f"{len(EVERY_CHECK)} checks: {len(EVERY_CHECK)} passed, 0 failed, 0 skipped" in out
    assert "Loading weights" not in out  # the libraries' chatter stays out of the table
    record = json.loads((tmp_path / "record.json").read_text())
    assert (record["checkpoint"], record["model_type"], record["adapter"]) == (tiny_llava, "llava", "llava")
    assert record["status"] == "pass" and record["image_size"] == 32
    assert [(c["name"], c["status"]) for c in record["checks"]] == [(name, "pass") for name in EVERY_CHECK]
    assert all(c["seconds"] >= 0 and c["reason"] == c["hook"] == "" for c in record["checks"])


@pytest.mark.parametrize(
    ("broken", "failing", "reason", "hook"),
    [
        (ColumnMajorLlava, "raster_order", "tokens are not in raster order", "select_features / patch_layout"),
        (VisionLoraLlava, "lora_targets", "LoRA layers run while encoding images", "lora_target_modules"),
    ],
    ids=["column-major", "lora-in-vision-tower"],
)
def test_a_broken_adapter_fails_its_check(tiny_llava, capsys, broken, failing, reason, hook):
    class_path = f"{broken.__module__}.{broken.__qualname__}"
    code, out, err = run_check(capsys, tiny_llava, "--adapter", class_path, "--stages", "false")

    assert code == 1, out + err
    table = rows(out)
    assert table[failing].split()[1] == "FAIL" and reason in table[failing] and f"(override: {hook}" in table[failing]
    others = [name for name in ["load", *ADAPTER_CHECK_NAMES] if name != failing]
    assert all(table[name].split()[1] == "pass" for name in others), out  # a failure does not stop the rest
    assert all(table[name].split()[1] == "skip" for name in STAGE_CHECK_NAMES)
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"vugen check: error: 1 of {len(EVERY_CHECK)} checks failed")
    assert failing in errors[0] and "Traceback" not in err


def test_a_failed_check_skips_only_the_checks_that_need_it(tiny_llava, tmp_path):
    """Through the Python API: an encoder that raises fails `features`; the checks that encode images are skipped,
    naming it, and the language-side checks still run and pass."""
    report = check_checkpoint(tiny_llava, adapter=f"{__name__}.BrokenEncoder", workdir=tmp_path)

    status = {result.name: result for result in report.results}
    assert status["features"].status == "fail" and status["features"].reason == "RuntimeError: encoder broken"
    assert status["features"].hook == "token_grid / select_features"
    assert status["frozen"].status == status["understanding"].status == "fail"  # they encode images too
    for name in ["raster_order", "deterministic", "lora_targets", "save_reload", "decoder_stage"]:
        assert status[name].status == "skip" and "features" in status[name].reason, name
    for name in ["cache_latents", "sampler_stage", "export", "generate"]:
        assert status[name].status == "skip", name
    for name in ["tokenize", "embeddings", "gradients", "kv_cache", "padding", "block_classes", "describe"]:
        assert status[name].status == "pass", name
    assert report.status == "fail" and report.to_dict()["status"] == "fail"


def test_the_understanding_check_fails_when_lora_is_not_scoped(tiny_llava, monkeypatch):
    """Negative control: the same check with the sampler's LoRA on every token (scope `all`) sees the change."""
    adapter = LlavaAdapter(tiny_llava)
    _recipe_checks.check_understanding_preserved(adapter, 32)
    unscoped = dataclasses.replace(_recipe_checks.TINY_LORA, lora_scope="all")
    monkeypatch.setattr(_recipe_checks, "TINY_LORA", unscoped)
    with pytest.raises(AssertionError, match="differs from the base model"):
        _recipe_checks.check_understanding_preserved(adapter, 32)


@pytest.mark.parametrize("arch", ["kimi_k25", "blip-2"])
def test_understanding_stays_intact_on_moe_mla_and_flattening_language_models(arch, tiny_checkpoint):
    """Kimi-K2.5's DeepSeek-V3 LM: peft would remap its MLP names onto the fused expert parameters (LoRA on every
    token) and MLA runs `kv_b_proj` on [B, 1, T, r]; BLIP-2's OPT flattens [B, T, D] before its MLP. The scope holds on
    all of them."""
    adapter = AutoAdapter(str(tiny_checkpoint(arch)))
    _recipe_checks.check_understanding_preserved(adapter, smallest_image_size(adapter))


def test_the_check_side_is_the_smallest_the_adapter_encodes_into_enough_tokens(tiny_checkpoint):
    """Apertus 1.5 (projector tokens) takes multiples of its 16 px stride: 32 px gives 2x2 tokens, too few, and 40 px
    is no multiple, so the checks run at 48 px (3x3). A fixed-size encoder (LLaVA's) encodes the first side."""
    tokenizer = AutoAdapter(str(tiny_checkpoint("apertus1p5")), feature_source="projector")
    assert smallest_image_size(tokenizer) == 48
    assert smallest_image_size(AutoAdapter(str(tiny_checkpoint("llava")))) == 32


def test_save_and_reload_keeps_the_adapters_options(tiny_checkpoint, tmp_path):
    """The reloaded adapter reads the same feature source: projector tokens (the LM's width) stay projector tokens, so
    the check passes where rebuilding from `pretrained` alone would compare them with vision tokens."""
    adapter = AutoAdapter(str(tiny_checkpoint("llava")), feature_source="projector")
    vision = AutoAdapter(str(tiny_checkpoint("llava")))
    assert adapter.feature_dim != vision.feature_dim  # control: the two sources differ, so a lost option would show
    check_save_and_reload(adapter, 32, tmp_path)
    assert AutoAdapter(str(tmp_path), feature_source="projector").feature_dim == adapter.feature_dim


def test_the_stage_smoke_reduces_features_narrower_than_its_latent(tiny_checkpoint, tmp_path):
    """Emu3's VQ encoder gives 4-channel latents: the smoke's reducer maps them to 2 channels (a reducer must reduce),
    and the decoder stage and the latent cache run; LLaVA's wide features keep the usual 8."""
    adapter = AutoAdapter(str(tiny_checkpoint("emu3")))
    assert adapter.feature_dim == 4 and _recipe_checks.smoke_latent_dim(adapter) == 2
    smoke = _recipe_checks.RecipeSmoke(tmp_path, accelerator="cpu")
    smoke.decoder_stage(adapter, 32)
    smoke.cache_latents(adapter, 32)
    assert _recipe_checks.smoke_latent_dim(AutoAdapter(str(tiny_checkpoint("llava")))) == _recipe_checks.LATENT_DIM


# ---------------------------------------------------------------------------------------------------- bad inputs
def encoder_decoder_folder(directory) -> str:
    """A tiny VisionEncoderDecoderModel (ViT + GPT-2), saved with save_pretrained."""
    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
    VisionEncoderDecoderModel(config).save_pretrained(directory)
    return str(directory)


def remote_code_folder(directory, tiny_llava: str) -> str:
    """The tiny LLaVA's config with an `auto_map`: a checkpoint that ships its own modelling code."""
    config = json.loads((Path(tiny_llava) / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_custom.CustomVLM"}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def text_only_folder(directory) -> str:
    """A tiny GPT-2: a language model with no vision at all."""
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(directory)
    return str(directory)


def bad_checkpoint(kind: str, directory, tiny_llava: str) -> str:
    if kind == "no config.json":
        directory.mkdir()
        (directory / "weights.bin").write_bytes(b"")
        return str(directory)
    if kind == "remote code":
        return remote_code_folder(directory, tiny_llava)
    if kind == "encoder-decoder":
        return encoder_decoder_folder(directory)
    if kind == "cross-attention":  # Mllama: a decoder-only LM that reads the image through cross-attention layers
        return str(build_tiny_vlm("mllama", directory))
    return text_only_folder(directory)


BAD_INPUTS = {
    "no config.json": ("holds no VLM: config.json is missing", "fail"),
    "remote code": ("ships its own modelling code", "fail"),
    "encoder-decoder": (
        "not applicable: vision-encoder-decoder is an encoder-decoder model",
        "not_applicable",
    ),
    "cross-attention": (
        "not applicable: mllama's language model reads images through cross-attention",
        "not_applicable",
    ),
    "text-only LM": ("is not an image-text-to-text VLM", "fail"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_a_checkpoint_vugen_cannot_use_ends_in_one_line(kind, tiny_llava, tmp_path, capsys):
    folder = bad_checkpoint(kind, tmp_path / "checkpoint", tiny_llava)
    fragment, status = BAD_INPUTS[kind]

    code, out, err = run_check(capsys, folder, "--json", str(tmp_path / "record.json"))

    assert code == 1 and out == "", out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vugen check: error: ") and fragment in lines[0], err
    record = json.loads((tmp_path / "record.json").read_text())  # the coverage record, also when loading fails
    assert record["status"] == ("not_applicable" if status == "not_applicable" else "fail")
    assert record["checks"][0]["name"] == "load" and record["checks"][0]["status"] == status
    assert fragment in record["checks"][0]["reason"]
    later = {"not_applicable"} if status == "not_applicable" else {"skip"}
    assert {check["status"] for check in record["checks"][1:]} == later
    assert [check["name"] for check in record["checks"]] == EVERY_CHECK


@pytest.mark.slow
def test_the_console_script_ends_in_one_line(tmp_path):
    """The user's path: the `vugen` executable in its own process, on an encoder-decoder model."""
    folder = encoder_decoder_folder(tmp_path / "encoder-decoder")
    result = run_vugen("check", folder, cwd=tmp_path)
    assert_one_line_error(result, "not applicable: vision-encoder-decoder is an encoder-decoder model", code=1)


def test_encoder_decoder_configs_are_refused_where_the_adapter_loads(tmp_path):
    """`AutoAdapter` refuses the same folder before loading a weight (the check in `check_pretrained_source`)."""
    folder = encoder_decoder_folder(tmp_path / "encoder-decoder")
    with pytest.raises(NotApplicableError, match="needs a decoder-only language model that reads image tokens"):
        AutoAdapter(folder)
    with pytest.raises(NotApplicableError, match="florence2 is an encoder-decoder model"):
        check_recipe_applies({"model_type": "florence2", "text_config": {"is_encoder_decoder": True}}, "config.json")
    check_recipe_applies({"model_type": "llava", "text_config": {"model_type": "llama"}}, "config.json")
