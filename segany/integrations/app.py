"""The ``segany serve`` app: one FastAPI application, one :class:`~.core.ModelSession`, each
tool's contract under its fixed prefix.

- ``/labelstudio``: Label Studio's ML backend (``segany.integrations.labelstudio.router``,
  mounted when that module is present);
- ``/cvat``: CVAT's interactor contract (:mod:`.cvat`);
- ``/xanylabeling``: X-AnyLabeling's remote server contract (:mod:`.xanylabeling`);
- ``GET /health``: 200 with the model, always without a token.

In front of every route, outermost first: the Host / Origin guard and the body limit of the
annotator (:mod:`segany.engine.guards`), one structured log line per request
(:class:`RequestLog`), and the optional token check (:class:`TokenAuth`).
"""

from __future__ import annotations

import base64
import hmac
import importlib
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI

from ..engine import errors, guards
from .core import ModelSession

log = logging.getLogger("segany.serve")

#: The fixed prefixes, each tool pointed at ``http://HOST:PORT/<prefix>``.
PREFIXES = {"labelstudio": "/labelstudio", "cvat": "/cvat", "xanylabeling": "/xanylabeling"}
#: Request bodies: a base64 frame of a 50 MP PNG is about 200 MB raw; 64 MiB covers a
#: 4k x 4k PNG and every JPEG frame CVAT sends (its own function.yaml caps at 32 MB).
DEFAULT_MAX_BODY = 64 * guards.MiB

#: A contract's error body for a status, a code and a message (the token check answers
#: in the shape of the tool the request was for).
ErrorShape = Callable[[int, str, str], dict[str, Any]]


def detail_shape(status: int, code: str, message: str) -> dict[str, Any]:
    return {"detail": message}


class RequestLog:
    """ASGI middleware: one JSON log line per request: method, route, status and
    milliseconds (``segany.serve`` logger, INFO)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            line = {
                "method": scope.get("method"),
                "route": scope.get("path"),
                "status": status,
                "ms": round(ms, 2),
            }
            log.info(json.dumps(line, separators=(",", ":")))


def request_token(headers: dict[bytes, bytes]) -> str | None:
    """The token of a request in any of the tools' conventions: ``Authorization: Bearer T``
    or ``Token T`` (Label Studio's API style), ``Authorization: Basic`` with the token as
    password (Label Studio's ML backend basic auth), ``Token: T`` (X-AnyLabeling's remote
    server header) or ``X-Segany-Token: T``."""
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = auth.partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme in ("bearer", "token") and value:
        return value
    if scheme == "basic" and value:
        try:
            _, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password or None
    for name in (b"token", b"x-segany-token"):
        v = headers.get(name, b"").decode("latin-1").strip()
        if v:
            return v
    return None


class TokenAuth:
    """ASGI middleware: with ``tokens``, every request but the health checks needs one of
    them (:func:`request_token`); 401 otherwise, in the error shape of the contract under
    whose prefix the request is (``shapes``: prefix -> shape)."""

    def __init__(
        self, app: Any, tokens: Sequence[str] = (), shapes: dict[str, ErrorShape] | None = None
    ) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens if t]
        self.shapes = shapes or {}

    def _open(self, path: str) -> bool:
        return path == "/health" or path.endswith("/health")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.tokens or self._open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        token = request_token(dict(scope.get("headers") or []))
        if token is not None and any(hmac.compare_digest(token.encode(), t) for t in self.tokens):
            await self.app(scope, receive, send)
            return
        message = (
            "this server needs a token: send 'Authorization: Bearer TOKEN' (or the tool's own "
            "header: 'Token: TOKEN' for X-AnyLabeling)"
            if token is None
            else "unknown token"
        )
        path = scope.get("path", "")
        shape = next((s for p, s in self.shapes.items() if path.startswith(p)), detail_shape)
        body = json.dumps(shape(401, "UNAUTHORIZED", message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _labelstudio_router(session: ModelSession) -> APIRouter | None:
    """Label Studio's routes from ``segany.integrations.labelstudio.router(session)``, or
    ``None`` when that module is not part of this installation."""
    name = f"{__package__}.labelstudio"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name).router(session)


def create_app(
    session: ModelSession,
    *,
    tokens: Sequence[str] = (),
    hosts: Sequence[str] | None = guards.LOCAL_NAMES,
    origins: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """The ``segany serve`` app over one session. ``tokens``: accepted tokens (none: no
    auth); ``hosts``: the ``Host`` names answered (``None``: any; see
    :func:`segany.engine.guards.served_hosts`); ``origins``: ``--allow-host`` names whose
    browser pages may post here; ``max_body``: the request body limit in bytes."""
    from . import cvat, xanylabeling

    app = FastAPI(
        title="segany serve",
        description="Segment Anything behind the annotation tools' own contracts: Label "
        "Studio (/labelstudio), CVAT (/cvat), X-AnyLabeling (/xanylabeling).",
        version="0.1.0",
        default_response_class=errors.SafeJSONResponse,
    )
    app.state.session = session
    errors.install(app)
    contracts = []

    ls = _labelstudio_router(session)
    if ls is not None:
        app.include_router(ls, prefix=PREFIXES["labelstudio"])
        contracts.append("labelstudio")
    app.include_router(cvat.router(session), prefix=PREFIXES["cvat"])
    app.include_router(xanylabeling.router(session), prefix=PREFIXES["xanylabeling"])
    contracts += ["cvat", "xanylabeling"]

    @app.get("/health")
    def health() -> dict[str, Any]:
        """200 with the model and the mounted contracts (no token needed)."""
        return {"status": "ok", **session.info(), "contracts": contracts}

    app.add_middleware(
        TokenAuth,
        tokens=tokens,
        shapes={PREFIXES["xanylabeling"]: xanylabeling.error_body},
    )
    app.add_middleware(RequestLog)
    app.add_middleware(guards.BodyLimit, default=max_body)
    app.add_middleware(guards.HostOriginGuard, hosts=hosts, origins=origins)  # outermost
    return app


def serve(
    session: ModelSession,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens: Sequence[str] = (),
    allow_hosts: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    log_level: str = "info",
) -> None:
    """Run the app until interrupted (uvicorn, one process: one model for every tool)."""
    import uvicorn

    hosts = guards.served_hosts(host, allow_hosts)
    if hosts is None:
        print(
            "segany serve: note: the Host header is not checked (bound to every interface "
            "without --allow-host, or --allow-host '*')",
            file=sys.stderr,
        )
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("segany").setLevel(log_level.upper())
    app = create_app(session, tokens=tokens, hosts=hosts, origins=allow_hosts, max_body=max_body)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        print("segany serve: stopped", file=sys.stderr)
