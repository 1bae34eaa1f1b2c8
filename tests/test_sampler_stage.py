"""Stage 2 (`SamplerStage`) with the tiny LLaVA: understanding preserved bit for bit, the loss going down, the
prompt KV cache equal to a full pass, bidirectional latent attention, per-prompt seeds, LoRA+bridge-only checkpoints."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from tests.fixtures_bundle import sampler_arguments
from tests.helpers import QUIET_TRAINER
from tests.test_image_text_data import write_folder
from vugen.data.image_text import ImageTextDataModule
from vugen.data.latent_cache import LatentCacheDataModule
from vugen.data.latent_index import StaleCacheError
from vugen.data.latent_writer import write_latent_cache
from vugen.data.shapes_datamodule import ShapesDataModule
from vugen.generation import LatentSamplerConfig, SamplingConfig, prompt_cache_reusable
from vugen.nn import DimensionReducer, PixelDecoder
from vugen.stages import DecoderStage
from vugen.stages.sampler import CACHE_ARGUMENTS, SamplerStage, without_cache
from vugen_adapters.llava import LlavaAdapter

LATENT_DIM = 8
ADAM = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0)
QUIET = QUIET_TRAINER | {"num_sanity_val_steps": 0, "limit_val_batches": 0}
PROMPTS = ["a large red circle on the left", "a small blue square"]


@pytest.fixture(scope="module")
def tiny_llava(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llava"))


@pytest.fixture(scope="module")
def decoder_export(tiny_llava, tmp_path_factory) -> str:
    """A decoder-stage export (random weights) at 32 px with 8-channel latents."""
    adapter = LlavaAdapter(tiny_llava)
    reducer = DimensionReducer(adapter.feature_dim, LATENT_DIM, hidden_dim=32, num_blocks=1)
    decoder = PixelDecoder(LATENT_DIM, patch_size=8, width=32, depth=1, num_heads=2, image_size=32)
    directory = tmp_path_factory.mktemp("decoder-export") / "export"
    DecoderStage(adapter, decoder, reducer=reducer, sampling=SamplingConfig(steps=2)).export(directory)
    return str(directory)


def make_stage(tiny_llava: str, decoder_export: str, **kwargs) -> SamplerStage:
    settings = {
        "latent_sampler": LatentSamplerConfig(lora_rank=4, head_width=32),
        "sampling": SamplingConfig(steps=2, guidance_scale=3.0),
        "optimizer": ADAM,
    }
    return SamplerStage(LlavaAdapter(tiny_llava), decoder_export, **sampler_arguments(settings, **kwargs))


def batch(n: int = 8, seed: int = 0) -> dict:
    return next(iter(ShapesDataModule(train_size=64, batch_size=n, seed=seed).train_dataloader()))


def vlm_logits(adapter: LlavaAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The VLM's own logits on a text-only input and on an image + text input."""
    text = adapter.tokenize(["what colour is the circle?"])
    image_tokens = adapter.token_grid(32, 32)[0] * adapter.token_grid(32, 32)[1]
    image_ids = torch.full((1, image_tokens), adapter.vlm.config.image_token_id)
    ids = torch.cat([image_ids, text["input_ids"]], dim=1)
    pixels = adapter.pixel_inputs(batch(1)["images"])
    with torch.no_grad():
        text_only = adapter.vlm(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
        with_image = adapter.vlm(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels).logits
    return text_only, with_image


def train(stage: SamplerStage, steps: int, data: dict) -> Trainer:
    trainer = Trainer(max_steps=steps, **QUIET)
    trainer.fit(stage, train_dataloaders=DataLoader([data] * steps, batch_size=None))
    return trainer


@pytest.fixture(scope="module")
def trained(tiny_llava, decoder_export):
    seed_everything(0)
    stage = make_stage(tiny_llava, decoder_export)
    base = vlm_logits(stage.adapter)  # LoRA B starts at zero and the scope hook zeroes it anyway
    data = batch()
    before = fixed_loss(stage, data)
    train(stage, 30, data)
    return stage, base, data, before


def fixed_loss(stage: SamplerStage, data: dict) -> float:
    stage.eval()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)
        return float(stage.loss(data, drop_prompts=False))


def test_understanding_is_bit_identical_to_the_base_model(trained):
    stage, base, _, _ = trained
    assert max(float(layer.weight.abs().max()) for layer in stage.latent_sampler.lora_b_layers()) > 1e-3, (
        "LoRA did not train"
    )
    for before, after in zip(base, vlm_logits(stage.adapter), strict=True):
        assert torch.equal(before, after)


def test_lora_scope_all_changes_understanding(tiny_llava, decoder_export):
    """The same training with LoRA on every token does change the VLM's logits: the exactness test can fail."""
    seed_everything(0)
    stage = make_stage(tiny_llava, decoder_export, lora_scope="all")
    base = vlm_logits(stage.adapter)
    train(stage, 3, batch())
    assert not torch.equal(base[0], vlm_logits(stage.adapter)[0])


def test_training_lowers_the_loss(trained):
    stage, _, data, before = trained
    assert fixed_loss(stage, data) < 0.7 * before


def test_the_default_time_shift_is_raes_but_never_below_one(trained):
    stage = trained[0]
    assert (
        stage.latent_sampler.bridge.num_tokens * LATENT_DIM == 512 and stage.shift() == 1.0
    )  # RAE alone: sqrt(512 / 4096)
    stage.time_shift = 0.5
    try:
        assert stage.shift() == 0.5  # an explicit value is used as given
    finally:
        stage.time_shift = None


def assert_the_prompt_cache_gives_the_full_pass_velocities(sampler) -> None:
    """Velocities of both prompts, and of the second alone, on the prompt cache equal a full pass's."""
    prefix, mask = sampler.eval().prefix(PROMPTS)
    z_t = torch.randn(2, sampler.bridge.num_tokens, LATENT_DIM, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        full = sampler.velocity(z_t, t, prefix, mask)
        positions = torch.cumsum(mask, 1) - 1
        prefix_hidden, cache = sampler.run(prefix, mask, positions.clamp_min(0), sampler.image_from(mask))
        context = prefix_hidden[:, -1]
        prompt_length = cache.get_seq_length()
        assert prompt_cache_reusable(cache)  # the Llama LM's cache: this call reuses it in place, no copy
        cached = sampler._cached_velocity(z_t, t, torch.arange(2), cache, mask, context)
        assert cache.get_seq_length() == prompt_length  # the latent block left the cache (cropped or on a copy)
        again = sampler._cached_velocity(z_t, t, torch.arange(2), cache, mask, context)
        one = sampler._cached_velocity(z_t[1:], t[1:], torch.tensor([1]), cache, mask, context)
    assert full.shape == (2, sampler.bridge.num_tokens, LATENT_DIM)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    assert torch.equal(again, cached)  # a second step on the same cache sees the prompt only
    torch.testing.assert_close(one, full[1:], atol=1e-5, rtol=1e-4)


def test_the_prompt_cache_gives_the_full_pass_velocities(trained):
    assert_the_prompt_cache_gives_the_full_pass_velocities(trained[0].latent_sampler)


def test_a_patched_latent_block_trains_and_its_prompt_cache_gives_the_full_pass(tiny_llava, decoder_export):
    """2 x 2 latent tokens per LM token: 16 LM tokens for the 64 latents, trained and sampled like one per token."""
    seed_everything(0)
    stage = make_stage(tiny_llava, decoder_export, latent_patch_size=2)
    sampler, data = stage.latent_sampler, batch()
    assert sampler.bridge.sequence_length == 16 and sampler.bridge.num_tokens == 64
    before = fixed_loss(stage, data)
    train(stage, 30, data)
    assert fixed_loss(stage, data) < 0.7 * before
    assert_the_prompt_cache_gives_the_full_pass_velocities(sampler)
    assert stage.eval().pipeline().sample(PROMPTS, [0, 1]).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(("attention", "sees_later"), [("bidirectional", True), ("causal", False)])
def test_latent_block_attention(tiny_llava, decoder_export, attention, sees_later):
    sampler = make_stage(tiny_llava, decoder_export, image_attention=attention, head="linear").eval().latent_sampler
    torch.nn.init.normal_(sampler.bridge.head.weight)  # a non-zero head, to read the hidden states through it
    prefix, mask = sampler.prefix(PROMPTS)
    z_t = torch.randn(2, sampler.bridge.num_tokens, LATENT_DIM)
    changed = z_t.clone()
    changed[:, -1] += 1.0
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        first = sampler.velocity(z_t, t, prefix, mask)[:, 0]
        first_changed = sampler.velocity(changed, t, prefix, mask)[:, 0]
    assert (not torch.equal(first, first_changed)) == sees_later


def test_generation_depends_on_the_prompt_and_its_seed_only(trained):
    stage = trained[0].eval()
    pipe = stage.pipeline()
    images = pipe.sample(PROMPTS, [0, 1])
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, pipe.sample(PROMPTS, [0, 1]))
    alone = pipe.sample(PROMPTS[1:], [1])
    torch.testing.assert_close(alone, images[1:], atol=1e-4, rtol=0)
    unguided = stage.sampling.with_overrides(guidance_scale=1.0)
    latents = stage.latent_sampler.generate(PROMPTS, [0, 1], unguided)
    assert latents.shape == (2, stage.latent_sampler.bridge.num_tokens, LATENT_DIM)
    assert not torch.equal(stage.latent_sampler.generate(PROMPTS[1:], [2], unguided), latents[1:])


def test_cached_latents_train_like_images(trained):
    stage = trained[0].eval()
    data = batch(4)
    with torch.no_grad():
        latents = stage.reducer.encode(stage.adapter.encode_images(data["images"]))
    cached = {"latents": latents, "captions": data["captions"]}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        from_images = stage.loss(data, drop_prompts=False)
        torch.manual_seed(0)
        from_cache = stage.loss(cached, drop_prompts=False)
    assert torch.equal(from_images, from_cache)


def test_wrong_latents_name_both_shapes(trained):
    stage = trained[0]
    wrong = {"latents": torch.zeros(2, 64, LATENT_DIM + 1), "captions": PROMPTS}
    with pytest.raises(ValueError, match=r"\(2, 64, 9\).*\[B, 64, 8\]"):
        stage.loss(wrong, drop_prompts=False)


def test_a_missing_decoder_export_names_its_parts(tiny_llava, tmp_path):
    (tmp_path / "reducer").mkdir()
    with pytest.raises(FileNotFoundError, match="missing decoder, sampling.json"):
        SamplerStage(LlavaAdapter(tiny_llava), str(tmp_path))


def test_checkpoints_hold_lora_and_bridge_only_and_reload(trained, tmp_path):
    stage = trained[0]
    trainer = Trainer(max_steps=1, **QUIET)
    trainer.fit(stage, train_dataloaders=DataLoader([batch()], batch_size=None))
    path = tmp_path / "sampler.ckpt"
    trainer.save_checkpoint(path)
    keys = set(torch.load(path, weights_only=True)["state_dict"])
    bridge = "latent_sampler.bridge."
    assert keys and all(k.startswith(bridge) or ".lora_" in k for k in keys), sorted(keys)[:5]
    assert {bridge + k for k in stage.latent_sampler.bridge.state_dict()} <= keys
    assert sum(".lora_" in k for k in keys) == 2 * len(stage.latent_sampler.lora_b_layers())

    reloaded = SamplerStage.load_from_checkpoint(path).eval()
    stage.eval()
    assert torch.equal(reloaded.pipeline().sample(PROMPTS, [0, 1]), stage.pipeline().sample(PROMPTS, [0, 1]))


def test_training_from_a_latent_cache_never_runs_the_vision_tower(tiny_llava, decoder_export, tmp_path, monkeypatch):
    stage = make_stage(tiny_llava, decoder_export)
    shapes = ShapesDataModule(train_size=16, batch_size=8)
    write_latent_cache(shapes, stage.adapter, stage.reducer, tmp_path / "cache", progress=False)
    calls = []
    monkeypatch.setattr(stage.adapter, "encode_images", lambda images: calls.append(images))
    trainer = Trainer(max_steps=2, **QUIET)
    trainer.fit(stage, datamodule=LatentCacheDataModule(tmp_path / "cache", batch_size=8))
    assert trainer.global_step == 2 and calls == []


def test_a_stale_latent_cache_is_refused(tiny_llava, decoder_export, tmp_path):
    stage = make_stage(tiny_llava, decoder_export)
    other = DimensionReducer(stage.adapter.feature_dim, LATENT_DIM, hidden_dim=32, num_blocks=1)
    write_latent_cache(
        ShapesDataModule(train_size=8, batch_size=8), stage.adapter, other, tmp_path / "c", progress=False
    )
    with pytest.raises(StaleCacheError, match="reducer"):
        Trainer(max_steps=1, **QUIET).fit(stage, datamodule=LatentCacheDataModule(tmp_path / "c", batch_size=8))


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(trained, tiny_llava, decoder_export):
    """Checkpointed LM blocks run twice per step (forward + recomputation) and give the same loss and gradients, LoRA
    included: the recomputation restores its call's LoRA mask (with none, LoRA's gradients would vanish)."""
    trained_state = trained[0].state_dict()
    latents = torch.randn(4, 64, LATENT_DIM, generator=torch.Generator().manual_seed(0))
    data = {"latents": latents, "captions": PROMPTS * 2}
    results = []
    for checkpointing in (False, True):
        stage = make_stage(tiny_llava, decoder_export, activation_checkpointing=checkpointing, prompt_dropout=0.0)
        stage.load_state_dict(trained_state)
        stage.configure_model()
        stage.configure_model()  # idempotent
        # Runs of the first block's MLP: a pre-hook, since a recomputation stops once its last saved tensor is back
        # (before the MLP returns), and a hook on the block itself sees only the outer call.
        calls = []
        stage.adapter.language_model.layers[0].mlp.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = stage.loss(data, drop_prompts=False)
            loss.backward()
        # No cache argument the layer call lacked, e.g. transformers 5.24's "Both `past_key_values` and `cache` are
        # set for `LlamaDecoderLayer.forward`" (model-level deprecations are the adapters' business, not this one's)
        assert not [str(w.message) for w in caught if "Layer" in str(w.message)]
        grads = {name: p.grad.clone() for name, p in stage.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, len(calls)))
        calls.clear()
        stage.latent_sampler.generate(PROMPTS[:1], [0], stage.sampling)  # no gradients: plain blocks, prompt cache
        assert len(calls) == 1 + 2  # the prompts once, then one call per step (guided and empty prompt batched)
    (loss, grads, calls), (ac_loss, ac_grads, ac_calls) = results
    assert (calls, ac_calls) == (1, 2)
    assert torch.equal(loss, ac_loss)
    assert any("lora_A" in name and g.abs().max() > 0 for name, g in ac_grads.items())
    for name, grad in grads.items():
        torch.testing.assert_close(ac_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", CACHE_ARGUMENTS)
def test_checkpointed_blocks_get_the_cache_they_were_called_with_as_none(name):
    """Whatever transformers calls a layer's KV cache (``cache`` from 5.24 on, ``past_key_values`` before), the
    checkpointed call gets None there and ``use_cache=False``; arguments the call lacked are not added."""
    mask = torch.ones(1, 3)
    called = {name: object(), "use_cache": True, "attention_mask": mask}
    assert without_cache(called) == {name: None, "use_cache": False, "attention_mask": mask}
    assert without_cache({"attention_mask": mask}) == {"attention_mask": mask}


def latent_batch(captions: list[str]) -> dict:
    return {"latents": torch.randn(len(captions), 64, LATENT_DIM), "captions": captions}


def caption_warnings(stage: SamplerStage, steps: int, **fit_data) -> list[str]:
    """The empty-caption warnings of a fit of ``steps`` steps."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(max_steps=steps, **QUIET).fit(stage, **fit_data)
    return [str(w.message) for w in caught if "allow_empty_captions" in str(w.message)]


def test_a_first_batch_of_empty_captions_stops_the_fit_naming_the_cause(tiny_llava, decoder_export, tmp_path):
    """An image folder without a metadata file: every caption is "" (as with caption_key: null)."""
    root = write_folder(tmp_path / "images", 8, metadata=None)

    def data() -> ImageTextDataModule:
        return ImageTextDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0)

    stage = make_stage(tiny_llava, decoder_export)
    with pytest.raises(
        ValueError,
        match=r"SamplerStage: all 4 captions of the first training batch are empty.*"
        r"caption_key: null, an image folder without a metadata file",
    ):
        Trainer(max_steps=2, **QUIET).fit(stage, datamodule=data())
    unconditional = make_stage(tiny_llava, decoder_export, allow_empty_captions=True)
    assert caption_warnings(unconditional, 2, datamodule=data()) == []
    assert unconditional.trainer.global_step == 2


def test_empty_captions_are_warned_about_once_per_fit_before_prompt_dropout(tiny_llava, decoder_export):
    stage = make_stage(tiny_llava, decoder_export, prompt_dropout=0.9)
    full, some_empty, all_empty = PROMPTS * 2, [PROMPTS[0], "", " \n", PROMPTS[1]], [""] * 4
    batches = [full, some_empty, all_empty, some_empty]  # only empty captions after the first batch: a warning
    loader = DataLoader([latent_batch(captions) for captions in batches], batch_size=None)
    messages = caption_warnings(stage, len(batches), train_dataloaders=loader)
    assert len(messages) == 1 and "2 of 4 captions of a training batch are empty" in messages[0]
    # Prompt dropout empties about 90 % of these captions: not the data's fault, no warning.
    assert caption_warnings(stage, 2, train_dataloaders=DataLoader([latent_batch(full)] * 2, batch_size=None)) == []
    assert len(caption_warnings(stage, len(batches), train_dataloaders=loader)) == 1  # the next fit warns again


def test_compile_wraps_every_language_model_block_once(trained, tiny_llava, decoder_export):
    """``compile: true`` compiles each LM block (after checkpointing wraps it), once however often Lightning calls
    ``configure_model``, and computes the same loss (run with dynamo's eager stance: the wiring, not the compiler)."""
    data = {"latents": torch.randn(2, 64, LATENT_DIM, generator=torch.Generator().manual_seed(0)), "captions": PROMPTS}
    losses = []
    for compile_blocks in (False, True):
        stage = make_stage(tiny_llava, decoder_export, compile=compile_blocks, activation_checkpointing=True)
        stage.load_state_dict(trained[0].state_dict())
        stage.configure_model()
        blocks = [
            m for m in stage.adapter.language_model.modules() if isinstance(m, tuple(stage.adapter.block_classes))
        ]
        compiled = [getattr(block, "_compiled_call_impl", None) for block in blocks]
        assert len(blocks) >= 2 and all((c is not None) == compile_blocks for c in compiled)
        stage.configure_model()
        assert [getattr(block, "_compiled_call_impl", None) for block in blocks] == compiled  # not wrapped twice
        torch.manual_seed(0)
        with torch.compiler.set_stance("force_eager"):
            losses.append(stage.loss(data, drop_prompts=False).detach())
    assert torch.equal(losses[0], losses[1])

    predicting = make_stage(tiny_llava, decoder_export, compile=True)
    trainer = Trainer(**QUIET)
    trainer.state.fn = TrainerFn.PREDICTING
    predicting.trainer = trainer
    predicting.configure_model()  # generation runs the prompt's KV cache through the blocks: they stay eager
    assert not [m for m in predicting.modules() if getattr(m, "_compiled_call_impl", None) is not None]
