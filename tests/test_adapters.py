"""Every built-in family adapter, and `AutoAdapter` on every family, pass the conformance suite; what the families
share is derived once (LoRA targets, the plain-pixel fast path) and equals what each family used to declare."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vugen.registry import build_adapter
from vugen.testing import PROMPTS, AdapterConformance
from vugen_adapters.auto import AutoAdapter, normalized_pixels
from vugen_adapters.llava import LlavaAdapter
from vugen_adapters.tiny import TINY_FAMILIES

FAMILIES = sorted(TINY_FAMILIES)
# What each family adapter listed by hand before `VLMAdapter.lora_target_modules` derived it from the LM.
DECODER_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The families whose encoders read plain normalised [B, 3, H, W] pixels: the four whose adapters used to say so by
# overriding `pixel_inputs` with `normalized_pixels` (LLaVA twice: SigLIP and CLIP).
PLAIN_PIXELS = {"llava", "llava_clip", "llava_wide_tower", "paligemma", "internvl", "gemma3"}


@pytest.fixture(scope="module")
def image_size():
    return 32


class TestFamilyAdapters(AdapterConformance):
    @pytest.fixture(scope="class", params=FAMILIES)
    @classmethod
    def adapter(cls, request, tiny_checkpoint):
        return build_adapter(TINY_FAMILIES[request.param].adapter, pretrained=str(tiny_checkpoint(request.param)))

    def test_lora_targets_are_the_decoder_projections(self, adapter):
        """The derived default names exactly the LM's attention and MLP projections: nothing of the vision tower
        (SigLIP's `out_proj`, `fc1`, `fc2`), the projector or the LM head."""
        derived = adapter.lora_target_modules
        assert sorted(derived) == sorted(DECODER_PROJECTIONS), f"{type(adapter).__name__} ({adapter.pretrained})"


class TestAutoAdapter(AdapterConformance):
    @pytest.fixture(scope="class", params=FAMILIES)
    @classmethod
    def adapter(cls, request, tiny_checkpoint):
        return AutoAdapter(str(tiny_checkpoint(request.param)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("feature_source", ["vision", "projector"])
def test_family_adapter_agrees_with_auto(family, feature_source, tiny_checkpoint, image_size):
    path = str(tiny_checkpoint(family))
    family_adapter = build_adapter(TINY_FAMILIES[family].adapter, pretrained=path, feature_source=feature_source)
    auto = AutoAdapter(path, feature_source=feature_source)
    images = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(family_adapter.encode_images(images), auto.encode_images(images), atol=1e-5, rtol=1e-5)
    assert family_adapter.token_grid(image_size, image_size) == auto.token_grid(image_size, image_size)
    if type(family_adapter).tokenize is AutoAdapter.tokenize:  # PaliGemma writes its own prompt format
        assert torch.equal(family_adapter.tokenize(PROMPTS)["input_ids"], auto.tokenize(PROMPTS)["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_projector_tokens_have_the_language_model_width(family, tiny_checkpoint, image_size):
    adapter = AutoAdapter(str(tiny_checkpoint(family)), feature_source="projector")
    rows, cols = adapter.token_grid(image_size, image_size)
    features = adapter.encode_images(torch.rand(1, 3, image_size, image_size))
    assert features.shape == (1, rows * cols, adapter.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_pixels_are_detected_and_normalised_on_the_device(family, tiny_checkpoint, image_size):
    """`reads_plain_pixels` holds for exactly the plain-pixel families, under the family adapter and `AutoAdapter`.
    There the pixels and the features are bit for bit those of the old `normalized_pixels` overrides (and the image
    processor's numbers); everywhere else (flat patches, 5-D tiles) `pixel_inputs` is the processor's output."""
    path = str(tiny_checkpoint(family))
    family_adapter, auto = build_adapter(TINY_FAMILIES[family].adapter, pretrained=path), AutoAdapter(path)
    assert family_adapter.reads_plain_pixels is auto.reads_plain_pixels is (family in PLAIN_PIXELS), family
    images = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    processor = auto.processor_inputs(images)
    if family not in PLAIN_PIXELS:
        inputs = auto.pixel_inputs(images)
        assert inputs.keys() == processor.keys() and all(torch.equal(inputs[k], processor[k]) for k in inputs)
        return
    old = {"pixel_values": normalized_pixels(images, auto.image_processor, auto.dtype)}  # the old overrides' pixels
    torch.testing.assert_close(old["pixel_values"], processor["pixel_values"], rtol=0, atol=1e-6)
    for adapter in (family_adapter, auto):
        assert adapter.pixel_inputs(images).keys() == old.keys()
        assert torch.equal(adapter.pixel_inputs(images)["pixel_values"], old["pixel_values"])
        old_features = adapter.select_features(adapter.image_features(old), (image_size, image_size), batch=2)
        assert torch.equal(adapter.encode_images(images), old_features)


def test_a_processor_that_does_not_normalise_keeps_its_own_pixels(tiny_checkpoint, tmp_path, image_size):
    """Negative control: a LLaVA checkpoint whose processor leaves pixels unnormalised (`do_normalize: false`).
    The probe sees that plain pixels would differ and keeps the processor; the old `normalized_pixels` override
    normalised them anyway."""
    folder = shutil.copytree(tiny_checkpoint("llava"), tmp_path / "unnormalised")
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["do_normalize"] = False
    (folder / "processor_config.json").write_text(json.dumps(config))
    adapter = LlavaAdapter(str(folder))
    images = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    assert not adapter.reads_plain_pixels
    assert torch.equal(adapter.pixel_inputs(images)["pixel_values"], images)
