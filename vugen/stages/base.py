"""What every training stage shares: a frozen VLM read through an adapter, and checkpoints without it.

A stage's checkpoint holds what trains (and small frozen parts such as a loaded reducer), never the VLM: the VLM is
rebuilt from the adapter configuration recorded in the hyperparameters, so ``Stage.load_from_checkpoint(path)``
works without the VLM's weights in the file.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from vugen.adapter import VLMAdapter
from vugen.atomic import atomic_directory
from vugen.callbacks import ExactResume, NonFiniteGuard
from vugen.checkpoint import check_writer, checked_hyperparameters, read_checkpoint, recorded_hyperparameters
from vugen.data.batches import batch_images
from vugen.distributed import full_copy, is_global_zero, is_sharded, world_size
from vugen.finite import DIVERGENCE_ADVICE, last_checkpoint, require_finite
from vugen.generation import LatentSamplerConfig, SamplingConfig
from vugen.nn.reducer import DimensionReducer
from vugen.stages.training_record import replacement_warning, training_record, write_training_record

__all__ = ["AdapterStage", "argument_config", "check_reads_adapter"]

# What `load_from_checkpoint` uses to rebuild the module (and its adapter) from the recorded configuration;
# one of Lightning's allow-listed instantiators.
_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
_ADAPTER_PREFIX = "adapter."
log = logging.getLogger(__name__)


class AdapterStage(LightningModule):
    """Base of the stages: holds the frozen ``adapter``, the optimizer factories, and the checkpoint rules.

    Subclasses call ``super().__init__(adapter, optimizer, lr_scheduler)`` first, then
    :meth:`record_hyperparameters` with the modules they received as arguments.

    State dicts (so checkpoints, distributed checkpoints and resuming) leave out the frozen weights under
    :attr:`rebuilt_prefixes`, which are rebuilt from the recorded configuration; trainable parameters under those
    prefixes (e.g. LoRA layers inside the VLM) are kept.
    """

    #: State-dict prefixes of frozen modules rebuilt from their configuration instead of checkpointed.
    rebuilt_prefixes: tuple[str, ...] = (_ADAPTER_PREFIX,)

    def __init__(
        self, adapter: VLMAdapter, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None
    ) -> None:
        super().__init__()
        if not isinstance(adapter, VLMAdapter):
            raise TypeError(
                f"adapter must be a VLMAdapter instance, got {type(adapter).__name__}. A checkpoint whose adapter "
                "cannot be rebuilt from its recorded configuration loads with load_from_checkpoint(path, adapter=...)"
            )
        self.hold_adapter(adapter.requires_grad_(False))  # frozen whatever the adapter did
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.register_state_dict_post_hook(_drop_rebuilt_weights)

    def hold_adapter(self, adapter: VLMAdapter) -> None:
        """Keep the adapter as the submodule ``adapter``; a stage whose model owns the adapter overrides this (and
        :attr:`adapter`)."""
        self.adapter = adapter

    def record_hyperparameters(self, **arguments: Any) -> None:
        """Save hyperparameters that rebuild this module, never the VLM itself.

        Under LightningCLI they are the parsed config (modules and optimizers as ``class_path`` dicts). Built in
        Python, a module argument would be recorded (and deep-copied) as an object: the adapter is replaced by its
        ``describe()`` record, a Hub-mixin module (reducer, decoder) by its class path and ``config``, and the
        callables by their class path when they are a class or a ``functools.partial`` of one (any other callable
        is not recorded: ``load_from_checkpoint`` then uses the default); paths become strings, and the stage's own
        class path is recorded as ``_class_path``, as LightningCLI does.

        Args:
            arguments: The ``__init__`` arguments that are modules or callables, by name.
        """
        frame = inspect.currentframe().f_back  # the subclass's __init__: its arguments are the hyperparameters
        self.save_hyperparameters(ignore=list(arguments), frame=frame)
        if "_instantiator" in self.hparams:  # built by LightningCLI: the config records every argument
            self.save_hyperparameters(frame=frame)
            return
        # as LightningCLI does: the writer's class, so a checkpoint says which stage it is for (vugen.checkpoint)
        records: dict[str, Any] = {"_instantiator": _INSTANTIATOR, "_class_path": _class_path(type(self))}
        # A Path or a config dataclass would be a pickled object: checkpoints hold plain data (torch.load weights_only)
        records |= {key: os.fspath(value) for key, value in self.hparams.items() if isinstance(value, os.PathLike)}
        configs = (SamplingConfig, LatentSamplerConfig)
        records |= {key: value.to_dict() for key, value in self.hparams.items() if isinstance(value, configs)}
        for name, value in arguments.items():
            config = argument_config(value)
            if config is not None or value is None:
                records[name] = config
        self.save_hyperparameters(records)

    # ================================================================== loading checkpoints (vugen.checkpoint)
    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> AdapterStage:
        """Rebuild the stage from a checkpoint file, the VLM from its recorded adapter configuration, as Lightning
        does; but the file decides no code that runs.

        The file is read as plain data and checked before anything it names is imported (see
        :mod:`vugen.checkpoint`): another stage's checkpoint is refused naming its writer; the recorded adapter must
        be a registered one and its ``trust_remote_code`` is replaced by this call's; the other recorded class paths
        must be vugen's own (or torch's optimizers and schedulers).

        Args:
            checkpoint_path: A ``.ckpt`` file written while training this stage.
            map_location: As Lightning's: where the tensors go.
            hparams_file: As Lightning's: a ``.yaml`` / ``.csv`` whose hyperparameters replace the recorded ones
                (checked the same way).
            strict: As Lightning's.
            weights_only: None or True: checkpoints are always read as plain data (``torch.load(weights_only=True)``).
            trust_remote_code: Let the VLM checkpoint the adapter loads run its own code: runs code from the VLM
                checkpoint; pin its ``revision``. Never taken from the file.
            kwargs: Arguments that replace the recorded ones, e.g. ``adapter=MyAdapter(...)`` for an adapter that is
                not registered, or ``decoder_export=...`` for a moved folder.

        Raises:
            CheckpointError: The file is missing, truncated, not a checkpoint, another stage's, or names a class
                vugen does not import from a file; naming the file and the key.
            UnregisteredAdapterError: The recorded adapter is not registered.
        """
        if weights_only is False:
            raise ValueError("weights_only=False: vugen reads checkpoints as plain data only (weights_only=True)")
        if not isinstance(checkpoint_path, str | os.PathLike):
            raise TypeError(f"checkpoint_path must be a file path, got {type(checkpoint_path).__name__}")
        use = f"{cls.__name__}.load_from_checkpoint"
        checkpoint = read_checkpoint(checkpoint_path)  # tensors mapped, not read: Lightning reads them below
        check_writer(checkpoint, checkpoint_path, cls, use, given=kwargs)
        replacements = checked_hyperparameters(
            recorded_hyperparameters(checkpoint, hparams_file),
            str(checkpoint_path),
            trust_remote_code,
            given=kwargs,
            alternative=f", or pass it yourself: {use}(path, {{key}}=...)",
        )
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, True, **replacements, **kwargs
        )

    # ================================================================== end of loading checkpoints

    # ------------------------------------------------------------------ model
    def vlm_features(self, images: Tensor, dtype: torch.dtype) -> Tensor:
        """Frozen VLM features ``[B, N, D]`` of ``images`` (``[B, 3, H, W]`` in ``[0, 1]``), cast to ``dtype``."""
        with torch.no_grad():
            features = self.adapter.encode_images(images)
        return features.to(dtype)

    def on_train_start(self) -> None:
        """Say once which modules start training in eval mode: the VLM's, by design (the ``vugen`` command hides
        Lightning's warning about them, see :mod:`vugen.lightning_cli`), and any other, by its top-level name."""
        vlm = {id(module) for module in self.adapter.modules()}
        in_eval = [(name, module) for name, module in self.named_modules() if name and not module.training]
        others = Counter(name.partition(".")[0] for name, module in in_eval if id(module) not in vlm)
        line = f"{type(self).__name__}: the VLM ({len(in_eval) - others.total()} modules) stays in eval mode by design"
        if others:
            line += "; also in eval mode: " + ", ".join(f"{name} ({count} modules)" for name, count in others.items())
        rank_zero_info(line)

    # ------------------------------------------------------------------ PCA initialisation of a fresh reducer
    def enable_pca_init(self, enabled: bool) -> None:
        """Initialise ``self.reducer`` as the PCA reducer of the first training batch's features (rank 0's batch, on
        every rank) before the first optimisation step, when ``enabled``.

        Deterministic for a given seed and data order. A checkpointed ``pca_fitted`` flag makes it happen once: a
        resumed run or a reloaded reducer is never overwritten by a fresh PCA.
        """
        self.pca_init = enabled
        self.register_buffer("pca_fitted", torch.tensor(False))

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Fit the PCA initialisation on the first training batch (see :meth:`enable_pca_init`)."""
        if getattr(self, "pca_init", False) and not bool(self.pca_fitted):
            dtype = self.reducer.in_proj.weight.dtype
            self.fit_reducer_pca(self.reducer, self.vlm_features(batch_images(batch, type(self).__name__), dtype))
            self.pca_fitted.fill_(True)

    def fit_reducer_pca(self, reducer: DimensionReducer, features: Tensor) -> None:
        """Initialise ``reducer`` as the PCA reducer of rank 0's ``features`` on every rank.

        Unsharded, every rank fits its own batch and rank 0's result is broadcast; FSDP2-sharded, rank 0 fits a
        gathered full copy and its state is scattered back into the shards.
        """
        if not is_sharded(reducer):
            reducer.init_from_pca(features)
            if world_size() > 1:
                for tensor in reducer.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        copy = full_copy(reducer)  # collective
        if copy is not None:
            copy.to(features.device).init_from_pca(features)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(reducer, copy.state_dict() if copy is not None else {}, options=options)

    def log_metrics(self, split: str, metrics: dict[str, Tensor], batch_size: int) -> None:
        """Log ``{split}/{name}``: per step in training, averaged over the epoch otherwise."""
        on_step = split == "train"
        for name, value in metrics.items():
            self.log(
                f"{split}/{name}",
                value.detach(),
                prog_bar=name == "loss",
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                sync_dist=not on_step,
            )

    # ------------------------------------------------------------------ distribution
    def fsdp_units(self) -> list[nn.Module]:
        """The trainable modules to FSDP2-shard, children before parents (each called through ``forward``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its FSDP2 sharding units")

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, FSDP2-shard :meth:`fsdp_units` and the adapter's ``block_classes``.

        FSDP2 gathers a module's parameters in hooks around its ``forward``, so a unit must be a module whose
        ``forward`` runs (a reducer's ``encode`` is a method: its children are the units). The adapter's blocks
        are frozen and sharded to save memory; the adapter's other weights stay replicated. Modules already
        sharded are skipped, so this is idempotent (Lightning may call it more than once).
        """
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = self.device_mesh["data_parallel"] if self.device_mesh.mesh_dim_names else self.device_mesh
        block_types = tuple(self.adapter.block_classes)
        adapter_blocks = [m for m in self.adapter.modules() if block_types and isinstance(m, block_types)]
        for module in [*self.fsdp_units(), *adapter_blocks]:
            if not isinstance(module, FSDPModule):
                fully_shard(module, mesh=mesh)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """The configured optimizer over the parameters that train, and the scheduler if any."""
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.lr_scheduler(optimizer), "interval": "step", "monitor": "train/loss"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ==================================================================== non-finite guard and safe exports
    # A NonFiniteGuard by default, no checkpoint or export with NaN / Inf weights, exports only after a fit that
    # changed the weights, each with its training.json record.
    def configure_callbacks(self) -> list[Callback]:
        """The callbacks every stage trains with.

        :class:`~vugen.callbacks.ExactResume`: a fit resumed from a checkpoint continues the interrupted one exactly
        (training data position, random states; validation runs on a fork of the random state). A
        :class:`~vugen.callbacks.NonFiniteGuard` that stops at the first NaN / Inf step, unless the trainer has a
        guard already (returning one then would make Lightning replace the trainer's, and its configured budget). A
        subclass that configures callbacks of its own returns them with ``super().configure_callbacks()``.
        """
        callbacks: list[Callback] = [ExactResume()]
        if not any(isinstance(callback, NonFiniteGuard) for callback in self.trainer.callbacks):
            callbacks.append(NonFiniteGuard())
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint whose weights hold NaN or Inf (every rank raises, or none does)."""
        what = f"refusing to write a checkpoint at step {self.trainer.global_step}"
        self.require_finite_state(checkpoint["state_dict"].items(), what)

    def ranks_agree(self, decision: bool) -> bool:
        """``decision`` of all ranks together (true only if true on every rank) when attached to a trainer, else the
        decision of this process."""
        return decision if self._trainer is None else self._trainer.strategy.reduce_boolean_decision(decision)

    def divergence_advice(self) -> str:
        """What to try and, in a run, where to go back to: for the messages about non-finite weights."""
        if self._trainer is None:
            return DIVERGENCE_ADVICE
        return f"last good checkpoint: {last_checkpoint(self._trainer)}; {DIVERGENCE_ADVICE}"

    def require_finite_state(self, tensors: Any, what: str) -> None:
        """Raise a :class:`~vugen.finite.NonFiniteError` on every rank when one of ``tensors`` (``(name, tensor)``
        pairs, local shards) holds NaN or Inf on any rank; ``what`` starts the message."""
        what = f"{type(self).__name__}: {what}"
        require_finite(tensors, what, agree=self.ranks_agree, advice=self.divergence_advice())

    def export_after_fit(self, directory: str, export: Callable[[str], Path | None], what: str) -> None:
        """``on_fit_end``: ``export(directory)`` when this fit applied at least one optimizer step.

        A fit that never trained (``Trainer.fit`` stopped: No training batches; ``max_steps`` already reached; every
        step skipped by the :class:`~vugen.callbacks.NonFiniteGuard`) leaves an earlier export as it was, and says
        so on rank zero.
        """
        guard = next((c for c in self.trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        if guard is not None and guard.applied_steps(self.trainer) == 0:
            rank_zero_info(f"{type(self).__name__}: no optimizer step ran in this fit; {directory} left as it was")
            return
        if (written := export(directory)) is not None:
            rank_zero_info(f"{what} exported to {written}")

    def export_modules(
        self, directory: str | Path, what: str, modules: dict[str, nn.Module], write: Callable[..., None]
    ) -> Path | None:
        """The export sequence of a stage: refuse NaN / Inf weights (every rank agrees), gather FSDP2 shards (call it
        on every rank), then global rank 0 writes ``write(folder, **whole_modules)`` with :meth:`write_export`.

        Args:
            directory: The export folder, replaced whole (or left as it was on error).
            what: What is exported, for the refusal message (e.g. ``"the reducer"``).
            modules: The Hub-mixin modules to gather, by the keyword ``write`` takes them under.
            write: Writes the export layout into the staging folder it is given.

        Returns:
            The folder on the rank that wrote it, else None.

        Raises:
            NonFiniteError: A weight of the stage holds NaN or Inf; nothing is written.
        """
        self.require_finite_state(self.state_dict().items(), f"refusing to export {what} to {directory}")
        whole = {name: full_copy(module) for name, module in modules.items()}  # collectives under FSDP2
        if any(module is None for module in whole.values()) or not is_global_zero():
            return None
        return self.write_export(directory, lambda folder: write(folder, **whole))

    def write_export(self, directory: str | Path, write: Callable[[Path], None]) -> Path:
        """Replace ``directory`` atomically with what ``write(folder)`` puts in ``folder``, plus ``training.json``.

        The record's ``global_step`` is the attached trainer's when its last run was a ``fit`` (None otherwise: a
        module exported outside training, or after a ``validate``). Says so in one line when the export replaced
        was trained more or validated better (see :func:`vugen.stages.training_record.replacement_warning`).
        """
        trainer = self._trainer
        fitted = trainer is not None and trainer.state.fn == TrainerFn.FITTING  # not a later validate / test
        metrics = dict(trainer.callback_metrics) if trainer is not None else {}
        record = training_record(type(self).__name__, trainer.global_step if fitted else None, metrics)
        warning = replacement_warning(directory, record)
        with atomic_directory(directory) as staging:
            write(staging)
            write_training_record(staging, record)
        if warning is not None:
            log.warning(warning)  # only global rank zero writes exports
        return Path(directory)

    # ==================================================================== end of non-finite guard and safe exports

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load everything but the frozen weights that are rebuilt (the VLM's come from ``pretrained``).

        ``strict`` holds for the rest: a missing tensor or an unknown key is an error naming them.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        rebuilt = set(_rebuilt_keys(self, result.missing_keys, prefix=""))
        missing = [key for key in result.missing_keys if key not in rebuilt]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__} (other module sizes, or another stage's "
                f"checkpoint?): missing {missing}, unexpected {result.unexpected_keys}"
            )
        return result._replace(missing_keys=missing)


def check_reads_adapter(reducer: DimensionReducer, adapter: VLMAdapter, source: str) -> DimensionReducer:
    """``reducer``, checked to read the adapter's features (``source`` names it in the error).

    Raises:
        ValueError: Its ``feature_dim`` is not the adapter's, naming both and what to set.
    """
    if reducer.feature_dim != adapter.feature_dim:
        raise ValueError(
            f"{source} reads feature_dim={reducer.feature_dim} channels but the adapter's features have "
            f"feature_dim={adapter.feature_dim}: set the reducer's feature_dim to {adapter.feature_dim}"
        )
    return reducer


def _rebuilt_keys(stage: AdapterStage, keys: Any, prefix: str) -> list[str]:
    """The ``keys`` of frozen weights under the stage's ``rebuilt_prefixes`` (not trainable parameters)."""
    trainable = {prefix + name for name, param in stage.named_parameters() if param.requires_grad}
    prefixes = tuple(prefix + p for p in stage.rebuilt_prefixes)
    return [key for key in keys if key.startswith(prefixes) and key not in trainable]


def _drop_rebuilt_weights(stage: AdapterStage, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in _rebuilt_keys(stage, list(state_dict), prefix):
        del state_dict[key]


def argument_config(value: Any) -> dict[str, Any] | None:
    """``{class_path, init_args}`` of an adapter, a Hub-mixin module, a class or a partial; None otherwise."""
    if isinstance(value, VLMAdapter):
        return value.init_config()
    if isinstance(value, nn.Module) and hasattr(value, "_hub_mixin_config"):
        return {"class_path": _class_path(type(value)), "init_args": dict(value._hub_mixin_config)}
    keywords: dict[str, Any] = {}
    if isinstance(value, functools.partial) and not value.args:
        value, keywords = value.func, dict(value.keywords)
    if not inspect.isclass(value):
        return None
    return {"class_path": _class_path(value), "init_args": keywords}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
