"""The adapter registry and the `vugen adapters` / `vugen tiny` commands."""

from __future__ import annotations

import sys

import pytest
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from tests.crafted_files import marker_module
from vugen import registry
from vugen.adapter import VLMAdapter
from vugen.cli import VugenCLI, main
from vugen.registry import (
    UnregisteredAdapterError,
    adapter_class_from_record,
    build_adapter,
    get_adapter_class,
    list_adapters,
    register_adapter,
    registered_adapter_name,
)
from vugen_adapters.auto import AutoAdapter
from vugen_adapters.llava import LlavaAdapter

FAMILIES = {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "paligemma", "internvl", "gemma3"}


@pytest.fixture
def clean_registry():
    saved = dict(registry._registered)
    yield
    registry._registered.clear()
    registry._registered.update(saved)


def test_builtin_adapters_are_registered_through_entry_points():
    names = set(list_adapters())
    assert FAMILIES | {"auto"} <= names
    for name in names:
        assert issubclass(get_adapter_class(name), VLMAdapter)
    assert get_adapter_class("auto") is AutoAdapter and get_adapter_class("llava") is LlavaAdapter


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown adapter 'nope'.*llava.*qwen2_5_vl"):
        build_adapter("nope", pretrained="x")


def test_class_path_resolves_and_is_checked():
    assert get_adapter_class("vugen_adapters.llava.LlavaAdapter") is LlavaAdapter
    with pytest.raises(TypeError, match="not a subclass of vugen's VLMAdapter"):
        get_adapter_class("collections.OrderedDict")
    with pytest.raises(ImportError, match="cannot import adapter class 'no_such_pkg.Adapter'"):
        get_adapter_class("no_such_pkg.Adapter")


def test_register_adapter_as_decorator_and_function(clean_registry):
    @register_adapter("my-vlm")
    class MyAdapter(LlavaAdapter):
        pass

    assert get_adapter_class("my-vlm") is MyAdapter and "my-vlm" in list_adapters()
    register_adapter("my-vlm", MyAdapter)  # the same class again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("my-vlm", LlavaAdapter)
    with pytest.raises(ValueError, match="lowercase"):
        register_adapter("My VLM", MyAdapter)
    with pytest.raises(TypeError, match="not a subclass"):
        register_adapter("plain", dict)


def test_build_adapter_loads_a_tiny_checkpoint(tiny_checkpoint):
    adapter = build_adapter("llava", pretrained=str(tiny_checkpoint("llava")))
    assert isinstance(adapter, LlavaAdapter) and adapter.feature_dim == 32 and adapter.hidden_size == 64


def test_vugen_adapters_command_prints_every_name(capsys):
    main(["adapters"])
    lines = capsys.readouterr().out.splitlines()
    printed = {line.split()[0] for line in lines}
    assert printed == set(list_adapters())
    assert any(line.split()[1] == "vugen_adapters.llava:LlavaAdapter" for line in lines)


def test_vugen_tiny_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    main(["tiny", "llava", str(tmp_path / "tiny")])
    assert capsys.readouterr().out.strip().endswith("tiny")
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert LlavaAdapter(str(tmp_path / "tiny")).token_grid(32, 32) == (8, 8)


BORING = ["--model", "lightning.pytorch.demos.boring_classes.BoringModel"]
BORING += ["--data", "lightning.pytorch.demos.boring_classes.BoringDataModule"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], RichProgressBar),
        (["--trainer.enable_progress_bar=false"], None),
        (["--trainer.callbacks+=TQDMProgressBar"], TQDMProgressBar),
    ],
    ids=["default-rich", "bars-off", "own-bar"],
)
def test_cli_progress_bar(extra, expected, tmp_path):
    cli = VugenCLI(args=[*BORING, f"--trainer.default_root_dir={tmp_path}", *extra], run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    assert [type(b) for b in bars] == ([expected] if expected else [])


def test_a_config_names_an_adapter_by_its_registered_name(tiny_checkpoint):
    args = [
        "--model=vugen.stages.ReducerStage",
        "--model.adapter=llava",
        f"--model.adapter.pretrained={tiny_checkpoint('llava')}",
        "--model.reducer=vugen.nn.DimensionReducer",
        "--model.reducer.feature_dim=32",
        "--model.reducer.latent_dim=4",
        "--data=vugen.data.shapes_datamodule.ShapesDataModule",
        "--trainer.logger=false",
    ]
    cli = VugenCLI(args=args, run=False)
    assert type(cli.model.adapter) is LlavaAdapter
    assert cli.config["model"]["init_args"]["adapter"]["class_path"] == "vugen_adapters.llava.LlavaAdapter"


# ---------------------------------------------------------------------------------------------------- from a file
@pytest.mark.parametrize(
    "recorded", ["llava", "vugen_adapters.llava.LlavaAdapter", "vugen_adapters.llava:LlavaAdapter"]
)
def test_a_file_may_name_a_registered_adapter(recorded):
    assert registered_adapter_name(recorded) == "llava"
    assert adapter_class_from_record(recorded, "f.json: adapter.class_path") is LlavaAdapter


def test_a_run_time_registration_counts_as_registered(clean_registry):
    class MyAdapter(LlavaAdapter):
        pass

    path = f"{MyAdapter.__module__}.{MyAdapter.__qualname__}"
    with pytest.raises(UnregisteredAdapterError):
        adapter_class_from_record(path, "f.json")
    register_adapter("mine", MyAdapter)
    assert adapter_class_from_record(path, "f.json") is MyAdapter


def test_registered_while_registers_only_for_its_block(clean_registry):
    """What `vugen check --adapter CLASS_PATH` does for its smoke; an adapter already registered stays as it was."""

    class MyAdapter(LlavaAdapter):
        pass

    path = f"{MyAdapter.__module__}.{MyAdapter.__qualname__}"
    with registry.registered_while(MyAdapter) as name:
        assert adapter_class_from_record(path, "f.json") is MyAdapter and registered_adapter_name(path) == name
    assert registered_adapter_name(path) is None
    with registry.registered_while(LlavaAdapter) as name:
        assert name == "llava"
    assert get_adapter_class("llava") is LlavaAdapter


@pytest.mark.parametrize("recorded", ["vugen_registry_marker.Evil", "os.system", "collections.OrderedDict", None, 3])
def test_a_file_naming_anything_else_is_refused_before_import(recorded, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    marker_module(tmp_path, "vugen_registry_marker", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnregisteredAdapterError) as raised:
        adapter_class_from_record(recorded, "b/vugen.json: adapter.class_path", ", or pass it yourself")
    message = str(raised.value)
    assert message.startswith(f"b/vugen.json: adapter.class_path: {recorded!r} is not a registered adapter (auto, ")
    assert "vugen.register_adapter(name, cls)" in message and message.endswith(", or pass it yourself")
    assert not marker.exists() and "vugen_registry_marker" not in sys.modules
