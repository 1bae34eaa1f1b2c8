"""vugen's own commands, one module per command, each a typed function whose signature and Google docstring are its
``--help`` (litgpt style; jsonargparse's ``CLI`` parses its command line, see :mod:`vugen.cli`).

``COMMANDS`` maps a command name (``vugen NAME ...``) to its function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vugen.commands import adapters, benchmarks, cache_latents, check, describe, emoji_set, export, generate, tiny

__all__ = ["COMMANDS"]

COMMANDS: dict[str, Callable[..., Any]] = {
    "adapters": adapters.print_adapters,
    "check": check.check,
    "tiny": tiny.tiny,
    "cache-latents": cache_latents.cache_latents,
    "emoji-set": emoji_set.emoji_set,
    "generate": generate.generate,
    "describe": describe.describe,
    "export": export.export,
    "export-geneval": benchmarks.export_geneval,
    "export-dpg": benchmarks.export_dpg,
}
