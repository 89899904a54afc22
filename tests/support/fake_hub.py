"""A local HTTP server standing in for the Hugging Face hub: one model repo, its files
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

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20


class FakeHub:
    def __init__(self, repo: str, files: dict[str, Path], bytes_per_s: float = 30e6) -> None:
        self.repo = repo
        self.files = files
        self.delay = CHUNK / bytes_per_s
        self.sha256 = {name: _sha256(path) for name, path in files.items()}
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
        api = f"/api/models/{self.repo}"
        if path.startswith(f"{api}/revision/") or path == api:
            siblings = [{"rfilename": name} for name in self.files]
            info = {"id": self.repo, "modelId": self.repo, "sha": COMMIT, "siblings": siblings}
            return _json(handler, info, body)
        if path.startswith(f"{api}/tree/"):
            tree = [
                {
                    "type": "file",
                    "path": name,
                    "size": p.stat().st_size,
                    "oid": hashlib.sha1(name.encode()).hexdigest(),
                    "lfs": {"oid": self.sha256[name], "size": p.stat().st_size, "pointerSize": 134},
                }
                for name, p in self.files.items()
            ]
            return _json(handler, tree, body)
        found = re.fullmatch(rf"/{re.escape(self.repo)}/resolve/[^/]+/(.+)", path)
        if found is None or found.group(1) not in self.files:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        return self.send_file(handler, found.group(1), body)

    def send_file(self, handler: BaseHTTPRequestHandler, name: str, body: bool) -> None:
        path = self.files[name]
        size = path.stat().st_size
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if ranged:
            start = int(ranged.group(1))
        handler.send_response(206 if ranged else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{self.sha256[name]}"')
        handler.send_header("X-Linked-Etag", f'"{self.sha256[name]}"')
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
