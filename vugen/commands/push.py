"""`vugen push BUNDLE ORG/NAME`: a bundle folder to the Hugging Face Hub (:func:`vugen.bundle_hub.push_bundle`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vugen.bundle_hub import push_bundle

__all__ = ["push"]


def push(
    bundle: str,
    repo_id: str,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    metrics: str | None = None,
    metrics_dataset: str | None = None,
    allow_local_vlm: bool = False,
) -> str:
    """`vugen push BUNDLE ORG/NAME`: upload a bundle folder to the Hugging Face Hub as one commit.

    The bundle's files are checked first (a damaged bundle is never pushed); the repo is created when missing; its
    model card names the base VLM, the recipe and the metrics given. Log in first (`hf auth login`, or HF_TOKEN).
    Load it back anywhere with `VugenPipeline.from_pretrained("ORG/NAME")` or `vugen generate --bundle ORG/NAME`.

    Args:
        bundle: The bundle folder (`vugen export`, `VugenPipeline.save_pretrained`).
        repo_id: The model repo, `org/name`.
        revision: The branch to commit to (default: main).
        private: Create the repo private (an existing repo keeps its visibility).
        commit_message: The commit's message.
        create_pr: Open a pull request instead of committing to the branch.
        metrics: A JSON file of the scores the bundle was evaluated with, `{"name": number, ...}`, for the model card.
        metrics_dataset: What those metrics were measured on (required with `--metrics`).
        allow_local_vlm: Push a bundle whose VLM is a local folder (loaders must then supply the VLM).

    Returns:
        The URL of the commit (or pull request).
    """
    scores = read_metrics(Path(metrics)) if metrics is not None else None
    url = push_bundle(
        bundle,
        repo_id,
        revision=revision,
        private=private,
        commit_message=commit_message,
        create_pr=create_pr,
        metrics=scores,
        metrics_dataset=metrics_dataset,
        allow_local_vlm=allow_local_vlm,
    )
    print(f"vugen push: {bundle} is on the Hub as {repo_id}: {url}")
    return url


def read_metrics(path: Path) -> dict[str, float]:
    """A metrics file: a JSON object of finite numbers by name.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: It is not such an object (naming the file and the first bad entry).
    """
    if not path.is_file():
        raise FileNotFoundError(f"--metrics {path}: no such file")
    try:
        scores = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--metrics {path} is not valid JSON: {error}") from error
    if not isinstance(scores, dict):
        raise ValueError(f"--metrics {path}: expected a JSON object of numbers by name, got {type(scores).__name__}")
    for name, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"--metrics {path}: {name!r} must be a finite number, got {value!r}")
    return {name: float(value) for name, value in scores.items()}
