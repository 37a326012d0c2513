"""Reading from a Label Studio server: the task images (``/data/upload/...``,
``/data/local-files/?d=...``, cloud storage URIs through its ``presign`` proxy, or any
``http(s)`` URL) and the project's annotations, with its API key.

Where the server and the key come from, first found wins:

1. ``LABEL_STUDIO_URL`` (or ``LABEL_STUDIO_HOST``) and ``LABEL_STUDIO_API_KEY`` (or
   ``LABEL_STUDIO_ACCESS_TOKEN``) in segany's environment;
2. what Label Studio sends to ``/setup`` when the backend is connected (``hostname`` and the
   project owner's legacy token ``access_token``).

Keys: a Personal Access Token (a JWT, Label Studio >= 1.17) is exchanged for a short-lived
access token at ``/api/token/refresh/`` and sent as ``Authorization: Bearer``; any other key
is a legacy token (``Authorization: Token``; Label Studio refuses those unless legacy
tokens are enabled for the organization).

Every failure is a :class:`LabelStudioError` saying what to fix: the "connected but
empty" backend is nearly always one of these (no ``LABEL_STUDIO_URL`` for a relative
``/data/upload`` path, no key, a refused key, an unreachable host).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

#: Largest image (or export) read from Label Studio.
MAX_DOWNLOAD = 256 * 2**20
TIMEOUT = 30.0
_ACCESS_LIFETIME = 240.0  # Label Studio's access tokens live 5 minutes: refresh before


class LabelStudioError(RuntimeError):
    """Label Studio cannot be read (with the fix in the message); ``status`` is the HTTP
    status segany answers with."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


def is_jwt(key: str) -> bool:
    """A Personal Access Token (JWT: three base64url parts, the first a JSON header)."""
    parts = key.split(".")
    return len(parts) == 3 and key.startswith("eyJ") and all(parts)


@dataclass
class Credentials:
    url: str | None
    key: str | None
    source: str  # "environment", "setup" or "none"

    def describe(self) -> str:
        return f"{self.url or '<no Label Studio URL>'} (from {self.source})"


def env_credentials() -> Credentials:
    url = os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST")
    key = os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN")
    return Credentials(url.rstrip("/") if url else None, key or None, "environment")


def _limited_read(resp: Any, limit: int, what: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise LabelStudioError(f"{what} is {int(length)} bytes, over the {limit}-byte limit", 413)
    data = resp.read(limit + 1)
    if len(data) > limit:
        raise LabelStudioError(f"{what} is over the {limit}-byte limit", 413)
    return data


class LabelStudioClient:
    """One Label Studio server and key (thread-safe; the access token is shared)."""

    def __init__(self, creds: Credentials, *, timeout: float = TIMEOUT) -> None:
        self.creds = creds
        self.timeout = timeout
        self._lock = threading.Lock()
        self._access: tuple[str, float] | None = None

    # -- authentication ------------------------------------------------------------------------
    def _auth_header(self) -> dict[str, str]:
        key = self.creds.key
        if not key:
            return {}
        if not is_jwt(key):
            return {"Authorization": f"Token {key}"}
        with self._lock:
            if self._access is None or self._access[1] < time.monotonic():
                self._access = (self._refresh(key), time.monotonic() + _ACCESS_LIFETIME)
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _refresh(self, key: str) -> str:
        body = json.dumps({"refresh": key}).encode()
        req = urllib.request.Request(
            self._absolute("/api/token/refresh/"),
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                access = json.loads(resp.read(1 << 20)).get("access")
        except urllib.error.HTTPError as exc:
            raise LabelStudioError(
                f"Label Studio at {self.creds.describe()} refused the Personal Access Token "
                f"(HTTP {exc.code} at /api/token/refresh/): make a new one under Account & "
                "Settings > Personal Access Token and set LABEL_STUDIO_API_KEY",
                401,
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise self._unreachable(exc) from None
        if not isinstance(access, str) or not access:
            raise LabelStudioError("Label Studio's /api/token/refresh/ gave no access token")
        return access

    def _unreachable(self, exc: BaseException) -> LabelStudioError:
        reason = getattr(exc, "reason", exc)
        return LabelStudioError(
            f"cannot reach Label Studio at {self.creds.describe()}: {reason}. Set "
            "LABEL_STUDIO_URL to an address of Label Studio that segany's machine can open",
            502,
        )

    # -- URLs ----------------------------------------------------------------------------------
    def _absolute(self, path: str) -> str:
        if not self.creds.url:
            raise LabelStudioError(
                f"the task's image is a path of Label Studio ({path[:200]}), but segany does not "
                "know Label Studio's address: set LABEL_STUDIO_URL (e.g. http://localhost:8080) "
                "and LABEL_STUDIO_API_KEY in segany serve's environment",
                424,
            )
        return self.creds.url + "/" + path.lstrip("/")

    def resolve(self, ref: str, task_id: int | None = None) -> tuple[str, bool]:
        """A task's image reference -> ``(URL, send the key)``."""
        ref = ref.strip()
        parsed = urllib.parse.urlparse(ref)
        if parsed.scheme in ("http", "https"):
            own = bool(self.creds.url) and ref.startswith(self.creds.url + "/")
            return ref, own
        if parsed.scheme == "" and ref.startswith("/"):
            return self._absolute(ref), True
        if parsed.scheme and task_id is not None:  # s3://, gs://, azure-blob://: LS presigns
            uri = base64.urlsafe_b64encode(ref.encode()).decode()
            return self._absolute(f"/tasks/{int(task_id)}/presign/?fileuri={uri}"), True
        raise LabelStudioError(
            f"cannot read the image {ref[:200]!r}: not an http(s) URL, a Label Studio path "
            "(/data/...) or a storage URI of a task",
            422,
        )

    # -- requests ------------------------------------------------------------------------------
    def get(self, url: str, *, auth: bool = True, limit: int = MAX_DOWNLOAD, what: str) -> bytes:
        headers = self._auth_header() if auth else {}
        req = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return _limited_read(resp, limit, what)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, url, auth, what) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _http_error(
        self, exc: urllib.error.HTTPError, url: str, auth: bool, what: str
    ) -> LabelStudioError:
        shown = url.split("?")[0][:200]
        if exc.code in (401, 403) and auth:
            if not self.creds.key:
                return LabelStudioError(
                    f"Label Studio refused {what} ({shown}: HTTP {exc.code}) because segany "
                    "has no API key: set LABEL_STUDIO_API_KEY (Account & Settings > Personal "
                    "Access Token) in segany serve's environment",
                    424,
                )
            kind = "Personal Access Token" if is_jwt(self.creds.key) else "legacy token"
            return LabelStudioError(
                f"Label Studio refused {what} ({shown}: HTTP {exc.code}) with the {kind} from "
                f"the {self.creds.source}: use a Personal Access Token in LABEL_STUDIO_API_KEY "
                "(or enable legacy tokens for the organization)",
                424,
            )
        if exc.code == 404:
            return LabelStudioError(f"{what} not found at {shown} (HTTP 404)", 424)
        return LabelStudioError(f"{what}: {shown} answered HTTP {exc.code}", 502)

    def image_bytes(self, ref: str, task_id: int | None = None) -> bytes:
        url, auth = self.resolve(ref, task_id)
        return self.get(url, auth=auth, what=f"the image of task {task_id}")

    def api_json(self, path: str, what: str) -> Any:
        data = self.get(self._absolute(path), what=what)
        try:
            return json.loads(data)
        except ValueError:
            raise LabelStudioError(f"{what}: Label Studio did not answer JSON") from None
