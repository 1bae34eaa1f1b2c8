"""The custom-adapter example: ToyVLM, a VLM that is not a transformers model, passes the conformance suite
and loads through every registration route (YAML class path, `register_adapter`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from safetensors.torch import load_file
from torch import nn

import vugen.registry as registry
from examples.custom_adapter.adapter import ToyVLMAdapter
from examples.custom_adapter.toy_vlm import TOKENIZER_FILE, ToyVLM, save_toy_checkpoint
from vugen import build_adapter, register_adapter
from vugen.adapter import VLMAdapter
from vugen.commands.check import check_checkpoint
from vugen.data.latent_index import StaleCacheError, check_fingerprint, read_index
from vugen.data.latent_writer import write_latent_cache
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.nn import DimensionReducer
from vugen.registry import registered_adapter_name
from vugen.testing import PROMPTS, AdapterConformance

CONFIG = Path(__file__).parents[1] / "examples" / "custom_adapter" / "config.yaml"
CLASS_PATH = "examples.custom_adapter.adapter.ToyVLMAdapter"


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> Path:
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy-vlm"), seed=0)


@pytest.fixture(scope="module")
def toy_adapter(toy_checkpoint) -> ToyVLMAdapter:
    return ToyVLMAdapter(pretrained=str(toy_checkpoint))


class TestToyVLMAdapter(AdapterConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def adapter(cls, toy_adapter):
        return toy_adapter

    @pytest.fixture(scope="class")
    @classmethod
    def image_size(cls):
        return 32


# `instantiate_classes` (what LightningCLI calls) is deprecated from jsonargparse 4.49; `instantiate` is newer
# than the oldest jsonargparse vugen supports.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_config_yaml_builds_the_adapter(toy_checkpoint, toy_adapter):
    assert yaml.safe_load(CONFIG.read_text())["class_path"] == CLASS_PATH
    parser = ArgumentParser()
    parser.add_argument("--adapter", type=VLMAdapter, sub_configs=True)  # accept a YAML path, as LightningCLI does
    config = parser.parse_args(["--adapter", str(CONFIG), "--adapter.init_args.pretrained", str(toy_checkpoint)])
    adapter = parser.instantiate_classes(config).adapter
    assert type(adapter) is ToyVLMAdapter and adapter.pretrained == str(toy_checkpoint)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(adapter.encode_images(images), toy_adapter.encode_images(images))


def test_register_adapter_then_build_by_name(toy_checkpoint, monkeypatch):
    # vugen has no `unregister_adapter`: run on a copy of the registry, restored by `undo`.
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    register_adapter("toy", ToyVLMAdapter)
    assert "toy" in registry.list_adapters()
    adapter = build_adapter("toy", pretrained=str(toy_checkpoint))
    assert type(adapter) is ToyVLMAdapter and adapter.pretrained == str(toy_checkpoint)
    assert registry.get_adapter_class(CLASS_PATH) is ToyVLMAdapter
    monkeypatch.undo()
    assert "toy" not in registry.list_adapters()


def test_checkpoint_weights_come_from_the_seed(tmp_path, toy_checkpoint):
    same, other = save_toy_checkpoint(tmp_path / "same", seed=0), save_toy_checkpoint(tmp_path / "other", seed=1)
    reference = load_file(toy_checkpoint / "model.safetensors")
    assert all(torch.equal(t, reference[k]) for k, t in load_file(same / "model.safetensors").items())
    assert not torch.equal(load_file(other / "model.safetensors")["projector.weight"], reference["projector.weight"])


def test_tokenize_applies_the_chat_template(toy_adapter):
    encoding = toy_adapter.tokenize(["A red circle"])
    words = [toy_adapter.tokenizer.id_to_token(i) for i in encoding["input_ids"][0].tolist()]
    assert words == ["user", ":", "a", "red", "circle", "assistant", ":"]
    assert toy_adapter.tokenize(["a purple circle"])["input_ids"][0, 3] == toy_adapter.tokenizer.token_to_id("<unk>")


def test_adapter_pieces_rebuild_the_models_own_forward(toy_adapter):
    # ToyVLM.forward (image tokens, then the prompt) against the same computation assembled from adapter calls.
    vlm = toy_adapter.vlm
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    encoding = toy_adapter.tokenize(PROMPTS)
    image_embeds = vlm.projector(toy_adapter.encode_images(images))
    embeds = torch.cat([image_embeds, toy_adapter.embed_tokens(encoding["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(2, image_embeds.shape[1], dtype=torch.long), encoding["attention_mask"]], dim=1)
    hidden, _ = toy_adapter.run_language_model(embeds, mask)
    with torch.no_grad():
        logits = vlm(images, encoding["input_ids"], encoding["attention_mask"])
    torch.testing.assert_close(logits, vlm.lm_head(hidden), atol=1e-5, rtol=1e-4)


def test_lora_targets_are_derived_from_the_language_model(toy_checkpoint, toy_adapter):
    # The six projections the example used to list by hand; ToyVLM's vision tower has the same names, the LM's only.
    assert toy_adapter.lora_target_modules == ["down_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    class EmbeddingOnlyLM(ToyVLMAdapter):
        language_model = property(lambda self: self.vlm.language_model.embed_tokens)

    with pytest.raises(TypeError, match="EmbeddingOnlyLM: its language_model has no nn.Linear.*override"):
        _ = EmbeddingOnlyLM(str(toy_checkpoint)).lora_target_modules

    class SharedNameLM(ToyVLMAdapter):  # `q_proj` also names an embedding: peft, matching names, would wrap it too
        language_model = property(
            lambda self: nn.ModuleDict({"lm": self.vlm.language_model, "q_proj": nn.Embedding(2, 2)})
        )

    targets = SharedNameLM(str(toy_checkpoint)).lora_target_modules
    assert targets == ["down_proj", "k_proj", "o_proj", "up_proj", "v_proj"]


def test_images_of_other_sizes_are_resized(toy_adapter):
    # Resizing keeps a flat colour flat, so a 64x48 image encodes like the same colour at the native 32x32.
    colour = torch.tensor([0.9, 0.2, 0.5]).view(1, 3, 1, 1)
    assert toy_adapter.token_grid(64, 48) == (8, 8)
    resized = toy_adapter.encode_images(colour.expand(1, 3, 64, 48))
    torch.testing.assert_close(resized, toy_adapter.encode_images(colour.expand(1, 3, 32, 32)), atol=1e-5, rtol=1e-5)


def test_dtype_is_applied(toy_checkpoint):
    assert ToyVLMAdapter(str(toy_checkpoint), dtype="bfloat16").dtype == torch.bfloat16


def test_bad_arguments_name_themselves(tmp_path, toy_checkpoint, toy_adapter):
    with pytest.raises(FileNotFoundError, match="`pretrained`.*tokenizer.json"):
        ToyVLMAdapter(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="`dtype`"):
        ToyVLMAdapter(str(toy_checkpoint), dtype="float64")
    with pytest.raises(ValueError, match="list of prompt strings"):
        toy_adapter.tokenize("a red circle")
    with pytest.raises(ValueError, match="attention_mask covers"):
        toy_adapter.run_language_model(torch.zeros(1, 3, toy_adapter.hidden_size), torch.ones(1, 4))
    with pytest.raises(ValueError, match="32x32"):
        ToyVLM()(torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))


def test_a_latent_cache_knows_the_toy_vlm_by_content(toy_checkpoint, tmp_path):
    """A VLM that is not a transformers checkpoint is still fingerprinted by its folder's files: a copy elsewhere is
    the same VLM, other weights at the same path are not."""
    vlm = Path(shutil.copytree(toy_checkpoint, tmp_path / "toy"))
    adapter = ToyVLMAdapter(str(vlm))
    reducer = DimensionReducer(adapter.feature_dim, latent_dim=4, hidden_dim=16, num_blocks=1)
    data = ShapesDataModule(image_size=32, train_size=2, batch_size=2)
    cache = write_latent_cache(data, adapter, reducer, tmp_path / "cache", progress=False)
    assert sorted(read_index(cache)["fingerprint"]["vlm"]["files"]) == [
        "config.json",
        "model.safetensors",
        TOKENIZER_FILE,
    ]
    check_fingerprint(cache, ToyVLMAdapter(str(shutil.copytree(vlm, tmp_path / "copy"))), reducer)
    save_toy_checkpoint(vlm, seed=1)
    with pytest.raises(StaleCacheError, match=r"adapter VLM differs .*model\.safetensors changed contents"):
        check_fingerprint(cache, ToyVLMAdapter(str(vlm)), reducer)


def test_vugen_check_passes_end_to_end(toy_checkpoint):
    """Every check and the whole stage smoke (the sampler stage passes the latent sampler's 4-D mask; export and
    generate rebuild the adapter from the files they write, named by the command line's class path)."""
    report = check_checkpoint(str(toy_checkpoint), adapter=CLASS_PATH, accelerator="cpu")
    assert [(r.name, r.reason) for r in report.failures] == []
    assert report.status == "pass" and [r.status for r in report.results].count("pass") == len(report.results)
    assert registered_adapter_name(CLASS_PATH) is None  # registered only while the check ran
