"""An offline mock of the Hugging Face Hub upload API (plus file download, so that uploads can be read
back), run on a loopback port, and the settings that point the ``huggingface_hub`` client at it."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

MOCK_COMMIT_OID = "1" * 40
"""Commit id of every commit (and of every download's ``X-Repo-Commit``)."""


class MockHub:
    """In-memory record of what was uploaded: ``repos`` and ``files[repo_id] -> {path: bytes}``.

    Besides the upload API (``/api/repos/create``, ``/api/validate-yaml``, ``preupload``, ``commit``
    NDJSON with base64 contents, every file "regular", never LFS/Xet), ``HEAD``/``GET
    /{repo_id}/resolve/{revision}/{path}`` serve the uploaded files and answer 404 with the Hub's
    ``X-Error-Code`` (``EntryNotFound`` / ``RepoNotFound``) otherwise, as ``hf_hub_download`` expects.
    ``requests`` lists every request as ``"METHOD /path"``; :meth:`drop_connection` makes the mock hang up
    on chosen requests (listed in ``dropped``), as a lost connection would.
    """

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        self.dropped: list[str] = []
        self.url = ""
        self._drops: list[list] = []  # [marker, remaining, after_processing]
        self._lock = threading.Lock()

    def drop_connection(self, marker: str, times: int | None = 1, after_processing: bool = False) -> None:
        """Close the connection without any answer on the next ``times`` requests (``None``: all, until
        :meth:`stop_dropping`) whose ``"METHOD /path"`` contains ``marker`` (e.g. ``"/commit/"``), after
        reading the request body. With ``after_processing`` a POST takes effect first (a commit is
        stored) and only its answer is lost."""
        with self._lock:
            self._drops.append([marker, math.inf if times is None else times, after_processing])

    def stop_dropping(self) -> None:
        """Answer every request again."""
        with self._lock:
            self._drops.clear()

    def _take_drop(self, request: str) -> bool | None:
        """``None``: answer ``request``; else drop it (``True``: after processing it)."""
        with self._lock:
            for drop in self._drops:
                if drop[0] in request and drop[1] > 0:
                    drop[1] -= 1
                    self.dropped.append(request)
                    return drop[2]
        return None


def _handler(hub: MockHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # silence
            pass

        def _hang_up(self) -> None:
            """End the exchange without a response (the client sees the connection closed)."""
            self.close_connection = True

        def _reply(self, payload: object, status: int = 200) -> None:
            if getattr(self, "lose_reply", False):
                self._hang_up()
                return
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _resolve(self, send_body: bool) -> bool:
            """Serve ``/{repo_id}/resolve/{revision}/{path}``; False if the URL is not of that form."""
            parts = self.path.split("?")[0].lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return False
            repo_id, filename = f"{parts[0]}/{parts[1]}", unquote("/".join(parts[4:]))
            stored = hub.files.get(repo_id)
            if stored is None or filename not in stored:
                code = "RepoNotFound" if repo_id not in hub.repos and stored is None else "EntryNotFound"
                body = json.dumps({"error": f"{code}: {repo_id}/{filename}"}).encode()
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)
                return True
            data = stored[filename]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", MOCK_COMMIT_OID)
            self.end_headers()
            if send_body:
                self.wfile.write(data)
            return True

        def do_HEAD(self) -> None:  # noqa: N802
            hub.requests.append(f"HEAD {self.path}")
            if hub._take_drop(f"HEAD {self.path}") is not None:
                return self._hang_up()
            if not self._resolve(send_body=False):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            hub.requests.append(f"GET {self.path}")
            if hub._take_drop(f"GET {self.path}") is not None:
                return self._hang_up()
            if not self._resolve(send_body=True):
                self._reply({"error": "not found"}, 404)

        def do_POST(self) -> None:  # noqa: N802
            hub.requests.append(f"POST {self.path}")
            body = self._body()
            drop = hub._take_drop(f"POST {self.path}")
            if drop is False:
                return self._hang_up()
            self.lose_reply = drop is True
            host = f"http://{self.headers['Host']}"
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                data = json.loads(body or b"{}")
                name = data.get("name")
                repo_id = f"{data['organization']}/{name}" if data.get("organization") else f"user/{name}"
                if "/" in name:
                    repo_id = name
                if repo_id not in hub.repos:
                    hub.repos.append(repo_id)
                self._reply({"url": f"{host}/{repo_id}", "name": repo_id, "id": repo_id})
            elif path == "/api/validate-yaml":
                self._reply({})
            elif "/preupload/" in path:
                data = json.loads(body or b"{}")
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in data.get("files", [])
                ]
                self._reply({"files": files, "commitOid": "0" * 40})
            elif "/commit/" in path:
                repo_id = path.split("/api/models/")[1].split("/commit/")[0]
                stored = hub.files.setdefault(repo_id, {})
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item.get("key") == "file":
                        value = item["value"]
                        stored[value["path"]] = base64.b64decode(value["content"])
                oid = MOCK_COMMIT_OID
                self._reply(
                    {"commitUrl": f"{host}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                )
            else:
                self._reply({"error": f"unexpected {path}"}, 404)

    return Handler


@contextmanager
def mock_hub_server() -> Iterator[MockHub]:
    """Run the mock Hub on 127.0.0.1 (random port) for the duration of the context."""
    hub = MockHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def point_hub_client_at(monkeypatch, url: str) -> None:
    """Send this process's ``huggingface_hub`` requests to ``url`` (the mock) instead of the Hub.

    ``huggingface_hub`` reads ``HF_ENDPOINT`` at import, so the derived constants are patched too: the
    API endpoint, the download URL template and the module-level ``HfApi`` behind ``create_repo`` /
    ``upload_folder``. ``monkeypatch`` is pytest's fixture.
    """
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api as hf_api

    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def instant_retries(monkeypatch) -> list[float]:
    """Make the waits between ``huggingface_hub``'s own retries (``http_backoff``: 1, 2, 4, 8, 8 s) instant.

    Returns the list the requested waits are appended to. ``monkeypatch`` is pytest's fixture.
    """
    import huggingface_hub.utils._http as hf_http

    waits: list[float] = []
    clock = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(**{**clock, "sleep": waits.append}))
    return waits


def hub_cli_env(url: str, home: Path) -> dict[str, str]:
    """Environment for an ``hf`` subprocess talking only to the mock at ``url`` (cache under ``home``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=url,
        HF_TOKEN="hf_fake",
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_OFFLINE="0",
        NO_COLOR="1",
        # Anything not addressed to the mock goes to a closed local port and fails at once.
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env
