"""The real huggingface_hub client against `tests.hub_stub`: upload, download back byte for byte, revisions, the Hub's
errors, and offline mode served from the cache once the stub is gone."""

from __future__ import annotations

import random
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from tests.hub_stub import INITIAL_GITATTRIBUTES, STUB_TOKEN, HubStub, git_blob_oid, read_tree

# The `hub_stub` fixture (an import of it would read as unused, then redefined, to ruff).
pytest_plugins = ["tests.hub_stub"]

REPO_ID = "vugen-test/tiny-model"


@pytest.fixture
def folder(tmp_path: Path) -> dict[str, bytes]:
    """A local folder to upload (``tmp_path / "upload"``), with nested subfolders; returns its files."""
    files = {
        "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n",
        "config.json": b'{"hidden_size": 8}\n',
        # ~100 KB of binary: the name the Hub would track with LFS; the stub takes it as a regular file.
        "weights/model.safetensors": random.Random(0).randbytes(100_000),
        "weights/extra/deep/notes.txt": "naïve ✓\n".encode(),
    }
    for path, data in files.items():
        target = tmp_path / "upload" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


def _upload(stub: HubStub, tmp_path: Path) -> str:
    """Creates `REPO_ID` and uploads ``tmp_path / "upload"`` with the client; returns the commit oid."""
    api = HfApi(endpoint=stub.url, token=STUB_TOKEN)
    api.create_repo(REPO_ID, exist_ok=True, private=False)
    info = api.upload_folder(folder_path=tmp_path / "upload", repo_id=REPO_ID, commit_message="first upload")
    return info.oid


def test_upload_folder_then_snapshot_download_is_byte_identical(hub_stub, folder, tmp_path):
    oid = _upload(hub_stub, tmp_path)

    repo = hub_stub.repos[REPO_ID]
    assert repo.branches["main"] == oid and len(oid) == 40
    assert [commit.message for commit in repo.history] == ["initial commit", "first upload"]
    (commit,) = hub_stub.commit_requests
    assert commit.commit_message == "first upload"
    assert sorted(commit.commit_files) == sorted(folder)
    assert {request.authorization for request in hub_stub.requests} == {f"Bearer {STUB_TOKEN}"}

    snapshot = snapshot_download(REPO_ID, cache_dir=tmp_path / "cache", endpoint=hub_stub.url)

    assert Path(snapshot) == tmp_path / "cache" / "models--vugen-test--tiny-model" / "snapshots" / oid
    assert read_tree(snapshot) == {**folder, ".gitattributes": INITIAL_GITATTRIBUTES}
    # Every file came from the stub (a HEAD for its metadata, a GET for its bytes), none from anywhere else.
    fetched = {request.path for request in hub_stub.requests if request.method == "GET" and "/resolve/" in request.path}
    assert fetched == {f"/{REPO_ID}/resolve/{oid}/{path}" for path in [*folder, ".gitattributes"]}


def test_create_commit_moves_main_and_an_old_commit_keeps_its_bytes(hub_stub, folder, tmp_path):
    api = HfApi(endpoint=hub_stub.url, token=STUB_TOKEN)
    first = _upload(hub_stub, tmp_path)
    (tmp_path / "new-config.json").write_bytes(b'{"hidden_size": 16}\n')

    second = api.create_commit(
        REPO_ID,
        operations=[
            CommitOperationAdd("config.json", path_or_fileobj=tmp_path / "new-config.json"),
            CommitOperationAdd("added.bin", path_or_fileobj=b"\x00\x01\x02"),
            # Unchanged: the client drops it from the commit, knowing the remote oid from the preupload answer.
            CommitOperationAdd("README.md", path_or_fileobj=folder["README.md"]),
        ],
        commit_message="second",
    ).oid

    assert second != first and hub_stub.repos[REPO_ID].branches["main"] == second
    assert hub_stub.commit_requests[-1].commit_files == ["config.json", "added.bin"]
    assert hub_stub.repos[REPO_ID].files()["config.json"] == b'{"hidden_size": 16}\n'
    cache = tmp_path / "cache"
    old = read_tree(snapshot_download(REPO_ID, revision=first, cache_dir=cache, endpoint=hub_stub.url))
    assert old == {**folder, ".gitattributes": INITIAL_GITATTRIBUTES}
    new = read_tree(snapshot_download(REPO_ID, revision="main", cache_dir=cache, endpoint=hub_stub.url))
    assert new == {**old, "config.json": b'{"hidden_size": 16}\n', "added.bin": b"\x00\x01\x02"}
    path = hf_hub_download(REPO_ID, "config.json", revision=first, cache_dir=cache, endpoint=hub_stub.url)
    assert Path(path).read_bytes() == folder["config.json"]
    # The cache names a blob after the ETag: the git blob oid, as the Hub sends for a non-LFS file.
    assert Path(path).resolve().name == git_blob_oid(folder["config.json"])


def test_a_missing_repo_raises_repository_not_found(hub_stub, tmp_path):
    api = HfApi(endpoint=hub_stub.url, token=STUB_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("vugen-test/no-such-repo")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("vugen-test/no-such-repo", cache_dir=tmp_path, endpoint=hub_stub.url)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("vugen-test/no-such-repo", "config.json", cache_dir=tmp_path, endpoint=hub_stub.url)
    assert {request.status for request in hub_stub.requests} == {404}


def test_a_missing_revision_raises_revision_not_found(hub_stub, folder, tmp_path):
    _upload(hub_stub, tmp_path)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO_ID, revision="no-such-branch", cache_dir=tmp_path / "cache", endpoint=hub_stub.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO_ID, "config.json", revision="f" * 40, cache_dir=tmp_path / "cache", endpoint=hub_stub.url)


def test_offline_mode_serves_the_cached_snapshot_with_the_stub_stopped(hub_stub, folder, tmp_path, monkeypatch):
    oid = _upload(hub_stub, tmp_path)
    cache = tmp_path / "cache"
    online = snapshot_download(REPO_ID, cache_dir=cache, endpoint=hub_stub.url)
    hub_stub.stop()
    seen = len(hub_stub.requests)
    # The Hub unreachable (connection refused) without offline mode: the client falls back on the cache too.
    assert snapshot_download(REPO_ID, cache_dir=cache, endpoint=hub_stub.url) == online
    # huggingface_hub 2.4.0 reads HF_HUB_OFFLINE once, into `constants.HF_HUB_OFFLINE` (`is_offline_mode()`).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    offline = snapshot_download(REPO_ID, cache_dir=cache, endpoint=hub_stub.url)

    assert offline == online and Path(offline).name == oid
    assert read_tree(offline) == {**folder, ".gitattributes": INITIAL_GITATTRIBUTES}
    path = hf_hub_download(REPO_ID, "weights/model.safetensors", cache_dir=cache, endpoint=hub_stub.url)
    assert Path(path).read_bytes() == folder["weights/model.safetensors"]
    assert len(hub_stub.requests) == seen


def test_the_fixture_points_the_defaults_at_the_stub(hub_stub, tmp_path):
    # No endpoint, token nor cache_dir: the module-level functions, the environment and the cache are the stub's.
    huggingface_hub.create_repo(REPO_ID, private=True)
    huggingface_hub.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id=REPO_ID)

    path = hf_hub_download(REPO_ID, "a/b.txt")

    assert Path(path).read_bytes() == b"hello"
    assert Path(path).is_relative_to(constants.HF_HUB_CACHE)
    assert hub_stub.repos[REPO_ID].private
    assert [request.commit_files for request in hub_stub.commit_requests] == [["a/b.txt"]]
    assert [(request.method, request.path.split("/resolve/")[0]) for request in hub_stub.requests[-2:]] == [
        ("HEAD", f"/{REPO_ID}"),
        ("GET", f"/{REPO_ID}"),
    ]
    assert {request.authorization for request in hub_stub.requests} == {f"Bearer {STUB_TOKEN}"}


def test_the_stub_refuses_a_wrong_token_and_an_existing_repo(hub_stub):
    with pytest.raises(HfHubHTTPError) as raised:
        HfApi(endpoint=hub_stub.url, token="hf_wrong").create_repo(REPO_ID)
    assert raised.value.response.status_code == 401
    api = HfApi(endpoint=hub_stub.url, token=STUB_TOKEN)
    api.create_repo(REPO_ID)
    with pytest.raises(HfHubHTTPError) as raised:
        api.create_repo(REPO_ID)
    assert raised.value.response.status_code == 409
    api.create_repo(REPO_ID, exist_ok=True)
    # A private repo reads as missing without the token, as on the Hub.
    api.create_repo("vugen-test/private", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_stub.url, token=False).repo_info("vugen-test/private")
