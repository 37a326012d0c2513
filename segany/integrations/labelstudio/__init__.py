"""Label Studio's ML backend on ``segany serve`` (``http://HOST:PORT/labelstudio``).

The protocol of ``label-studio-ml`` (HumanSignal/label-studio-ml-backend,
``label_studio_ml/api.py``), route for route:

- ``GET /health`` (and ``GET /``): ``{"status": "UP", "model_class": ...}`` (plus segany's
  model version, training state and last error);
- ``POST /setup``: ``{"project", "schema", "hostname", "access_token", "extra_params"}`` ->
  ``{"model_version"}``;
- ``POST /predict``: ``{"tasks", "label_config", "project", "params": {"context"}}`` ->
  ``{"results": [{"result": [...], "score", "model_version"}, ...]}``, one per task;
- ``POST /webhook``: ``{"action", "project": {"id", "label_config", ...}}``; training events
  -> 201 ``{"result", "status": "ok"}``, others -> 200 ``{"status": "Unknown event"}``;
- ``POST /train`` (Label Studio before the training webhook) and ``GET /metrics``,
  ``GET /versions``; segany's ``GET /train/status``.

Errors answer label-studio-ml's shape ``{"status", "detail", ...}`` with the HTTP status,
and are logged (``segany.serve.labelstudio``) and kept for ``/health`` (Label Studio's page
shows only the status of a failed call). See ``docs/labelstudio.md``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .backend import LabelStudioBackend, error_body, status_of
from .client import LabelStudioError

__all__ = ["LabelStudioBackend", "router"]

log = logging.getLogger("segany.serve.labelstudio")


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {"__error__": "the body is not JSON"}
    return data if isinstance(data, dict) else {"__error__": "the body must be a JSON object"}


async def _call(
    backend: LabelStudioBackend, where: str, fn: Callable[[dict], Any], request: Request
) -> JSONResponse:
    body = await _body(request)
    if "__error__" in body:
        return JSONResponse(error_body(400, body["__error__"]), status_code=400)
    try:
        out = await run_in_threadpool(fn, body)
    except Exception as exc:  # every failure answers label-studio-ml's error shape
        status = status_of(exc)
        message = str(exc) if status != 500 else f"{type(exc).__name__}: {exc}"
        if status == 500:
            log.exception("Label Studio %s failed", where)
        if status >= 500 or isinstance(exc, LabelStudioError) or where == "predict":
            backend.error(exc, where)
        return JSONResponse(error_body(status, message), status_code=status)
    status, payload = out if isinstance(out, tuple) else (200, out)
    return JSONResponse(payload, status_code=status)


def router(session: Any, **options: Any) -> APIRouter:
    """The routes over a ``ModelSession`` (``options``: :class:`LabelStudioBackend`'s)."""
    backend = LabelStudioBackend(session, **options)
    r = APIRouter(tags=["Label Studio"])
    r.backend = backend  # type: ignore[attr-defined]  # for tests and the serve CLI

    @r.get("/health")
    @r.get("/")
    def health() -> dict[str, Any]:
        return backend.health()

    @r.post("/setup")
    async def setup(request: Request) -> JSONResponse:
        return await _call(backend, "setup", backend.setup, request)

    @r.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        return await _call(backend, "predict", backend.predict, request)

    @r.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        return await _call(backend, "webhook", backend.webhook, request)

    @r.post("/train")
    async def train(request: Request) -> JSONResponse:
        return await _call(backend, "train", backend.train, request)

    @r.get("/train/status")
    def train_status() -> dict[str, Any]:
        return backend.job.status()

    @r.get("/metrics")
    def metrics() -> dict[str, Any]:
        return {}

    @r.get("/versions")
    def versions() -> dict[str, Any]:
        return {"versions": [backend.model_version]}

    return r
