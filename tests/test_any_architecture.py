"""Any VLM of transformers' image-text-to-text mapping, taken as a user would: `vugen tiny ARCH DIR` (its own config
class shrunk, its own processor and chat template), then `vugen check DIR` through `auto`.

- A sample of the coverage matrix (`make coverage`, docs/coverage.md): the 9 families and architectures outside them
  that cover the ways VLMs lay out image tokens and language models: packed flat patches with a grid tensor, dynamic
  resolution, pixel-shuffle / pooling projectors, tiled processors, MoE and hybrid language models.
- Two architectures outside the families end to end through the CLI with the demo's configs, naming `auto` in YAML:
  stage 1, stage 3, the latent cache, stage 2, `vugen export` and `vugen generate`.
"""

from __future__ import annotations

import inspect
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
from vugen.check_runner import CheckSkipped
from vugen.cli import run
from vugen.commands._recipe_checks import check_understanding_preserved
from vugen.commands.check import check_checkpoint, smallest_image_size
from vugen.conformance import (
    BRIGHT,
    PROMPTS,
    check_kv_cache,
    check_latent_attention,
    check_lora_targets,
    check_positions,
    check_raster_order,
    striped_images,
)
from vugen.generation import LatentSampler, LatentSamplerConfig
from vugen_adapters.auto import IMAGE_INSTRUCTION, AutoAdapter, normalized_pixels
from vugen_adapters.per_layer_inputs import embedded_token_ids
from vugen_adapters.token_layout import LayoutNotDerivable
from vugen_adapters.video_frames import OneFrameVideos

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "paligemma", "internvl", "gemma3"]
OUTSIDE = {
    "glm4v": "flat patches packed in merge-block order with image_grid_thw, M-RoPE LM",
    "lighton_ocr": "Pixtral tower: every image's tokens packed into one [1, sum N, D] sequence, no grid tensor",
    "llava_next": "tiled (anyres) processor: the whole image is one view among its tiles",
    "granite_docling": "pixel-shuffle connector over a SigLIP tower",
    "qwen3_vl_moe": "MoE language model, deepstack vision features",
    "cosmos3_edge": "dynamic resolution, packed patches",
    "deepseek_vl": "hybrid SigLIP + SAM towers, LLaMA LM",
    "instructblip": "Q-Former reads the prompt: qformer_input_ids from the processor's qformer_tokenizer",
    "instructblipvideo": "video processor and get_video_features only: images are one-frame videos",
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
    features = adapter.encode_images(striped_images(size, 3, 2))  # top dark, bottom bright; right, then left swapped
    assert features.shape == (3, 4, 32 + 32)  # CLIP width + SAM width
    change = (features[1:] - features[:1]).norm(dim=-1)
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


def test_lora_targets_compare_the_copy_of_the_vlm_with_itself(tiny_checkpoint):
    """Gemma 3n's vision tower as loaded (weights at the offsets safetensors left them) and a copy of it (weights
    realigned) can round differently on CPU, where kernels pick their path by alignment: LoRA's copy is compared with
    its own features before LoRA, not with the adapter's."""
    adapter = AutoAdapter(str(tiny_checkpoint("gemma3n")))
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


def test_a_pooling_kernel_sets_the_sides_images_are_encoded_at(tiny_checkpoint):
    """Gemma 4 pools k x k patches into one token, and its processor resizes to whole kernels of patches: sides are
    multiples of patch * k (4 px * 3), 48 px is 4x4 tokens. At 32 px (8 patches, not whole kernels) the processor
    counts 7 tokens and the tower pools 4: refused, not encoded."""
    adapter = AutoAdapter(str(tiny_checkpoint("gemma4")))
    assert adapter.size_multiple == 12
    assert adapter.token_grid(48, 48) == (4, 4)
    assert adapter.encode_images(torch.rand(2, 3, 48, 48)).shape[:2] == (2, 16)
    with pytest.raises(ValueError, match="multiples of 12 px"):
        adapter.encode_images(torch.rand(1, 3, 32, 32))


def test_a_vision_path_that_reads_the_prompt_gets_it_from_the_checkpoints_processor(tiny_checkpoint, tmp_path):
    """InstructBLIP's `get_image_features` requires `qformer_input_ids` (its Q-Former reads the instruction), which
    its image processor does not make: the checkpoint's processor makes them with its `qformer_tokenizer`, one row
    per image, and save_pretrained keeps that tokenizer. The features are the ViT's patch tokens, CLS dropped (a
    raster grid), not the Q-Former's query tokens."""
    adapter = AutoAdapter(str(tiny_checkpoint("instructblip")))
    instruction = adapter.prompt_processor.qformer_tokenizer([IMAGE_INSTRUCTION], return_tensors="pt")["input_ids"]
    made = adapter.prompt_side_inputs(["qformer_input_ids"], images=3)["qformer_input_ids"]
    assert instruction.shape[1] > 0 and torch.equal(made, instruction.expand(3, -1))

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = adapter.encode_images(images)
    patches = adapter.vlm.vision_model(normalized_pixels(images, adapter.image_processor, torch.float32))
    assert torch.equal(features, patches.last_hidden_state[:, 1:])

    adapter.save_pretrained(tmp_path / "saved")
    reloaded = AutoAdapter(str(tmp_path / "saved"))
    assert torch.equal(reloaded.prompt_side_inputs(["qformer_input_ids"], images=3)["qformer_input_ids"], made)


def test_prompt_side_inputs_no_processor_makes_are_named_in_one_line(tiny_checkpoint):
    """An input the processor does not make from a prompt is named, with the hook to override; a checkpoint whose
    image processor makes every required input loads no processor at all."""
    adapter = AutoAdapter(str(tiny_checkpoint("instructblip")))
    with pytest.raises(TypeError, match=r"^instructblip: its get_image_features needs image_sizes, which neither") as e:
        adapter.prompt_side_inputs(["qformer_input_ids", "image_sizes"], images=1)
    assert "\n" not in str(e.value) and "override `image_features`" in str(e.value)
    assert AutoAdapter(str(tiny_checkpoint("llava"))).prompt_processor is None


def test_a_vlm_without_get_image_features_still_saves(tiny_checkpoint, tmp_path):
    """GIT has no `get_image_features` (an adapter would override `image_features`): saving needs no processor."""
    adapter = AutoAdapter(str(tiny_checkpoint("git")))
    assert adapter.prompt_processor is None
    adapter.save_pretrained(tmp_path)
    assert AutoAdapter(str(tmp_path)).tokenize(["a cat"])["input_ids"].shape[0] == 1


def test_a_vlm_that_reads_images_only_as_videos_encodes_one_frame_videos(tiny_checkpoint):
    """InstructBLIP-Video has a video processor and `get_video_features` only; its tower reads every frame alone, so
    an image is a one-frame video: the features are the tower's patch tokens of each image, CLS dropped."""
    adapter = AutoAdapter(str(tiny_checkpoint("instructblipvideo")))
    assert isinstance(adapter.image_processor, OneFrameVideos)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert adapter.processor_inputs(images)["pixel_values"].shape == (2, 1, 3, 32, 32)
    patches = adapter.vlm.vision_model(normalized_pixels(images, adapter.image_processor, torch.float32))
    assert torch.allclose(adapter.encode_images(images), patches.last_hidden_state[:, 1:], atol=1e-5)


def test_a_vlm_that_reads_images_keeps_needing_its_image_processor(tiny_checkpoint, tmp_path):
    """The video fallback is for VLMs without `get_image_features`: LLaVA without its image processor is refused."""
    adapter = AutoAdapter(str(tiny_checkpoint("llava")))
    adapter.vlm.save_pretrained(tmp_path)
    adapter.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(OSError, match="has weights but no usable image processor"):
        AutoAdapter(str(tmp_path))


def test_raster_order_sees_an_encoder_that_normalises_each_raw_patch(tiny_checkpoint):
    """Gemma 4 Unified's embedder LayerNorms each raw patch, so uniform gray patches of any brightness are one token:
    the probe's bright half is coloured. Its tokens pass in raster order, and fail read column by column."""
    adapter = AutoAdapter(str(tiny_checkpoint("gemma4_unified")))
    black, white = torch.zeros(1, 3, 48, 48), torch.ones(1, 3, 48, 48)
    assert torch.equal(adapter.encode_images(black), adapter.encode_images(white))
    check_raster_order(adapter, 48)

    raster = adapter.select_features
    adapter.select_features = _column_major(raster)
    with pytest.raises(AssertionError, match="tokens are not in raster order"):
        check_raster_order(adapter, 48)


def _column_major(select_features):
    """`select_features` with its square grid of tokens read column by column."""

    def read_by_columns(*args, **kwargs):
        features = select_features(*args, **kwargs)
        side = math.isqrt(features.shape[1])
        return features.unflatten(1, (side, side)).transpose(1, 2).flatten(1, 2)

    return read_by_columns


def test_raster_order_sees_a_processor_that_standardises_each_image(tiny_checkpoint):
    """Kosmos-2.5's processor standardises each image by its own mean and std, so brightening one half of a blank
    image moves both halves alike; the probe swaps the colours of a half of two stripes, which keeps those statistics.
    Its tokens pass in raster order, and fail read column by column."""
    adapter = AutoAdapter(str(tiny_checkpoint("kosmos-2.5")))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(adapter.encode_images(images), adapter.encode_images(images * 0.5 + 0.25), atol=1e-4)
    check_raster_order(adapter, 32)

    adapter.select_features = _column_major(adapter.select_features)
    with pytest.raises(AssertionError, match="tokens are not in raster order"):
        check_raster_order(adapter, 32)


@pytest.mark.parametrize("lines", [4, 5])
@pytest.mark.parametrize("axis", [3, 2])
def test_raster_probe_swaps_one_half_and_keeps_each_channels_pixel_values(axis, lines):
    """The probe's images differ from the reference exactly on the named half, and each channel keeps its count of
    bright pixels (for an odd number of lines of tokens, up to the extra dark line of the swapped half)."""
    size = 40  # lines of tokens of 10 or 8 px
    reference, second, first = striped_images(size, axis, lines)
    assert set(reference.unique().tolist()) == {0.0, *BRIGHT}
    across = torch.arange(size) * lines // size >= (lines + 1) // 2  # the bright stripe: whole lines of tokens
    assert torch.equal(reference[0].any(axis - 2), across)
    half = torch.arange(size) >= size // 2
    changed = (half.view(1, -1) if axis == 3 else half.view(-1, 1)).expand(size, size)
    assert torch.equal((second != reference).any(0), changed)
    assert torch.equal((first != reference).any(0), ~changed)
    extra = 0 if lines % 2 == 0 else size // lines * size // 2  # 5 lines: 3 dark, 2 bright
    for image in (second, first):
        assert ((image > 0).sum((1, 2)) - (reference > 0).sum((1, 2))).tolist() == [extra] * 3


# --------------------------------------------------------------------------------------- geometry from the checkpoint
def test_a_processor_that_sizes_every_image_itself_says_the_native_size(tiny_checkpoint):
    """Aria's processor has no resize step to switch off: it pads every image to its `max_image_size` (490 px), which
    is then the encoder's input size, whatever the images' size. A processor with a resize step (LLaVA's) keeps the
    size its attributes name."""
    adapter = AutoAdapter(str(tiny_checkpoint("aria")))
    assert adapter.native_size == (490, 490)
    assert adapter.token_grid(32, 32) == adapter.token_grid(64, 48) == (35, 35)
    assert adapter.encode_images(torch.rand(1, 3, 32, 32)).shape[:2] == (1, 35 * 35)
    assert AutoAdapter(str(tiny_checkpoint("llava"))).native_size == (32, 32)


def test_a_processor_that_cuts_tiles_of_its_size_keeps_the_images_size(tiny_checkpoint):
    """Inkling 2's processor `size` (8 px in the tiny) is the tile it cuts images into, not a size it resizes to:
    images keep their own size, in multiples of a merged patch (patch 4 x merge 2)."""
    adapter = AutoAdapter(str(tiny_checkpoint("inkling2")))
    assert adapter.native_size is None and adapter.size_multiple == 8
    assert adapter.input_size(32, 48) == (32, 48)
    with pytest.raises(ValueError, match="multiples of 8 px"):
        adapter.input_size(36, 36)


def test_a_tower_that_names_no_patch_size_is_measured_at_a_size_its_processor_makes(tiny_checkpoint):
    """Apertus 1.5's VQ tokenizer names no patch size: its stride (16 px) is measured on the size its own processor
    makes of an image (a 2 px probe is no input for its convolutions), and images must hold whole tokens."""
    adapter = AutoAdapter(str(tiny_checkpoint("apertus1p5")), feature_source="projector")
    assert adapter.patch_stride == 16 and adapter.size_multiple == 16
    assert adapter.token_grid(48, 64) == (3, 4)
    assert adapter.encode_images(torch.rand(2, 3, 48, 64)).shape[:2] == (2, 12)
    with pytest.raises(ValueError, match="multiples of 16 px"):
        adapter.input_size(40, 40)


def test_an_image_tokenizer_without_encoder_tokens_says_to_read_the_projector(tiny_checkpoint):
    """Discrete codes leave no encoder tokens for `feature_source='vision'`: one line that names the way out."""
    adapter = AutoAdapter(str(tiny_checkpoint("apertus1p5")))
    with pytest.raises(ValueError, match="apertus1p5: .*no encoder tokens.*feature_source='projector'"):
        adapter.encode_images(torch.rand(1, 3, 64, 64))


def test_a_batch_norm_tower_encodes_in_eval_mode_inside_a_training_module(tiny_checkpoint):
    """FastVLM's timm tower has BatchNorm: inside a module put in training mode (what Lightning does) it keeps its
    running statistics, so an image encodes the same alone as in a batch."""
    adapter = AutoAdapter(str(tiny_checkpoint("fast_vlm")))
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in adapter.modules())
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    nn.ModuleDict({"adapter": adapter}).train()
    assert not [name for name, m in adapter.named_modules() if m.training]
    torch.testing.assert_close(adapter.encode_images(images[:1]), adapter.encode_images(images)[:1])


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


# ------------------------------------------------------------------------------------------------ per-layer inputs
def test_token_ids_come_back_only_from_rows_that_are_a_tokens_embedding_bit_for_bit():
    """Tokens sharing one embedding give the lowest id, tokens sharing the first coordinates each their own; a row one
    float step away from a token's embedding, or none at all, gives the placeholder."""
    embedding = nn.Embedding(40000, 16)  # more than one chunk of the table
    with torch.no_grad():
        embedding.weight[4500] = embedding.weight[7]  # two tokens, one embedding
        embedding.weight[9, :4] = embedding.weight[3, :4]  # the same first 4 coordinates, then others
    ids = torch.tensor([[3, 39999, 4500, 9, 20000]])
    rows = embedding(ids).detach() * 2.0  # the model's own embedding scales its table
    nudged = rows[0, 0].clone()
    nudged[-1] = torch.nextafter(nudged[-1], torch.tensor(float("inf")))
    embeds = torch.cat([rows, nudged.view(1, 1, -1), torch.randn(1, 1, 16)], dim=1)
    found = embedded_token_ids(embeds, lambda t: embedding(t) * 2.0, 40000, missing=-1)
    assert found.tolist() == [[3, 39999, 7, 9, 20000, -1, -1]]
    half = embedded_token_ids(embeds.bfloat16(), lambda t: (embedding(t) * 2.0).bfloat16(), 40000, missing=-1)
    assert half[0, :5].tolist() == [3, 39999, 7, 9, 20000]


@pytest.mark.parametrize("arch", ["gemma4", "gemma3n"])
def test_prompt_tokens_get_the_per_layer_inputs_of_their_ids_and_latents_the_pad_tokens(arch, tiny_checkpoint):
    """Gemma 3n / 4 add a per-layer embedding of each token id to every layer. From embeddings alone, the prompt's
    rows get those of their ids (the language model's hidden states are its own from the ids, bit for bit) and
    latent rows those of the pad id, as the VLM's own forward gives image tokens."""
    adapter = AutoAdapter(str(tiny_checkpoint(arch)))
    model, pad = adapter.language_model, adapter.vlm.config.get_text_config().pad_token_id
    for module in model.modules():  # a fresh Gemma 3n scales AltUp's corrected output by 0, silencing per-layer inputs
        if hasattr(module, "correct_output_scale"):
            nn.init.ones_(module.correct_output_scale)
    encoding = adapter.tokenize(PROMPTS[1:])  # one prompt: no padding, positions from 0 as the model's own
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    prompt = adapter.embed_tokens(ids)
    latents = torch.randn(1, 3, adapter.hidden_size, generator=torch.Generator().manual_seed(0)).to(prompt.dtype)
    given = adapter._per_layer_inputs(torch.cat([prompt, latents], dim=1))["per_layer_inputs"]
    placeholder = torch.full((1, 3), pad, dtype=torch.long)
    assert torch.equal(given, model.get_per_layer_inputs(torch.cat([ids, placeholder], dim=1)))
    assert not torch.equal(given[:, -3:], model.get_per_layer_inputs(ids[:, -3:]))  # latents: not the prompt's
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pad_only = model.get_per_layer_inputs(torch.full_like(ids, pad))
        pads = model(inputs_embeds=prompt, attention_mask=mask, per_layer_inputs=pad_only)
    assert not torch.equal(pads.last_hidden_state, own)  # per-layer inputs matter here: equal states are no accident
    assert torch.equal(adapter.run_language_model(prompt, mask)[0], own)


def test_latent_tokens_run_through_a_language_model_with_per_layer_inputs(tiny_checkpoint):
    """Gemma 4's language model, left to recover the token ids from embeddings itself, fails on latent tokens: through
    `run_language_model` they attend both ways and the sampler's LoRA leaves the prompt's hidden states untouched."""
    adapter = AutoAdapter(str(tiny_checkpoint("gemma4")))
    embeds = torch.randn(1, 4, adapter.hidden_size)
    with pytest.raises(RuntimeError, match="needs to reverse the embedding"), torch.no_grad():
        adapter.language_model(inputs_embeds=embeds)
    size = smallest_image_size(adapter)
    check_latent_attention(adapter, size)
    check_understanding_preserved(adapter, size)
    assert not AutoAdapter(str(tiny_checkpoint("gemma3")))._takes_per_layer_inputs  # no per-layer inputs: none given


# ------------------------------------------------------------------------ towers without a plain get_image_features
def _pixels(adapter: AutoAdapter, images):
    return adapter.pixel_inputs(images)["pixel_values"]


def test_a_vlm_without_get_image_features_reads_its_tower_and_the_projector_beside_it(tiny_checkpoint):
    """GIT calls its CLIP tower and projection inside `forward`: the adapter finds the tower by its config and the
    projector by its widths, and returns exactly what `forward` feeds the language model, CLS dropped."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vision, projector = (AutoAdapter(str(tiny_checkpoint("git")), feature_source=s) for s in ("vision", "projector"))
    git = vision.vlm.git
    tower = git.image_encoder(_pixels(vision, images)).last_hidden_state
    assert vision._feature_model.tower is git.image_encoder and vision._feature_model.projector is git.visual_projection
    assert torch.allclose(vision.encode_images(images), tower[:, 1:], atol=1e-6)
    assert torch.allclose(projector.encode_images(images), git.visual_projection(tower)[:, 1:], atol=1e-6)
    assert projector.feature_dim == vision.hidden_size != vision.feature_dim


@pytest.mark.parametrize(
    ("arch", "inner", "size"), [("pi0", "model.vlm", 32), ("diffusion_gemma", "model.encoder", 24)]
)
def test_get_image_features_is_found_on_the_inner_module_that_has_it(arch, inner, size, tiny_checkpoint):
    """pi0 wraps a PaliGemma, DiffusionGemma's encoder holds the tower: their `get_image_features` and vision config
    are read there, and the features are that module's own."""
    adapter = AutoAdapter(str(tiny_checkpoint(arch)), image_size=size)
    module = adapter.vlm.get_submodule(inner)
    assert adapter._feature_model is module and adapter.vision_config is module.config.vision_config
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = adapter.accepted_image_inputs(adapter.pixel_inputs(images))
    expected = module.get_image_features(**inputs).last_hidden_state.reshape(1, -1, adapter.feature_dim)
    assert torch.equal(adapter.encode_images(images), expected)


def _quadrant_change(adapter: AutoAdapter, size: int, corner: str) -> tuple[float, float]:
    """Mean feature change of the top-left and bottom-right token quadrants when one corner block turns white."""
    image, block = torch.zeros(1, 3, size, size), size // 4
    rows = slice(0, block) if corner == "top-left" else slice(size - block, size)
    image[..., rows, rows] = 1
    change = (adapter.encode_images(image) - adapter.encode_images(torch.zeros_like(image))).norm(dim=-1)
    grid = change.reshape(*adapter.token_grid(size, size))
    half = grid.shape[0] // 2
    return grid[:half, :half].mean().item(), grid[half:, half:].mean().item()


@pytest.mark.parametrize(("arch", "size"), [("chameleon", 128), ("emu3", 64)])
def test_a_vq_tokenizer_gives_its_continuous_latent_grid(arch, size, tiny_checkpoint):
    """Chameleon and Emu3 have a VQ tokenizer (`vq_config`), no vision tower: `vision` is the encoder's latent map
    before quantisation, one token per latent cell, raster (a white corner moves its own quadrant's tokens most, in
    both corners; the half-image check cannot tell: GroupNorm turns the dark half as far from black as the bright)."""
    adapter = AutoAdapter(str(tiny_checkpoint(arch)), image_size=size)
    vq = adapter.vlm.model.vqmodel
    assert adapter.vision_config is vq.config
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = adapter.accepted_image_inputs(adapter.pixel_inputs(images))
    latent = vq.encode(**inputs).last_hidden_state  # [B, C, h, w], or [B, 1 frame, C, h, w] (Emu3)
    latent = latent.reshape(2, -1, *latent.shape[-3:])[:, 0]
    assert torch.equal(adapter.encode_images(images), latent.flatten(2).transpose(1, 2))
    assert adapter.patch_stride == size // latent.shape[-1] and adapter.patch_stride > 1
    top_left, bottom_right = _quadrant_change(adapter, size, "top-left")
    assert top_left > 1.2 * bottom_right
    top_left, bottom_right = _quadrant_change(adapter, size, "bottom-right")
    assert bottom_right > 1.2 * top_left


def test_a_vq_tokenizers_projector_tokens_are_the_embeddings_of_its_image_tokens(tiny_checkpoint):
    """Chameleon's `projector` features are what its language model reads for an image: the input embeddings of the
    image's VQ codes, mapped to its vocabulary, in raster order."""
    adapter = AutoAdapter(str(tiny_checkpoint("chameleon")), feature_source="projector", image_size=64)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model = adapter.vlm.model
    codes = model.vqmodel.encode(_pixels(adapter, images)).image_tokens.reshape(2, -1)
    embeddings = model.get_input_embeddings()(model.vocabulary_mapping.convert_img2bpe(codes))
    assert codes.unique().numel() > 1  # a grid of one code would be raster in any order
    assert torch.equal(adapter.encode_images(images), embeddings)


def test_images_a_model_reads_as_patches_are_cut_by_the_processors_own_patchify(tiny_checkpoint):
    """Fuyu's image processor gives whole images and its model reads flat patches (one linear layer): the adapter
    cuts them with the processor's `patchify_image`, and token k is raster patch k (one white patch moves one token)."""
    adapter = AutoAdapter(str(tiny_checkpoint("fuyu")))
    size, patch = adapter.native_size[0], adapter.vit_patch_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels = _pixels(adapter, images)
    assert pixels.shape == (2, (size // patch) ** 2, 3 * patch * patch)
    assert torch.equal(adapter.encode_images(images), adapter.vlm.model.vision_embed_tokens(pixels))
    image, (row, col) = torch.zeros(1, 3, size, size), (1, 2)  # off the diagonal: a transposed order would miss
    image[..., row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = 1
    change = (adapter.encode_images(image) - adapter.encode_images(torch.zeros_like(image))).norm(dim=-1)[0]
    assert torch.nonzero(change).flatten().tolist() == [row * (size // patch) + col]


def test_the_language_model_inside_a_vla_model_is_the_one_reading_its_input_embeddings(tiny_checkpoint):
    """PI0's `get_decoder()` is its whole vision-language-action model (it takes `pixel_values`); its language model is
    PaliGemma's Gemma, which owns the input embeddings, not the action expert: a Gemma too, with embeddings of its own.
    The LM width comes from that model's config, as PI0's own config names none."""
    adapter = AutoAdapter(str(tiny_checkpoint("pi0")))
    model, expert = adapter.language_model, adapter.vlm.get_decoder().dit
    assert type(expert) is type(model) and expert is not model  # same class: picking by class could take either
    assert model.get_input_embeddings() is adapter.vlm.get_input_embeddings()
    assert not hasattr(adapter.vlm.config.get_text_config(), "hidden_size")
    assert adapter.hidden_size == model.config.hidden_size == adapter.embed_tokens(torch.tensor([[1]])).shape[-1]
    embeds = torch.randn(1, 3, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(inputs_embeds=embeds).last_hidden_state.shape == (1, 3, adapter.hidden_size)


def test_a_block_diffusion_models_language_model_is_its_causal_prompt_model(tiny_checkpoint):
    """DiffusionGemma's `get_decoder()` refines a canvas of token ids (no `inputs_embeds`) from a read-only KV cache;
    the model writing that cache reads the prompt, image tokens included, as embeddings, causally: vugen's language
    model. Changing a later token leaves the earlier tokens' hidden states as they were; the cache holds them all."""
    adapter = AutoAdapter(str(tiny_checkpoint("diffusion_gemma")))
    canvas = adapter.vlm.get_decoder()
    assert "inputs_embeds" not in inspect.signature(canvas.forward).parameters
    model = adapter.language_model
    assert model is not canvas and model.get_input_embeddings() is adapter.vlm.get_input_embeddings()
    embeds = torch.randn(1, 4, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    changed = embeds.clone()
    changed[:, -1] += 1
    with torch.no_grad():
        first, second = model(inputs_embeds=embeds, use_cache=True), model(inputs_embeds=changed)
    assert torch.equal(first.last_hidden_state[:, :3], second.last_hidden_state[:, :3])
    assert not torch.equal(first.last_hidden_state[:, 3], second.last_hidden_state[:, 3])
    assert first.cache.get_seq_length() == 4


@pytest.mark.parametrize(
    ("arch", "flag", "default_cache"), [("diffusion_gemma", {}, False), ("paligemma", {"is_causal": True}, True)]
)
def test_is_causal_is_passed_where_the_language_model_takes_it(tiny_checkpoint, arch, flag, default_cache):
    """PaliGemma's LM is marked bidirectional for its image prefix: vugen passes `is_causal=True`. DiffusionGemma's
    layers pass their own `is_causal` along with the call's, so the flag is left out (the raw call raises: the
    negative control); it has no `generate`, so no default cache is given. Both run the language model causally."""
    adapter = AutoAdapter(str(tiny_checkpoint(arch)))
    assert adapter._causal_argument == flag and adapter._given_default_cache is default_cache
    embeds = torch.randn(1, 3, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 3, dtype=torch.long)
    if not flag:
        with pytest.raises(TypeError, match="is_causal"):
            adapter.language_model(inputs_embeds=embeds, attention_mask=mask, is_causal=True)
    changed = embeds.clone()
    changed[:, -1] += 1
    first, _ = adapter.run_language_model(embeds, mask)
    second, _ = adapter.run_language_model(changed, mask)
    # Close, not bit-equal: on some CPUs SDPA leaves the earlier positions 1e-6 apart when a later token changes
    # (its summation order); a model that read the changed token would move them by ~1.
    torch.testing.assert_close(first[:, :2], second[:, :2], rtol=0, atol=1e-5)
    assert (first[:, 2] - second[:, 2]).abs().amax() > 0.1


def test_a_vlm_naming_no_split_modules_is_sharded_by_its_checkpointing_layers(tiny_checkpoint):
    """GIT names no `_no_split_modules`: its FSDP / activation-checkpointing units are the layers transformers
    checkpoints one by one, its text decoder's among them."""
    adapter = AutoAdapter(str(tiny_checkpoint("git")))
    assert not adapter.vlm._no_split_modules
    assert {c.__name__ for c in adapter.block_classes} == {"GitLayer", "GitVisionEncoderLayer"}
    assert any(type(m).__name__ == "GitLayer" for m in adapter.language_model.modules())
