"""CVAT's interactor contract (serverless functions of ``type: interactor``, ``version: 2``).

Read from CVAT's sources (github.com/cvat-ai/cvat):

- the request, ``cvat/apps/lambda_manager/views.py`` (``LambdaFunction.invoke``, interactor
  branch): ``{"image": <base64 of the encoded frame>, "pos_points": [[x, y], ...],
  "neg_points": [[x, y], ...], "obj_bbox": [[x1, y1], [x2, y2]] or null}`` in frame pixels
  (older versions cut ``obj_bbox`` from the first two ``pos_points`` when the function
  declares ``startswith_box``; recent ones send it apart when ``startswith_box_optional``);
- the answer, ``cvat-ui/.../controls-side-bar/tools-control.tsx`` (``runInteractionRequest``):
  ``{"mask": rows of 0/1, "points": [[x, y], ...], "bounds": [left, top, right, bottom]}``;
  the page encodes ``mask`` with ``mask2Rle`` and appends ``bounds`` (inclusive corners of
  the crop the mask covers; the whole frame when absent) and draws ``points`` as the
  polygon when the user converts masks to polygons.

Here the mask is cropped to the object's box (``bounds``): a click on a 1080p frame answers
a few kilobytes instead of a 2-million-cell list. ``points`` is the largest outer contour.
The same function serves the Nuclio handler (``deploy/cvat/main.py``) and ``POST /cvat`` of
``segany serve``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from .core import BadRequest, ModelSession, ServiceError, Unprocessable, mask_polygons

log = logging.getLogger("segany.serve")

#: What CVAT's function.yaml annotations declare for this interactor (and what
#: ``GET /cvat`` reports): any number of positive / negative points, a box optional.
SPEC = {
    "kind": "interactor",
    "version": 2,
    "min_pos_points": 0,
    "min_neg_points": 0,
    "startswith_box": False,
    "startswith_box_optional": True,
    "help_message": "Click inside the object (positive points), outside it (negative "
    "points) or drag a box around it; segany answers with its mask.",
}


def _points(value: Any, what: str) -> list[list[float]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{what}: expected a list of [x, y] points")
    out = []
    for i, p in enumerate(value):
        if not (isinstance(p, (list, tuple)) and len(p) == 2):
            raise BadRequest(f"{what}[{i}]: expected [x, y]")
        try:
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError):
            raise BadRequest(f"{what}[{i}]: coordinates must be numbers") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise BadRequest(f"{what}[{i}]: coordinates must be finite numbers")
        out.append([x, y])
    return out


def _box(value: Any) -> list[float] | None:
    """``obj_bbox`` as XYXY: ``[[x1, y1], [x2, y2]]`` (CVAT's shape, two corners in any
    order) or ``[x1, y1, x2, y2]``; ``None`` for null or an empty list."""
    if value is None or (isinstance(value, list) and not value):
        return None
    if isinstance(value, list) and len(value) == 4 and not isinstance(value[0], (list, tuple)):
        value = [value[:2], value[2:]]
    corners = _points(value, "obj_bbox")
    if len(corners) != 2:
        raise BadRequest("obj_bbox: expected two corners [[x1, y1], [x2, y2]]")
    (xa, ya), (xb, yb) = corners
    return [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)]


def parse(body: Any) -> tuple[Any, list[list[float]], list[list[float]], list[float] | None]:
    """``(image, pos_points, neg_points, box)`` of an interactor request; :class:`BadRequest`
    for a malformed one."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object with image, pos_points, neg_points")
    if "image" not in body:
        raise BadRequest("image: missing (the frame, base64-encoded)")
    pos = _points(body.get("pos_points"), "pos_points")
    neg = _points(body.get("neg_points"), "neg_points")
    return body["image"], pos, neg, _box(body.get("obj_bbox"))


def crop_answer(mask: np.ndarray) -> dict[str, Any]:
    """CVAT's answer for a full-frame boolean mask: the crop to its box (a uint8 0/1
    array; :func:`dumps` writes it as rows), the box as ``bounds`` and the largest outer
    contour as ``points``. An empty mask answers a 1x1 zero crop at the origin and no
    points."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return {"mask": np.zeros((1, 1), np.uint8), "bounds": [0, 0, 0, 0], "points": []}
    left, top, right, bottom = int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])
    crop = mask[top : bottom + 1, left : right + 1].astype(np.uint8)
    polys = mask_polygons(mask)
    points = [[int(x), int(y)] for x, y in polys[0]] if polys else []
    return {"mask": crop, "bounds": [left, top, right, bottom], "points": points}


def _rows_json(crop: np.ndarray) -> bytes:
    """``[[0,1,...],[...]]`` of a 0/1 uint8 array, written by numpy (``tolist`` and
    ``json.dumps`` of a 1000 x 1000 crop take a second; this, milliseconds)."""
    h, w = crop.shape
    row = 2 * w + 2  # "[" digit "," digit ... "]" ","
    buf = np.full((h, row), ord(","), np.uint8)
    buf[:, 0] = ord("[")
    buf[:, 1 : 2 * w : 2] = crop + ord("0")
    buf[:, 2 * w] = ord("]")
    return b"[" + buf.tobytes()[:-1] + b"]"


def dumps(answer: dict[str, Any]) -> bytes:
    """The JSON of an answer of :func:`interact` (its ``mask`` an array or rows)."""
    mask = answer.get("mask")
    if not isinstance(mask, np.ndarray):
        return json.dumps(answer).encode()
    rest = json.dumps({k: v for k, v in answer.items() if k != "mask"}).encode()
    return b'{"mask":' + _rows_json(mask) + b"," + rest[1:]


def interact(session: ModelSession, body: Any) -> dict[str, Any]:
    """One interaction: CVAT's request in, CVAT's answer out (plus the mask's predicted IoU
    as ``score``, which CVAT ignores)."""
    image, pos, neg, box = parse(body)
    if not pos and box is None:
        raise Unprocessable(
            "give at least one positive point or a box: negative points alone do not "
            "select an object"
        )
    rgb = session.image_from_base64(image)
    points = pos + neg
    labels = [1] * len(pos) + [0] * len(neg)
    mask, score = session.best_mask(rgb, points=points, labels=labels, box=box)
    return {**crop_answer(mask), "score": round(score, 5)}


def handle(session: ModelSession, body: Any) -> tuple[int, bytes]:
    """``(status, JSON body)`` for a raw request body (bytes, text or parsed JSON, as a
    Nuclio event gives it): the answer of :func:`interact`, or ``{"detail": reason}`` with
    the error's status. What the Nuclio handler (``deploy/cvat/main.py``) calls."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError:
            return 400, dumps({"detail": "malformed JSON"})
    try:
        return 200, dumps(interact(session, body))
    except ServiceError as exc:
        log.info("cvat interaction refused (%d): %s", exc.status, exc.message)
        return exc.status, dumps({"detail": exc.message})


def router(session: ModelSession) -> APIRouter:
    """``POST /cvat``: one interaction (the body CVAT sends a Nuclio interactor);
    ``GET /cvat``: the interactor's spec; ``GET /cvat/health``."""
    r = APIRouter(tags=["CVAT"])

    async def call(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("malformed JSON") from None
        answer = await run_in_threadpool(interact, session, body)
        return Response(dumps(answer), media_type="application/json")

    r.add_api_route("", call, methods=["POST"], summary="interactor call")
    r.add_api_route("/", call, methods=["POST"], include_in_schema=False)

    @r.get("")
    def spec() -> dict[str, Any]:
        return {**SPEC, "name": f"segany {session.name}", "model_id": session.model_id}

    @r.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": session.name}

    return r
