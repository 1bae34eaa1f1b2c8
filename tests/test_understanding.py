"""Teaching the VLM to understand Shapes: the examples (captions, attribute questions), the stage that trains chosen
parts of the VLM on its own loss, the captioning score, and `vugen tiny ... --understand shapes`."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from lightning.pytorch import Trainer

from vugen.cli import main
from vugen.data.shapes import ShapeObject, ShapeScene, ShapesDataset, is_heldout, parse_caption
from vugen.data.shapes_understanding import (
    CAPTION_PROMPT,
    ShapesUnderstandingDataModule,
    ShapesUnderstandingDataset,
    attribute_questions,
)
from vugen.eval.captioning import AnswerScore, answer_correct, caption_accuracy, caption_correct, question_accuracy
from vugen.registry import get_adapter_class
from vugen.stages.understanding import UnderstandingStage, model_parts

FAMILIES = ["llava", "qwen2_vl", "idefics3", "paligemma", "gemma3", "internvl"]
PAIR = ShapeScene((ShapeObject("circle", "red", "large"), ShapeObject("square", "green", "small")), relation="left_of")


# ---------------------------------------------------------------------------------------------------- examples
def test_questions_bind_each_attribute_to_its_object():
    assert attribute_questions(PAIR) == [
        ("what color is the circle?", "red"),
        ("what shape is the red object?", "circle"),
        ("how large is the red circle?", "large"),
        ("where is the red circle?", "to the left of a small green square"),
        ("what color is the square?", "green"),
        ("what shape is the green object?", "square"),
        ("how large is the green square?", "small"),
        ("where is the green square?", "to the right of a large red circle"),  # the converse relation
    ]
    single = ShapeScene((ShapeObject("triangle", "cyan", "small", "top"),))
    assert ("where is the cyan triangle?", "at the top") in attribute_questions(single)


def test_a_shape_two_objects_share_is_not_asked_for_its_colour():
    twins = ShapeScene((ShapeObject("circle", "red", "large"), ShapeObject("circle", "blue", "small")), "above")
    prompts = [prompt for prompt, _ in attribute_questions(twins)]
    assert "what color is the circle?" not in prompts  # two answers would be right
    assert "what shape is the blue object?" in prompts


def test_examples_are_the_shapes_images_with_a_seeded_prompt():
    images = ShapesDataset("train", 64, seed=5)
    captions = ShapesUnderstandingDataset("train", 64, seed=5, question_ratio=0.0)
    mixed = ShapesUnderstandingDataset("train", 64, seed=5, question_ratio=0.5)
    for index in range(64):
        image = images[index]
        assert torch.equal(mixed[index]["images"], image["images"])
        assert (captions[index]["prompts"], captions[index]["answers"]) == (CAPTION_PROMPT, image["captions"])
    asked = [mixed[i]["prompts"] != CAPTION_PROMPT for i in range(64)]
    assert 16 < sum(asked) < 48  # about half
    again = ShapesUnderstandingDataset("train", 64, seed=5, question_ratio=0.5)
    backwards = [again[i]["answers"] for i in reversed(range(64))]  # another instance, another access order
    assert backwards[::-1] == [mixed[i]["answers"] for i in range(64)]
    with pytest.raises(ValueError, match=r"question_ratio must be in \[0, 1\], got 2"):
        ShapesUnderstandingDataModule(question_ratio=2)


def test_the_datamodule_batches_prompts_and_answers():
    data = ShapesUnderstandingDataModule(question_ratio=1.0, train_size=8, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)
    assert len(batch["prompts"]) == len(batch["answers"]) == 4
    assert all(prompt.endswith("?") for prompt in batch["prompts"])


def test_heldout_ratio_mixes_held_out_compositions_into_training_only():
    """A fifth of the training examples show a held-out composition, evenly spaced and unlike the images scored on
    the `heldout` split (another seed); validation keeps none, and the default keeps them out (negative control)."""
    data = ShapesUnderstandingDataModule(heldout_ratio=0.2, train_size=100, val_size=50, seed=3)
    train = data.dataset("train")
    shown = [is_heldout(parse_caption(train[i]["answers"])) for i in range(100)]
    assert sum(shown) == 20 and all(sum(shown[start : start + 5]) == 1 for start in range(0, 100, 5))
    # Each item is the base split's at seed 3, or the heldout split's at seed 4, at the same index.
    base, taught, scored = (
        ShapesDataset(split, 100, seed=seed) for split, seed in (("train", 3), ("heldout", 4), ("heldout", 3))
    )
    for i in range(100):
        assert torch.equal(train[i]["images"], (taught if shown[i] else base)[i]["images"])
    assert sum(torch.equal(train[i]["images"], scored[i]["images"]) for i in range(100) if shown[i]) < 5
    assert not any(is_heldout(parse_caption(data.dataset("val")[i]["answers"])) for i in range(50))
    default = ShapesUnderstandingDataModule(train_size=100).dataset("train")
    assert not any(is_heldout(parse_caption(default[i]["answers"])) for i in range(100))
    with pytest.raises(ValueError, match=r"heldout_ratio must be in \[0, 1\], got -1"):
        ShapesUnderstandingDataModule(heldout_ratio=-1)


# ---------------------------------------------------------------------------------------------------- parts
@pytest.mark.parametrize("family", FAMILIES)
def test_parts_split_the_vlm_once(tiny_checkpoint, family):
    adapter = get_adapter_class(family)(pretrained=str(tiny_checkpoint(family)))
    parts = model_parts(adapter)
    ids = [id(p) for part in parts.values() for p in part]
    assert sorted(ids) == sorted({id(p) for p in adapter.vlm.parameters()})  # every weight, each once
    assert parts["language_model"] and parts["vision_tower"]
    language = {id(p) for p in parts["language_model"]}
    assert {id(p) for p in adapter.language_model.parameters()} <= language
    assert id(adapter.vlm.get_output_embeddings().weight) in language  # the LM head learns with the LM


def test_llava_parts_are_its_tower_projector_and_lm(tiny_checkpoint):
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    parts = {name: {id(p) for p in params} for name, params in model_parts(adapter).items()}
    model = adapter.vlm.model
    assert parts["vision_tower"] == {id(p) for p in model.vision_tower.parameters()}
    assert parts["projector"] == {id(p) for p in model.multi_modal_projector.parameters()}


def test_unknown_part_is_one_line(tiny_checkpoint):
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    with pytest.raises(ValueError, match=r"^trainable must be a non-empty list of parts from .*'decoder'") as error:
        UnderstandingStage(adapter, trainable=["decoder"])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="non-empty"):
        UnderstandingStage(adapter, trainable=[])


# ---------------------------------------------------------------------------------------------------- training
def _fit(adapter, trainable, directory, steps=12):
    """Fit ``steps`` steps on 16 examples; the loss on the first batch before and after, and the trainer."""
    data = ShapesUnderstandingDataModule(question_ratio=0.5, train_size=16, batch_size=8, seed=1)
    stage = UnderstandingStage(
        adapter, trainable, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), export_dir=str(directory)
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = stage.conversation_loss(batch).item()
    trainer.fit(stage, datamodule=data)
    with torch.no_grad():
        after = stage.conversation_loss(batch).item()
    return before, after, trainer


def _weights(adapter) -> dict[str, dict[str, torch.Tensor]]:
    named = {id(p): name for name, p in adapter.vlm.named_parameters()}
    return {part: {named[id(p)]: p.detach().clone() for p in ps} for part, ps in model_parts(adapter).items()}


def test_the_trained_parts_learn_and_the_rest_stays_bit_for_bit(tiny_checkpoint, tmp_path):
    """The language model alone trains: its loss goes down, the export reloads through the adapter with the LM
    changed and the projector and tower (so the generation stages' features) exactly as they were."""
    pretrained = str(tiny_checkpoint("llava"))
    adapter = get_adapter_class("llava")(pretrained=pretrained)
    images = ShapesDataset("test", 4)
    features = adapter.encode_images(torch.stack([images[i]["images"] for i in range(4)]))
    original = _weights(adapter)
    before, after, _ = _fit(adapter, ["language_model"], tmp_path / "trained")
    assert after < before - 0.5, (before, after)
    reloaded = get_adapter_class("llava")(pretrained=str(tmp_path / "trained"))
    saved = _weights(reloaded)
    for part in ("vision_tower", "projector"):
        assert all(torch.equal(saved[part][name], weight) for name, weight in original[part].items()), part
    changed = [
        name
        for name, weight in original["language_model"].items()
        if not torch.equal(saved["language_model"][name], weight)
    ]
    assert len(changed) == len(original["language_model"])  # every LM weight moved, head and embeddings included
    assert torch.equal(reloaded.encode_images(torch.stack([images[i]["images"] for i in range(4)])), features)
    assert json.loads((tmp_path / "trained" / "training.json").read_text())["global_step"] == 12


def test_training_the_projector_changes_it(tiny_checkpoint, tmp_path):
    """Negative control of the test above: the projector does change when it is among the trained parts. A stage
    checkpoint holds it alone, and restores it over the VLM rebuilt from `pretrained`."""
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    original = _weights(adapter)
    _, _, trainer = _fit(adapter, ["projector"], tmp_path / "trained", steps=2)
    trained = _weights(adapter)
    assert not any(torch.equal(trained["projector"][name], w) for name, w in original["projector"].items())
    for part in ("vision_tower", "language_model"):
        assert all(torch.equal(trained[part][name], w) for name, w in original[part].items()), part
    validation = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        trainer.lightning_module, ShapesUnderstandingDataModule(val_size=8, batch_size=8), verbose=False
    )
    assert validation[0]["val/loss"] > 0
    trainer.save_checkpoint(tmp_path / "stage.ckpt")
    state = torch.load(tmp_path / "stage.ckpt", weights_only=True)["state_dict"]
    assert {key.removeprefix("adapter.vlm.") for key in state} == set(trained["projector"])
    restored = _weights(UnderstandingStage.load_from_checkpoint(tmp_path / "stage.ckpt").adapter)
    for part, weights in trained.items():
        assert all(torch.equal(restored[part][name], w) for name, w in weights.items()), part


# ---------------------------------------------------------------------------------------------------- scoring
CAPTION = "a small green square to the left of a large red circle"


@pytest.mark.parametrize(
    ("answer", "stopped", "correct"),
    [
        (CAPTION, True, True),
        ("  A small green square   to the LEFT of a large red circle", True, True),  # parse_caption normalises
        (CAPTION, False, False),  # did not stop
        (CAPTION.replace("green", "blue"), True, False),  # a wrong attribute
        ("a small green square to the right of a large red circle", True, False),  # the converse relation
        ("a large red circle to the right of a small green square", True, False),  # same image, other wording
        (CAPTION + " a", True, False),  # more than a caption
        ("a small green square", True, False),  # less than one
        ("", True, False),
    ],
)
def test_a_caption_is_correct_when_it_parses_to_the_scene(answer, stopped, correct):
    scene = ShapeScene((ShapeObject("square", "green", "small"), ShapeObject("circle", "red", "large")), "left_of")
    assert caption_correct(answer, scene, stopped) is correct


@pytest.mark.parametrize(
    ("answer", "stopped", "correct"),
    [
        ("blue", True, True),
        (" Blue ", True, True),
        ("blue", False, False),
        ("blue square", True, False),
        ("", True, False),
    ],
)
def test_an_attribute_answer_is_correct_when_it_says_the_words(answer, stopped, correct):
    assert answer_correct(answer, "blue", stopped) is correct
    assert answer_correct("to  the left of a small red circle", "to the left of a small red circle")


def test_question_accuracy_asks_every_attribute_question(tiny_checkpoint):
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    scores = question_accuracy(adapter, "test", n=6, batch_size=16, max_new_tokens=4)
    data = ShapesDataset("test", 6)
    asked = {1: 0, 2: 0}
    for i in range(6):
        scene = data.sample(i)[0]
        asked[len(scene.objects)] += len(attribute_questions(scene))
    assert (scores["one_object"].total, scores["two_object"].total) == (asked[1], asked[2])
    assert all(0 <= score.correct <= score.total for score in scores.values())


def test_caption_accuracy_of_the_random_tiny_vlm(tiny_checkpoint):
    """A real run on the heldout split: one- and two-object scenes counted apart, every image once; the random VLM
    says no caption."""
    adapter = get_adapter_class("llava")(pretrained=str(tiny_checkpoint("llava")))
    scores = caption_accuracy(adapter, "heldout", n=24, batch_size=10, max_new_tokens=8)
    data = ShapesDataset("heldout", 24)
    two = sum(len(data.sample(i)[0].objects) == 2 for i in range(24))
    assert all(is_heldout(data.sample(i)[0]) for i in range(24))
    assert scores == {"one_object": AnswerScore(0, 24 - two), "two_object": AnswerScore(0, two)}
    assert scores["one_object"].to_dict() == {"correct": 0, "total": 24 - two, "accuracy": 0.0}


# ---------------------------------------------------------------------------------------------------- command
def test_vugen_tiny_understand_trains_saves_and_scores(tmp_path, capsys):
    directory = tmp_path / "tiny"
    main(["tiny", "llava", str(directory), "--understand", "shapes", "--understand_steps", "3"])
    out = capsys.readouterr().out
    assert "3 steps" in out and "heldout" in out and "one_object" in out
    record = json.loads((directory / "understanding.json").read_text())
    assert record["steps"] == 3 and record["trained_parts"] == record["recipe"]["trainable"] == [
        "language_model",
        "projector",
    ]
    assert set(record["caption_accuracy"]) == {"test", "heldout"}
    assert sum(s["total"] for s in record["caption_accuracy"]["test"].values()) == 128
    get_adapter_class("llava")(pretrained=str(directory)).answer([torch.zeros(3, 32, 32)], [CAPTION_PROMPT])


def test_vugen_tiny_unknown_understanding_task_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny", "llava", str(tmp_path / "tiny"), "--understand", "colours"])
    assert exit_info.value.code != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["vugen tiny: error: --understand: unknown task 'colours'; expected one of: shapes"]
    assert not (tmp_path / "tiny").exists()  # refused before building


def test_a_part_the_vlm_lacks_is_skipped_unless_nothing_is_left(tiny_checkpoint):
    """Qwen2-VL's merger (its projector) lives inside the vision tower transformers names: the default parts train its
    language model alone; asking for the projector alone is one line."""
    adapter = get_adapter_class("qwen2_vl")(pretrained=str(tiny_checkpoint("qwen2_vl")))
    assert not model_parts(adapter)["projector"]
    stage = UnderstandingStage(adapter, ["language_model", "projector"])
    assert stage.trainable == ("language_model",)
    learning = {id(p) for p in adapter.parameters() if p.requires_grad}
    assert learning == {id(p) for p in model_parts(adapter)["language_model"]}
    with pytest.raises(ValueError, match=r"^trainable: Qwen2VLForConditionalGeneration has no projector weights"):
        UnderstandingStage(get_adapter_class("qwen2_vl")(pretrained=str(tiny_checkpoint("qwen2_vl"))), ["projector"])
