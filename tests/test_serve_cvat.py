"""CVAT's interactor contract on ``segany serve`` (``POST /cvat``) and in the Nuclio handler
(``deploy/cvat/main.py``).

Request and answer shapes from CVAT's sources (github.com/cvat-ai/cvat):
- request: ``cvat/apps/lambda_manager/views.py`` at 024777ef335b88170d8a23d427528629c5f83941
  (``LambdaFunction.invoke``, interactor: ``image`` base64 of the frame, ``pos_points``,
  ``neg_points``, ``obj_bbox`` = two corners or null);
- answer: ``cvat-ui/src/components/annotation-page/standard-workspace/controls-side-bar/
  tools-control.tsx`` at 298b6166636d5defe3d95e5585fa51fd0347856b (``mask`` rows,
  ``bounds`` [left, top, right, bottom], ``points`` the polygon);
- the function's declaration: ``serverless/pytorch/facebookresearch/sam/nuclio/function.yaml``
  (``type: interactor``, ``version: 2``, ``min_pos_points: 0``, ``startswith_box_optional``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from segany.integrations import cvat
from segany.integrations.core import ModelSession
from segany.models.registry import MODEL_CONFIG_KEY, custom_config
from segany.predictor import Predictor

from .conftest import REPO, tiny_sam
from .serve_common import RECT, b64, client, cvat_decode, frame, reference_mask, tiny_session

H, W = 96, 144


@pytest.fixture(scope="module")
def session() -> ModelSession:
    return tiny_session()


@pytest.fixture(scope="module")
def http(session):
    return client(session)


def test_click_answers_the_predictors_mask_in_cvats_shape(http, session):
    img = frame()
    r = http.post("/cvat", json={"image": b64(img), "pos_points": [[60, 40]], "neg_points": []})
    assert r.status_code == 200
    answer = r.json()
    assert set(answer) == {"mask", "bounds", "points", "score"}
    want, score = reference_mask(session.model, img, points=[[60, 40]], labels=[1])
    assert want.any()
    np.testing.assert_array_equal(cvat_decode(answer, H, W), want)
    ys, xs = np.nonzero(want)
    assert answer["bounds"] == [xs.min(), ys.min(), xs.max(), ys.max()]
    assert answer["score"] == pytest.approx(score, abs=1e-5)
    assert len(answer["points"]) >= 3 and all(len(p) == 2 for p in answer["points"])


def test_box_corners_in_any_order_and_points(http, session):
    img = frame()
    body = {
        "image": b64(img),
        "pos_points": [[60, 40]],
        "neg_points": [[5, 5]],
        "obj_bbox": [[89, 59], [30, 20]],  # corners as dragged from bottom right
    }
    answer = http.post("/cvat", json=body).json()
    want, _ = reference_mask(
        session.model, img, points=[[60, 40], [5, 5]], labels=[1, 0], box=[30, 20, 89, 59]
    )
    np.testing.assert_array_equal(cvat_decode(answer, H, W), want)


def test_box_alone_and_flat_box(http, session):
    img = frame()
    want, _ = reference_mask(session.model, img, box=list(RECT))
    for box in ([[30, 20], [89, 59]], list(RECT)):
        body = {"image": b64(img), "pos_points": [], "neg_points": [], "obj_bbox": box}
        answer = http.post("/cvat", json=body).json()
        np.testing.assert_array_equal(cvat_decode(answer, H, W), want)


def test_missing_box_key_and_data_uri(http, session):
    img = frame()
    body = {
        "image": "data:image/png;base64," + b64(img),
        "pos_points": [[60, 40], [70, 30]],
        "neg_points": [[120, 80]],
    }  # no obj_bbox at all (older CVAT without startswith_box)
    answer = http.post("/cvat", json=body).json()
    want, _ = reference_mask(
        session.model, img, points=[[60, 40], [70, 30], [120, 80]], labels=[1, 1, 0]
    )
    np.testing.assert_array_equal(cvat_decode(answer, H, W), want)


def test_negative_points_only_is_refused_with_the_reason(http):
    body = {"image": b64(frame()), "pos_points": [], "neg_points": [[5, 5]], "obj_bbox": None}
    r = http.post("/cvat", json=body)
    assert r.status_code == 422
    assert "negative points alone" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"pos_points": [[1, 1]], "neg_points": []}, 400, "image: missing"),
        ({"image": "%%%not base64", "pos_points": [[1, 1]]}, 400, "not valid base64"),
        ({"image": "aGVsbG8gd29ybGQ=", "pos_points": [[1, 1]]}, 422, "cannot read image"),
        ({"image": "", "pos_points": [[1, 1]]}, 400, "image: empty"),
        ({"image": 12, "pos_points": [[1, 1]]}, 400, "expected a base64 string"),
        ({"image": "AAAA", "pos_points": [[1]]}, 400, "pos_points[0]: expected [x, y]"),
        ({"image": "AAAA", "pos_points": [["a", 1]]}, 400, "must be numbers"),
        ({"image": "AAAA", "pos_points": [[1, 1]], "obj_bbox": [[1, 2]]}, 400, "two corners"),
        ([1, 2], 400, "expected a JSON object"),
    ],
)
def test_malformed_requests(http, body, status, words):
    r = http.post("/cvat", json=body)
    assert r.status_code == status
    assert words in r.json()["detail"]


def test_point_outside_the_frame_and_malformed_json(http):
    r = http.post("/cvat", json={"image": b64(frame()), "pos_points": [[500, 40]]})
    assert r.status_code == 422 and "outside" in r.json()["detail"]
    r = http.post("/cvat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json() == {"detail": "malformed JSON"}


def test_empty_mask_and_small_crops_as_json():
    def answer(m):
        return json.loads(cvat.dumps(cvat.crop_answer(m)))

    assert answer(np.zeros((4, 5), bool)) == {"mask": [[0]], "bounds": [0, 0, 0, 0], "points": []}
    m = np.zeros((4, 5), bool)
    m[1:3, 2:5] = True
    a = answer(m)
    assert a["bounds"] == [2, 1, 4, 2] and a["mask"] == [[1, 1, 1], [1, 1, 1]]
    assert sorted(map(tuple, a["points"])) == [(2, 1), (2, 2), (4, 1), (4, 2)]
    m = np.zeros((3, 3), bool)
    m[0, 0] = m[2, 2] = True  # two pixels: the crop has holes, one contour too small
    a = answer(m)
    assert a["mask"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]] and a["bounds"] == [0, 0, 2, 2]
    assert a["points"] == []


def test_spec_route(http):
    spec = http.get("/cvat").json()
    assert spec["kind"] == "interactor" and spec["version"] == 2
    assert spec["min_pos_points"] == 0 and spec["startswith_box_optional"] is True


@pytest.mark.weights
def test_mobile_sam_click_selects_the_rectangle(mobile_sam):
    """A real click: MobileSAM's mask is the red rectangle (corner pixels aside)."""
    s = ModelSession(Predictor(mobile_sam), name="mobile_sam")
    img = frame()
    answer = (
        client(s)
        .post("/cvat", json={"image": b64(img), "pos_points": [[60, 40]], "neg_points": []})
        .json()
    )
    assert answer["bounds"] == list(RECT)
    mask = cvat_decode(answer, H, W)
    assert 2390 <= mask.sum() <= 2400  # 60 x 40 = 2400
    xs = sorted({x for x, _ in answer["points"]})
    ys = sorted({y for _, y in answer["points"]})
    assert xs[0] == 30 and xs[-1] == 89 and ys[0] == 20 and ys[-1] == 59


# -- the Nuclio function -----------------------------------------------------------------------
class _Response:
    def __init__(self, body, headers, content_type, status_code):
        self.body, self.headers = body, headers
        self.content_type, self.status_code = content_type, status_code


def _context():
    logs = []
    logger = types.SimpleNamespace(
        info=lambda m: logs.append(("info", m)), warn=lambda m: logs.append(("warn", m))
    )
    return types.SimpleNamespace(
        logger=logger, user_data=types.SimpleNamespace(), Response=_Response, logs=logs
    )


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    """The tiny SAM as a checkpoint file that names its size (loaded by path)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_sam.pt"
    config = custom_config(
        "vit_custom",
        embed_dim=32,
        depth=2,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=4,
        img_size=128,
    )
    torch.save({"model": tiny_sam().state_dict(), MODEL_CONFIG_KEY: config}, path)
    return path


def test_function_yaml_declares_an_interactor_calling_the_handler():
    text = (REPO / "deploy" / "cvat" / "function.yaml").read_text()
    for line in (
        "type: interactor",
        "version: 2",
        "min_pos_points: 0",
        "startswith_box_optional: true",
        "handler: main:handler",
    ):
        assert line in text


def test_nuclio_handler_runs_without_nuclio(tiny_file, monkeypatch, tmp_path):
    monkeypatch.setenv("SEGANY_MODEL", str(tiny_file))
    monkeypatch.setenv("SEGANY_CACHE_DIR", str(tmp_path / "emb"))
    spec = importlib.util.spec_from_file_location(
        "segany_cvat_nuclio_main", REPO / "deploy" / "cvat" / "main.py"
    )
    main = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, main)
    spec.loader.exec_module(main)
    ctx = _context()
    main.init_context(ctx)
    assert ctx.user_data.session.name == "tiny_sam.pt"

    img = frame()
    body = {"image": b64(img), "pos_points": [[60, 40]], "neg_points": [], "obj_bbox": None}
    # nuclio hands the body over as bytes (or parsed JSON): both work
    for raw in (json.dumps(body).encode(), body):
        resp = main.handler(ctx, types.SimpleNamespace(body=raw))
        assert resp.status_code == 200 and resp.content_type == "application/json"
        answer = json.loads(resp.body)
        want, _ = reference_mask(ctx.user_data.session.model, img, points=[[60, 40]], labels=[1])
        np.testing.assert_array_equal(cvat_decode(answer, H, W), want)
    assert len(list((tmp_path / "emb").glob("*.pt"))) == 1  # embedded once, on disk

    resp = main.handler(ctx, types.SimpleNamespace(body=b'{"image": "@@", "pos_points": [[1, 1]]}'))
    assert resp.status_code == 400
    assert json.loads(resp.body) == {"detail": "image: not valid base64"}
    assert ctx.logs[-1][0] == "warn"
