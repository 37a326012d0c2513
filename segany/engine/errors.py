"""The annotator's error answers: every failure becomes JSON ``{"detail": ...}`` with a
status that says whose fault it is.

- :class:`~.service.ServiceError`: its own 4xx;
- invalid fields: 422 naming the field (400 for malformed JSON);
- the database cannot be used (locked, disk full, corrupt, unreachable, read-only): 503
  with the reason, and ``Retry-After``;
- a database integrity or range error the service did not foresee: 409 / 422;
- anything else: the traceback is logged and the client gets a plain 500 without internals.

Responses never hold NaN or infinities (:class:`SafeJSONResponse`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..validate import json_safe
from .schemas import ServiceError
from .store import StoreError

log = logging.getLogger("segany.engine")


class SafeJSONResponse(JSONResponse):
    """JSON that is always valid: a NaN or infinity (from a row stored before numbers were
    checked) becomes ``null`` instead of failing the whole answer."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # "Out of range float values are not JSON compliant"
            return super().render(json_safe(content))


#: Driver messages -> what the operator is told (SQLite's and PostgreSQL's wording).
_REASONS = (
    (("locked", "lock timeout", "deadlock"), "the database is locked by another process"),
    (("disk is full", "no space left", "disk full", "could not extend"), "the disk is full"),
    (
        ("not a database", "malformed", "corrupt", "disk i/o error", "checksum"),
        "the database file is damaged",
    ),
    (("readonly", "read-only", "read only"), "the database is read-only"),
    (
        ("unable to open", "connection", "could not connect", "terminat", "server closed"),
        "the database cannot be reached",
    ),
)


def db_reason(exc: BaseException) -> str:
    """A one-line reason for a database failure, without paths or credentials."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    for needles, reason in _REASONS:
        if any(n in text for n in needles):
            return reason
    return "the database cannot be used right now"


def install(app: FastAPI) -> None:
    """Register the error handlers on ``app``."""

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return SafeJSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx") or {}
            msg = f"malformed JSON: {ctx.get('error', 'cannot parse the body')}"
            return SafeJSONResponse({"detail": msg}, status_code=400)
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msg = e.get("msg")
            if e.get("type") == "finite_number":
                msg = "must be a finite number, not NaN or infinity"
            parts.append(f"{loc or 'body'}: {msg}")
        return SafeJSONResponse(
            {"detail": "; ".join(parts), "errors": _jsonable(errors[:20])}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> JSONResponse:
        log.warning("%s %s: integrity error: %s", request.method, request.url.path, exc.orig)
        return SafeJSONResponse(
            {"detail": "the change conflicts with another one made at the same time; retry"},
            status_code=409,
        )

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> JSONResponse:
        log.warning("%s %s: data error: %s", request.method, request.url.path, exc.orig)
        return SafeJSONResponse(
            {"detail": "a value is out of the range the database can store"}, status_code=422
        )

    @app.exception_handler(DBAPIError)
    async def _db(request: Request, exc: DBAPIError) -> JSONResponse:
        reason = db_reason(exc)
        log.error("%s %s: database error (%s): %s", request.method, request.url.path, reason, exc)
        return _unavailable(reason)

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _unavailable(str(exc))

    @app.exception_handler(Exception)
    async def _last_resort(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
        return SafeJSONResponse(
            {"detail": "internal error: the server could not handle this request (logged)"},
            status_code=500,
        )


def _unavailable(reason: str) -> JSONResponse:
    return SafeJSONResponse(
        {"detail": f"database unavailable: {reason}"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append({k: e[k] for k in ("loc", "msg", "type") if k in e})
    return json.loads(json.dumps(out, default=str))
