"""Every shipped YAML parses against the classes it names (litgpt's config-hub test): a broken config fails CI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from vugen.adapter import VLMAdapter
from vugen.cli import VugenCLI
from vugen.commands.cache_latents import cache_latents
from vugen.registry import get_adapter_class

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_CONFIGS = sorted(ROOT.glob("configs/*/adapter.yaml"))
# Configs of `vugen <command>` functions (jsonargparse CLIs), by file name; every other YAML is a LightningCLI run.
COMMAND_CONFIGS = {"cache.yaml": cache_latents}
# Overlays, by file name: each parses over the config it names (`vugen fit --config BASE --config OVERLAY`).
OVERLAYS = {"sampler-understands.yaml": "sampler.yaml"}
RUN_CONFIGS = sorted(
    p for p in ROOT.glob("configs/**/*.yaml") if p not in ADAPTER_CONFIGS and p.name not in COMMAND_CONFIGS
)
BORING = {
    "model": "lightning.pytorch.demos.boring_classes.BoringModel",
    "data": "lightning.pytorch.demos.boring_classes.BoringDataModule",
}


class ParseOnlyCLI(VugenCLI):
    """The real `vugen` parser, stopping before anything is instantiated (no weights are loaded)."""

    def before_instantiate_classes(self) -> None:
        raise StopIteration


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_family_has_an_adapter_config():
    assert {p.parent.name for p in ADAPTER_CONFIGS} >= {
        "llava",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "idefics3",
        "smolvlm",
        "paligemma",
        "internvl",
        "gemma3",
    }


def parse_adapter(path: Path, tmp_path: Path):
    """Parse the `model.init_args.adapter` node of a config against the adapter class it names."""
    node = yaml.safe_load(path.read_text())["model"]["init_args"]["adapter"]
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(node))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VLMAdapter, "adapter")
    return parser.parse_args(["--adapter", str(tmp_path / "node.yaml")]).adapter


@pytest.mark.parametrize("path", ADAPTER_CONFIGS, ids=rel)
def test_adapter_config_parses(path, tmp_path):
    adapter = parse_adapter(path, tmp_path)
    assert issubclass(get_adapter_class(adapter.class_path), VLMAdapter)
    assert adapter.init_args.pretrained
    assert adapter.init_args.trust_remote_code is False


def test_adapter_config_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "adapter.yaml"
    bad.write_text(ADAPTER_CONFIGS[0].read_text() + "        not_an_argument: 1\n")
    with pytest.raises(Exception, match="not_an_argument"):
        parse_adapter(bad, tmp_path)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=rel)
def test_run_config_parses(path):
    subcommand = "predict" if path.name == "predict.yaml" else "fit"  # a predict config sets predict's own options
    base = [path.with_name(OVERLAYS[path.name])] if path.name in OVERLAYS else []
    args = [subcommand, *(arg for config in (*base, path) for arg in ("--config", str(config)))]
    present = {key for config in (*base, path) for key in yaml.safe_load(config.read_text()) or {}}
    for key, class_path in BORING.items():  # partial configs (trainer-only, data-only) get stand-ins
        if key not in present:
            args += [f"--{key}", class_path]
    with pytest.raises(StopIteration):
        ParseOnlyCLI(args=args)


@pytest.mark.parametrize(
    "path", sorted(p for p in ROOT.glob("configs/**/*.yaml") if p.name in COMMAND_CONFIGS), ids=rel
)
def test_command_config_parses(path):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(COMMAND_CONFIGS[path.name])
    parser.add_argument("--config", action="config")
    config = parser.parse_args(["--config", str(path)])
    assert config.adapter.class_path and config.data.class_path
