"""vugen's own commands, one module per command, each a typed function whose signature and Google docstring are its
``--help`` (litgpt style; jsonargparse's ``CLI`` parses its command line, see :mod:`vugen.cli`).

``COMMANDS`` maps a command name (``vugen NAME ...``) to its function as ``"module:function"``; :func:`command`
imports it. Only the command that runs is imported: each pulls in what it needs (torch, Lightning, transformers),
and ``vugen adapters`` or ``vugen tiny --help`` need none of it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["COMMANDS", "command"]

COMMANDS: dict[str, str] = {
    "adapters": "vugen.commands.adapters:print_adapters",
    "check": "vugen.commands.check:check",
    "tiny": "vugen.commands.tiny:tiny",
    "cache-latents": "vugen.commands.cache_latents:cache_latents",
    "emoji-set": "vugen.commands.emoji_set:emoji_set",
    "generate": "vugen.commands.generate:generate",
    "describe": "vugen.commands.describe:describe",
    "export": "vugen.commands.export:export",
    "export-geneval": "vugen.commands.benchmarks:export_geneval",
    "export-dpg": "vugen.commands.benchmarks:export_dpg",
    "serve": "vugen.commands.serve:serve",
    "push": "vugen.commands.push:push",
}


def command(name: str) -> Callable[..., Any]:
    """The function of command ``name`` (a key of :data:`COMMANDS`), importing its module.

    Raises:
        KeyError: ``name`` is no vugen command.
    """
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)
