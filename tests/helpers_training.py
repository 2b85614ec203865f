"""Shared fixtures for the training tests: generated images, a tiny DINOv2, tiny model configs and an
offline mock of the Hugging Face Hub upload API (plus file download, so that uploads can be read back)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

#: SSDDAutoencoder overrides for an f2 encoder and a 4-level tiny decoder (mid grid = H/8).
TINY_MODEL_CONFIG = {
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "decoder_block_out_channels": [32, 32, 64, 64],
    "decoder_layers_per_block": 1,
    "decoder_transformer_layers": 2,
    "decoder_attention_heads": 2,
    "decoder_attention_window": 4,
    "norm_num_groups": 32,
    "num_inference_steps": 4,
    "sample_size": 32,
}

DINO_PATCH = 4


def generated_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth, colourful synthetic RGB image (low-frequency sinusoids plus a disc)."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
        channels.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
    image = np.stack(channels, axis=-1)
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    image[mask] = rng.uniform(0, 1, size=3)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), mode="RGB")


def make_image_folder(root: Path, count: int = 8, seed: int = 0, corrupt: bool = False) -> Path:
    """``count`` generated images in nested folders (PNG and JPEG, one grayscale, one RGBA); with
    ``corrupt`` also a truncated JPEG and a text file named ``.png``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = generated_image(seed * 1000 + i)
        folder = root / f"class_{i % 2}"
        folder.mkdir(exist_ok=True)
        if i == 1:
            image = image.convert("L")
        if i == 2:
            image = image.convert("RGBA")
        suffix = "jpg" if i % 3 == 0 else "png"
        image.save(folder / f"img_{i:03d}.{suffix}", quality=95) if suffix == "jpg" else image.save(
            folder / f"img_{i:03d}.{suffix}"
        )
    if corrupt:
        good = root / "class_0" / "img_000.jpg"
        data = good.read_bytes()
        (root / "class_1" / "truncated.jpg").write_bytes(data[: len(data) // 3])
        (root / "class_0" / "not_an_image.png").write_text("this is a text file, not a PNG\n")
    return root


def make_tiny_dino(path: Path) -> Path:
    """A randomly initialised tiny DINOv2 saved with ``save_pretrained`` (stand-in for dinov2-base)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=DINO_PATCH,
        image_size=16,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Mock Hub
# ----------------------------------------------------------------------------------------------------
MOCK_COMMIT_OID = "1" * 40
"""Commit id of every commit (and of every download's ``X-Repo-Commit``)."""


class MockHub:
    """In-memory record of what was uploaded: ``repos`` and ``files[repo_id] -> {path: bytes}``.

    Besides the upload API (``/api/repos/create``, ``/api/validate-yaml``, ``preupload``, ``commit``
    NDJSON with base64 contents, every file "regular", never LFS/Xet), ``HEAD``/``GET
    /{repo_id}/resolve/{revision}/{path}`` serve the uploaded files and answer 404 with the Hub's
    ``X-Error-Code`` (``EntryNotFound`` / ``RepoNotFound``) otherwise, as ``hf_hub_download`` expects.
    ``requests`` lists every request as ``"METHOD /path"``.
    """

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        self.url = ""


def _handler(hub: MockHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # silence
            pass

        def _reply(self, payload: object, status: int = 200) -> None:
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
            if not self._resolve(send_body=False):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            hub.requests.append(f"GET {self.path}")
            if not self._resolve(send_body=True):
                self._reply({"error": "not found"}, 404)

        def do_POST(self) -> None:  # noqa: N802
            hub.requests.append(f"POST {self.path}")
            body = self._body()
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
