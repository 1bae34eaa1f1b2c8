"""Stage checkpoints as untrusted files: one reader that names the file, and what their recorded config may build.

A stage's Lightning checkpoint is data: nothing in it decides which code runs.

- :func:`read_checkpoint` reads it with ``torch.load(weights_only=True, mmap=True)`` (plain data only; the tensors
  are mapped, not read) and turns each way of failing into one line naming the file: missing, a folder, truncated
  or not a checkpoint, or holding a pickled Python object.
- :func:`check_writer` refuses a checkpoint another stage wrote, naming that stage (the ``_class_path`` that
  LightningCLI and :meth:`~vugen.stages.base.AdapterStage.record_hyperparameters` record).
- :func:`checked_hyperparameters` lets the recorded configuration rebuild a stage through trusted classes only,
  checked as text before jsonargparse imports anything: the adapter must be registered
  (:func:`vugen.registry.adapter_class_from_record`) and its ``trust_remote_code`` is the caller's, never the
  file's; any other ``class_path`` must be vugen's own or, for the optimizer and scheduler, torch's or Lightning's.
"""

from __future__ import annotations

import copy
import inspect
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from vugen.errors import VugenError
from vugen.registry import adapter_class_from_record, get_adapter_class

__all__ = [
    "CheckpointError",
    "check_writer",
    "checked_hyperparameters",
    "read_checkpoint",
    "recorded_hyperparameters",
]

HYPERPARAMETERS = "hyper_parameters"  # LightningModule.CHECKPOINT_HYPER_PARAMS_KEY
WRITER = "_class_path"  # the stage class that wrote the checkpoint, in its hyperparameters
DISTRIBUTED_METADATA = "meta.pt"  # beside the shards of a distributed checkpoint folder (ModelParallelStrategy)
# Modules a recorded class path may import: vugen's own, plus torch's and Lightning's optimizers and schedulers for
# the arguments that build them (callables, whose string values jsonargparse also imports).
_MODULES = ("vugen.", "vugen_adapters.")
_OPTIMIZATION = (*_MODULES, "torch.optim.", "lightning.pytorch.cli.")
_CALLABLE_ARGUMENTS = ("optimizer", "lr_scheduler")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class CheckpointError(VugenError, ValueError):
    """A checkpoint is missing, damaged, another stage's, or names classes vugen does not import from a file."""


# ---------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, distributed: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint file, read as plain data with its tensors memory-mapped (not read until used).

    Args:
        path: The ``.ckpt`` file.
        distributed: Also accept a distributed checkpoint folder (FSDP2 runs with ``ModelParallelStrategy``
            write one); its ``meta.pt`` is read (everything but the model and optimizer shards).

    Raises:
        FileNotFoundError: No such file or folder.
        CheckpointError: A folder where a file is needed, a truncated file or not a checkpoint, or one holding
            pickled Python objects; each naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        metadata = path / DISTRIBUTED_METADATA
        if distributed and metadata.is_file():
            return _load(metadata, shown=path)
        kind = "a distributed checkpoint folder (FSDP2)" if metadata.is_file() else "a folder"
        raise CheckpointError(
            f"{path} is {kind}, not a checkpoint file"
            + (
                ": this command reads a one-file checkpoint (train with another strategy, or merge its shards, "
                "torch.distributed.checkpoint.format_utils.dcp_to_torch_save, into meta.pt's dict as 'state_dict')"
                if metadata.is_file()
                else ""
            )
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return _load(path, shown=path)


def _load(file: Path, shown: Path) -> dict[str, Any]:
    if not zipfile.is_zipfile(file):  # reads the archive's last bytes only: a cut-short file has no directory there
        raise CheckpointError(f"{shown}: truncated or not a checkpoint (not the zip archive that torch.save writes)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        unsupported = _UNSUPPORTED_GLOBAL.search(str(error))
        if unsupported is None:
            raise CheckpointError(f"{shown}: truncated or not a checkpoint ({_first_line(error)})") from error
        raise CheckpointError(
            f"{shown}: holds a pickled Python object ({unsupported.group(1)}), not only tensors and plain data; "
            "vugen reads checkpoints with torch.load(weights_only=True), which does not run pickled code"
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as error:  # what torch raises on bad bytes
        raise CheckpointError(f"{shown}: truncated or not a checkpoint ({_first_line(error)})") from error
    is_metadata = file.name == DISTRIBUTED_METADATA  # a distributed checkpoint keeps its state_dict in the shards
    if not isinstance(checkpoint, dict) or not (is_metadata or "state_dict" in checkpoint):
        raise CheckpointError(f"{shown}: not a Lightning checkpoint (no 'state_dict'; e.g. a bare weights file)")
    return checkpoint


def recorded_hyperparameters(
    checkpoint: Mapping[str, Any], hparams_file: str | os.PathLike | None = None
) -> Mapping[str, Any]:
    """What Lightning rebuilds a stage from: the checkpoint's ``hyper_parameters``, or those of ``hparams_file``
    (a ``.yaml`` or ``.csv``, read as Lightning reads it) when one is given."""
    if hparams_file is None:
        return checkpoint.get(HYPERPARAMETERS) or {}
    from lightning.pytorch.core.saving import load_hparams_from_tags_csv, load_hparams_from_yaml

    load = load_hparams_from_tags_csv if str(hparams_file).lower().endswith(".csv") else load_hparams_from_yaml
    return load(hparams_file) or {}


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message (torch's go on with advice that does not apply here)."""
    text = str(error).strip()
    return re.split(r"(?<=\.)\s|\n", text, maxsplit=1)[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------- the writer
def check_writer(
    checkpoint: Mapping[str, Any], path: str | Path, stage: type, use: str, given: Collection[str] = ()
) -> None:
    """Refuse a checkpoint that another stage wrote (or that does not record what ``stage`` needs).

    The writer is the checkpoint's ``hyper_parameters["_class_path"]``; it must name ``stage`` or an imported
    subclass (looked up in ``sys.modules``: nothing is imported). A checkpoint without it (written before vugen
    recorded it) must record every required argument of ``stage`` not in ``given``.

    Args:
        checkpoint: The checkpoint (:func:`read_checkpoint`).
        path: Its file, for the message.
        stage: The stage class wanted.
        use: Who wants it, for the message, e.g. ``"vugen export"``.
        given: Arguments the caller supplies instead of the checkpoint.

    Raises:
        CheckpointError: e.g. ``x.ckpt: written by DecoderStage; vugen export needs a SamplerStage checkpoint
            (vugen fit --config ...sampler.yaml)``.
    """
    hyperparameters = checkpoint.get(HYPERPARAMETERS) or {}
    writer = hyperparameters.get(WRITER)
    needs = f"{use} needs a {stage.__name__} checkpoint{_how_to_write(stage)}"
    if writer is None:
        missing = [name for name in _required_arguments(stage) if name not in hyperparameters and name not in given]
        if missing:
            raise CheckpointError(f"{path}: records no {', '.join(missing)}, so another stage wrote it; {needs}")
        return
    if not _is_imported_subclass(writer, stage):
        name = str(writer).rpartition(".")[2] if str(writer).startswith(_MODULES) else repr(writer)
        raise CheckpointError(f"{path}: written by {name}; {needs}")


def _how_to_write(stage: type) -> str:
    if not stage.__module__.startswith(_MODULES):
        return ""
    return f" (vugen fit --config ...{stage.__name__.removesuffix('Stage').lower()}.yaml)"


def _required_arguments(stage: type) -> list[str]:
    parameters = inspect.signature(stage.__init__).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in positional and p.default is p.empty and p.name != "self"]


def _is_imported_subclass(class_path: Any, cls: type) -> bool:
    """Whether ``class_path`` names an already imported subclass of ``cls`` (as Lightning checks: no import)."""
    if not isinstance(class_path, str):
        return False
    module, _, name = class_path.rpartition(".")
    target = getattr(sys.modules.get(module), name, None)
    return isinstance(target, type) and issubclass(target, cls)


# ---------------------------------------------------------------------------------------------------- class paths
def checked_hyperparameters(
    hyperparameters: Mapping[str, Any],
    source: str,
    trust_remote_code: bool | None,
    given: Collection[str] = (),
    trusted: Collection[str] = (),
    alternative: str = "",
) -> dict[str, Any]:
    """Check a checkpoint's recorded configuration before jsonargparse imports anything from it.

    Every class path is compared as text: the adapter's must be a registered adapter; the others (the stage's
    modules) must be vugen's own; those of the optimizer and scheduler (and any import path among their
    arguments) vugen's, ``torch.optim``'s or ``lightning.pytorch.cli``'s; or any of them one in ``trusted``. Keys
    the caller gives are not checked.

    Args:
        hyperparameters: The checkpoint's ``hyper_parameters``.
        source: The file, for messages.
        trust_remote_code: The caller's choice for the adapter, recorded in its place; None drops the file's value
            (the caller's config then decides).
        given: Arguments the caller supplies instead (not checked, not replaced).
        trusted: Class paths the caller chose elsewhere (e.g. named in its own config), accepted as they are.
        alternative: How else to proceed, appended to a refusal; ``{key}`` is replaced by the argument's name.

    Returns:
        The replacements to apply: ``{"adapter": record}`` with the file's ``trust_remote_code`` replaced (empty
        when the caller gives the adapter or none is recorded).

    Raises:
        CheckpointError: A class path that is not vugen's (or torch's, for the optimizer), naming it and its key.
        UnregisteredAdapterError: The adapter is not registered.
    """
    for key, value in hyperparameters.items():
        if key not in given and key != "adapter" and not key.startswith("_"):
            callable_argument = key in _CALLABLE_ARGUMENTS
            where = f"{source}: {HYPERPARAMETERS}.{key}"
            _check_import_paths(value, where, callable_argument, trusted, alternative.format(key=key))
    if "adapter" in given or hyperparameters.get("adapter") is None:
        return {}
    where = f"{source}: {HYPERPARAMETERS}.adapter"
    adapter = _checked_adapter(hyperparameters["adapter"], where, trust_remote_code, trusted, alternative)
    return {"adapter": adapter}


def _checked_adapter(
    record: Any, where: str, trust_remote_code: bool | None, trusted: Collection[str], alternative: str
) -> Any:
    """The adapter record with a registered (or trusted) class path and the caller's ``trust_remote_code``."""
    record = {"class_path": record} if isinstance(record, str) else copy.deepcopy(record)
    if not isinstance(record, dict):
        return record  # not a class spec: the stage's own argument check names it
    alternative = alternative.format(key="adapter")
    if record.get("class_path") in trusted:
        adapter_cls = get_adapter_class(record["class_path"]) if trust_remote_code is not None else None
    else:
        adapter_cls = adapter_class_from_record(record.get("class_path"), f"{where}.class_path", alternative)
        record["class_path"] = f"{adapter_cls.__module__}.{adapter_cls.__qualname__}"
    for section in ("init_args", "dict_kwargs"):
        arguments = record.get(section)
        if isinstance(arguments, dict):
            arguments.pop("trust_remote_code", None)  # never the file's say
            _check_import_paths(arguments, f"{where}.{section}", False, trusted, alternative)
    if trust_remote_code is not None and "trust_remote_code" in inspect.signature(adapter_cls).parameters:
        record.setdefault("init_args", {})["trust_remote_code"] = trust_remote_code
    return record


def _check_import_paths(
    value: Any, where: str, callable_argument: bool, trusted: Collection[str], alternative: str
) -> None:
    """Refuse a ``class_path`` (any, nested) or, in a callable's arguments, any import path outside the allowed."""
    allowed = _OPTIMIZATION if callable_argument else _MODULES
    if isinstance(value, dict):
        class_path = value.get("class_path")
        if class_path is not None and not _allowed(class_path, allowed, trusted):
            _refuse(class_path, f"{where}.class_path", allowed, alternative)
        for key, item in value.items():
            if key != "class_path":
                _check_import_paths(item, f"{where}.{key}", callable_argument, trusted, alternative)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_import_paths(item, f"{where}[{index}]", callable_argument, trusted, alternative)
    elif callable_argument and _is_import_path(value) and not _allowed(value, allowed, trusted):
        _refuse(value, where, allowed, alternative)


def _allowed(class_path: Any, allowed: tuple[str, ...], trusted: Collection[str]) -> bool:
    return isinstance(class_path, str) and (class_path.startswith(allowed) or class_path in trusted)


def _is_import_path(value: Any) -> bool:
    """What jsonargparse would import for a callable: a dotted path of identifiers."""
    return isinstance(value, str) and "." in value and all(part.isidentifier() for part in value.split("."))


def _refuse(value: Any, where: str, allowed: tuple[str, ...], alternative: str) -> None:
    raise CheckpointError(
        f"{where}: vugen does not import {value!r} because a file names it (only "
        f"{', '.join(prefix + '*' for prefix in allowed)}){alternative}"
    )
