"""A local HTTP server standing in for the Hugging Face hub: model repos, their files
served in the hub's layout (repo info, file tree, ``resolve`` with HEAD metadata and byte
ranges), slowed down so a download's progress can be watched. huggingface_hub, pointed at
it with ``HF_ENDPOINT``, runs its real download path against it."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 1 << 20


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]], bytes_per_s: float = 30e6) -> None:
        self.repos = repos  # repo id -> {file name: the file served}
        self.delay = CHUNK / bytes_per_s
        paths = {path for files in repos.values() for path in files.values()}
        self.sha256 = {path: _sha256(path) for path in paths}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub.requests.append(f"GET {self.path}")
                hub.answer(self, body=True)

            def do_HEAD(self) -> None:
                hub.requests.append(f"HEAD {self.path}")
                hub.answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()

    def answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        for repo, files in self.repos.items():
            api = f"/api/models/{repo}"
            if path.startswith(f"{api}/revision/") or path == api:
                siblings = [{"rfilename": name} for name in files]
                info = {"id": repo, "modelId": repo, "sha": commit(repo), "siblings": siblings}
                return _json(handler, info, body)
            if path.startswith(f"{api}/tree/"):
                tree = [
                    {
                        "type": "file",
                        "path": name,
                        "size": p.stat().st_size,
                        "oid": hashlib.sha1(name.encode()).hexdigest(),
                        "lfs": {
                            "oid": self.sha256[p],
                            "size": p.stat().st_size,
                            "pointerSize": 134,
                        },
                    }
                    for name, p in files.items()
                ]
                return _json(handler, tree, body)
            found = re.fullmatch(rf"/{re.escape(repo)}/resolve/[^/]+/(.+)", path)
            if found is not None and found.group(1) in files:
                return self.send_file(handler, repo, files[found.group(1)], body)
        handler.send_response(404)
        handler.send_header("X-Error-Code", "RepoNotFound")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return None

    def send_file(self, handler: BaseHTTPRequestHandler, repo: str, path: Path, body: bool) -> None:
        size = path.stat().st_size
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if ranged:
            start = int(ranged.group(1))
        handler.send_response(206 if ranged else 200)
        handler.send_header("X-Repo-Commit", commit(repo))
        handler.send_header("ETag", f'"{self.sha256[path]}"')
        handler.send_header("X-Linked-Etag", f'"{self.sha256[path]}"')
        handler.send_header("X-Linked-Size", str(size))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(size - start))
        if ranged:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.end_headers()
        if not body:
            return
        with path.open("rb") as data:
            data.seek(start)
            while chunk := data.read(CHUNK):
                try:
                    handler.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                time.sleep(self.delay)


def commit(repo: str) -> str:
    """A repo's one revision: a commit hash of its own, as on the hub."""
    return hashlib.sha1(repo.encode()).hexdigest()


def _json(handler: BaseHTTPRequestHandler, value: object, body: bool) -> None:
    raw = json.dumps(value).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    if body:
        handler.wfile.write(raw)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(CHUNK * 8):
            digest.update(chunk)
    return digest.hexdigest()
