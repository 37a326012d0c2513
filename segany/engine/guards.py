"""ASGI guards in front of the annotator's routes: the Host and Origin checks and the
request-body limits.

- **Host** (DNS rebinding): a web page whose domain an attacker re-points at 127.0.0.1 can
  reach a localhost server from the victim's browser, but its requests carry the
  attacker's name in ``Host``. Requests whose ``Host`` is not one of the served names (the
  localhost names, the bound address and ``--allow-host`` names) get 421.
- **Origin** (cross-site requests): a browser sends ``Origin`` with every cross-origin
  request; a state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin`` is neither
  the server's own (``scheme://host[:port]`` of its ``Host``) nor a name given with
  ``--allow-host`` (any scheme and port: the page as a reverse proxy serves it) gets 403.
  Requests without ``Origin`` (curl, scripts) are not browser cross-site requests and
  pass.
- **Body size**: each route has a limit (small for clicks and accepts, larger for the COCO
  import); a ``Content-Length`` over it gets 413 at once, and a chunked body is counted as
  it arrives and answered with 413 as soon as it passes the limit (the route never sees
  it). Bodies are read here only up to the limit, so no route holds more than that.

Starlette's ``TrustedHostMiddleware`` answers in plain text without saying what to do;
these answer JSON ``{"detail": ...}`` like every other error of the API and name the
option that fixes a refused LAN name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

#: Host names a localhost server always answers to.
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
#: Addresses that mean "every interface": the Host header can then be any of the machine's
#: names, which the server cannot list (see :func:`served_hosts`).
WILDCARD = ("0.0.0.0", "::", "")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

MiB = 2**20
#: Default body limit: prompts, accepts (a COCO RLE of a 50 MP mask is well under this),
#: edits, events.
SMALL_BODY = 8 * MiB
#: The COCO import (``POST /api/import/coco``): a whole annotation file.
IMPORT_BODY = 256 * MiB


def served_hosts(host: str, allow: Sequence[str] = ()) -> list[str] | None:
    """The ``Host`` names a server bound to ``host`` answers to: the localhost names, the
    bound address and ``allow`` (``--allow-host``). ``None`` (no check) when ``allow``
    holds ``*``, or when bound to every interface and no ``allow`` names are given (the
    machine's LAN names are unknown; auth is on by default there)."""
    allow = [a.strip().lower() for a in allow if a.strip()]
    if "*" in allow or (host in WILDCARD and not allow):
        return None
    names = [*LOCAL_NAMES, *allow]
    if host not in WILDCARD:
        names.append(host.lower())
    return list(dict.fromkeys(_bare(n) for n in names))


def _bare(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the host name, lower case, without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


async def send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HostOriginGuard:
    """ASGI middleware: 421 for an unknown ``Host``, 403 for a cross-origin state-changing
    request. ``hosts=None`` turns the Host check off (the Origin check stays)."""

    def __init__(self, app: Any, hosts: Sequence[str] | None, origins: Sequence[str] = ()) -> None:
        self.app = app
        self.hosts = None if hosts is None else frozenset(_bare(h) for h in hosts)
        self.origins = frozenset(_bare(h) for h in origins if h.strip() != "*")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and _bare(host) not in self.hosts:
            await send_json(
                send,
                421,
                f"this server does not answer to the host name {host[:100]!r} (a guard "
                "against DNS rebinding); to serve it under that name, start it with "
                f"--allow-host {_bare(host)[:100] or 'NAME'}",
            )
            return
        origin = headers.get(b"origin")
        if origin is not None and scope.get("method", "GET") in STATE_CHANGING:
            text = origin.decode("latin-1")
            if not _same_origin(text, host, scope.get("scheme", "http"), self.origins):
                await send_json(
                    send,
                    403,
                    f"cross-origin request refused: Origin {text[:100]!r} is not this "
                    "server; use the annotator's own page",
                )
                return
        await self.app(scope, receive, send)


def _same_origin(origin: str, host: str, scheme: str, names: frozenset[str]) -> bool:
    try:
        o = urlsplit(origin)
        if not o.netloc:
            return False
        if (o.hostname or "").lower() in names:
            return True
        return o.scheme == scheme and o.netloc.lower() == host.lower()
    except ValueError:
        return False


class BodyLimit:
    """ASGI middleware: request bodies over the route's limit get 413.

    ``limits`` maps a path pattern (a regular expression matched against the whole path)
    to its limit; other paths get ``default``. The body is passed on as it arrives (never
    buffered here); when the running count passes the limit, the request is answered with
    413 and the route is not run further (its reads see a disconnect)."""

    def __init__(
        self, app: Any, default: int = SMALL_BODY, limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.default = default
        self.limits = [(re.compile(p), n) for p, n in (limits or {}).items()]

    def limit(self, path: str) -> int:
        for pattern, n in self.limits:
            if pattern.fullmatch(path):
                return n
        return self.default

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope.get("path", ""))
        too_large = f"request body over the limit of this route ({_size(limit)})"
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = -1
                if n < 0:
                    await send_json(send, 400, "invalid Content-Length")
                    return
                if n > limit:
                    await send_json(send, 413, too_large)
                    return
        seen = 0
        refused = False
        started = False

        async def counted() -> dict:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await send_json(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: dict) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer; the route's own reply is dropped
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not refused:
                raise


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


#: Headers that make a page cross-origin isolated (SharedArrayBuffer, WebAssembly threads):
#: only same-origin resources (or ones that opt in) can be loaded by it, and windows of
#: other origins cannot reach it.
ISOLATION_HEADERS = [
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-embedder-policy", b"require-corp"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class Isolation:
    """ASGI middleware: :data:`ISOLATION_HEADERS` on the answers to the paths in ``paths``
    and those under the ``prefixes`` (the annotator's pages, scripts and worker scripts;
    not ``/docs``, whose assets come from elsewhere)."""

    def __init__(self, app: Any, paths: Sequence[str], prefixes: Sequence[str] = ()) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else None
        if path is None or not (path in self.paths or path.startswith(self.prefixes)):
            await self.app(scope, receive, send)
            return

        async def send_isolated(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *ISOLATION_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_isolated)
