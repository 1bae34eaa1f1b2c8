"""Adapter registry: one name per VLM adapter, one registration mechanism.

Adapters are found three ways, all resolving to a `VLMAdapter` subclass:

- the entry-point group `vugen.adapters` (built-in adapters and installed third-party packages declare
  `name = "package.module:Class"` in their pyproject.toml; loaded lazily, on first use);
- `register_adapter(name, cls)` at run time (or as a class decorator);
- a full class path `package.module.Class`, as in a YAML `class_path`.

A class path read from a file (a checkpoint, a bundle's ``vugen.json``) is data, not the user's choice:
:func:`adapter_class_from_record` accepts only a registered adapter, compared as text before anything is imported.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from vugen.errors import VugenError

if TYPE_CHECKING:
    # Imported where a class is checked, not here: listing adapters (`vugen adapters`) needs no torch.
    from vugen.adapter import VLMAdapter

ENTRY_POINT_GROUP = "vugen.adapters"
_registered: dict[str, type[VLMAdapter]] = {}

A = TypeVar("A", bound="type[VLMAdapter]")


class UnregisteredAdapterError(VugenError, ValueError):
    """A file names an adapter class that is not registered, so vugen does not import it."""


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_adapter(name: str, cls: A | None = None) -> A | Any:
    """Register an adapter class under `name`; usable as `@register_adapter("name")`.

    Args:
        name: lowercase name users write in configs and on the command line.
        cls: the `VLMAdapter` subclass. Omit it to use this function as a decorator.
    """
    if not name or name != name.lower() or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"adapter name must be lowercase letters, digits, '_' or '-', got {name!r}")

    def register(adapter_cls: A) -> A:
        _check_adapter_class(adapter_cls, name)
        existing = _registered.get(name)
        if existing is not None and existing is not adapter_cls:
            raise ValueError(f"adapter name {name!r} is already registered to {existing.__qualname__}")
        _registered[name] = adapter_cls
        return adapter_cls

    return register if cls is None else register(cls)


@contextmanager
def registered_while(cls: type[VLMAdapter]) -> Iterator[str]:
    """Register ``cls`` for the with-block only, unless it already is; yields its registered name.

    For a class the user's own command line named by class path (``vugen check --adapter my_pkg.MyAdapter``): the
    files the command writes and reads back in the block record it, and may name it.
    """
    name = registered_adapter_name(f"{cls.__module__}.{cls.__qualname__}")
    if name is not None:
        yield name
        return
    name = re.sub(r"[^a-z0-9_]", "_", f"{cls.__module__}.{cls.__qualname__}".lower())
    register_adapter(name, cls)
    try:
        yield name
    finally:
        _registered.pop(name, None)


def list_adapters() -> list[str]:
    """Every registered adapter name: entry points and run-time registrations."""
    return sorted(set(_entry_points()) | set(_registered))


def adapter_sources() -> dict[str, str]:
    """Registered name -> where its class lives (`module:Class`), without importing anything."""
    sources = {name: ep.value for name, ep in _entry_points().items()}
    return sources | {name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in _registered.items()}


def adapter_class_path(name: str) -> str:
    """The dotted class path (``package.module.Class``) of a registered adapter name, without importing it.

    Raises:
        KeyError: ``name`` is not registered.
    """
    source = adapter_sources().get(name)
    if source is None:
        raise KeyError(f"unknown adapter {name!r}; registered adapters: {', '.join(list_adapters())}")
    return source.replace(":", ".")


def get_adapter_class(name_or_class_path: str) -> type[VLMAdapter]:
    """Resolve a registered name or a `package.module.Class` path to an adapter class."""
    if name_or_class_path in _registered:
        return _registered[name_or_class_path]
    entry = _entry_points().get(name_or_class_path)
    if entry is not None:
        return _check_adapter_class(entry.load(), name_or_class_path)
    if "." in name_or_class_path:
        return _check_adapter_class(_import_class(name_or_class_path), name_or_class_path)
    raise KeyError(
        f"unknown adapter {name_or_class_path!r}; registered adapters: {', '.join(list_adapters())} "
        "(or give a class path such as my_package.my_module.MyAdapter)"
    )


def registered_adapter_name(class_path: str) -> str | None:
    """The registered name that ``class_path`` means, compared as text (nothing is imported); None if none.

    Accepted: a registered name (``llava``), or its class as ``package.module.Class`` or ``package.module:Class``.
    """
    for name, source in adapter_sources().items():
        if class_path in (name, source, source.replace(":", ".")):
            return name
    return None


def adapter_class_from_record(class_path: Any, source: str, alternative: str = "") -> type[VLMAdapter]:
    """The adapter class a file names (a checkpoint's, a bundle's), only if it is registered: checked before import.

    Importing the module a file names runs that module's code, so a recorded ``class_path`` must be a registered
    adapter (an entry point of the ``vugen.adapters`` group or a :func:`register_adapter` registration), compared
    as text; only then is the class imported.

    Args:
        class_path: The recorded class path or registered name.
        source: Where it was read: the file and the key, e.g. ``"run.ckpt: hyper_parameters.adapter.class_path"``.
        alternative: A further way out, appended to the refusal (e.g. how to pass the adapter yourself).

    Raises:
        UnregisteredAdapterError: Naming ``source``, the class path and how to proceed.
    """
    name = registered_adapter_name(class_path) if isinstance(class_path, str) else None
    if name is None:
        raise UnregisteredAdapterError(
            f"{source}: {class_path!r} is not a registered adapter ({', '.join(list_adapters())}), and vugen does "
            "not import a class that a file names. Register yours (an entry point in the 'vugen.adapters' group, "
            f"or vugen.register_adapter(name, cls) before loading){alternative}"
        )
    return get_adapter_class(name)


def build_adapter(name_or_class_path: str, **kwargs: Any) -> VLMAdapter:
    """Instantiate an adapter by registered name or class path, e.g. `build_adapter("llava", pretrained=...)`."""
    return get_adapter_class(name_or_class_path)(**kwargs)


def _import_class(class_path: str) -> Any:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"cannot import adapter class {class_path!r}: {error}") from error


def _check_adapter_class(cls: Any, name: str) -> type[VLMAdapter]:
    from vugen.adapter import VLMAdapter

    if not (isinstance(cls, type) and issubclass(cls, VLMAdapter)):
        raise TypeError(f"adapter {name!r} resolves to {cls!r}, which is not a subclass of vugen's VLMAdapter")
    return cls
