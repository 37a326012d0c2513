"""X-AnyLabeling's remote server contract on ``segany serve`` (``/xanylabeling``).

Shapes from the client, github.com/CVHub520/X-AnyLabeling at
87da33999c3d146ae38d1cd0a4f6c328f3908406, ``anylabeling/services/auto_labeling/
remote_server.py`` (``Token`` header; ``GET /v1/models`` read as ``data`` -> {id: info};
``POST /v1/predict`` with ``model``, ``image`` as a data URI, ``params`` with ``marks``,
``text_prompt`` (trailing "." stripped), ``conf_threshold``, ``epsilon_factor``; shapes read
from ``data.shapes``), and the reference server, github.com/CVHub520/X-AnyLabeling-Server at
70599dc41e1d8fcb997636f0032d8403631bdc9b (``app/api/models.py``, ``app/api/predict.py``,
``app/schemas/response.py``: ``{"success": true, "data": ...}`` /
``{"success": false, "error": {"code", "message"}}``; ``app/core/middleware.py``: 401
``UNAUTHORIZED``; ``app/models/segment_anything_2.py``: point marks ``{"type": "point",
"data": [x, y], "label": 1|0}``, rectangle marks ``{"type": "rectangle", "data": [x1, y1,
x2, y2]}``, one polygon shape per contour labelled ``AUTOLABEL_OBJECT``, closed).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from segany.integrations.core import ModelSession
from segany.predictor import Predictor
from segany.text import Detections

from .serve_common import RECT, b64, client, frame, reference_mask, tiny_session

URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def session() -> ModelSession:
    return tiny_session()


@pytest.fixture(scope="module")
def http(session):
    return client(session, tokens=["sek"])


def _post(http, params, *, model="tiny", image=None, token="sek"):
    body = {"model": model, "image": image if image is not None else URI + b64(frame())}
    body["params"] = params
    return http.post("/xanylabeling/v1/predict", json=body, headers={"Token": token})


def _fill(shapes, h=96, w=144) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    for s in shapes:
        cv2.fillPoly(out, [np.round(np.asarray(s["points"])).astype(np.int32)], 1)
    return out.astype(bool)


def test_models_and_info(http):
    r = http.get("/xanylabeling/v1/models", headers={"Token": "sek"})
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and list(body["data"]) == ["tiny"]
    info = body["data"]["tiny"]
    names = [w["name"] for w in info["widgets"]]
    assert names[:5] == [
        "button_add_point",
        "button_remove_point",
        "button_add_rect",
        "button_clear",
        "button_finish_object",
    ]
    assert "edit_text" not in names  # no detector: no text box
    assert info["batch_processing_mode"] == "default"
    r = http.get("/xanylabeling/v1/models/tiny/info", headers={"Token": "sek"})
    assert r.json() == {"success": True, "data": {"model_id": "tiny", **info}}


def test_unknown_model(http):
    r = http.get("/xanylabeling/v1/models/sam3/info", headers={"Token": "sek"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "MODEL_NOT_FOUND" and r.json()["success"] is False
    r = _post(http, {"marks": [{"type": "point", "data": [60, 40], "label": 1}]}, model="sam3")
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"


def test_point_marks_give_polygons_of_the_predictors_mask(http, session):
    img = frame()
    marks = [
        {"type": "point", "data": [60, 40], "label": 1},
        {"type": "point", "data": [5, 5], "label": 0},
    ]
    r = _post(http, {"marks": marks, "epsilon_factor": 0, "conf_threshold": 0.0})
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["replace"] is False and data["description"] == ""
    want, score = reference_mask(session.model, img, points=[[60, 40], [5, 5]], labels=[1, 0])
    shapes = data["shapes"]
    assert shapes and all(s["label"] == "AUTOLABEL_OBJECT" for s in shapes)
    assert all(s["shape_type"] == "polygon" and s["points"][0] == s["points"][-1] for s in shapes)
    assert {s["score"] for s in shapes} == {round(min(max(score, 0.0), 1.0), 5)}
    # the outer contours, unsimplified, cover the mask (holes filled) but for straight
    # one-pixel lines (a contour of two points is no polygon)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(want.astype(np.uint8), connectivity=8)
    line = [min(stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT]) == 1 for k in range(n)]
    filled = _fill(shapes)
    missed = want & ~filled
    assert all(line[k] for k in np.unique(comp[missed]))
    # and nothing else but holes: background pixels not connected to the frame's border
    _, bg = cv2.connectedComponents((~want).astype(np.uint8), connectivity=4)
    border = set(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]).tolist())
    assert not set(np.unique(bg[filled & ~want]).tolist()) & border


@pytest.mark.weights
def test_rectangles_give_one_object_each(mobile_sam):
    """Two rectangle marks on two objects: one polygon each, the object's outline."""
    img = frame()
    img[62:89, 102:139] = (30, 60, 220)  # a blue object beside the red one
    http = client(ModelSession(Predictor(mobile_sam), name="mobile_sam"))
    boxes = [[29, 19, 90, 60], [101, 61, 139, 89]]
    body = {"model": "mobile_sam", "image": URI + b64(img)}
    body["params"] = {"marks": [{"type": "rectangle", "data": b} for b in boxes]}
    shapes = http.post("/xanylabeling/v1/predict", json=body).json()["data"]["shapes"]
    assert len(shapes) == 2
    spans = []
    for s in shapes:
        xs, ys = [p[0] for p in s["points"]], [p[1] for p in s["points"]]
        spans.append((min(xs), min(ys), max(xs), max(ys)))
        assert 0.9 <= s["score"] <= 1.0
    assert spans == [RECT, (102, 62, 138, 88)]


def test_no_marks_answers_no_shapes(http):
    r = _post(http, {"conf_threshold": 0.3})
    assert r.json() == {
        "success": True,
        "data": {"shapes": [], "description": "", "replace": False},
    }


@pytest.mark.parametrize(
    ("params", "image", "status", "code", "words"),
    [
        ({"marks": [{"type": "point", "data": [5, 5], "label": 0}]}, None, 422,
         "INVALID_PARAMS", "negative points alone"),
        ({"marks": [{"type": "point", "data": [1, 1]}]}, "data:image/png;base64,@@@", 400,
         "INVALID_IMAGE", "not valid base64"),
        ({"marks": [{"type": "point", "data": [1, 1]}]}, "aGVsbG8=", 422, "INVALID_IMAGE",
         "cannot read image"),
        ({"marks": [{"type": "polygon", "data": [1, 1]}]}, None, 422, "INVALID_PARAMS",
         "not 'point' or 'rectangle'"),
        ({"marks": [{"type": "point", "data": [1]}]}, None, 400, "INVALID_REQUEST",
         "2 finite numbers"),
        ({"marks": [{"type": "rectangle", "data": [1, 1, 9, 9], "label": 0}]}, None, 422,
         "INVALID_PARAMS", "negative rectangles"),
        ({"marks": "x"}, None, 400, "INVALID_REQUEST", "expected a list"),
        ({"marks": [{"type": "point", "data": [1, 1]}], "epsilon_factor": 5}, None, 400,
         "INVALID_REQUEST", "epsilon_factor"),
    ],
)  # fmt: skip
def test_errors_use_the_envelope(http, params, image, status, code, words):
    r = _post(http, params, image=image)
    assert r.status_code == status
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code
    assert words in body["error"]["message"]


def test_text_prompt_without_detector_is_a_clear_4xx(http):
    r = _post(http, {"text_prompt": "red box."})
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["code"] == "TEXT_PROMPT_UNAVAILABLE" and "--detector" in err["message"]


def test_token_header(http):
    r = _post(http, {}, token="wrong")
    assert r.status_code == 401
    assert r.json() == {
        "success": False,
        "error": {"code": "UNAUTHORIZED", "message": "unknown token"},
    }
    r = http.get("/xanylabeling/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    assert http.get("/xanylabeling/health").status_code == 200  # health needs no token


class _BoxDetector:
    """A text detector that finds the red rectangle for the query ``red box``."""

    name = "stub"

    def __init__(self):
        self.calls = []

    def detect(self, image, queries, *, box_threshold=None, text_threshold=None):
        self.calls.append((list(queries), box_threshold))
        box = np.asarray([[30, 20, 90, 60]], float)
        return Detections(box, np.asarray([0.8]), np.asarray([0]), ["red box"], list(queries))


@pytest.mark.weights
def test_text_prompt_through_the_detector(mobile_sam):
    det = _BoxDetector()
    s = ModelSession(Predictor(mobile_sam), name="mobile_sam", detector=det)
    http = client(s)
    info = http.get("/xanylabeling/v1/models").json()["data"]["mobile_sam"]
    assert "edit_text" in [w["name"] for w in info["widgets"]]
    assert info["batch_processing_mode"] == "text_prompt"
    body = {"model": "mobile_sam", "image": URI + b64(frame())}
    body["params"] = {"text_prompt": "red box.", "conf_threshold": 0.5, "epsilon_factor": 0}
    r = http.post("/xanylabeling/v1/predict", json=body)
    assert r.status_code == 200
    data = r.json()["data"]
    assert det.calls == [(["red box"], 0.5)]
    assert [s["label"] for s in data["shapes"]] == ["red box"]
    assert data["shapes"][0]["score"] == 0.8  # the detector's confidence
    xs = [p[0] for p in data["shapes"][0]["points"]]
    ys = [p[1] for p in data["shapes"][0]["points"]]
    assert (min(xs), min(ys), max(xs), max(ys)) == RECT
    assert "replace" not in data  # the client's own toggle decides
