"""A local stand-in for the Hugging Face hub, enough for huggingface_hub 0.17.3 to download a model.

It answers what the client asks (read from huggingface_hub's file_download.py and hf_api.py):

- GET /api/models/{repo}[/revision/{rev}][?blobs=true]: model info with `sha`, `gated` and `siblings`
  (rfilename, size, blobId, and lfs {sha256, size} for LFS files), as `model_info(files_metadata=True)`
  reads it.
- HEAD/GET /{repo}/resolve/{rev}/{filename}: a small (git) file answers 200 with ETag (git blob id),
  X-Repo-Commit, Content-Length; an LFS file answers 302 to a "CDN" URL with X-Linked-Etag (sha256),
  X-Linked-Size and X-Repo-Commit, as the real hub does. Missing file: 404 with X-Error-Code EntryNotFound.
- GET /cdn/{sha256}: the LFS bytes, with Range (206 + Content-Range) for resumed downloads, optionally
  throttled so a download lasts long enough to watch.
- Gated repos: the model info is public (gated: "manual"), the files are not: no token gives 401 and a
  refused token 403, both with X-Error-Code GatedRepo. Unknown repos: 401 RepoNotFound.

Loopback only. Every request is recorded (method, path, status, whether a token was sent, monotonic time),
and the first/last byte times of LFS bodies, so a test can tell what was downloaded and when.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.model")
PIECE = 64 * 1024


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    gated: bool = False
    tokens: tuple[str, ...] = ("test",)
    commit: str = ""

    def __post_init__(self):
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        self.commit = self.commit or digest.hexdigest()
        self.lfs = {
            name: hashlib.sha256(data).hexdigest()
            for name, data in self.files.items()
            if any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)
        }
        self.blob_ids = {
            name: hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() for name, data in self.files.items()
        }

    @property
    def total_size(self) -> int:
        return sum(len(data) for data in self.files.values())

    def model_info(self) -> dict:
        siblings = []
        for name, data in sorted(self.files.items()):
            sibling = {"rfilename": name, "size": len(data), "blobId": self.blob_ids[name]}
            if name in self.lfs:
                sibling["lfs"] = {"sha256": self.lfs[name], "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        return {
            "_id": hashlib.md5(self.repo_id.encode()).hexdigest()[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": self.commit,
            "lastModified": "2023-11-26T00:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": "manual" if self.gated else False,
            "pipeline_tag": "text-generation",
            "library_name": "transformers",
            "tags": ["transformers", "safetensors", "llama", "text-generation"],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        }


@dataclass
class Request:
    method: str
    path: str
    status: int
    authorized: bool
    at: float


@dataclass
class FakeHub:
    bytes_per_second: float | None = None  # throttle of LFS bodies; None = as fast as loopback goes
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    body_started: float | None = None  # monotonic time of the first LFS body byte sent
    body_finished: float | None = None  # ... and of the last one

    def add_repo(self, repo: HubRepo) -> HubRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def downloads(self) -> list[Request]:
        """GETs that sent file bytes (resolve of small files, CDN bodies)."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.status in (200, 206) and ("/resolve/" in r.path or r.path.startswith("/cdn/"))
        ]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "fake-hub/1"

    def log_message(self, *args):  # recorded in hub.requests instead
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # -- routing ----------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            if path.startswith("/api/models/"):
                self._model_info(path[len("/api/models/") :], head)
            elif path.startswith("/cdn/"):
                self._cdn(path[len("/cdn/") :], head)
            elif "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                revision, _, filename = rest.partition("/")
                self._resolve(repo_id, revision, filename, head)
            else:
                self._error(404, "NotFound", "no such endpoint")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _record(self, status: int) -> None:
        self.hub.requests.append(Request(self.command, self.path, status, self._token() is not None, time.monotonic()))

    def _token(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[len("Bearer ") :] if header.startswith("Bearer ") else None

    def _send(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self._start_response(status, headers, len(body))
        if not head:
            self.wfile.write(body)

    def _start_response(self, status: int, headers: dict[str, str], length: int) -> None:
        self._record(status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _error(self, status: int, code: str, message: str, extra: dict | None = None, head: bool = False) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        headers.update(extra or {})
        self._send(status, headers, json.dumps({"error": message}).encode(), head)

    def _repo(self, repo_id: str, head: bool) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found", head=head)
        return repo

    def _revision_ok(self, repo: HubRepo, revision: str, head: bool) -> bool:
        if revision in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        return False

    def _may_read_files(self, repo: HubRepo, head: bool) -> bool:
        if not repo.gated:
            return True
        token = self._token()
        if token is None:
            self._error(
                401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must be authenticated to access it.",
                head=head,
            )
            return False
        if token not in repo.tokens:
            self._error(
                403,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.",
                head=head,
            )
            return False
        return True

    # -- endpoints --------------------------------------------------------------------------------
    def _model_info(self, rest: str, head: bool) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo = self._repo(repo_id, head)
        if repo is None or (revision and not self._revision_ok(repo, revision, head)):
            return
        body = json.dumps(repo.model_info()).encode()
        self._send(200, {"Content-Type": "application/json"}, body, head)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None or not self._revision_ok(repo, revision, head) or not self._may_read_files(repo, head):
            return
        commit = {"X-Repo-Commit": repo.commit}
        if filename not in repo.files:
            self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}", commit, head)
            return
        data = repo.files[filename]
        if filename in repo.lfs:
            sha = repo.lfs[filename]
            host, port = self.server.server_address[:2]
            location = f"http://{host}:{port}/cdn/{sha}?filename={quote(filename)}"
            self._send(
                302,
                {
                    **commit,
                    "Location": location,
                    "ETag": f'"{sha}"',
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "Content-Type": "text/plain",
                },
                f"Found. Redirecting to {location}".encode(),
                head,
            )
            return
        self._send(
            200,
            {
                **commit,
                "ETag": f'"{repo.blob_ids[filename]}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            },
            data,
            head,
        )

    def _cdn(self, sha: str, head: bool) -> None:
        data = next(
            (
                repo.files[name]
                for repo in self.hub.repos.values()
                for name, digest in repo.lfs.items()
                if digest == sha
            ),
            None,
        )
        if data is None:
            self._error(404, "NotFound", "no such object", head=head)
            return
        start, status, headers = (
            0,
            200,
            {"ETag": f'"{sha}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"},
        )
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[len("bytes=") : -1])
            if start >= len(data):
                self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = memoryview(data)[start:]
        self._start_response(status, headers, len(body))
        if not head:
            self._stream(body)

    def _stream(self, body: memoryview) -> None:
        hub, began = self.hub, time.monotonic()
        if hub.body_started is None:
            hub.body_started = began
        for offset in range(0, len(body), PIECE):
            if hub._closing.is_set():
                self.close_connection = True
                return
            self.wfile.write(body[offset : offset + PIECE])
            if hub.bytes_per_second:
                lag = began + (offset + PIECE) / hub.bytes_per_second - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
        self.wfile.flush()
        hub.body_finished = time.monotonic()


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    """The files of a local checkpoint directory, as a repo's contents."""
    return {
        p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file() and not p.name.startswith(".")
    }


def safetensors_header(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])


def padding_safetensors(name: str, size: int) -> bytes:
    """A valid safetensors file holding one uint8 tensor of `size` bytes (a shard nothing loads)."""
    header = json.dumps({name: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bytes(size)


def sharded_with_padding(files: dict[str, bytes], padding: int) -> dict[str, bytes]:
    """The checkpoint as a sharded repo (like meta-llama's): its weights in shard 1 and an unused padding
    tensor in shard 2, so the download is big enough to watch while the served model stays the tiny one."""
    files = dict(files)
    weights = files.pop("model.safetensors")
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    weight_map = {key: first for key in safetensors_header(weights) if key != "__metadata__"}
    weight_map["farworker_test_padding"] = second
    files[first] = weights
    files[second] = padding_safetensors("farworker_test_padding", padding)
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": len(weights) + padding}, "weight_map": weight_map}, indent=1
    ).encode()
    return files
