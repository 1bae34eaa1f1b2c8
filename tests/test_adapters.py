"""Every built-in family adapter, and `AutoAdapter` on every family, pass the conformance suite."""

from __future__ import annotations

import pytest
import torch

from vugen.registry import build_adapter
from vugen.testing import PROMPTS, AdapterConformance
from vugen_adapters.auto import AutoAdapter
from vugen_adapters.tiny import TINY_FAMILIES

FAMILIES = sorted(TINY_FAMILIES)
# What each family adapter listed by hand before `VLMAdapter.lora_target_modules` derived it from the LM.
DECODER_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
