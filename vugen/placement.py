"""Where a process runs: its rank among the processes of a command, and its device.

Commands that shard work (``vugen export-geneval``, ``export-dpg``, ``cache-latents``) take ``rank`` /
``world_size`` / ``device`` arguments that default to what ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
"""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "resolve_rank"]


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
