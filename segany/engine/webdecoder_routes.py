"""The browser decoder's routes (:mod:`.webdecoder`): onnxruntime-web's files, the exported
graphs and each image's embedding payload. Added to the app by :func:`.server.create_app`.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' annotations, and
# ``who`` (the caller dependency, given by create_app) is a local name.
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, Response

from . import ortweb
from .schemas import NotFound

#: Paths (and path prefixes) answered with the cross-origin isolation headers
#: (:class:`.guards.Isolation`).
ISOLATED = ("/", "/stats")
ISOLATED_PREFIXES = ("/static/", "/vendor/")
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}
#: Versioned URLs (runtime version, model id): cached by the browser for a day.
_CACHED = {"Cache-Control": "private, max-age=86400"}


def add_web_decoder_routes(app: FastAPI, service: Any, who: Any) -> None:
    """``GET /vendor/onnxruntime-web-VERSION/FILE`` (only :data:`.ortweb.FILES`),
    ``GET /api/graphs/{model_id}/{name}.onnx`` and ``GET /api/images/{id}/embedding``."""

    @app.get(f"/vendor/onnxruntime-web-{ortweb.VERSION}/{{name}}", include_in_schema=False)
    def ort_file(name: str) -> FileResponse:
        if name not in ortweb.FILES or not ortweb.available():
            raise NotFound(f"{name} is not served (onnxruntime-web {ortweb.VERSION} files only)")
        suffix = name[name.rfind(".") :]
        return FileResponse(ortweb.ort_dir() / name, media_type=_TYPES[suffix], headers=_CACHED)

    @app.get("/api/graphs/{model_id}/{name}.onnx")
    def graph(model_id: str, name: str, u: who) -> FileResponse:
        """An exported graph of the current model (``prompt`` or ``decoder``) for the
        browser decoder."""
        path = service.web_graph(model_id, name)
        return FileResponse(path, media_type="application/octet-stream", headers=_CACHED)

    @app.get("/api/images/{image_id}/embedding")
    def embedding(
        image_id: int,
        u: who,
        dtype: str | None = Query(default=None, description="float16 (default) or float32"),
    ) -> Response:
        """The image's embedding and per-image decoder context for the browser decoder
        (binary, see :mod:`segany.engine.webdecoder`)."""
        data = service.embedding_payload(image_id, dtype)
        return Response(data, media_type="application/octet-stream",
                        headers={"Cache-Control": "no-store"})  # fmt: skip
