"""Test fixture (not part of vitconvert): a Hugging Face Hub-compatible server on loopback.

The stock ``huggingface_hub`` client talks to one ``HF_ENDPOINT``; this module puts one front server on
that port and splits the traffic:

* reads (file downloads, repo info by revision, refs, trees, paths-info) are proxied to **olah** running
  in offline mode, which serves plain git repositories from ``<root>/mirrors/models/<owner>/<name>``;
* the few write endpoints the client uses for ``create_repo``, ``create_branch``, ``create_commit`` /
  ``upload_folder`` and ``delete_repo`` are implemented here and write real git commits into those same
  repositories (files travel inside the commit as base64 "regular" files: no LFS, no xet).

Writes require ``Authorization: Bearer hf_test_token`` (user ``tester``, member of ``testorg``); any
other token is refused with HTTP 401 like the Hub does, a namespace the user does not own with 403.
Only stdlib + git + olah are used so that importing this module never imports huggingface_hub.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_test_token"
USER = "tester"
ORGS = ("testorg",)
EMPTY_BLOB = "0" * 40
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "accept-encoding", "content-length"}
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HubError(Exception):
    """An HTTP error answer, with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class GitStore:
    """Bare git repositories under ``<root>/models/<owner>/<name>``: the storage olah serves.

    Commits are written with git plumbing and a private index, so no working tree is involved and every
    branch (``refs/heads/*``) or pull-request ref (``refs/pr/N``) can be written directly.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.RLock()
        self._env = {
            **os.environ,
            "GIT_AUTHOR_NAME": USER, "GIT_AUTHOR_EMAIL": f"{USER}@example.invalid",
            "GIT_COMMITTER_NAME": USER, "GIT_COMMITTER_EMAIL": f"{USER}@example.invalid",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
        }

    def path(self, repo_id: str) -> Path:
        owner, name = repo_id.split("/")
        return self.root / "models" / owner / name

    def exists(self, repo_id: str) -> bool:
        return (self.path(repo_id) / "HEAD").is_file()

    def _git(self, repo_id: str, *args: str, data: bytes | None = None, env: dict[str, str] | None = None,
             check: bool = True) -> str:
        out = subprocess.run(["git", *args], cwd=self.path(repo_id), input=data, capture_output=True,
                             env={**self._env, **(env or {})}, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {out.stderr.decode(errors='replace')}")
        return out.stdout.decode().strip() if out.returncode == 0 else ""

    def create(self, repo_id: str) -> str:
        """Create a repository with the Hub's initial commit (a .gitattributes file) on ``main``."""
        with self._lock:
            path = self.path(repo_id)
            path.mkdir(parents=True)
            subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True, env=self._env,
                           capture_output=True)
            return self.commit(repo_id, "main", {".gitattributes": _GITATTRIBUTES}, message="initial commit")

    def delete(self, repo_id: str) -> None:
        with self._lock:
            shutil.rmtree(self.path(repo_id))

    def resolve(self, repo_id: str, revision: str) -> str | None:
        """Commit id of a branch, tag, ``refs/...`` name or commit id; None when it does not exist."""
        if not revision or revision.startswith("-"):
            return None
        return self._git(repo_id, "rev-parse", "--verify", "-q", f"{revision}^{{commit}}", check=False) or None

    def _ref(self, revision: str) -> str:
        return revision if revision.startswith("refs/") else f"refs/heads/{revision}"

    def blob_ids(self, repo_id: str, commit: str) -> dict[str, str]:
        """path -> git blob id of every file at a commit."""
        out = self._git(repo_id, "ls-tree", "-r", "-z", commit)
        ids = {}
        for entry in filter(None, out.split("\0")):
            meta, path = entry.split("\t", 1)
            ids[path] = meta.split()[2]
        return ids

    def commit(self, repo_id: str, revision: str, files: dict[str, bytes], deletions: tuple[str, ...] = (),
               message: str = "update", parent: str | None = None, ref: str | None = None) -> str:
        """Write one commit on ``revision`` (created when missing) and move the ref (``ref`` overrides)."""
        with self._lock:
            head = self.resolve(repo_id, revision)
            parent = parent or head
            index = self.path(repo_id) / f"index-{threading.get_ident()}"
            env = {"GIT_INDEX_FILE": str(index)}
            try:
                self._git(repo_id, "read-tree", *([parent] if parent else ["--empty"]), env=env)
                lines = []
                for name, data in files.items():
                    blob = self._git(repo_id, "hash-object", "-w", "--stdin", data=data)
                    lines.append(f"100644 {blob}\t{name}")
                lines += [f"0 {EMPTY_BLOB}\t{name}" for name in deletions]
                if lines:
                    self._git(repo_id, "update-index", "--index-info", data=("\n".join(lines) + "\n").encode(),
                              env=env)
                tree = self._git(repo_id, "write-tree", env=env)
            finally:
                index.unlink(missing_ok=True)
            commit = self._git(repo_id, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
            self._git(repo_id, "update-ref", ref or self._ref(revision), commit)
            return commit

    def create_ref(self, repo_id: str, ref: str, start: str) -> None:
        with self._lock:
            self._git(repo_id, "update-ref", ref, start)

    def next_pr(self, repo_id: str) -> int:
        refs = self._git(repo_id, "for-each-ref", "--format=%(refname)", "refs/pr/")
        return 1 + max((int(r.rsplit("/", 1)[1]) for r in refs.split() if r), default=0)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FrontServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet; requests are recorded instead
        pass

    # --- plumbing ---------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_length: str | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", content_length if content_length is not None else str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(self, err: HubError) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        body = self._body()
        self.server.hub.requests.append((self.command, url.path))
        route = self._route(self.command, parts)
        if route is None:
            self._proxy(body)
            return
        try:
            route(parts, parse_qs(url.query), body)
        except HubError as e:
            self._error(e)
        except Exception as e:  # a bug in this fixture: answer, so the client does not hang or retry
            self._error(HubError(500, f"test server error: {type(e).__name__}: {e}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def _proxy(self, body: bytes) -> None:
        """Forward a read to olah and relay its answer, patching what olah does differently from the Hub.

        olah resolves neither revisions with a slash (``refs/pr/1``) nor private repositories, and answers
        a missing file or revision with its catch-all 401 RepoNotFound; the Hub answers 404 EntryNotFound /
        RevisionNotFound, which the client turns into different exceptions.
        """
        hub = self.server.hub
        raw = urlsplit(self.path)
        segments = raw.path.split("/")
        if len(segments) == 5 and segments[1:3] == ["api", "models"]:
            segments += ["revision", "main"]  # olah answers repo info only for an explicit revision
        repo_id, rev_index = _repo_and_revision(segments)
        if repo_id is not None and hub.private.get(repo_id) and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._error(HubError(401, "Repository not found", "RepoNotFound"))
            return
        if repo_id is not None and rev_index is not None and hub.store.exists(repo_id):
            revision = unquote(segments[rev_index])
            commit = hub.store.resolve(repo_id, revision)
            if commit is None:
                self._error(HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound"))
                return
            if "/" in revision:
                segments[rev_index] = commit
        path = "/".join(segments) + (f"?{raw.query}" if raw.query else "")
        conn = http.client.HTTPConnection("127.0.0.1", hub.olah_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Host"] = f"127.0.0.1:{hub.port}"
            conn.request(self.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            self._send(502, f"olah unreachable: {e}".encode())
            return
        finally:
            conn.close()
        if resp.status == 401 and rev_index == 4 and repo_id is not None and hub.store.exists(repo_id):
            self._error(HubError(404, "Entry not found", "EntryNotFound"))
            return
        out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
        # A HEAD answer announces the size of the body it does not send.
        length = (resp.getheader("Content-Length") or "0") if self.command == "HEAD" else None
        self._send(resp.status, data, out, content_length=length)

    # --- write endpoints --------------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str]) -> Any:
        if parts[:1] != ["api"]:
            return None
        if method == "POST" and parts[1:] == ["repos", "create"]:
            return self._create_repo
        if method == "DELETE" and parts[1:] == ["repos", "delete"]:
            return self._delete_repo
        if method == "POST" and parts[1:] == ["validate-yaml"]:
            return self._validate_yaml
        if method == "GET" and parts[1:] == ["whoami-v2"]:
            return self._whoami
        if method == "POST" and len(parts) >= 6 and parts[1] == "models" and parts[4] in ("preupload", "commit",
                                                                                         "branch"):
            return {"preupload": self._preupload, "commit": self._commit, "branch": self._branch}[parts[4]]
        return None

    def _auth(self) -> str:
        header = self.headers.get("Authorization", "")
        if not header:
            raise HubError(401, "You must be authenticated to access this resource")
        if header != f"Bearer {TOKEN}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return USER

    def _writable_repo(self, parts: list[str]) -> tuple[str, str]:
        """(repo_id, revision) for /api/models/{owner}/{name}/{action}/{revision...}."""
        user = self._auth()
        repo_id = f"{parts[2]}/{parts[3]}"
        if not self.server.hub.store.exists(repo_id):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if parts[2] not in (user, *ORGS):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo_id, "/".join(parts[5:]) or "main"

    def _create_repo(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        user = self._auth()
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repositories")
        owner = payload.get("organization") or user
        repo_id = f"{owner}/{payload['name']}"
        url = f"{self.server.hub.endpoint}/{repo_id}"
        if owner not in (user, *ORGS):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {owner!r}")
        if self.server.hub.store.exists(repo_id):
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        self.server.hub.store.create(repo_id)
        self.server.hub.private[repo_id] = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        user = self._auth()
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if not self.server.hub.store.exists(repo_id):
            raise HubError(404, "Repository not found", "RepoNotFound")
        self.server.hub.store.delete(repo_id)
        self._send(200)

    def _whoami(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        user = self._auth()
        self._json(200, {"type": "user", "name": user, "orgs": [{"name": o} for o in ORGS],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def _validate_yaml(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        content = json.loads(body or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except (yaml.YAMLError, IndexError) as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        repo_id, revision = self._writable_repo(parts)
        store = self.server.hub.store
        head = store.resolve(repo_id, revision)
        existing = store.blob_ids(repo_id, head) if head else {}
        files = json.loads(body)["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": existing.get(f["path"])} for f in files]})

    def _branch(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        repo_id, branch = self._writable_repo(parts)
        store = self.server.hub.store
        if store.resolve(repo_id, f"refs/heads/{branch}"):
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        commit = store.resolve(repo_id, start)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
        store.create_ref(repo_id, f"refs/heads/{branch}", commit)
        self._send(200)

    def _commit(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        repo_id, revision = self._writable_repo(parts)
        store, hub = self.server.hub.store, self.server.hub
        if store.resolve(repo_id, revision) is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deletions: list[str] = []
        for line in filter(None, body.split(b"\n")):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "file content must be base64")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deletions.append(value["path"])
            else:  # lfsFile / deletedFolder: the client only sends these when preupload says so
                raise HubError(400, f"unsupported commit operation {key!r} in this test server")
        head = store.resolve(repo_id, revision)
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        message = header.get("summary") or "update"
        if header.get("description"):
            message += "\n\n" + header["description"]
        pr_url = None
        if query.get("create_pr") == ["1"]:
            num = store.next_pr(repo_id)
            commit = store.commit(repo_id, revision, files, tuple(deletions), message, ref=f"refs/pr/{num}")
            pr_url = f"{hub.endpoint}/{repo_id}/discussions/{num}"
        else:
            commit = store.commit(repo_id, revision, files, tuple(deletions), message)
        hub.commits.append((repo_id, revision, sorted(files)))
        self._json(200, {"success": True, "commitOid": commit, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit}",
                         "pullRequestUrl": pr_url})


def _repo_and_revision(segments: list[str]) -> tuple[str | None, int | None]:
    """Repo id and the index of the revision segment in a read URL's raw path segments."""
    parts = segments[1:]
    if parts[:2] == ["api", "models"] and len(parts) >= 4:
        # /api/models/{owner}/{name}[/revision|tree|paths-info|refs/{rev}...]
        has_rev = len(parts) >= 6 and parts[4] in ("revision", "tree", "paths-info")
        return f"{parts[2]}/{parts[3]}", 6 if has_rev else None
    if len(parts) >= 4 and parts[0] != "api" and parts[2] == "resolve":
        return f"{parts[0]}/{parts[1]}", 4  # /{owner}/{name}/resolve/{rev}/{file}
    return None, None


class _FrontServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: LoopbackHub) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", hub.port), _Handler)


def _olah_command() -> list[str]:
    exe = shutil.which("olah-cli", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe:
        return [exe]
    try:
        import olah  # noqa: F401
    except ImportError:
        raise RuntimeError("olah is not installed; the Hub tests need it: pip install -e '.[dev]' (or pip install "
                           "olah)") from None
    return [sys.executable, "-m", "olah.server"]


class LoopbackHub:
    """The loopback Hub: front server on ``port`` (the tests' HF_ENDPOINT) + olah behind it.

    Args:
        root: Scratch folder (git mirrors, olah cache and logs).
        port: Port of the front server; ``HF_ENDPOINT`` must be ``http://127.0.0.1:<port>``.

    Example:
        >>> with LoopbackHub(tmp_path, free_port()) as hub:  # doctest: +SKIP
        ...     hub.store.create("tester/demo")
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root = Path(root)
        self.port = port
        self.olah_port = 0
        self.endpoint = f"http://127.0.0.1:{port}"
        self.store = GitStore(self.root / "mirrors")
        self.private: dict[str, bool] = {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[tuple[str, str, list[str]]] = []
        self._olah: subprocess.Popen[bytes] | None = None
        self._front: _FrontServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> LoopbackHub:
        """Start olah and the front server; wait until olah answers (or fail with its log)."""
        (self.root / "mirrors" / "models").mkdir(parents=True, exist_ok=True)
        self.olah_port = free_port()
        cfg = self.root / "olah.toml"
        cfg.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.olah_port}\n'
            # URLs olah writes into answers must point at the front server, not at olah itself.
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f"repos-path = {json.dumps(str(self.root / 'olah-cache'))}\n"
            f"mirrors-path = [{json.dumps(str(self.root / 'mirrors'))}]\n"
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n"
        )
        log = open(self.root / "olah.out", "wb")  # noqa: SIM115 - lives as long as the process
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # olah is a client of nothing
        self._olah = subprocess.Popen([*_olah_command(), "--config", str(cfg), "--log-path", str(self.root / "logs")],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env)
        log.close()
        self._front = _FrontServer(self)
        self._thread = threading.Thread(target=self._front.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            if self._olah.poll() is not None:
                self.stop()
                raise RuntimeError(f"olah exited with code {self._olah.returncode}:\n{self.olah_log()}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", self.olah_port, timeout=2)
                conn.request("GET", "/api/models/none/none/revision/main")
                conn.getresponse().read()
                conn.close()
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"olah did not answer within {timeout:.0f} s:\n{self.olah_log()}")
            time.sleep(0.1)

    def olah_log(self) -> str:
        path = self.root / "olah.out"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._olah is not None and self._olah.poll() is None:
            self._olah.terminate()
            try:
                self._olah.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._olah.kill()
                self._olah.wait()
        self._olah = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- direct access for tests (bypasses HTTP, e.g. to seed repositories a client would refuse) ------

    def seed(self, repo_id: str, files: dict[str, bytes], revision: str = "main", message: str = "seed") -> str:
        """Create ``repo_id`` if needed and commit ``files`` to it directly; returns the commit id."""
        if not self.store.exists(repo_id):
            self.store.create(repo_id)
        return self.store.commit(repo_id, revision, files, message=message)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, str]:
        """path -> blob id at a revision (what the Hub holds, read from git directly)."""
        commit = self.store.resolve(repo_id, revision)
        return self.store.blob_ids(repo_id, commit) if commit else {}

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """A file's content at a revision, read from git directly."""
        out = subprocess.run(["git", "cat-file", "blob", f"{revision}:{path}"], cwd=self.store.path(repo_id),
                             capture_output=True, check=True)
        return out.stdout
