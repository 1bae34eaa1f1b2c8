"""Tests of the image-text data from files: image folders with JSONL/CSV metadata and WebDataset shards."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vugen.data.image_folder import ImageTextFolder, folder_items, split_items
from vugen.data.image_io import UnreadableImageWarning, collate_skipping_none
from vugen.data.image_shards import ImageTextShards, expand_shards, shards_for
from vugen.data.image_text import ImageTextDataModule

# Distinct colours: an image's colour tells which item it is, so caption alignment can be checked.
COLORS = [(20 * i, 255 - 20 * i, (57 * i) % 256) for i in range(12)]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def noise_png(seed: int = 0, size: tuple[int, int] = (64, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def truncated_png() -> bytes:
    """A PNG whose header is intact and whose pixel data is cut in half."""
    data = noise_png()
    return data[: len(data) // 2]


def color_of(images: torch.Tensor) -> list[int]:
    """Index in COLORS of each solid image of a [B, 3, S, S] batch (asserting it is solid)."""
    pixels = (images * 255).round().to(torch.uint8)
    assert (pixels == pixels[:, :, :1, :1]).all()
    return [COLORS.index(tuple(p[:, 0, 0].tolist())) for p in pixels]


def caption(index: int) -> str:
    return f"colour number {index}"


def write_folder(root: Path, count: int, metadata: str | None = "jsonl", bad: dict[str, bytes] | None = None) -> Path:
    """Solid images of COLORS[i] under root (half in a subfolder), with metadata ``file_name``/``text``."""
    names = [f"sub/{i:02d}.png" if i % 2 else f"{i:02d}.png" for i in range(count)]
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (24 + i, 20), COLORS[i]).save(root / name)
    rows = [{"file_name": name, "text": caption(i)} for i, name in enumerate(names)]
    for name, data in (bad or {}).items():
        if data:
            (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": f"bad {name}"})
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif metadata == "csv":
        lines = ["file_name,text"] + [f'{row["file_name"]},"{row["text"]}"' for row in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def write_shards(root: Path, num_shards: int, per_shard: int, bad: dict[int, dict] | None = None) -> str:
    """Tar shards of solid COLORS[i] images, captions alternately as .txt and .json; returns a brace pattern."""
    index = 0
    for shard in range(num_shards):
        with wds.TarWriter(str(root / f"shard-{shard:03d}.tar")) as sink:
            for _ in range(per_shard):
                sample = {"__key__": f"{index:06d}", "png": encode(Image.new("RGB", (30, 20), COLORS[index]))}
                sample |= {"txt": caption(index)} if index % 2 else {"json": {"text": caption(index)}}
                sink.write(sample | (bad or {}).get(index, {}))
                index += 1
    return str(root / f"shard-{{000..{num_shards - 1:03d}}}.tar")


def captions_of(loader) -> list[str]:
    return [text for batch in loader for text in batch["captions"]]


# -------------------------------------------------------------------------------------------------- transform
def test_resize_and_centre_crop_match_pil(tmp_path):
    """A landscape noise image: shorter side resized (PIL bilinear, antialiased), then the centre cropped."""
    Image.open(io.BytesIO(noise_png(1, (64, 32)))).save(tmp_path / "noise.png")
    reference = Image.open(tmp_path / "noise.png").resize((32, 16), Image.Resampling.BILINEAR).crop((8, 0, 24, 16))
    item = ImageTextFolder([(str(tmp_path / "noise.png"), "x")], image_size=16)[0]
    assert item["images"].shape == (3, 16, 16) and item["images"].dtype == torch.float32
    pixels = (item["images"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pixels, np.asarray(reference))
    assert item["images"].min() >= 0 and item["images"].max() <= 1


def test_portrait_crop_keeps_the_centre_band(tmp_path):
    """Rows 12..51 of a 32x64 image are green; the centre crop of its 16x32 resize sees rows 16..47 (plus the
    filter's 2-pixel reach), so it is exactly green."""
    bands = np.zeros((64, 32, 3), dtype=np.uint8)
    bands[:12] = (255, 0, 0)
    bands[12:52] = (0, 255, 0)
    bands[52:] = (0, 0, 255)
    Image.fromarray(bands).save(tmp_path / "bands.png")
    images = ImageTextFolder([(str(tmp_path / "bands.png"), "")], image_size=16)[0]["images"]
    expected = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(images, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("mode", "value", "rgb", "fmt"),
    [
        ("L", 100, (100, 100, 100), "PNG"),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30), "PNG"),  # alpha is dropped
        ("RGB", (0, 128, 255), (0, 128, 255), "BMP"),
        ("RGB", (0, 128, 255), (0, 128, 255), "WEBP"),
        ("P", 1, (7, 77, 177), "PNG"),
        ("RGB", (128, 128, 128), (128, 128, 128), "JPEG"),
    ],
)
def test_modes_and_formats_become_rgb(tmp_path, mode, value, rgb, fmt):
    image = Image.new(mode, (37, 23), value)
    if mode == "P":
        image.putpalette([0, 0, 0, *rgb] + [0] * 762)
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    images = ImageTextFolder([(str(path), "")], image_size=16)[0]["images"]
    assert images.shape == (3, 16, 16)
    expected = torch.tensor(rgb, dtype=torch.int16).view(3, 1, 1).expand(3, 16, 16)
    difference = (images * 255).round().to(torch.int16) - expected
    assert difference.abs().max() <= (1 if fmt == "JPEG" else 0)  # JPEG is lossy


# -------------------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_metadata_captions_are_aligned_with_images(tmp_path, metadata):
    root = write_folder(tmp_path, 7, metadata)
    datamodule = ImageTextDataModule(root=str(root), test_root=str(root), image_size=16, batch_size=3, num_workers=0)
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    indices = [i for batch in batches for i in color_of(batch["images"])]
    assert indices == list(range(7))  # metadata order, unshuffled
    assert [text for batch in batches for text in batch["captions"]] == [caption(i) for i in range(7)]
    assert batches[0]["images"].shape == (3, 3, 16, 16)


def test_training_batches_are_shuffled_aligned_and_seeded(tmp_path):
    root = write_folder(tmp_path, 8, "jsonl")
    orders = []
    for _ in range(2):
        datamodule = ImageTextDataModule(root=str(root), image_size=16, batch_size=4, num_workers=0, seed=3)
        datamodule.setup("fit")
        batches = list(datamodule.train_dataloader())
        for batch in batches:
            assert batch["captions"] == [caption(i) for i in color_of(batch["images"])]
        orders.append([text for batch in batches for text in batch["captions"]])
    assert orders[0] == orders[1] != [caption(i) for i in range(8)]
    assert sorted(orders[0]) == sorted(caption(i) for i in range(8))


def test_metadata_path_and_keys_are_configurable(tmp_path):
    root = write_folder(tmp_path / "images", 3, metadata=None)
    rows = [{"image": f"{'sub/' if i % 2 else ''}{i:02d}.png", "caption": caption(i)} for i in range(3)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    items = folder_items(root, tmp_path / "captions.jsonl", image_key="image", caption_key="caption")
    assert items == [(str(root / row["image"]), row["caption"]) for row in rows]
    assert [text for _, text in folder_items(root, tmp_path / "captions.jsonl", "image", None)] == ["", "", ""]


def test_folder_without_metadata_lists_every_image(tmp_path):
    write_folder(tmp_path, 4, metadata=None)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (20, 20), COLORS[9]).save(tmp_path / "sub" / "UPPER.JPG")
    items = folder_items(tmp_path)
    expected = ["00.png", "02.png", "sub/01.png", "sub/03.png", "sub/UPPER.JPG"]
    assert items == [(str(tmp_path / name), "") for name in expected]


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_corrupt_and_missing_images_are_skipped_counted_and_named(tmp_path, metadata):
    root = write_folder(tmp_path, 5, metadata, bad={"broken.png": truncated_png(), "gone.png": b""})
    datamodule = ImageTextDataModule(root=str(root), image_size=16, batch_size=7, num_workers=0)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    with pytest.warns(UnreadableImageWarning) as record:
        first, second = captions_of(loader), captions_of(loader)  # two epochs, each reading all 7 items
    messages = sorted(str(warning.message) for warning in record if warning.category is UnreadableImageWarning)
    assert len(messages) == 2  # once per file, not once per epoch
    assert str(root / "broken.png") in messages[0] and str(root / "gone.png") in messages[1]
    assert datamodule.skipped == {"train": 2}
    # One batch of 7 items per epoch, 5 readable: never a bad caption.
    assert len(first) == len(second) == 5 and all(text.startswith("colour") for text in first + second)


def test_skips_are_counted_across_dataloader_workers(tmp_path):
    root = write_folder(tmp_path, 4, "jsonl", bad={"broken.png": truncated_png(), "gone.png": b""})
    good, bad = folder_items(root)[:4], folder_items(root)[4:]
    dataset = ImageTextFolder([good[0], bad[0], good[1], bad[1], good[2], good[3]], image_size=16)
    # batch_size 2: worker 0 loads the batch with broken.png, worker 1 the one with gone.png.
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skipping_none)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        batches = list(loader)
    assert [len(batch["captions"]) for batch in batches] == [1, 1, 2]
    assert captions_of(batches) == [caption(i) for i in range(4)]
    assert dataset.skips.total == 2  # counted in the workers, read in the main process
    assert dataset.skips.counts.tolist() == [0, 1, 0, 1, 0, 0]


def test_strict_mode_raises_naming_the_file(tmp_path):
    root = write_folder(tmp_path, 2, "jsonl", bad={"broken.png": truncated_png()})
    dataset = ImageTextDataModule(root=str(root), image_size=16, num_workers=0, strict=True).dataset("train")
    assert dataset[0] is not None
    with pytest.raises(ValueError, match=re.escape(str(root / "broken.png"))):
        dataset[2]


def test_a_batch_of_only_unreadable_images_is_an_error():
    with pytest.raises(ValueError, match="all 2 images of a batch were unreadable"):
        collate_skipping_none([None, None])


def test_empty_folder_and_metadata_are_errors_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no images found in {re.escape(str(tmp_path / 'empty'))}"):
        ImageTextDataModule(root=str(tmp_path / "empty")).setup("fit")
    (tmp_path / "empty" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(ValueError, match=f"no images found in metadata file {re.escape(str(tmp_path))}"):
        folder_items(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        folder_items(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"file_name": "a.png", "text": "x"}\n{"text": "y"}\n', r"metadata.jsonl:2: .*'file_name'.*keys: \['text'\]"),
        ('{"file_name": "a.png", "text": 3}\n', r"metadata.jsonl:1: expected a string under 'text', got 3"),
        ('{"file_name": "a.png",\n', r"metadata.jsonl:1: invalid JSON"),
        ('["a.png", "x"]\n', r"metadata.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_metadata_rows_are_errors_naming_file_and_line(tmp_path, text, error):
    (tmp_path / "metadata.jsonl").write_text(text)
    with pytest.raises(ValueError, match=error):
        folder_items(tmp_path)


def test_val_fraction_is_a_deterministic_disjoint_split(tmp_path):
    root = write_folder(tmp_path, 10, "jsonl")

    def split(seed: int) -> tuple[list[str], list[str]]:
        datamodule = ImageTextDataModule(root=str(root), val_fraction=0.3, seed=seed, image_size=16, num_workers=0)
        datamodule.setup("fit")
        return tuple(datamodule.dataset(name).captions for name in ("train", "val"))

    train, val = split(0)
    assert len(val) == 3 and len(train) == 7
    assert sorted(train + val) == sorted(caption(i) for i in range(10))
    assert split(0) == (train, val)
    assert split(1)[1] != val
    with pytest.raises(ValueError, match="leaves train or val empty"):
        split_items(list(range(10)), 0.01, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "the training data is required"),
        ({"root": "a", "shards": "b.tar"}, "root .* or shards .*, not both"),
        ({"root": "a", "val_metadata": "m.jsonl"}, "val_metadata='m.jsonl' needs val_root"),
        ({"root": "a", "val_root": "b", "val_fraction": 0.1}, "val_fraction splits a folder training set"),
        ({"root": "a", "val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"root": "a", "image_size": 4}, "image_size must be an integer >= 8"),
        ({"root": "a", "batch_size": 0}, "batch_size must be a positive integer"),
        ({"root": "a", "num_workers": -1}, "num_workers must be >= 0"),
    ],
)
def test_bad_arguments_are_errors_naming_them(kwargs, error):
    with pytest.raises(ValueError, match=error):
        ImageTextDataModule(**kwargs)


def test_missing_test_split_is_an_error_and_missing_val_skips_validation(tmp_path):
    datamodule = ImageTextDataModule(root=str(write_folder(tmp_path, 2, None)), image_size=16, num_workers=0)
    datamodule.setup("fit")
    assert datamodule.val_dataloader() == []
    with pytest.raises(ValueError, match="no test data: set test_root or test_shards"):
        datamodule.test_dataloader()


# -------------------------------------------------------------------------------------------------- shards
def test_shard_batches_match_the_folder_format(tmp_path):
    pattern = write_shards(tmp_path, num_shards=2, per_shard=3)
    datamodule = ImageTextDataModule(shards=pattern, val_shards=pattern, image_size=16, batch_size=4, num_workers=0)
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())
    assert [tuple(batch["images"].shape) for batch in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    indices = [i for batch in batches for i in color_of(batch["images"])]
    assert indices == list(range(6))  # validation streams in order
    assert captions_of(batches) == [caption(i) for i in range(6)]  # from .json (even) and .txt (odd)
    train = [batch for batch in datamodule.train_dataloader()]
    assert len(train) == 1 and train[0]["captions"] == [caption(i) for i in color_of(train[0]["images"])]


def test_two_ranks_times_two_workers_read_disjoint_samples_covering_all(tmp_path):
    pattern = write_shards(tmp_path, num_shards=5, per_shard=2)
    seen = {}
    for rank in range(2):
        with pytest.warns(UserWarning, match="5 shards over 2 ranks"):
            dataset = ImageTextShards(pattern, image_size=16, rank=rank, world_size=2, shuffle_buffer=4, seed=rank)
        loader = DataLoader(dataset, batch_size=None, num_workers=2)
        seen[rank] = [item["captions"] for item in loader]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(caption(i) for i in range(10))
    assert len(seen[0]) == len(set(seen[0])) == 6  # shards 0, 2, 4: one worker reads two, the other one


def test_shard_split_by_rank_and_worker_is_a_partition():
    shards = [f"s{i}" for i in range(7)]
    parts = [shards_for(shards, rank, 2, worker, 3) for rank in range(2) for worker in range(3)]
    assert sorted(s for part in parts for s in part) == shards
    assert parts[0] == ["s0", "s6"] and parts[3] == ["s1"] and parts[5] == ["s5"]
    assert shards_for(shards[:2], 1, 2, 1, 2) == []  # fewer shards than workers: that worker idles


def test_rank_comes_from_the_environment_and_too_few_shards_is_an_error(tmp_path, monkeypatch):
    pattern = write_shards(tmp_path, num_shards=3, per_shard=1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="3 shards over 2 ranks: ranks get unequal numbers"):
        dataset = ImageTextShards(pattern, image_size=16)
    assert (dataset.rank, dataset.world_size) == (1, 2)
    assert [item["captions"] for item in dataset] == [caption(1)]
    with pytest.raises(ValueError, match=r"3 shards for 4 ranks: every rank needs one \('.*shard-\{000\.\.002\}"):
        ImageTextShards(pattern, image_size=16, rank=0, world_size=4)


def test_shard_shuffling_is_seeded_and_changes_every_epoch(tmp_path):
    pattern = write_shards(tmp_path, num_shards=4, per_shard=3)

    def epochs(seed: int) -> list[list[str]]:
        dataset = ImageTextShards(pattern, image_size=16, shuffle_buffer=5, seed=seed)
        orders = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            orders.append([item["captions"] for item in dataset])
        assert [item["captions"] for item in dataset] == orders[1]  # the order of an epoch, whatever the pass
        return orders

    first, second = epochs(0)
    assert epochs(0) == [first, second] and first != second != epochs(1)[0]
    assert sorted(first) == sorted(second) == sorted(caption(i) for i in range(12))
    assert first != [caption(i) for i in range(12)]


def test_bad_shard_samples_are_skipped_counted_and_named(tmp_path):
    bad = {1: {"png": truncated_png()}, 4: {"__key__": "000004", "png": b"", "txt": ""}}
    pattern = write_shards(tmp_path, num_shards=2, per_shard=3, bad=bad)
    with wds.TarWriter(str(tmp_path / "uncaptioned.tar")) as sink:
        sink.write({"__key__": "nocap", "png": encode(Image.new("RGB", (16, 16), COLORS[11]))})
    dataset = ImageTextShards([pattern, str(tmp_path / "uncap*.tar")], image_size=16)
    with pytest.warns(UnreadableImageWarning) as record:
        texts = [item["captions"] for item in dataset]
    assert texts == [caption(i) for i in (0, 2, 3, 5)]
    messages = [str(warning.message) for warning in record if warning.category is UnreadableImageWarning]
    assert len(messages) == 3 and dataset.skips.total == 3
    assert f"{tmp_path / 'shard-000.tar'}:000001.png" in messages[0]
    assert f"{tmp_path / 'shard-001.tar'}:000004.png" in messages[1]
    assert f"{tmp_path / 'uncaptioned.tar'}:nocap.png" in messages[2] and "no caption" in messages[2]
    assert dataset.skips.counts.tolist() == [1, 1, 1]
    image_only = ImageTextShards(str(tmp_path / "uncaptioned.tar"), image_size=16, caption_key=None)
    assert [item["captions"] for item in image_only] == [""]
    strict = ImageTextShards(pattern, image_size=16, strict=True)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'shard-000.tar'}:000001.png")):
        list(strict)


def test_expand_shards_handles_braces_globs_duplicates_and_urls(tmp_path):
    pattern = write_shards(tmp_path, num_shards=3, per_shard=1)
    names = [str(tmp_path / f"shard-{i:03d}.tar") for i in range(3)]
    assert expand_shards(pattern) == names
    assert expand_shards([str(tmp_path / "shard-002.tar"), str(tmp_path / "*.tar")]) == [names[2], *names[:2]]
    assert expand_shards("s3://bucket/x-{0..1}.tar") == ["s3://bucket/x-0.tar", "s3://bucket/x-1.tar"]
    with pytest.raises(ValueError, match=re.escape(f"no shard matches '{tmp_path}/shard-003.tar' (from the pattern")):
        expand_shards(str(tmp_path / "shard-{001..005}.tar"))
    with pytest.raises(ValueError, match=r"no shard matches '.*nothing-\*\.tar'"):
        ImageTextDataModule(shards=str(tmp_path / "nothing-*.tar")).setup("fit")
    with pytest.raises(ValueError, match="no shard patterns given"):
        expand_shards([])
