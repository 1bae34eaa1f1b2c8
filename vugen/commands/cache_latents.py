"""`vugen cache-latents`: encode a dataset split once into the reducer latents the latent sampler trains on."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule

from vugen.adapter import VLMAdapter
from vugen.data.latent_writer import write_latent_cache
from vugen.distributed import resolve_device, resolve_rank
from vugen.hub import local_folder_or_hub_id
from vugen.nn.reducer import DimensionReducer

__all__ = ["cache_latents"]


def cache_latents(
    *,  # keyword-only: jsonargparse then takes every argument as an option (`--adapter.class_path ...`)
    adapter: VLMAdapter,
    reducer_path: str,
    data: LightningDataModule,
    out_dir: str,
    split: str = "train",
    shard_size: int = 4096,
    batch_size: int | None = None,
    device: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> Path:
    """`vugen cache-latents`: encode a dataset split once into the reducer latents the latent sampler trains on.

    On several GPUs, launch one process per GPU with torchrun, e.g. ``torchrun --standalone --nproc_per_node 8
    --no-python -- vugen cache-latents --config ...`` (``--``: else torchrun takes vugen's options for its own):
    rank ``r`` of ``W`` encodes every ``W``-th sample (of a sharded dataset: every ``W``-th shard) on
    ``cuda:LOCAL_RANK`` into ``out_dir/rank-{r}/``, and :class:`~vugen.data.latent_cache.LatentCacheDataModule`
    reads the ``W`` parts of ``out_dir`` as one cache. The processes do not communicate (no process group).

    Args:
        adapter: The frozen VLM the reducer was trained on, e.g. ``--adapter.class_path
            vugen_adapters.llava.LlavaAdapter --adapter.init_args.pretrained llava-hf/llava-1.5-7b-hf``.
        reducer_path: The trained reducer: a folder exported by stage 1 or stage 3 (its ``reducer/``) or a Hub id.
        data: The image-text datamodule, e.g. ``--data.class_path vugen.data.shapes_datamodule.ShapesDataModule``.
        out_dir: The cache folder to write (replaced whole if it exists; with several ranks, each replaces its
            ``rank-{r}/``).
        split: The split of ``data`` to encode: ``train``, ``val``, ``test``.
        shard_size: Samples per shard file.
        batch_size: Images per encoder batch; None: the datamodule's ``batch_size``.
        device: Device to encode on; None: the local rank's GPU (``cuda:LOCAL_RANK``) when there is one, else
            ``cpu``.
        rank: This process's rank among the writers; None: ``RANK`` from the environment (as torchrun sets it),
            else 0.
        world_size: Number of writer processes; None: ``WORLD_SIZE`` from the environment, else 1 (a
            single-process cache in ``out_dir`` itself).
        progress: Show a progress bar over batches (rank 0 only); ``false`` for logs and scripts.

    Returns:
        The folder this process wrote: ``out_dir``, or ``out_dir/rank-{rank}`` for one rank's part.
    """
    rank, world_size = resolve_rank(rank, world_size)
    device = resolve_device(device)
    local_folder_or_hub_id(reducer_path, "--reducer_path")  # a mistyped folder fails at once, not on the network
    reducer = DimensionReducer.from_pretrained(reducer_path)
    folder = write_latent_cache(
        data,
        adapter.to(device),
        reducer.to(device),
        out_dir,
        split,
        shard_size=shard_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        progress=progress,
    )
    part = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    print(f"vugen cache-latents: wrote the latents of the {split} split{part} to {folder}")
    return folder
