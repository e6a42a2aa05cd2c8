"""Model folders served under hub repo ids, on 127.0.0.1: the part of the hub API that
`huggingface_hub.snapshot_download` uses.

The hub tier's code (zoo/resolve.py: `snapshot_download`, then `mlx_lm.load`) is what
users run online, and here the hub is out of reach. Pointing HF_ENDPOINT at this server
runs that code unchanged, end to end, on folders the zoo converted from real weights:
`repo_info` (GET /api/models/{repo}/revision/{rev}), the recursive tree listing
(GET /api/models/{repo}/tree/{rev}) and file downloads with their metadata
(HEAD/GET /{repo}/resolve/{rev}/{path}: X-Repo-Commit, ETag, Content-Length).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Repo:
    """One model folder as a hub repository at a single commit."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        listing = "".join(f"{name}:{path.stat().st_size}\n" for name, path in self.files.items())
        self.commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()

    def etag(self, name: str) -> str:
        stat = self.files[name].stat()
        return hashlib.sha1(f"{self.commit}/{name}/{stat.st_size}".encode()).hexdigest()

    def info(self) -> dict:
        return {
            "id": self.repo_id,
            "modelId": self.repo_id,
            "sha": self.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "siblings": [{"rfilename": name} for name in self.files],
        }

    def tree(self) -> list[dict]:
        return [
            {"type": "file", "path": name, "size": path.stat().st_size, "oid": self.etag(name)}
            for name, path in self.files.items()
        ]


class LocalHub:
    """A threaded HTTP server for some repos; `endpoint` is what HF_ENDPOINT takes."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: Repo(repo_id, Path(folder)) for repo_id, folder in repos.items()}
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, path: str) -> tuple[Repo, str, str] | None:
        """(repo, kind, rest) for /api/models/{repo}/{revision|tree}/... or /{repo}/resolve/..."""
        parts = unquote(urlsplit(path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            repo = self.repos.get("/".join(parts[2:4]))
            return (repo, parts[4], "/".join(parts[6:])) if repo else None
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.repos.get("/".join(parts[:2]))
            return (repo, "resolve", "/".join(parts[4:])) if repo else None
        return None


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the test reads hub.requests instead
            pass

        def do_HEAD(self) -> None:  # noqa: N802 - http.server API
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            found = hub.route(self.path)
            if found is None:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            repo, kind, rest = found
            if kind == "revision":
                return self._send(200, json.dumps(repo.info()).encode(), {}, body)
            if kind == "tree":
                return self._send(200, json.dumps(repo.tree()).encode(), {}, body)
            if kind == "resolve" and rest in repo.files:
                headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(rest)}"'}
                return self._send(
                    200, repo.files[rest].read_bytes() if body else b"", headers, body, repo.files[rest]
                )
            return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})

        def _send(self, status: int, data: bytes, headers: dict, body: bool = True, file: Path | None = None):
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/json" if file is None else "application/octet-stream"
            )
            self.send_header("Content-Length", str(file.stat().st_size if file is not None else len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
