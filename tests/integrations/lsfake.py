"""A stand-in Label Studio for the contract tests: serves task images under ``/data/upload``
and ``/data/local-files`` (legacy ``Token`` or ``Bearer`` auth, as Label Studio checks them),
``/api/token/refresh/`` for Personal Access Tokens, and a project export."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

LEGACY = "legacy-token-0123456789"
PAT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"  # a JWT's shape
ACCESS = "access-abc"


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class FakeLabelStudio:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.export: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, auth header

    def authorized(self, header: str | None) -> bool:
        return header in (f"Token {LEGACY}", f"Bearer {ACCESS}")


@contextmanager
def fake_label_studio() -> Iterator[tuple[FakeLabelStudio, str]]:
    state = FakeLabelStudio()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            auth = self.headers.get("Authorization")
            state.requests.append(("GET", self.path, auth))
            if not state.authorized(auth):
                self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                return
            if self.path.startswith("/api/projects/") and "/export" in self.path:
                self._send(200, json.dumps(state.export).encode())
            elif self.path in state.files:
                self._send(200, state.files[self.path], "image/png")
            else:
                self._send(404, b'{"detail": "Not found."}')

        def do_POST(self) -> None:  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            state.requests.append(("POST", self.path, self.headers.get("Authorization")))
            if self.path == "/api/token/refresh/" and body.get("refresh") == PAT:
                self._send(200, json.dumps({"access": ACCESS}).encode())
            else:
                self._send(401, b'{"detail": "Token is invalid or expired"}')

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
