"""Any VLM of transformers' image-text-to-text mapping, taken as a user would: `vugen tiny ARCH DIR` (its own config
class shrunk, its own processor and chat template), then `vugen check DIR` through `auto`.

- A sample of the coverage matrix (`make coverage`, docs/coverage.md): the 9 families and architectures outside them
  that cover the ways VLMs lay out image tokens and language models: packed flat patches with a grid tensor, dynamic
  resolution, pixel-shuffle / pooling projectors, tiled processors, MoE and hybrid language models.
- Two architectures outside the families end to end through the CLI with the demo's configs, naming `auto` in YAML:
  stage 1, stage 3, the latent cache, stage 2, `vugen export` and `vugen generate`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from tests.test_configs import ROOT
from tools.coverage_matrix import first_failure
from vugen.adapter import positions_from_mask
from vugen.cli import run
from vugen.commands.check import check_checkpoint, smallest_image_size
from vugen.conformance import (
    PROMPTS,
    CheckSkipped,
    check_kv_cache,
    check_lora_targets,
    check_positions,
    check_raster_order,
    half_images,
)
from vugen.generation import LatentSampler, LatentSamplerConfig
from vugen_adapters.auto import AutoAdapter
from vugen_adapters.token_layout import LayoutNotDerivable

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "paligemma", "internvl", "gemma3"]
OUTSIDE = {
    "glm4v": "flat patches packed in merge-block order with image_grid_thw, M-RoPE LM",
    "lighton_ocr": "Pixtral tower: every image's tokens packed into one [1, sum N, D] sequence, no grid tensor",
    "llava_next": "tiled (anyres) processor: the whole image is one view among its tiles",
    "granite_docling": "pixel-shuffle connector over a SigLIP tower",
    "qwen3_vl_moe": "MoE language model, deepstack vision features",
    "cosmos3_edge": "dynamic resolution, packed patches",
    "deepseek_vl": "hybrid SigLIP + SAM towers, LLaMA LM",
    "kimi_k25": "DeepSeek-V3 LM: multi-head latent attention, MoE with fused experts",
    "lfm2_vl": "SigLIP2 NaFlex: flat patches padded per image, pixel-unshuffle projector; convolution/attention LM",
    "lfm3_vl": "hybrid convolution / sliding-window attention LM: the latent sampler runs causal",
    "qwen3_5": "hybrid linear-attention (Gated DeltaNet) / attention LM: the latent sampler runs causal",
    "unlimited_ocr": "two towers in series: SAM's downsampled map fed to a CLIP encoder, both concatenated per patch",
    "nemotron_h_omni": "hybrid Mamba / attention LM: LoRA leaves out the mixer layers peft refuses",
    "llama4": "MoE LM whose router is an nn.Linear returning a tuple: no LoRA there",
    "granite4_vision": "an LM that builds no KV cache itself (generate gives it one)",
    "kosmos-2": "an LM that takes only a [B, S] padding mask: the latent sampler runs causal",
}
END_TO_END = ["glm4v", "llava_next"]


@pytest.mark.parametrize(
    ("arch", "bidirectional"), [("qwen3_5", False), ("lfm3_vl", False), ("kosmos-2", False), ("gemma3", True)]
)
def test_latent_attention_follows_the_kinds_of_language_model_layers(arch, bidirectional, tiny_checkpoint):
    """Linear-attention and convolution layers take no mask, nor does a language model that expands a `[B, S]`
    padding mask itself (Kosmos-2's): latent tokens there cannot see each other both ways, and asking for it is one
    line; full and sliding-window attention layers can."""
    adapter = AutoAdapter(str(tiny_checkpoint(arch)))
    assert adapter.bidirectional_latents is bidirectional
    if bidirectional:
        LatentSampler(adapter, 8, 32, LatentSamplerConfig(image_attention="bidirectional"))
    else:
        with pytest.raises(ValueError, match="image_attention: .* set image_attention: causal"):
            LatentSampler(adapter, 8, 32, LatentSamplerConfig(image_attention="bidirectional"))
        LatentSampler(adapter, 8, 32, LatentSamplerConfig(image_attention="causal"))


class ColumnsMirrored(AutoAdapter):
    """The negative control of a raster order: the same tokens, each row read right to left."""

    def select_features(self, output, size, batch):
        features = super().select_features(output, size, batch)
        side = math.isqrt(features.shape[1])  # square images
        return features.unflatten(1, (side, side)).flip(2).flatten(1, 2)


def test_two_towers_in_series_give_their_patch_grid_in_raster_order(tiny_checkpoint):
    """Unlimited-OCR: SAM's downsampled `[B, C, h, w]` map is the CLIP encoder's patch embeddings; the tower returns
    CLIP's patch tokens (CLS dropped) beside the SAM map's, one per cell of the map in raster order."""
    adapter = AutoAdapter(str(tiny_checkpoint("unlimited_ocr")))
    size = adapter.native_size[0]
    assert adapter.token_grid(size, size) == (2, 2)  # 32 px, 4 px SAM patches, two stride-2 convolutions
    features = adapter.encode_images(half_images(size, 3))  # right half bright, then left half bright
    assert features.shape == (2, 4, 32 + 32)  # CLIP width + SAM width
    change = (features - adapter.encode_images(torch.zeros(1, 3, size, size))).norm(dim=-1)
    assert (change[0, [1, 3]].min() > change[0, [0, 2]].max()) and (change[1, [0, 2]].min() > change[1, [1, 3]].max())
    check_raster_order(adapter, size)
    with pytest.raises(AssertionError, match="not in raster order"):
        check_raster_order(ColumnsMirrored(str(tiny_checkpoint("unlimited_ocr"))), size)


def test_learned_query_tokens_are_refused_in_one_line_not_read_as_a_grid(tiny_checkpoint):
    """DeepSeek-OCR 2's tower ends in 144 learned queries ("visual causal flow") that each read the whole image: no
    raster order to read. Unlimited-OCR, its sibling without the queries, is the control (above)."""
    adapter = AutoAdapter(str(tiny_checkpoint("deepseek_ocr2")))
    assert adapter._learned_query_tables[(144, 32)] == "DeepseekOcr2VisionModel.query_768_resolution"
    with pytest.raises(LayoutNotDerivable, match=r"^deepseek_ocr2: .* 144 learned query tokens .*not a patch grid"):
        adapter.encode_images(torch.zeros(1, 3, 192, 192))
    assert AutoAdapter(str(tiny_checkpoint("unlimited_ocr")))._learned_query_tables == {}


def linear_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def test_lora_leaves_out_the_mamba_layers_peft_refuses(tiny_checkpoint):
    """peft refuses LoRA on a Mamba mixer's `out_proj` (fused kernels read its weight) in a Nemotron-H language model,
    by name, wherever it occurs: the derived targets leave it out and keep every other linear layer."""
    adapter = AutoAdapter(str(tiny_checkpoint("nemotron_h_omni")))
    linear = linear_names(adapter.language_model)
    assert "out_proj" in linear and "in_proj" in linear  # the LM has one: leaving it out is a choice
    assert adapter.lora_target_modules == sorted(linear - {"out_proj"})
    check_lora_targets(adapter, smallest_image_size(adapter))  # injected on the LM itself, where peft checks names


def test_lora_leaves_out_linear_layers_with_their_own_forward(tiny_checkpoint):
    """Llama 4's MoE router is an `nn.Linear` whose forward returns (scores, logits): LoRA cannot add to that."""
    adapter = AutoAdapter(str(tiny_checkpoint("llama4")))
    router = next(m for name, m in adapter.language_model.named_modules() if name.endswith(".router"))
    assert isinstance(router, nn.Linear) and isinstance(router(torch.ones(1, router.in_features)), tuple)
    assert adapter.lora_target_modules == sorted(linear_names(adapter.language_model) - {"router"})
    check_lora_targets(adapter, smallest_image_size(adapter))


def test_a_language_model_that_builds_no_cache_is_given_one(tiny_checkpoint):
    """Granite 4 Vision's language model leaves its KV cache to `generate`: asked for one and given none, it returns
    none. `run_language_model` gives it the one `generate` would, so the prompt's cache comes back."""
    adapter = AutoAdapter(str(tiny_checkpoint("granite4_vision")))
    encoding = adapter.tokenize(PROMPTS)
    embeds, mask = adapter.embed_tokens(encoding["input_ids"]), encoding["attention_mask"]
    with torch.no_grad():
        own = adapter.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    assert own.get("cache") is None and own.get("past_key_values") is None
    _, cache = adapter.run_language_model(embeds, mask)
    assert cache.get_seq_length() == embeds.shape[1]
    check_kv_cache(adapter, smallest_image_size(adapter))


def test_position_ids_may_be_a_strided_view(tiny_checkpoint):
    """Callers pass slices of positions (the latent block's, after the prompt's); Kosmos-2's text model `view`s them,
    which a strided tensor cannot take: `run_language_model` gives the same hidden states as for contiguous ones."""
    adapter = AutoAdapter(str(tiny_checkpoint("kosmos-2")))
    encoding = adapter.tokenize(PROMPTS)
    embeds, mask = adapter.embed_tokens(encoding["input_ids"]), encoding["attention_mask"]
    positions = positions_from_mask(mask, mask.shape[1])
    strided = torch.cat([positions, positions], dim=1)[:, -positions.shape[1] :]  # the tail of a longer run's
    assert torch.equal(strided, positions) and not strided.is_contiguous()
    with pytest.raises(RuntimeError, match="view size is not compatible"), torch.no_grad():
        adapter.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=strided)
    hidden, _ = adapter.run_language_model(embeds, mask, strided)
    assert torch.equal(hidden, adapter.run_language_model(embeds, mask, positions)[0])


class FromZero(AutoAdapter):
    """Positions counted from 0 whatever the language model counts from (what `run_language_model` did before)."""

    position_offset = 0


class NeedsPositions(nn.Module):
    """A language model that must be told its positions: it numbers no token itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, position_ids=None, cache=None, **kwargs):
        if position_ids is None:
            raise ValueError("position_ids are required")
        return self.inner(position_ids=position_ids, cache=cache, **kwargs)


class TellsPositions(AutoAdapter):
    @property
    def language_model(self) -> nn.Module:
        return NeedsPositions(super().language_model)


def test_positions_count_from_where_the_language_model_counts(tiny_checkpoint):
    """Kosmos-2's text model numbers the tokens from `padding_idx + 1` (its table's row at `padding_idx` is zero):
    the offset is measured, and an unpadded prompt gets the hidden states of the model's own pass. Negative control:
    counted from 0, the same prompt reads differently, and `check_positions` says so."""
    path = str(tiny_checkpoint("kosmos-2"))
    adapter = AutoAdapter(path)
    padding_idx = adapter.language_model.embed_positions.padding_idx
    assert adapter.position_offset == padding_idx + 1 == adapter.vlm.config.text_config.pad_token_id + 1
    check_positions(adapter, smallest_image_size(adapter))
    with pytest.raises(AssertionError, match="positions differ from the language model's own"):
        check_positions(FromZero(path), smallest_image_size(adapter))


def test_a_rotary_language_model_counts_from_zero(tiny_checkpoint):
    """RoPE depends on relative positions only, so every offset reproduces the own pass: the first, 0, is taken."""
    adapter = AutoAdapter(str(tiny_checkpoint("llava")))
    assert adapter.position_offset == 0
    check_positions(adapter, smallest_image_size(adapter))


def test_a_language_model_that_numbers_no_token_itself_is_skipped(tiny_checkpoint):
    """Without an own numbering there is nothing to compare with: offset 0, and the check skips saying why."""
    adapter = TellsPositions(str(tiny_checkpoint("llava")))
    assert adapter.position_offset == 0
    with pytest.raises(CheckSkipped, match="does not run without position_ids"):
        check_positions(adapter, smallest_image_size(adapter))


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES + sorted(OUTSIDE))
def test_the_coverage_sample_passes_every_check_through_auto(arch, tmp_path):
    folder = tmp_path / arch
    run(["tiny", arch, str(folder)])
    report = check_checkpoint(str(folder), adapter="auto", workdir=tmp_path / "check")
    assert report.status == "pass", first_failure(report.to_dict())
    assert report.model_type == json.loads((Path(folder) / "config.json").read_text())["model_type"]


# ------------------------------------------------------------------------------------------------------- end to end
ONE_CPU_RUN = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.val_check_interval=2",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]
SMALL_SHAPES = ["--data.init_args.train_size=8", "--data.init_args.val_size=4", "--data.init_args.batch_size=4"]


def auto_adapter_yaml(path: Path, node: str, pretrained: Path) -> Path:
    """The YAML a user writes to point a stage at their VLM through `auto`: no code."""
    adapter = {"class_path": "auto", "init_args": {"pretrained": str(pretrained), "dtype": "float32"}}
    config: dict = {"adapter": adapter} if node == "" else {"model": {"init_args": {"adapter": adapter}}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", END_TO_END)
def test_an_architecture_outside_the_families_runs_every_stage_through_the_cli(arch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo configs write under outputs/demo/
    demo, vlm = ROOT / "configs" / "demo", tmp_path / "vlm"
    run(["tiny", arch, str(vlm)])
    run(["check", str(vlm), "--adapter", "auto"])  # raises unless every check passes
    stage, cache = (
        auto_adapter_yaml(tmp_path / "stage.yaml", "model", vlm),
        auto_adapter_yaml(tmp_path / "c.yaml", "", vlm),
    )
    feature_dim = f"--model.init_args.reducer.init_args.feature_dim={AutoAdapter(str(vlm)).feature_dim}"

    reducer = run(["fit", "--config", str(demo / "reducer.yaml"), "--config", str(stage), feature_dim, *ONE_CPU_RUN,
                   *SMALL_SHAPES])  # fmt: skip
    assert reducer.model.reducer.feature_dim == reducer.model.adapter.feature_dim
    decoder = run(["fit", "--config", str(demo / "decoder.yaml"), "--config", str(stage), *ONE_CPU_RUN, *SMALL_SHAPES,
                   "--model.init_args.sampling.steps=1"])  # fmt: skip
    assert math.isfinite(decoder.trainer.callback_metrics["train/loss"].item())
    for split in ("train", "val"):
        run(["cache-latents", "--config", str(demo / "cache.yaml"), "--config", str(cache), *SMALL_SHAPES,
             "--split", split, "--out_dir", f"outputs/demo/latents/{split}"])  # fmt: skip
    sampler = run(["fit", "--config", str(demo / "sampler.yaml"), "--config", str(stage), *ONE_CPU_RUN,
                   "--data.init_args.batch_size=4"])  # fmt: skip
    assert sampler.trainer.global_step == 2 and math.isfinite(sampler.trainer.callback_metrics["train/loss"].item())
    run(["export", "outputs/demo/sampler.ckpt", "outputs/demo/bundle"])
    paths = run(["generate", "--bundle=outputs/demo/bundle", "--out=samples", "--prompt", "a large red circle",
                 "--steps=2", "--accelerator=cpu"])  # fmt: skip
    with Image.open(paths[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    bundle = json.loads((tmp_path / "outputs/demo/bundle/vugen.json").read_text())
    assert "AutoAdapter" in json.dumps(bundle)
