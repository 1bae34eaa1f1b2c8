"""`vugen adapters`: the registered VLM adapters."""

from __future__ import annotations

from vugen.registry import adapter_sources

__all__ = ["print_adapters"]


def print_adapters() -> None:
    """`vugen adapters`: one line per registered adapter name and its class."""
    for name, source in sorted(adapter_sources().items()):
        print(f"{name:<12} {source}")
