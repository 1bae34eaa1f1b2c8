"""Bundles on the Hugging Face Hub: found by repo id (downloaded once, then read from the local cache, offline too)
and pushed as one commit.

Wherever vugen takes a bundle folder (``VugenPipeline.from_pretrained``, ``vugen generate --bundle``, ``vugen serve
--bundle``, ``vugen describe --bundle``) it also takes a Hub repo id, ``org/name``, with an optional ``revision``:
:func:`bundle_folder` resolves it to a snapshot in the local Hugging Face cache through
``huggingface_hub.snapshot_download``, fetching only the bundle's own files (:data:`vugen.bundle.BUNDLE_FILES`,
not whatever else the repo holds). A snapshot already in the cache loads with ``HF_HUB_OFFLINE=1``. The loaded
bundle is then checked exactly as a local one (sha256 of every file, tensor shapes, the VLM's fingerprint).

:func:`push_bundle` checks a bundle folder's files, then uploads them in one commit with a model card naming the base
VLM, the recipe and the metrics given (``VugenPipeline.push_to_hub``, ``vugen push``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

import vugen
from vugen.bundle import BUNDLE_FILES, CARD_FILE, CONFIG_FILE, BundleError, check_bundle_files
from vugen.decoder_export import read_decoder_sampling
from vugen.errors import VugenError
from vugen.hub import local_folder_or_hub_id
from vugen.model_card import model_card

__all__ = ["HubBundleError", "bundle_folder", "push_bundle"]


class HubBundleError(VugenError, LookupError):
    """A bundle named by a Hub repo id cannot be had: no such repo or revision, gated, or not cached offline."""


def bundle_folder(
    bundle: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a bundle given as a folder or as a Hub repo id (downloaded into the Hugging Face cache
    on first use; from the cache alone when it is there and the Hub is not reachable or ``HF_HUB_OFFLINE=1``).

    Args:
        bundle: A bundle folder, or a Hub repo id such as ``org/name``.
        revision: For a repo id: a branch, tag or commit sha (default: ``main``).
        cache_dir: For a repo id: the Hugging Face cache to use (default: ``HF_HUB_CACHE``).
        token: For a repo id: a Hub token (default: the logged-in one, or ``HF_TOKEN``).

    Raises:
        FileNotFoundError: ``bundle`` looks like a local path that does not exist (named).
        HubBundleError: The repo or revision does not exist (or is private or gated), the repo holds no bundle, or
            it is not in the cache while the Hub cannot be reached; one line naming the repo id.
        ValueError: A ``revision`` given with a local folder.
    """
    local = local_folder_or_hub_id(bundle, "bundle")
    if local is not None:
        if revision is not None:
            raise ValueError(f"bundle {str(bundle)!r} is a local folder: revision={revision!r} applies to a Hub id")
        return local
    repo_id, at = str(bundle), f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=list(BUNDLE_FILES),
            library_name="vugen",
            library_version=vugen.__version__,
        )
    except RevisionNotFoundError as error:
        raise HubBundleError(f"bundle {repo_id!r}: the Hub repo has no revision {revision!r}") from error
    except GatedRepoError as error:  # before its parent class RepositoryNotFoundError
        raise HubBundleError(
            f"bundle {repo_id!r} is gated on the Hub: accept its conditions on its page, then log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from error
    except RepositoryNotFoundError as error:
        raise HubBundleError(
            f"bundle {repo_id!r}: no such model repo on the Hugging Face Hub (a private one needs `hf auth login` or "
            "HF_TOKEN; a local bundle folder must exist)"
        ) from error
    except LocalEntryNotFoundError as error:
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubBundleError(
            f"bundle {repo_id!r}{at} is not in the local Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
            f"and {why}: download it where the Hub is reachable (`hf download {repo_id}`), or give a bundle folder"
        ) from error
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise HubBundleError(f"bundle {repo_id!r}{at}: the Hub repo holds no {CONFIG_FILE}, so it is no vugen bundle")
    return folder


def push_bundle(
    directory: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    metrics: Mapping[str, float] | None = None,
    metrics_dataset: str | None = None,
    allow_local_vlm: bool = False,
) -> str:
    """Upload a bundle folder to the Hub as one commit (the repo is created when missing), its ``README.md``
    replaced by a model card for the repo (:func:`vugen.model_card.model_card`, with ``metrics``); the folder itself is
    not changed.

    The files are checked first, as loading checks them (a damaged bundle is never pushed). A bundle whose VLM is a
    local folder is refused unless ``allow_local_vlm``: nobody who downloads it has that folder (loading it then
    needs ``adapter_overrides={"pretrained": ...}``); export it from a sampler whose adapter names a Hub id.

    Args:
        directory: The bundle folder (``VugenPipeline.save_pretrained``, ``vugen export``).
        repo_id: The model repo, ``org/name``.
        revision: The branch to commit to (default: ``main``).
        private: Create the repo private (an existing repo keeps its visibility).
        token: A Hub token with write access (default: the logged-in one, or ``HF_TOKEN``).
        commit_message: The commit's message (default: names the vugen version).
        create_pr: Open a pull request instead of committing to the branch.
        metrics: Scores the bundle was evaluated with, by name, for the card and its ``model-index``.
        metrics_dataset: What ``metrics`` were measured on (required with them).
        allow_local_vlm: Push a bundle whose VLM is a local folder.

    Returns:
        The URL of the commit (or of the pull request).

    Raises:
        BundleError: The bundle's files are incomplete or damaged (named), or its VLM is a local folder.
    """
    directory = Path(directory)
    record = check_bundle_files(directory)
    _check_vlm_is_reachable(record, directory, allow_local_vlm)
    card = model_card(record, read_decoder_sampling(directory), repo_id, metrics, metrics_dataset)
    files = sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name))
        for name in filter_repo_objects(files, allow_patterns=list(BUNDLE_FILES))
        if name != CARD_FILE
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode()))
    api = HfApi(token=token, library_name="vugen", library_version=vugen.__version__)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload a vugen {vugen.__version__} bundle",
        revision=revision,
        create_pr=create_pr,
    )
    return info.pr_url if create_pr and info.pr_url else info.commit_url


def _check_vlm_is_reachable(record: Mapping[str, Any], directory: Path, allow_local_vlm: bool) -> None:
    """Refuse a bundle whose VLM is a local folder (unless allowed): on the Hub its ``pretrained`` leads nowhere."""
    if allow_local_vlm or (record.get("vlm") or {}).get("kind") != "local":
        return
    pretrained = record["adapter"]["init_args"].get("pretrained")
    raise BundleError(
        f"{directory / CONFIG_FILE}: its VLM is the local folder {pretrained!r}, which nobody who downloads the bundle "
        "has; export it from a sampler whose adapter names a Hub id (pretrained: org/name, revision: a commit), or "
        "push anyway with allow_local_vlm=True (`vugen push --allow_local_vlm true`): loaders then pass "
        "adapter_overrides={'pretrained': PATH}"
    )
