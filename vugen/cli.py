"""The `vugen` command: LightningCLI's fit / validate / test / predict, plus vugen's own commands.

vugen fit --config configs/demo/decoder.yaml
vugen adapters | check | tiny | emoji-set | cache-latents | generate | describe | export | export-geneval | export-dpg
"""

from __future__ import annotations

import importlib
import os
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import CLI
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI

from vugen.checkpoint import HYPERPARAMETERS, WRITER, check_writer, checked_hyperparameters, read_checkpoint
from vugen.commands import COMMANDS
from vugen.errors import TRACEBACK_ENV, known_error_message
from vugen.registry import adapter_class_path, get_adapter_class, list_adapters

_CKPT_PATH_KEYWORDS = ("best", "last", "hpc")  # Lightning resolves these itself

DESCRIPTION = (
    "vugen: train the three VUGEN stages of any Hugging Face VLM. Lightning subcommands below (`vugen predict`: "
    "images of a vugen.data.prompts.PromptDataModule, saved by a prediction writer of vugen.callbacks); "
    "vugen's own: `vugen adapters` (list the registered VLM adapters), `vugen check PRETRAINED` (does vugen work "
    "on this VLM? the adapter checks and a few-step smoke of every stage), `vugen tiny FAMILY DIR` (write a tiny "
    "offline VLM checkpoint), `vugen emoji-set DIR` (a real captioned image set from an emoji font), "
    "`vugen cache-latents` (encode a dataset into reduced latents once), `vugen generate` "
    "(text -> PNGs from a bundle), `vugen describe` (what the bundle's VLM answers about images), `vugen export` "
    "(sampler checkpoint -> bundle), `vugen export-geneval` / "
    "`vugen export-dpg` (benchmark layouts). `vugen COMMAND --help` for each. A known error (bad config, missing or "
    f"corrupt file, ...) prints one line; `vugen --traceback COMMAND ...` or {TRACEBACK_ENV}=1 shows its traceback."
)


class VugenCLI(LightningCLI):
    """LightningCLI in subclass mode: `model` is any stage, `data` any datamodule, chosen by `class_path`."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs) -> None:
        import_registered_adapters()  # so YAML can name adapters by class name, not only by class path
        accept_registered_adapter_names()
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # a bad config raises, so `main` reports it in one line instead of argparse's usage dump
            parser_kwargs={"description": DESCRIPTION, "exit_on_error": False},
            args=args,
            run=run,
            **kwargs,
        )

    # ================================================================== --ckpt_path (vugen.checkpoint)
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` at once, then apply its recorded configuration as Lightning does, but safely.

        Lightning reads the whole checkpoint here (and again to restore it) and lets its hyperparameters replace the
        config's model, class paths and ``trust_remote_code`` included. vugen reads it memory-mapped (a missing,
        truncated or foreign file is one line naming it, see :func:`vugen.checkpoint.read_checkpoint`), refuses
        another stage's checkpoint, and applies only recorded class paths that are registered adapters, vugen's
        own, or named by the config itself; ``trust_remote_code`` stays the config's.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or path in _CKPT_PATH_KEYWORDS or str(path).startswith("registry"):
            return
        checkpoint = read_checkpoint(path, distributed=True)  # an FSDP2 run's folder: its meta.pt
        model = self.config[subcommand]["model"]
        check_writer(checkpoint, path, _import_class(model.class_path), "--ckpt_path with this config")
        hyperparameters = dict(checkpoint.get(HYPERPARAMETERS) or {})
        hyperparameters.pop("_instantiator", None)
        if Path(path).is_dir() or not hyperparameters:
            return  # as Lightning: a folder's hyperparameters are not applied
        named = frozenset(_class_paths(model.as_dict()))
        alternative = ", or name it in the config"
        hyperparameters |= checked_hyperparameters(
            hyperparameters, str(path), None, trusted=named, alternative=alternative
        )
        if WRITER in hyperparameters:
            hyperparameters = {"class_path": hyperparameters.pop(WRITER), "dict_kwargs": hyperparameters}
        self.config = self.parser.parse_object({subcommand: {"model": hyperparameters}}, self.config)

    # ================================================================== end of --ckpt_path

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The trainer, with a Rich progress bar unless the run turns bars off or configures its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        return super().instantiate_trainer(**kwargs)


def _import_class(class_path: str) -> type:
    """A class the config names (already imported while parsing it)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _class_paths(config: Any) -> list[str]:
    """Every ``class_path`` a config (as a dict) names, at any depth."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("class_path"), str):
                found.append(value["class_path"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(config)
    return found


def import_registered_adapters() -> None:
    """Import every registered adapter class; one that fails to import is reported, not fatal."""
    for name in list_adapters():
        try:
            get_adapter_class(name)
        except Exception as error:  # a broken third-party plug-in must not take the CLI down
            warnings.warn(f"adapter {name!r} could not be imported: {error}", stacklevel=2)


def accept_registered_adapter_names() -> None:
    """Let a config name an adapter by its registered name (``class_path: llava``) wherever a class path is accepted.

    jsonargparse resolves a ``class_path`` without dots by the class's ``__name__`` among the subclasses of the
    expected type; a registry name ("llava", "qwen2_vl") is not a class name, so it is mapped to the registered
    class path first, for parameters typed as a ``VLMAdapter`` only.
    """
    from jsonargparse import _typehints

    resolve = _typehints.resolve_class_path_by_name
    if getattr(resolve, "accepts_adapter_names", False):
        return

    def resolve_adapter_names(cls: type | tuple[type, ...], name: str) -> str:
        if not (isinstance(name, str) and "." not in name and _expects_adapter(cls)):
            return resolve(cls, name)
        if name in list_adapters():
            return adapter_class_path(name)
        class_path = resolve(cls, name)  # an adapter's class name, e.g. LlavaAdapter
        if "." not in class_path:
            raise ValueError(
                f"unknown adapter {name!r}: give a registered name ({', '.join(list_adapters())}) or a class path "
                "such as my_package.my_module.MyAdapter"
            )
        return class_path

    resolve_adapter_names.accepts_adapter_names = True
    _typehints.resolve_class_path_by_name = resolve_adapter_names


def _expects_adapter(cls: type | tuple[type, ...]) -> bool:
    from vugen.adapter import VLMAdapter

    types = cls if isinstance(cls, tuple) else (cls,)
    return any(isinstance(t, type) and issubclass(t, VLMAdapter) for t in types)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `vugen` console script: runs a command, reporting a known error in one line.

    A known error (see :mod:`vugen.errors`) prints ``vugen COMMAND: error: MESSAGE`` on stderr and exits with
    status 2 for a bad command line or config, 1 otherwise; ``--traceback`` (anywhere on the command line) or
    ``VUGEN_TRACEBACK=1`` re-raises it with its traceback. Other exceptions keep their traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if "--traceback" in argv:
        argv = [arg for arg in argv if arg != "--traceback"]
        os.environ[TRACEBACK_ENV] = "1"  # for the processes a DDP launcher starts with this command line
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads (and DDP relaunches) sys.argv: passing args would warn
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        _run(argv, from_sys_argv=args is None)
    except Exception as error:
        message = None if show_traceback else known_error_message(error)
        if message is None:
            raise
        print(f"vugen{' ' + command if command else ''}: error: {message}", file=sys.stderr)
        sys.exit(2 if _is_usage_error(error) else 1)


def run(argv: list[str]) -> Any:
    """Run ``vugen ARGV...`` in this process (as the console script would, but raising errors): vugen's own commands
    return their result, Lightning's subcommands the :class:`VugenCLI`."""
    return _run(argv, from_sys_argv=False)


def _run(argv: list[str], from_sys_argv: bool) -> Any:
    if argv and argv[0] in COMMANDS:
        command = COMMANDS[argv[0]]
        args = _appending_list_options(command, argv[1:])
        result = CLI(command, args=args, prog=f"vugen {argv[0]}", exit_on_error=False)
        if result is not None:
            print(result)
        return result
    return VugenCLI(args=None if from_sys_argv else argv)


def _appending_list_options(command: Callable[..., Any], argv: list[str]) -> list[str]:
    """``argv`` with each ``--NAME`` of a ``list``-typed parameter as jsonargparse's appending ``--NAME+``, so an
    option given once per value (``--image a.png --image b.png``) collects them all instead of failing on the first
    (jsonargparse reads a lone ``--NAME VALUE`` as a whole list)."""
    hints = typing.get_type_hints(command)
    names = {f"--{name}" for name, hint in hints.items() if name != "return" and typing.get_origin(hint) is list}

    def appending(arg: str) -> str:
        option, equals, value = arg.partition("=")
        return f"{option}+{equals}{value}" if option in names else arg

    return [appending(arg) for arg in argv]


def _is_usage_error(error: BaseException) -> bool:
    from argparse import ArgumentError

    from jsonargparse import ArgumentError as ParserError

    return isinstance(error, ArgumentError | ParserError)


if __name__ == "__main__":
    main()
