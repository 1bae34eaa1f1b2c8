"""The `vugen` command: LightningCLI's fit / validate / test / predict, plus vugen's own commands.

vugen fit --config configs/demo/decoder.yaml
vugen adapters | check | tiny | ... (every command: ``vugen --help``, the table :data:`vugen.commands.COMMANDS`)

This module stays light (no torch, Lightning or transformers at import): ``vugen --help`` is read from the command
table and the commands' source, a vugen command imports only its own module (:func:`vugen.commands.command`), and
:class:`~vugen.lightning_cli.VugenCLI` is imported only for a Lightning subcommand.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import CLI

from vugen.commands import COMMANDS, command
from vugen.errors import TRACEBACK_ENV, known_error_message
from vugen.quiet import expected_output_hidden

DESCRIPTION = (
    "vugen: train the three VUGEN stages of any Hugging Face VLM (Lightning's subcommands: each stage is a "
    "LightningModule a YAML config names by class_path) and use what they make (vugen's own commands). "
    "`vugen COMMAND --help` for each. A known error (bad config, missing or corrupt file, ...) prints one line; "
    f"`vugen --traceback COMMAND ...` or {TRACEBACK_ENV}=1 shows its traceback."
)
LIGHTNING_SUBCOMMANDS = {
    "fit": "train a stage, e.g. `vugen fit --config configs/demo/decoder.yaml`",
    "validate": "one evaluation epoch of a stage over the validation set",
    "test": "one evaluation epoch of a stage over the test set (held-out reconstruction scores)",
    "predict": "images of a vugen.data.prompts.PromptDataModule, saved by a prediction writer of vugen.callbacks",
}
_HELP = ("-h", "--help")


def __getattr__(name: str) -> Any:
    # `vugen.cli.VugenCLI` as before the split, imported on first use (PEP 562) so that this module stays light.
    if name == "VugenCLI":
        from vugen.lightning_cli import VugenCLI

        return VugenCLI
    raise AttributeError(f"module 'vugen.cli' has no attribute {name!r}")


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
    name = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        _run(argv, from_sys_argv=args is None)
    except Exception as error:
        message = None if show_traceback else known_error_message(error)
        if message is None:
            raise
        print(f"vugen{' ' + name if name else ''}: error: {message}", file=sys.stderr)
        sys.exit(2 if _is_usage_error(error) else 1)


def run(argv: list[str]) -> Any:
    """Run ``vugen ARGV...`` in this process (as the console script would, but raising errors): vugen's own commands
    return their result, Lightning's subcommands the :class:`~vugen.lightning_cli.VugenCLI`."""
    return _run(argv, from_sys_argv=False)


def _run(argv: list[str], from_sys_argv: bool) -> Any:
    if not argv or argv[0] in _HELP:
        print(help_text())
        return None
    with expected_output_hidden():  # Lightning's and its dependencies' expected noise, in every command
        if argv[0] in COMMANDS:
            function = command(argv[0])
            args = _appending_list_options(function, argv[1:])
            # Each command prints its own summary; its return value is for Python callers (`run`).
            return CLI(function, args=args, prog=f"vugen {argv[0]}", exit_on_error=False)
        from vugen.lightning_cli import VugenCLI

        return VugenCLI(args=None if from_sys_argv else argv)


def help_text(width: int | None = None) -> str:
    """``vugen --help``: the description and every command with its summary, without building LightningCLI's parser
    (seconds of imports) or importing the commands.

    Args:
        width: Line width; default: the terminal's, at most 120.
    """
    width = width or min(shutil.get_terminal_size().columns, 120)
    indent = " " * 18

    def rows(summaries: dict[str, str]) -> list[str]:
        return [
            textwrap.fill(f"  {name:<15} {summary}", width, subsequent_indent=indent)
            for name, summary in summaries.items()
        ]

    own = {name: _command_summary(target) for name, target in COMMANDS.items()}
    return "\n".join(
        [
            "usage: vugen [--traceback] COMMAND [ARGS ...]",
            "",
            textwrap.fill(DESCRIPTION, width),
            "",
            "Lightning's subcommands (LightningCLI; `vugen fit --help`, ...):",
            *rows(LIGHTNING_SUBCOMMANDS),
            "",
            "vugen's commands:",
            *rows(own),
        ]
    )


def _command_summary(target: str) -> str:
    """The first line of a command function's docstring less its leading `vugen NAME ARGS`: usage, read from the
    source (importing the module would load what the command needs); empty if it cannot be read."""
    module, _, function = target.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            line = (ast.get_docstring(node) or "").partition("\n")[0]
            return line.split("`: ", 1)[1] if line.startswith("`") and "`: " in line else line
    return ""


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
