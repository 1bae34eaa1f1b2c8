"""A `pretrained`-style value is a local folder or a Hub id, decided at once: a mistyped folder fails in well under a
second naming it, instead of being taken for a Hub id and waiting on the network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vugen.hub import local_folder_or_hub_id
from vugen.nn import PixelDecoder
from vugen.stages import DecoderStage
from vugen_adapters.llava import LlavaAdapter


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding the folders ``outputs/demo/tiny-llava`` and ``models``."""
    (tmp_path / "outputs" / "demo" / "tiny-llava").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("value", ["outputs/demo/tiny-llava", "./outputs/demo/tiny-llava", "models"])
def test_an_existing_relative_folder_is_local(workdir, value):
    assert local_folder_or_hub_id(value, "x") == Path(value)


def test_an_existing_absolute_folder_is_local(workdir):
    assert local_folder_or_hub_id(workdir / "models", "x") == workdir / "models"


@pytest.mark.parametrize(
    "value, reason",
    [
        ("out/demo/tiny-lava", "not a Hub repo id either"),  # more than one "/"
        ("outputs/demo/tiny-lava", "outputs/ is a local folder"),
        ("outputs/tiny-lava", "outputs/ is a local folder"),  # its first component exists here
        ("./tiny-lava", "written as a path"),
        ("/no/such/vlm", "written as a path"),
        ("~/no-such-vlm", "written as a path"),
        ("models\\tiny", "written as a path"),
        ("tiny lava", "not a Hub repo id either"),
    ],
)
def test_a_missing_path_fails_at_once_naming_it(workdir, value, reason):
    with pytest.raises(FileNotFoundError) as raised:
        local_folder_or_hub_id(value, "adapter `pretrained`")
    assert str(raised.value) == (
        f"adapter `pretrained`: no such folder {value!r} ({reason}; a Hub id looks like 'org/name')"
    )


@pytest.mark.parametrize("value", ["llava-hf/llava-1.5-7b-hf", "gpt2", "org/na.me"])
def test_a_valid_repo_id_that_is_not_here_is_a_hub_id(workdir, value):
    assert local_folder_or_hub_id(value, "x") is None


def test_an_adapter_with_a_mistyped_folder_fails_without_the_network(workdir):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="adapter `pretrained`: no such folder 'outputs/tiny-lava'"):
        LlavaAdapter("outputs/tiny-lava")  # a valid repo id: taken for one, it waits ~50 s offline
    assert time.perf_counter() - start < 1.0


def test_a_mistyped_reducer_path_fails_without_the_network(tiny_checkpoint, workdir):
    adapter = LlavaAdapter(str(tiny_checkpoint("llava")))
    decoder = PixelDecoder(latent_dim=8, patch_size=4, width=32, depth=1, num_heads=2, image_size=16)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="DecoderStage reducer_path: no such folder 'outputs/reducr'"):
        DecoderStage(adapter, decoder, reducer_path="outputs/reducr")
    assert time.perf_counter() - start < 1.0
