"""Ranks, devices and gathering: what vugen's code needs to know about the processes it runs in.

Commands that shard work without a process group (``vugen cache-latents``) take ``rank`` / ``world_size`` /
``device`` arguments that default to what ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Code that
runs inside a process group (the stages, saving a bundle from a sharded model) asks :func:`world_size` and
:func:`is_global_zero`, and gathers FSDP2-sharded Hub-mixin modules with :func:`full_copy`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["full_copy", "is_global_zero", "is_sharded", "resolve_device", "resolve_rank", "world_size"]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else ``RANK`` / ``WORLD_SIZE`` from the environment, else 0 and 1."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def resolve_device(device: str | None) -> torch.device:
    """``device``, or the local rank's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def is_global_zero() -> bool:
    """True in a single process and on global rank 0 of a process group."""
    return world_size() == 1 or torch.distributed.get_rank() == 0


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is an FSDP2 shard (a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_copy(module: nn.Module) -> nn.Module | None:
    """The whole, unsharded weights of a Hub-mixin module (a reducer, a decoder, a latent bridge) on global rank 0.

    Unsharded modules are returned as they are (on every rank). An FSDP2-sharded one is gathered on every rank (a
    collective: call it on all ranks) into a fresh instance of its class built from its ``config`` on rank 0;
    the other ranks get None.
    """
    if not is_sharded(module):
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    if not is_global_zero():
        return None
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclasses the module
    copy = cls(**module.config)
    copy.load_state_dict(state)
    return copy
