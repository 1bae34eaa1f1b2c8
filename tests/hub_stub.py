"""A local stub of the Hugging Face Hub's HTTP API, for testing the real `huggingface_hub` client offline.

`HubStub` serves, on ``127.0.0.1`` and a free port, the endpoints that huggingface_hub 2.4.0 calls to create a repo,
commit files to it and download them back; the client itself is not mocked. Use it as a context manager, or through
the `hub_stub` fixture, which also points huggingface_hub's defaults (endpoint, cache, token) at it. A test module gets
the fixture with ``pytest_plugins`` (importing it would read to ruff as unused, then redefined: F401 and F811)::

    pytest_plugins = ["tests.hub_stub"]

    def test_upload(hub_stub):
        HfApi().create_repo("org/name")
        ...
        assert hub_stub.repos["org/name"].files()["config.json"] == b"{}"

Endpoints (``{type}s`` is ``models``, ``datasets``, ``spaces`` or ``kernels``; ``{repo}`` is ``ns/name`` or ``name``):

- ``POST /api/repos/create``: a new repo holds one "initial commit" with a ``.gitattributes``, as on the Hub;
  409 when it exists (what `create_repo(exist_ok=True)` expects).
- ``POST /api/{type}s/{repo}/preupload/{rev}``: answers ``"uploadMode": "regular"`` for every file, so contents
  travel base64-encoded inside the commit. The real Hub answers "lfs" for LFS-tracked or large files; with `hf_xet`
  installed the 2.4.0 client then uploads through Xet (`upload_folder` sends every non-regular file to Xet, and
  `create_commit` does too unless a file is a buffered reader), a binary protocol this stub does not speak. So no
  LFS or Xet transfer endpoint is implemented. The answer carries the remote file's git oid, so the client drops
  unchanged files from a commit as it does against the Hub. `.gitignore` rules are not applied.
- ``POST /api/{type}s/{repo}/commit/{branch}``: the NDJSON commit (``header``, ``file``, ``deletedFile``,
  ``deletedFolder``, and ``lfsFile`` for contents this stub already holds); a new random 40-hex commit oid, the
  branch moves; ``parentCommit`` other than the branch head answers 412. ``create_pr`` is not supported (400).
- ``GET /api/{type}s/{repo}`` and ``.../revision/{rev}``: repo info with ``sha`` and ``siblings`` (sizes and blob
  ids with ``?blobs=true``).
- ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``: the tree listing, ``?recursive=true`` or not, in one page.
  `snapshot_download` lists files with it (not with ``siblings``) and caches it on disk for offline use.
- ``GET``/``HEAD /[{type}s/]{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (the quoted
  git blob oid, as the Hub sends for non-LFS files; the client names the cache blob after it), ``Content-Length``;
  ``Range`` requests answer 206.
- ``POST /api/validate-yaml`` (the client sends a ``README.md`` there before committing it): always valid.
- ``GET /api/whoami-v2``: the stub's user; ``GET /api/agent-harnesses``: an empty registry (huggingface_hub fetches
  it once per process to fill its user agent).

Errors follow the Hub: a missing repo answers 404 with ``X-Error-Code: RepoNotFound`` (the client raises
`RepositoryNotFoundError`), a missing revision ``RevisionNotFound`` (`RevisionNotFoundError`), a missing file
``EntryNotFound`` (`RemoteEntryNotFoundError`). A write without a token, or any request with a token other than the
stub's, answers 401; a private repo reads as missing without the token. Any other endpoint answers 501, naming it.

Every request is recorded in `HubStub.requests`: method, path, query, headers, the Authorization header, the answer's
status, and for a commit its message and the paths it adds and deletes.

PYTEST_DONT_REWRITE: this module asserts nothing, and a test module imports its helpers before its ``pytest_plugins``
registers it as a plugin (pytest would warn that it cannot rewrite a module already imported).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

STUB_TOKEN = "stub-token"
STUB_USER = "stub-user"
DEFAULT_BRANCH = "main"

# The head of the `.gitattributes` the Hub puts in a new repo's initial commit (the real one lists ~35 patterns).
INITIAL_GITATTRIBUTES = b"""\
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

# URL path prefix of each repo type, as in `huggingface_hub.constants.REPO_TYPES_URL_PREFIXES` (models have none).
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_API_TYPES = {f"{repo_type}s": repo_type for repo_type in _URL_PREFIXES}

# Words that follow the repo id in `/api/{type}s/{repo}/...` paths: they tell a one-part repo id ("gpt2") apart from a
# two-part one ("org/name").
_API_ACTIONS = {"commit", "preupload", "revision", "tree", "paths-info", "refs", "commits", "resolve"}


def git_blob_oid(content: bytes) -> str:
    """Returns the git blob oid (sha1 of ``blob <size>\\0<content>``): the Hub's ``oid`` and ``ETag`` of a file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class StubCommit:
    """One commit of a stub repo.

    Attributes:
        oid: The commit's 40-hex id (random, as a real one is unpredictable).
        message: The commit summary (``commit_message``).
        description: The commit description.
        parent: The oid of the previous commit on the branch, None for the initial commit.
        files: Every file of the repo at this commit, path -> content.
        added: Paths this commit added or changed.
        deleted: Paths this commit deleted.
        created_at: ISO 8601 UTC time of the commit.
    """

    oid: str
    message: str
    description: str
    parent: str | None
    files: dict[str, bytes]
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=_now)


@dataclass
class StubRepo:
    """A repo of the stub: its commits and branches.

    Attributes:
        repo_id: ``namespace/name`` (or ``name``).
        repo_type: ``model``, ``dataset``, ``space`` or ``kernel``.
        private: Whether reads need the stub's token.
        commits: Commit oid -> commit, oldest first.
        branches: Branch name -> the oid of its head commit.
    """

    repo_id: str
    repo_type: str = "model"
    private: bool = False
    commits: dict[str, StubCommit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str | None = None) -> StubCommit | None:
        """Returns the commit a branch name or commit oid names (None: no such revision)."""
        revision = revision or DEFAULT_BRANCH
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    def files(self, revision: str | None = None) -> dict[str, bytes]:
        """Returns the files at a revision (default: ``main``), path -> content.

        Raises:
            KeyError: No such branch or commit.
        """
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"{self.repo_id}: no revision {revision!r}")
        return dict(commit.files)

    @property
    def history(self) -> list[StubCommit]:
        """The commits of ``main``, oldest first."""
        chain: list[StubCommit] = []
        commit = self.resolve(DEFAULT_BRANCH)
        while commit is not None:
            chain.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return chain[::-1]


@dataclass
class RecordedRequest:
    """One request the stub received.

    Attributes:
        method: ``GET``, ``HEAD``, ``POST``...
        path: The URL path, percent-decoded, without the query.
        query: The query parameters.
        headers: The request headers (names as sent).
        authorization: The Authorization header, None if absent.
        status: The status code of the answer.
        commit_message: For a commit, its summary; None otherwise.
        commit_files: For a commit, the paths it adds or changes.
        commit_deletions: For a commit, the paths (files or folders) it deletes.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    authorization: str | None
    status: int = 0
    commit_message: str | None = None
    commit_files: list[str] = field(default_factory=list)
    commit_deletions: list[str] = field(default_factory=list)


class _HubError(Exception):
    """An error answer: status, message, Hub error code (``X-Error-Code``), headers and more JSON fields."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the JSON answer


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that can cut its open connections, so that a stopped stub is unreachable at once."""

    # huggingface_hub keeps connections alive in a pool shared by the process: never wait on them.
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Shuts the open connections: otherwise a pooled keep-alive connection would still reach a stopped stub."""
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client


class HubStub:
    """A Hugging Face Hub stub serving on ``127.0.0.1`` in a daemon thread.

    Args:
        token: The one token it accepts (``Authorization: Bearer <token>``).

    Attributes:
        url: The endpoint, ``http://127.0.0.1:<port>``, once started.
        repos: The repos, keyed by URL path: ``org/name`` for a model, ``datasets/org/name`` for a dataset...
        requests: Every request received, in order.
        token: The accepted token.
    """

    def __init__(self, token: str = STUB_TOKEN) -> None:
        self.token = token
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.url = ""
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HubStub:
        """Starts serving on a free port; returns self."""
        stub = self

        class Handler(_Handler):
            hub = stub

        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        # A short poll: `stop` waits up to one poll interval for the serving loop to notice.
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="hub-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving, closes the port and its open connections (the recorded repos and requests stay)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.cut_connections()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def commit_requests(self) -> list[RecordedRequest]:
        """The recorded commit requests (successful or not), in order."""
        return [request for request in self.requests if request.commit_message is not None]

    def add_repo(
        self, repo_id: str, files: dict[str, bytes] | None = None, repo_type: str = "model", private: bool = False
    ) -> StubRepo:
        """Creates a repo directly (no request), with the Hub's initial commit and optionally a second one of files.

        Args:
            repo_id: ``namespace/name``.
            files: Files of a commit "add files" after the initial one, path -> content.
            repo_type: ``model``, ``dataset``, ``space`` or ``kernel``.
            private: Whether reads need the token.

        Returns:
            The new repo.
        """
        with self._lock:
            repo = self._create_repo(repo_id, repo_type, private)
            if files:
                self._commit(repo, DEFAULT_BRANCH, "add files", "", dict(files), [])
        return repo

    # ------------------------------------------------------------------ state changes (under self._lock)

    def _create_repo(self, repo_id: str, repo_type: str, private: bool) -> StubRepo:
        repo = StubRepo(repo_id=repo_id, repo_type=repo_type, private=private)
        self.repos[_URL_PREFIXES[repo_type] + repo_id] = repo
        initial = StubCommit(
            oid=secrets.token_hex(20),
            message="initial commit",
            description="",
            parent=None,
            files={".gitattributes": INITIAL_GITATTRIBUTES},
            added=[".gitattributes"],
        )
        repo.commits[initial.oid] = initial
        repo.branches[DEFAULT_BRANCH] = initial.oid
        return repo

    def _commit(
        self,
        repo: StubRepo,
        branch: str,
        message: str,
        description: str,
        added: dict[str, bytes],
        deleted: list[str],
    ) -> StubCommit:
        head = repo.commits[repo.branches[branch]]
        files = dict(head.files)
        for path in deleted:
            folder = path.rstrip("/") + "/"
            files = {name: data for name, data in files.items() if name != path and not name.startswith(folder)}
        files.update(added)
        commit = StubCommit(
            oid=secrets.token_hex(20),
            message=message,
            description=description,
            parent=head.oid,
            files=files,
            added=list(added),
            deleted=list(deleted),
        )
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _find_content(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for commit in repo.commits.values():
                for data in commit.files.values():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return data
        return None


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the stub (`hub` is set on a subclass per stub)."""

    hub: HubStub
    # HTTP/1.1: the client keeps connections alive, as with the real Hub (every answer sets Content-Length).
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silences the per-request log on stderr (the requests are in `HubStub.requests`)."""

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ------------------------------------------------------------------ plumbing

    def _handle(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body()
        record = RecordedRequest(
            method=self.command,
            path=unquote(split.path),
            query=parse_qs(split.query),
            headers=dict(self.headers.items()),
            authorization=self.headers.get("Authorization"),
        )
        with self.hub._lock:
            self.hub.requests.append(record)
        try:
            self._check_token()
            status, headers, payload = self._route(split.path, record, body)
        except _HubError as error:
            status = error.status
            headers = dict(error.headers)
            if error.error_code is not None:
                headers["X-Error-Code"] = error.error_code
            headers["X-Error-Message"] = error.message
            payload = {"error": error.message, **error.extra}
        except Exception as error:  # a stub bug: answer it rather than drop the connection
            status, headers, payload = 500, {}, {"error": f"hub stub: {type(error).__name__}: {error}"}
        record.status = status
        self._send(status, headers, payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()  # the blank line after the last chunk (no trailers are sent)
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, headers: dict[str, str], payload: Any) -> None:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        headers.setdefault("Content-Length", str(len(data)))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _check_token(self) -> None:
        authorization = self.headers.get("Authorization")
        if authorization is not None and authorization != f"Bearer {self.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    # ------------------------------------------------------------------ routing

    def _route(self, raw_path: str, record: RecordedRequest, body: bytes) -> tuple[int, dict[str, str], Any]:
        # Split before decoding: a revision such as "refs/pr/1" comes as one segment, "refs%2Fpr%2F1".
        parts = [unquote(part) for part in raw_path.strip("/").split("/")]
        method = self.command
        if parts[:1] == ["api"]:
            if parts[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body or b"{}"))
            if parts[1:] == ["validate-yaml"] and method == "POST":
                return 200, {}, {"errors": [], "warnings": []}
            if parts[1:] == ["whoami-v2"] and method == "GET":
                if not self._authorized():
                    raise _HubError(401, "Invalid credentials in Authorization header")
                return 200, {}, {"type": "user", "name": STUB_USER, "orgs": [], "auth": {"type": "access_token"}}
            if parts[1:] == ["agent-harnesses"] and method == "GET":
                return 200, {}, {"standardEnvVars": [], "harnesses": {}}
            if len(parts) >= 3 and parts[1] in _API_TYPES:
                return self._repo_api(_API_TYPES[parts[1]], parts[2:], record, body)
        elif "resolve" in parts and method in ("GET", "HEAD"):
            return self._resolve(parts)
        raise _HubError(501, f"hub stub: not implemented: {method} {unquote(raw_path)}")

    def _split_repo_id(self, repo_type: str, parts: list[str], actions: set[str]) -> tuple[StubRepo | None, str, int]:
        """Finds the repo a path names: returns (repo or None, repo_id, number of parts it used)."""
        candidates = [2, 1] if len(parts) >= 2 else [1]
        for size in candidates:
            repo = self.hub.repos.get(_URL_PREFIXES[repo_type] + "/".join(parts[:size]))
            if repo is not None:
                return repo, repo.repo_id, size
        size = 1 if len(parts) == 1 or parts[1] in actions else 2
        return None, "/".join(parts[:size]), size

    def _repo_or_404(self, repo: StubRepo | None, repo_id: str) -> StubRepo:
        if repo is None or (repo.private and not self._authorized()):
            # The Hub answers a missing repo and a private one alike (401 without a token, 404 with one).
            status = 404 if self._authorized() else 401
            raise _HubError(status, f"Repository Not Found for {repo_id}", "RepoNotFound")
        return repo

    def _commit_or_404(self, repo: StubRepo, revision: str) -> StubCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        if not self._authorized():
            raise _HubError(401, "You must be authenticated to create a repo")
        name, organization = payload.get("name"), payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else str(name)
        repo_type = payload.get("type") or "model"
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        key = _URL_PREFIXES[repo_type] + repo_id
        url = f"{self.hub.url}/{key}"
        with self.hub._lock:
            if key in self.hub.repos:
                # `create_repo(exist_ok=True)` reads the repo's url from this answer, as from a 200.
                raise _HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
            self.hub._create_repo(repo_id, repo_type, private)
        return 200, {}, {"url": url, "name": repo_id, "id": secrets.token_hex(12)}

    def _repo_api(
        self, repo_type: str, parts: list[str], record: RecordedRequest, body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        with self.hub._lock:
            found, repo_id, size = self._split_repo_id(repo_type, parts, _API_ACTIONS)
        action, rest = (parts[size], parts[size + 1 :]) if len(parts) > size else ("", [])
        method = self.command
        if action == "commit" and method == "POST":
            # Parse first: the commit is recorded even when it is refused.
            self._parse_commit(body, record)
        if method in ("POST", "PUT", "DELETE") and not self._authorized():
            raise _HubError(401, "Invalid username or password.")
        repo = self._repo_or_404(found, repo_id)
        revision = rest[0] if rest else DEFAULT_BRANCH
        if action == "" and method == "GET":
            return self._repo_info(repo, DEFAULT_BRANCH)
        if action == "revision" and len(rest) == 1 and method == "GET":
            return self._repo_info(repo, revision)
        if action == "tree" and rest and method == "GET":
            return self._tree(repo, revision, "/".join(rest[1:]))
        if action == "preupload" and len(rest) == 1 and method == "POST":
            return self._preupload(repo, revision, json.loads(body or b"{}"))
        if action == "commit" and len(rest) == 1 and method == "POST":
            return self._commit(repo, revision, record, body)
        raise _HubError(501, f"hub stub: not implemented: {method} {record.path}")

    def _repo_info(self, repo: StubRepo, revision: str) -> tuple[int, dict[str, str], Any]:
        commit = self._commit_or_404(repo, revision)
        with_blobs = self._query_flag("blobs")
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(data), blobId=git_blob_oid(data))
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else STUB_USER
        first = next(iter(repo.commits.values()))
        return (
            200,
            {},
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": author,
                "sha": commit.oid,
                "lastModified": commit.created_at,
                "createdAt": first.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            },
        )

    def _tree(self, repo: StubRepo, revision: str, folder: str) -> tuple[int, dict[str, str], Any]:
        commit = self._commit_or_404(repo, revision)
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        recursive = self._query_flag("recursive")
        names = sorted(name for name in commit.files if name.startswith(prefix))
        if prefix and not names:
            raise _HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for name in names:
            relative = name[len(prefix) :].split("/")
            # Folders on the way to the file: every one when recursive, else only the first level.
            for depth in range(1, len(relative) if recursive else min(len(relative), 2)):
                path = prefix + "/".join(relative[:depth])
                if path not in entries:
                    # Not git's tree oid (that needs git's tree objects): a stable id of the folder's content.
                    content = "".join(
                        f"{n}:{git_blob_oid(commit.files[n])}\n" for n in names if n.startswith(path + "/")
                    )
                    tree_id = hashlib.sha1(content.encode()).hexdigest()
                    entries[path] = {"type": "directory", "oid": tree_id, "size": 0, "path": path}
            if recursive or len(relative) == 1:
                data = commit.files[name]
                entries[name] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": name}
        return 200, {}, sorted(entries.values(), key=lambda entry: entry["path"])

    def _preupload(self, repo: StubRepo, revision: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        commit = repo.resolve(revision)
        existing = commit.files if commit is not None else {}
        files = []
        for item in payload.get("files", []):
            path = item["path"]
            oid = git_blob_oid(existing[path]) if path in existing else None
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return 200, {}, {"files": files, "commitOid": commit.oid if commit else None}

    def _parse_commit(self, body: bytes, record: RecordedRequest) -> None:
        for key, value in _ndjson_items(body):
            if key == "header":
                record.commit_message = value.get("summary", "")
            elif key in ("file", "lfsFile"):
                record.commit_files.append(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                record.commit_deletions.append(value["path"])

    def _commit(
        self, repo: StubRepo, branch: str, record: RecordedRequest, body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        if self._query_flag("create_pr"):
            raise _HubError(400, "hub stub: create_pr is not supported")
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for key, value in _ndjson_items(body):
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                encoding = value.get("encoding")
                added[value["path"]] = base64.b64decode(content) if encoding == "base64" else content.encode()
            elif key == "lfsFile":
                with self.hub._lock:
                    data = self.hub._find_content(value["oid"])
                if data is None:
                    raise _HubError(400, f"hub stub: no uploaded content for LFS file {value['path']}")
                added[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _HubError(400, f"hub stub: unknown commit operation {key!r}")
        if not header.get("summary"):
            raise _HubError(400, "Commit summary is required")
        with self.hub._lock:
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent is not None and parent != repo.branches[branch]:
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            for path in deleted:
                files = repo.commits[repo.branches[branch]].files
                folder = path.rstrip("/") + "/"
                if path not in files and not any(name.startswith(folder) for name in files):
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            commit = self.hub._commit(repo, branch, header["summary"], header.get("description", ""), added, deleted)
        prefix = _URL_PREFIXES[repo.repo_type]
        return (
            200,
            {},
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                "hookOutput": "",
            },
        )

    def _resolve(self, parts: list[str]) -> tuple[int, dict[str, str], Any]:
        at = parts.index("resolve")
        repo_type = "model"
        repo_parts = parts[:at]
        if len(repo_parts) > 1 and repo_parts[0] in _API_TYPES and repo_parts[0] != "models":
            repo_type, repo_parts = _API_TYPES[repo_parts[0]], repo_parts[1:]
        if not repo_parts or len(parts) < at + 3:
            raise _HubError(400, "hub stub: expected /{repo}/resolve/{revision}/{path}")
        repo_id = "/".join(repo_parts)
        with self.hub._lock:
            found = self.hub.repos.get(_URL_PREFIXES[repo_type] + repo_id)
            repo = self._repo_or_404(found, repo_id)
            commit = self._commit_or_404(repo, parts[at + 1])
        path = "/".join(parts[at + 2 :])
        if path not in commit.files:
            # The Hub names the commit even here: the client caches the file's absence under it.
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_oid(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes=") and "," not in byte_range:
            start_text, _, end_text = byte_range[len("bytes=") :].partition("-")
            start = int(start_text) if start_text else max(len(data) - int(end_text), 0)
            end = int(end_text) if start_text and end_text else len(data) - 1
            if start >= len(data):
                raise _HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, headers, data[start : end + 1]
        return 200, headers, data

    def _query_flag(self, name: str) -> bool:
        values = parse_qs(urlsplit(self.path).query).get(name, [])
        return bool(values) and values[-1].lower() in ("1", "true")


@pytest.fixture
def hub_stub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStub]:
    """A running `HubStub` that huggingface_hub uses by default, with a fresh cache and the stub's token.

    huggingface_hub reads most settings into `huggingface_hub.constants` at import, so each is patched there as well
    as in the environment (for subprocesses and code that reads the environment): the endpoint, and the resolve URL
    template `hf_hub_url` builds from (patching only the endpoint would leave downloads on huggingface.co); the cache
    folders; the token (and its files, so no user token is read); offline mode off; telemetry off. The module-level
    `HfApi` behind `huggingface_hub.create_repo` and friends took its endpoint at import: it is patched too. The
    agent-harness registry, which huggingface_hub fetches once per process to fill its user agent, is pinned empty,
    so the recorded requests are only the test's.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _detect_agent

    home = tmp_path_factory.mktemp("hf-home")
    with HubStub() as stub:
        settings = {
            "HF_ENDPOINT": stub.url,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_TOKEN": stub.token,
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        patched = {
            "ENDPOINT": stub.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": stub.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        }
        for name, value in patched.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(hf_api.api, "endpoint", stub.url)
        monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
        # transformers keeps one HfApi per process, made with the endpoint of its first use: a later stub (another
        # port) would get its requests sent to a stopped one, each retried with backoff for ~45 s
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)
        yield stub


def _ndjson_items(body: bytes) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """The ``(key, value)`` of each line of a commit's NDJSON payload (``header``, ``file``, ``lfsFile``, ...)."""
    for line in body.splitlines():
        if line.strip():
            item = json.loads(line)
            yield item.get("key"), item.get("value", {})


def read_tree(folder: str | os.PathLike[str]) -> dict[str, bytes]:
    """Returns every file under a folder, '/'-separated relative path -> content (symlinks followed).

    Args:
        folder: A local folder, e.g. a `snapshot_download` result.
    """
    root = Path(folder)
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".cache" not in path.relative_to(root).parts
    }
