"""`vugen.fingerprint`: a VLM checkpoint identified by content. The same bytes at another path compare equal; a change
to a small file, to a weights file's size or safetensors header, or inside a sampled block of a large weights file is
named; a same-size change between the sampled blocks is the documented blind spot. A Hub snapshot in the local cache
is found without network and compares equal to a byte copy of it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import huggingface_hub
import pytest
from safetensors import safe_open

from vugen.fingerprint import (
    BLOCK_BYTES,
    FULL_HASH_LIMIT,
    SAMPLED_BLOCKS,
    file_fingerprint,
    fingerprint_differences,
    vlm_fingerprint,
)

WEIGHT_BYTES = FULL_HASH_LIMIT + 16 * 1024 * 1024  # above the limit: sampled, not hashed whole
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_large_safetensors(path: Path, name: str = "weight") -> int:
    """A valid safetensors file of one uint8 tensor of ``WEIGHT_BYTES`` zeros, written sparse (instant); returns
    where the tensor data starts."""
    header = json.dumps({name: {"dtype": "U8", "shape": [WEIGHT_BYTES], "data_offsets": [0, WEIGHT_BYTES]}})
    header += " " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode())
        handle.truncate(8 + len(header) + WEIGHT_BYTES)
    return 8 + len(header)


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A VLM-like folder: a large sparse weights file, configs, a chat template, plus a card, a licence and a hidden
    file that describe it without deciding what it computes."""
    folder = tmp_path / "vlm"
    folder.mkdir()
    write_large_safetensors(folder / "model.safetensors")
    (folder / "config.json").write_text('{"hidden_size": 32}')
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5]}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "README.md").write_text("# a model card")
    (folder / "LICENSE").write_text("MIT")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs")
    return folder


def test_the_same_bytes_at_another_path_are_the_same_vlm(checkpoint, tmp_path, monkeypatch):
    recorded = vlm_fingerprint(str(checkpoint))
    assert recorded["kind"] == "local"
    assert sorted(recorded["files"]) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    weights = recorded["files"]["model.safetensors"]
    assert set(weights) == {"size", "header_sha256", "sampled_sha256"} and weights["size"] > FULL_HASH_LIMIT
    assert set(recorded["files"]["config.json"]) == {"size", "sha256"}

    copy = Path(shutil.copytree(checkpoint, tmp_path / "elsewhere" / "copy"))
    (copy / "README.md").write_text("# edited card")  # documentation does not count
    (copy / "LICENSE").unlink()
    assert fingerprint_differences(recorded, vlm_fingerprint(copy)) == []
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relative path resolves from the working directory
    assert vlm_fingerprint("copy") == vlm_fingerprint(copy)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda f: write_at(f / "preprocessor_config.json", 18, b"4"), "preprocessor_config.json changed contents"),
        (lambda f: (f / "chat_template.jinja").write_text("{{ other }}"), "chat_template.jinja changed"),
        (lambda f: (f / "tokenizer.json").write_text("{}"), "tokenizer.json only in the found VLM"),
        (lambda f: (f / "config.json").unlink(), "config.json only in the recorded VLM"),
        (lambda f: write_large_safetensors(f / "model.safetensors", "wEIGHT"), "model.safetensors has another tensor"),
        (lambda f: truncate(f / "model.safetensors", FULL_HASH_LIMIT + 1), "model.safetensors changed size ("),
    ],
    ids=["processor-config", "chat-template", "new-file", "removed-file", "header", "size"],
)
def test_a_change_is_named(checkpoint, change, phrase):
    recorded = vlm_fingerprint(checkpoint)
    change(checkpoint)
    changes = fingerprint_differences(recorded, vlm_fingerprint(checkpoint))
    assert len(changes) == 1 and changes[0].startswith(phrase), changes


def test_sampled_blocks_see_a_same_size_change_inside_them_and_miss_one_between_them(checkpoint):
    weights = checkpoint / "model.safetensors"
    data_start = write_large_safetensors(weights)
    recorded = vlm_fingerprint(checkpoint)
    size = weights.stat().st_size
    stride = (size - BLOCK_BYTES) // (SAMPLED_BLOCKS - 1)
    middle_block = stride * (SAMPLED_BLOCKS // 2)  # a block start in the middle of the tensor data

    write_at(weights, middle_block + 100, b"\x01")  # one byte, same size, same header
    assert fingerprint_differences(recorded, vlm_fingerprint(checkpoint)) == [
        "model.safetensors changed contents (sampled blocks)"
    ]
    with safe_open(weights, "pt") as handle:  # still a valid file: only the header and size could not tell
        assert handle.get_tensor("weight")[middle_block + 100 - data_start] == 1

    write_at(weights, middle_block + 100, b"\x00")
    assert fingerprint_differences(recorded, vlm_fingerprint(checkpoint)) == []
    # The blind spot (module docstring): a byte between two sampled blocks changes nothing that is read.
    write_at(weights, middle_block + BLOCK_BYTES + stride // 2, b"\x01")
    assert fingerprint_differences(recorded, vlm_fingerprint(checkpoint)) == []


def test_a_small_file_is_hashed_whole(tmp_path):
    small = tmp_path / "model.safetensors"
    small.write_bytes(bytes(3 * SAMPLED_BLOCKS * BLOCK_BYTES))  # larger than the sampled blocks, below the limit
    before = file_fingerprint(small)
    write_at(small, SAMPLED_BLOCKS * BLOCK_BYTES + BLOCK_BYTES // 2, b"\x01")
    assert set(before) == {"size", "sha256"} and file_fingerprint(small) != before


def hub_cache(root: Path, repo_id: str, files: Path, commit: str = COMMIT) -> Path:
    """The Hugging Face cache layout of one downloaded snapshot of ``repo_id``: refs/main and snapshots/COMMIT."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(shutil.copytree(files, repo / "snapshots" / commit))


def test_a_hub_snapshot_is_found_offline_and_equals_a_byte_copy(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_cache(tmp_path / "hub", "org/tiny-vlm", checkpoint)
    found = vlm_fingerprint("org/tiny-vlm")
    assert (found["kind"], found["repo_id"], found["commit"]) == ("hub", "org/tiny-vlm", COMMIT)
    assert found["files"] == vlm_fingerprint(snapshot)["files"]
    assert vlm_fingerprint("org/tiny-vlm", revision=COMMIT) == found
    assert fingerprint_differences(found, vlm_fingerprint(checkpoint)) == []  # a local copy of the snapshot

    assert vlm_fingerprint("org/not-downloaded") is None  # no network: unknown until the adapter downloads it
    assert vlm_fingerprint("org/tiny-vlm", revision="v2") is None
    assert vlm_fingerprint("./missing/folder/x") is None  # neither a path nor a valid Hub id
    assert vlm_fingerprint(None) is None

    write_at(snapshot / "config.json", 3, b"X")  # same commit: the Hub's content address says same VLM
    assert fingerprint_differences(found, vlm_fingerprint("org/tiny-vlm")) == []
    other = dict(vlm_fingerprint("org/tiny-vlm"), commit="f" * 40)
    assert fingerprint_differences(found, other) == ["config.json changed contents"]
