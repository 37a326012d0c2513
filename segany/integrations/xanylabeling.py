"""X-AnyLabeling's remote server contract (its ``Remote-Server`` model).

Read from the client, github.com/CVHub520/X-AnyLabeling
``anylabeling/services/auto_labeling/remote_server.py``, and the reference server,
github.com/CVHub520/X-AnyLabeling-Server (``app/api/models.py``, ``app/api/predict.py``,
``app/schemas/*.py``, ``app/core/middleware.py``, ``app/models/segment_anything_2.py``):

- ``GET /v1/models`` -> ``{"success": true, "data": {model_id: metadata}}``, metadata with
  ``display_name``, ``widgets`` (the buttons the client shows), ``params``,
  ``capabilities`` and ``batch_processing_mode``;
- ``GET /v1/models/{id}/info`` -> ``{"success": true, "data": {"model_id": id, ...}}``;
- ``POST /v1/predict`` with ``{"model": id, "image": base64 or data URI, "params": {...}}``;
  params carry ``marks`` (``{"type": "point", "data": [x, y], "label": 1|0}``,
  ``{"type": "rectangle", "data": [x1, y1, x2, y2]}``), ``text_prompt``,
  ``conf_threshold``, ``epsilon_factor`` (polygon simplification: the tolerance is this
  fraction of the contour's length) -> ``{"success": true, "data": {"shapes": [...],
  "description": "", "replace": false}}``, each shape ``{"label", "shape_type":
  "polygon", "points": [[x, y], ...], "score"}``;
- errors: ``{"success": false, "error": {"code", "message"}}``; the token header is
  ``Token`` (the client sends its API key there).

One difference, on purpose: the reference server answers its errors (unknown model,
undecodable image, inference error) with HTTP 200, which the client reads as "no shapes"
and shows nothing. Here they carry their 4xx/5xx status (same body), so the client's
``raise_for_status`` shows "Remote server error: 422 ..." and the log says why.
As in the reference, a request without marks or text answers no shapes (the client sends
one when the marks are cleared).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..engine.errors import SafeJSONResponse
from .core import (
    BadRequest,
    ModelSession,
    NotFound,
    ServiceError,
    Unprocessable,
    mask_polygons,
)

#: The label of interactive shapes: the client replaces it with the label the user picks
#: when finishing the object (the reference SAM server's convention).
AUTO_LABEL = "AUTOLABEL_OBJECT"
EPSILON_FACTOR = 0.001
#: The client's widgets for a point/box model (the reference's SAM 2 configuration) and,
#: with a text detector, the text box and its send button.
POINT_WIDGETS = [
    "button_add_point",
    "button_remove_point",
    "button_add_rect",
    "button_clear",
    "button_finish_object",
    "mask_fineness_slider",
    "mask_fineness_value_label",
]
TEXT_WIDGETS = ["edit_text", "button_send", "input_conf", "edit_conf"]
_CODES = {400: "INVALID_REQUEST", 404: "MODEL_NOT_FOUND", 409: "TEXT_PROMPT_UNAVAILABLE"}


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """The contract's error envelope."""
    return {"success": False, "error": {"code": code, "message": message}}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return SafeJSONResponse(error_body(status, code, message), status_code=status)


def error_code(exc: ServiceError) -> str:
    """The contract's error code of a refusal (the reference's codes where it has one)."""
    if exc.message.startswith("image"):
        return "INVALID_IMAGE"
    return _CODES.get(exc.status, "INVALID_PARAMS")


def model_id(session: ModelSession) -> str:
    return session.name


def metadata(session: ModelSession) -> dict[str, Any]:
    text = session.detector_name is not None
    widgets = POINT_WIDGETS + (TEXT_WIDGETS if text else [])
    return {
        "display_name": f"segany {session.name}",
        "widgets": [{"name": w, "value": None} for w in widgets],
        "params": {"epsilon_factor": EPSILON_FACTOR, "multimask_output": False},
        "capabilities": {"points": True, "rectangles": True, "text_prompt": text},
        "batch_processing_mode": "text_prompt" if text else "default",
    }


def _number(params: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = params.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"params.{name}: expected a number")
    if not lo <= v <= hi:
        raise BadRequest(f"params.{name}: must lie in [{lo}, {hi}], got {v}")
    return float(v)


def parse_marks(marks: Any) -> tuple[list[list[float]], list[int], list[list[float]]]:
    """``(points, labels, rectangles)`` of the ``marks`` list."""
    if marks is None:
        return [], [], []
    if not isinstance(marks, list):
        raise BadRequest("params.marks: expected a list")
    points, labels, rects = [], [], []
    for i, m in enumerate(marks):
        if not isinstance(m, dict):
            raise BadRequest(f"params.marks[{i}]: expected an object")
        kind, data, label = m.get("type"), m.get("data"), m.get("label", 1)
        want = {"point": 2, "rectangle": 4}.get(kind)
        if want is None:
            raise Unprocessable(f"params.marks[{i}]: type {kind!r} is not 'point' or 'rectangle'")
        if not (
            isinstance(data, list)
            and len(data) == want
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
            and all(math.isfinite(v) for v in data)
        ):
            raise BadRequest(f"params.marks[{i}]: data must be {want} finite numbers")
        if label not in (0, 1):
            raise BadRequest(f"params.marks[{i}]: label must be 1 (object) or 0 (background)")
        if kind == "point":
            points.append([float(v) for v in data])
            labels.append(int(label))
        elif label == 0:
            raise Unprocessable(f"params.marks[{i}]: negative rectangles are not supported")
        else:
            x1, y1, x2, y2 = (float(v) for v in data)
            rects.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
    return points, labels, rects


def polygon_shapes(
    mask: np.ndarray, score: float, *, label: str = AUTO_LABEL, epsilon_factor: float
) -> list[dict[str, Any]]:
    """Polygon shapes of a mask's outer contours, simplified by ``epsilon_factor`` of each
    contour's length and closed (first point repeated, as the reference server does)."""
    out = []
    for poly in mask_polygons(mask):
        c = np.asarray(poly, dtype=np.float32).reshape(-1, 1, 2)
        if epsilon_factor > 0:
            c = cv2.approxPolyDP(c, epsilon_factor * cv2.arcLength(c, True), True)
        pts = [[float(x), float(y)] for x, y in c.reshape(-1, 2)]
        if len(pts) < 3:
            continue
        pts.append(pts[0])
        out.append(
            {
                "label": label,
                "shape_type": "polygon",
                "points": pts,
                "score": round(min(max(score, 0.0), 1.0), 5),
            }
        )
    return out


def predict(session: ModelSession, body: Any) -> dict[str, Any]:
    """``POST /v1/predict``'s ``data``; raises :class:`ServiceError` subclasses."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object with model, image and params")
    mid = body.get("model")
    if mid != model_id(session):
        raise NotFound(f"model {mid!r} is not served here; GET /v1/models lists the models")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("params: expected an object")
    if "image" not in body:
        raise BadRequest("image: missing (base64 or a data URI)")
    points, labels, rects = parse_marks(params.get("marks"))
    text = params.get("text_prompt")
    if text is not None and not isinstance(text, str):
        raise BadRequest("params.text_prompt: expected a string")
    text = (text or "").strip().rstrip(".").strip()
    eps = _number(params, "epsilon_factor", EPSILON_FACTOR, 0.0, 1.0)
    empty = {"shapes": [], "description": "", "replace": False}
    if not (points or rects or text):
        return empty  # the client's call after its marks are cleared (as the reference)
    rgb = session.image_from_base64(body["image"])
    shapes: list[dict[str, Any]] = []
    if points or rects:
        if not rects and 1 not in labels:
            raise Unprocessable(
                "give at least one positive point or a rectangle: negative points alone do "
                "not select an object"
            )
        multimask = params.get("multimask_output")
        for box in rects or [None]:
            mask, score = session.best_mask(
                rgb,
                points=points,
                labels=labels,
                box=box,
                multimask=bool(multimask) if multimask is not None else None,
            )
            shapes += polygon_shapes(mask, score, epsilon_factor=eps)
        return {**empty, "shapes": shapes}
    conf = params.get("conf_threshold")
    threshold = _number(params, "conf_threshold", 0.0, 0.0, 1.0) if conf else None
    seg = session.segment_text(rgb, text, box_threshold=threshold)
    for name, mask, score in zip(seg.label_names, seg.masks, seg.scores):
        shapes += polygon_shapes(mask, float(score), label=name, epsilon_factor=eps)
    # no "replace": the client's "preserve existing annotations" toggle decides
    return {"shapes": shapes, "description": ""}


def router(session: ModelSession) -> APIRouter:
    """The contract's routes (mounted under ``/xanylabeling``)."""
    r = APIRouter(tags=["X-AnyLabeling"])

    @r.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "healthy", "models_loaded": 1, "model": session.name}

    @r.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"success": True, "data": {model_id(session): metadata(session)}}

    @r.get("/v1/models/{mid}/info", response_model=None)
    def info(mid: str) -> dict[str, Any] | JSONResponse:
        if mid != model_id(session):
            return _error(404, "MODEL_NOT_FOUND", f"model {mid!r} is not served here")
        return {"success": True, "data": {"model_id": mid, **metadata(session)}}

    @r.post("/v1/predict", response_model=None)
    async def predict_route(request: Request) -> dict[str, Any] | JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "INVALID_REQUEST", "malformed JSON")
        try:
            data = await run_in_threadpool(predict, session, body)
        except ServiceError as exc:
            return _error(exc.status, error_code(exc), exc.message)
        return {"success": True, "data": data}

    return r
