"""Training data loaders that resume mid-epoch: :class:`ResumableDataLoader` and its :class:`ResumableSampler`.

Lightning saves the ``state_dict()`` of every training loader that has ``state_dict`` / ``load_state_dict`` in its
checkpoints and loads it back before iterating on resume. The state of a :class:`ResumableDataLoader` is its
*position*: the epoch and the number of batches of that epoch already used. What a batch holds then follows from
the position alone, because an epoch's order depends on ``(seed, epoch)`` only:

* a map-style dataset is read through a :class:`ResumableSampler`, a ``DistributedSampler``: this rank's share of a
  permutation drawn from ``seed + epoch`` (the whole dataset in one process). Being a ``DistributedSampler``,
  Lightning keeps it under DDP instead of injecting its own;
* an ``IterableDataset`` with a ``set_epoch(epoch)`` method (e.g.
  :class:`~vugen.data.image_shards.ImageTextShards`) gets the epoch and must derive its order from it;
* the loader's own generator, from which torch's ``DataLoader`` draws the workers' seeds (from the global random
  state without one), is reseeded from ``seed + epoch`` at each epoch.

On resume the batches already used are skipped: by the sampler for map-style datasets (no sample is loaded), by
loading and discarding them otherwise (an iterable dataset, or a sampler passed in).

Under Lightning the position must count the batches that *trained*, not those the trainer fetched ahead, and the
epoch must follow the trainer's: the :class:`~vugen.callbacks.ExactResume` callback (every vugen stage adds it) does
both through :meth:`ResumableDataLoader.report_progress` and :meth:`ResumableDataLoader.set_epoch`. In a loop of
your own, each pass over the loader is the next epoch (or call ``set_epoch``) and the position counts the batches
the loader yielded.

Datasets must draw no randomness from a global random state, in the main process or in DataLoader workers (Shapes
renders from per-sample seeds, the image-text sources transform deterministically): what a batch holds would
otherwise depend on when, and by which worker, it was loaded.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

__all__ = ["ResumableDataLoader", "ResumableSampler"]

_STATE_KEYS = {"epoch", "batches", "batch_size", "world_size", "num_workers"}


def _distributed_world() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` whose next pass can start after its first ``start`` indices.

    Each epoch is this rank's share of ``randperm(len(dataset))`` seeded with ``seed + epoch`` (``range`` without
    ``shuffle``), padded to a multiple of the number of ranks, as ``DistributedSampler`` does.

    Args:
        dataset: The map-style dataset (anything with ``__len__``).
        shuffle: Shuffle each epoch.
        seed: Seed of the order.
        num_replicas: Number of ranks; None: from ``torch.distributed`` when initialised, else 1.
        rank: This process's rank; None: as ``num_replicas``.
    """

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        world_size, this_rank = _distributed_world()
        super().__init__(
            dataset,
            num_replicas=world_size if num_replicas is None else num_replicas,
            rank=this_rank if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
        )
        #: Indices of this rank's share that the next pass skips (then reset to 0).
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return itertools.islice(super().__iter__(), start, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with a ``state_dict``: where it is in which epoch, so that a resumed run continues there.

    Use it as a training loader in a datamodule (see the module docstring for how orders are fixed and batches
    skipped): ``ResumableDataLoader(dataset, batch_size=32, shuffle=True, seed=seed, drop_last=True)``. The state
    also records the batch size, the number of ranks and (for iterable datasets, whose batch order depends on it)
    of workers; loading a state saved with other values warns and starts the epoch from its beginning.

    Args:
        dataset: A map-style dataset, or an ``IterableDataset`` (with ``set_epoch(epoch)`` for epochs to differ).
        batch_size: Samples per batch (None: no batching, as in ``DataLoader``).
        shuffle: Shuffle a map-style dataset (in an order fixed by ``seed`` and the epoch).
        seed: Seed of the order and of the worker seeds.
        **kwargs: Any other ``DataLoader`` argument (``drop_last``, ``num_workers``, ``collate_fn``, ...). A
            ``sampler`` or ``batch_sampler`` given here is used as it is: batches are then skipped by loading them.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        shuffle: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        custom_sampler = kwargs.get("sampler") is not None or kwargs.get("batch_sampler") is not None
        if not custom_sampler and not isinstance(dataset, IterableDataset):
            kwargs["sampler"] = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
            shuffle = False
        own_generator = kwargs.get("generator") is None
        if own_generator:  # else torch's DataLoader draws the workers' base seed from the global RNG at each iter()
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)
        self.seed = seed
        self._own_generator = own_generator
        self._epoch = 0
        self._epoch_started = False  # a pass of self._epoch began: the next one, without set_epoch, is the next epoch
        self._position = (0, 0)  # (epoch, batches of it used): what state_dict saves
        self._resume_at: tuple[int, int] | None = None  # a loaded position, applied by the next pass

    @property
    def epoch(self) -> int:
        """The epoch the next pass iterates (see :meth:`set_epoch`)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch ``epoch`` next: sets the sampler's and (if it has ``set_epoch``) the dataset's epoch.

        Without calls, each new pass over the loader is the next epoch.
        """
        self._epoch, self._epoch_started = epoch, False
        if self._position[0] != epoch:
            self._position = (epoch, 0)
        for target in (self.sampler, self.dataset):
            if callable(getattr(target, "set_epoch", None)):
                target.set_epoch(epoch)

    def report_progress(self, batches: int, epoch_done: bool) -> None:
        """Record that ``batches`` batches of the current epoch have been used (trained), or all of it.

        The trainer's count, which excludes the batches it fetched ahead; :class:`~vugen.callbacks.ExactResume` calls
        it after each training batch. ``epoch_done`` (the epoch ended there, also when it was cut short by
        ``limit_train_batches``) makes the position the start of the next epoch.
        """
        self._position = (self._epoch + 1, 0) if epoch_done else (self._epoch, batches)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}`` (the position) and the settings it depends on."""
        epoch, batches = self._position
        return {
            "epoch": epoch,
            "batches": batches,
            "batch_size": self.batch_size or 1,
            "world_size": getattr(self.sampler, "num_replicas", _distributed_world()[0]),
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue at a saved position: the next pass iterates its epoch from the first batch not used yet."""
        if set(state_dict) != _STATE_KEYS:
            raise ValueError(
                f"a ResumableDataLoader state has the keys {sorted(_STATE_KEYS)}; got {sorted(state_dict)}"
            )
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        saved, current = self._order_settings(state_dict), self._order_settings(self.state_dict())
        if saved != current:
            warnings.warn(
                f"the training data position was saved with {saved} and this run has {current}: epoch {epoch} "
                f"starts again from its first batch instead of batch {batches} (the resume is not exact)",
                stacklevel=2,
            )
            batches = 0
        self.set_epoch(epoch)
        self._position = (epoch, batches)
        self._resume_at = (epoch, batches)

    def _order_settings(self, state: dict[str, int]) -> dict[str, int]:
        """The settings a position's meaning depends on (the worker count only for iterable datasets)."""
        names = ["batch_size", "world_size"] + (["num_workers"] if isinstance(self.dataset, IterableDataset) else [])
        return {name: int(state[name]) for name in names}

    def __iter__(self) -> Iterator[Any]:
        if self._epoch_started:
            self.set_epoch(self._epoch + 1)
        self._epoch_started = True
        epoch, skip = self._epoch, 0
        if self._resume_at is not None:
            resume_epoch, batches = self._resume_at
            self._resume_at = None
            skip = batches if resume_epoch == epoch else 0  # set_epoch moved on since: that epoch starts afresh
        if self._own_generator:
            self.generator.manual_seed(self.seed + epoch)
        by_sampler = isinstance(self.sampler, ResumableSampler)
        if by_sampler:  # batches are consecutive runs of batch_size indices (one index each without batching)
            self.sampler.start = skip * (self.batch_size or 1)
        self._position = (epoch, skip)
        return self._counted(super().__iter__(), epoch, skip, discard=0 if by_sampler else skip)

    def _counted(self, batches: Iterator[Any], epoch: int, used: int, discard: int) -> Iterator[Any]:
        """``batches`` after ``discard`` of them, advancing the position with each one yielded."""
        for _ in itertools.islice(batches, discard):
            pass
        for batch in batches:
            used += 1
            self._position = (epoch, used)
            yield batch
