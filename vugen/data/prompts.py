"""Prompt sets for text-to-image prediction: :class:`PromptDataModule` (``Trainer.predict`` over a benchmark's
prompts, across processes) and the seed rule every vugen generation path shares (:func:`image_seeds`).

A prompt set is one of:

- a list of prompts (a YAML list in a config);
- a text file, one prompt per line (surrounding spaces stripped, blank lines skipped);
- a JSONL file (``.jsonl``) of JSON objects with a string ``prompt``, such as GenEval's
  ``prompts/evaluation_metadata.jsonl``: each line's text is kept as it is (its record), for GenEval's per-prompt
  ``metadata.jsonl``;
- a folder of ``<id>.txt`` files, one prompt each (DPG-Bench's ``dpg_bench/prompts``), in file-name order; each
  prompt's record is its ``<id>``.

Seeds: image ``k`` of prompt ``i`` uses seed ``seed + i * n + k`` (``n`` images per prompt), so an image depends on
its prompt's index in the set, never on batching or on the number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from vugen.errors import check_positive

__all__ = [
    "SEED_RULE",
    "PromptBatch",
    "PromptDataModule",
    "PromptDataset",
    "PromptItem",
    "PromptSet",
    "collate_prompts",
    "image_seeds",
    "read_prompt_set",
]

SEED_RULE = "image k of prompt i uses seed + i * images_per_prompt + k"
PromptFormat = Literal["list", "text", "jsonl", "dpg_folder"]


def image_seeds(seed: int, prompt_index: int, n: int) -> list[int]:
    """Seeds of the ``n`` images of prompt ``prompt_index``: ``seed + prompt_index * n + k`` (:data:`SEED_RULE`)."""
    return [seed + prompt_index * n + k for k in range(n)]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a set, each with its record, and where they came from.

    Attributes:
        prompts: The prompts, in order.
        records: Per prompt: its JSONL line as written (``jsonl``), its ``<id>`` (``dpg_folder``), else None.
        format: ``list``, ``text``, ``jsonl`` or ``dpg_folder``.
        source: The resolved path of the file or folder, or the list itself.
    """

    prompts: list[str]
    records: list[str | None]
    format: PromptFormat
    source: str | list[str]


def read_prompt_set(prompts: str | Path | list[str]) -> PromptSet:
    """Read a prompt set (see the module docstring): a list of prompts, or the path of a text file, a ``.jsonl`` file
    or a folder of ``<id>.txt`` files.

    Raises:
        FileNotFoundError: The path does not exist, or the folder holds no ``<id>.txt`` file.
        ValueError: No prompts, a JSONL line that is not a JSON object with a string ``prompt`` (naming the file and
            line), an empty ``<id>.txt``, or a list item that is not a string.
    """
    if isinstance(prompts, (list, tuple)):
        return _from_list(list(prompts))
    path = Path(prompts)
    if path.is_dir():
        return _from_folder(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts: no such file or folder {path} (a text file, a .jsonl file or a folder of <id>.txt files)"
        )
    return _from_jsonl(path) if path.suffix == ".jsonl" else _from_text(path)


def _from_list(prompts: list[Any]) -> PromptSet:
    if not prompts:
        raise ValueError("prompts: the list of prompts is empty")
    for number, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts: item {number} is not a string: {prompt!r}")
    return PromptSet(prompts, [None] * len(prompts), "list", prompts)


def _from_text(path: Path) -> PromptSet:
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (expected one per line)")
    return PromptSet(prompts, [None] * len(prompts), "text", str(path.resolve()))


def _from_jsonl(path: Path) -> PromptSet:
    prompts, records = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not JSON: {error}") from error
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}: line {number} is not a JSON object with a string 'prompt': {line[:80]}")
        prompts.append(record["prompt"])
        records.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompts (expected one JSON object with a 'prompt' per line)")
    return PromptSet(prompts, records, "jsonl", str(path.resolve()))


def _from_folder(path: Path) -> PromptSet:
    files = sorted(path.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{path}: no <id>.txt prompt files (a DPG-Bench prompts folder holds one per prompt)")
    prompts = [file.read_text(encoding="utf-8").strip() for file in files]
    for file, prompt in zip(files, prompts, strict=True):
        if not prompt:
            raise ValueError(f"{file} is empty (expected one prompt)")
    return PromptSet(prompts, [file.stem for file in files], "dpg_folder", str(path.resolve()))


class PromptItem(TypedDict):
    """One prompt of a set: its index, text, image seeds and record (see :class:`PromptSet`)."""

    index: int
    prompt: str
    seeds: list[int]
    record: str | None


class PromptBatch(TypedDict):
    """Prompts batched by :func:`collate_prompts`: the items' fields as lists, in order."""

    indices: list[int]
    prompts: list[str]
    seeds: list[list[int]]
    records: list[str | None]


class PromptDataset(Dataset):
    """The items of a :class:`PromptSet` with ``images_per_prompt`` seeds each (:func:`image_seeds`)."""

    def __init__(self, prompt_set: PromptSet, images_per_prompt: int, seed: int) -> None:
        self.prompt_set, self.images_per_prompt, self.seed = prompt_set, images_per_prompt, seed

    def __len__(self) -> int:
        return len(self.prompt_set.prompts)

    def __getitem__(self, index: int) -> PromptItem:
        return {
            "index": index,
            "prompt": self.prompt_set.prompts[index],
            "seeds": image_seeds(self.seed, index, self.images_per_prompt),
            "record": self.prompt_set.records[index],
        }


def collate_prompts(items: list[PromptItem]) -> PromptBatch:
    """Items -> a :class:`PromptBatch` of plain lists (torch's default collate would turn seeds into tensors)."""
    return {
        "indices": [item["index"] for item in items],
        "prompts": [item["prompt"] for item in items],
        "seeds": [item["seeds"] for item in items],
        "records": [item["record"] for item in items],
    }


class PromptDataModule(LightningDataModule):
    """A prompt set for ``Trainer.predict``: batches of :class:`PromptBatch`, in order, split across processes.

    Under DDP, Lightning gives ``predict`` an ``UnrepeatedDistributedSamplerWrapper``
    (``lightning.pytorch.overrides.distributed``, Lightning 2.6): rank ``r`` of ``W`` takes prompts
    ``r, r + W, r + 2W, ...``, none repeated to even the ranks out (their batch counts may differ by one), so every
    prompt is generated exactly once. That sampler needs at least one prompt per process, checked here.

    Args:
        prompts: A list of prompts, or the path of a text file (one prompt per line), a ``.jsonl`` file of JSON
            objects with a ``prompt`` (GenEval's ``evaluation_metadata.jsonl``) or a folder of ``<id>.txt`` files
            (DPG-Bench's ``prompts/``). Read at once, so a bad set fails before any model loads.
        images_per_prompt: Images per prompt (``n``).
        seed: Base seed: image ``k`` of prompt ``i`` uses ``seed + i * n + k``.
        batch_size: Prompts per batch (each prompt's images are one generation call, so this changes no image).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        prompts: str | list[str],
        images_per_prompt: int = 1,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive("images_per_prompt", images_per_prompt)
        check_positive("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.prompt_set = read_prompt_set(prompts)
        self.images_per_prompt, self.seed = images_per_prompt, seed
        self.batch_size, self.num_workers = batch_size, num_workers

    @property
    def prompts(self) -> list[str]:
        """Every prompt of the set, in order."""
        return self.prompt_set.prompts

    def dataset(self) -> PromptDataset:
        """Every prompt of the set as a :class:`PromptItem`."""
        return PromptDataset(self.prompt_set, self.images_per_prompt, self.seed)

    def predict_dataloader(self) -> DataLoader:
        """The prompts in order, ``batch_size`` per batch (Lightning adds the rank split under DDP)."""
        processes = self.trainer.world_size if self.trainer is not None else 1
        if len(self.prompts) < processes:
            raise ValueError(
                f"{len(self.prompts)} prompts for {processes} processes: each process needs at least one prompt "
                "(run fewer processes)"
            )
        return DataLoader(
            self.dataset(),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_prompts,
        )

    def sampling_record(self) -> dict[str, Any]:
        """What a prediction's sidecar records about the prompts and seeds."""
        return {
            "prompts": self.prompt_set.source,
            "prompt_format": self.prompt_set.format,
            "num_prompts": len(self.prompts),
            "images_per_prompt": self.images_per_prompt,
            "seed": self.seed,
            "seed_rule": SEED_RULE,
        }
