"""Label Studio's ML backend contract without Label Studio (fast; the real server is in
test_labelstudio_real.py).

Shapes are those of HumanSignal/label-studio-ml-backend:
- ``label_studio_ml/api.py``: ``/predict`` reads ``tasks``, ``label_config``, ``project``
  (``"<id>.<created>"``) and ``params.context`` and answers ``{"results": [...]}``;
  ``/setup`` reads ``project``, ``schema``, ``extra_params`` and answers
  ``{"model_version"}``; ``/webhook`` answers 201 ``{"result", "status": "ok"}`` for
  ``ANNOTATION_CREATED / UPDATED / DELETED / START_TRAINING`` and 200
  ``{"status": "Unknown event"}`` otherwise; ``/health`` ``{"status": "UP", "model_class"}``;
- ``label_studio_ml/exceptions.py``: errors as ``{"status", "detail", ...}``;
- ``label_studio_ml/examples/segment_anything_model/model.py``: the smart keypoint context
  (``value.x / y`` in percent, ``is_positive``, ``original_width / height``), rectangles
  (``x, y, width, height`` in percent) and the brush region it answers
  (``value: {format: "rle", rle, brushlabels}``, ``type: "brushlabels"``);
and of Label Studio 1.23's ``ml/api_connector.py`` (``/setup`` also sends ``hostname`` and
``access_token``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from segany.integrations.labelstudio import brush
from segany.integrations.labelstudio.config import ConfigError, parse_label_config
from segany.integrations.labelstudio.predict import parse_context

from ..conftest import TEST_DATA, tiny_sam
from .lsfake import LEGACY, PAT, fake_label_studio, png_bytes

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Banana" background="#FF0000"/>
    <Label value="Orange" background="#0d14d3" predicted_values="orange, tangerine"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana" background="#000000" showInline="true"/>
    <Label value="Orange" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>"""
POLYGON_CONFIG = BRUSH_CONFIG.replace("BrushLabels", "PolygonLabels")
H, W = 96, 144


# -- brush RLE -----------------------------------------------------------------------------------
def test_brush_header_and_chunk_bits_by_hand() -> None:
    # 2x3 empty mask: 24 RGBA values; header 24 (32 bits), word 8 -> 7 (5 bits), widths
    # 4, 8, 12, 16 -> 3, 7, 11, 15 (4 bits each); one run chunk: 1, width #1 (01), 23 in 8
    # bits, value 0 in 8 bits; zero padding to 72 bits
    assert brush.mask_to_rle(np.zeros((2, 3), bool)) == [0, 0, 0, 24, 57, 189, 253, 23, 0]
    assert brush.decode_rle([0, 0, 0, 24, 57, 189, 253, 23, 0]).tolist() == [0] * 24


def test_brush_decodes_label_studios_own_encoder() -> None:
    # made by label_studio_converter 0.0.59's brush.mask2rle (literal chunks, widths 3,4,8,16)
    cases = json.loads((TEST_DATA / "labelstudio_brush_rle.json").read_text())["cases"]
    for c in cases:
        want = np.array([[ch == "1" for ch in row] for row in c["mask_rows"]])
        got = brush.rle_to_mask(c["rle"], c["height"], c["width"])
        assert got.shape == (c["height"], c["width"]) and (got == want).all()


@pytest.mark.parametrize("shape", [(1, 1), (97, 131), (300, 301), (3, 40000)])
def test_brush_round_trip(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0])
    masks = [np.ones(shape, bool), np.zeros(shape, bool)]  # runs past 2**16 values are split
    if shape[0] * shape[1] < 20000:
        masks.append(rng.random(shape) > 0.5)  # a chunk per pixel
    for mask in masks:
        rle = brush.mask_to_rle(mask)
        assert all(0 <= b <= 255 for b in rle)
        flat = brush.decode_rle(rle)
        assert flat.size == mask.size * 4 and set(np.unique(flat).tolist()) <= {0, 255}
        assert (brush.rle_to_mask(rle, *shape) == mask).all()


def test_brush_errors() -> None:
    rle = brush.mask_to_rle(np.ones((4, 5), bool))
    with pytest.raises(brush.BrushError, match="not a mask of this image"):
        brush.rle_to_mask(rle, 5, 4 + 1)
    with pytest.raises(brush.BrushError, match="ends early"):
        brush.decode_rle(rle[:6])
    with pytest.raises(brush.BrushError, match="bytes"):
        brush.decode_rle([0, 300])


# -- label config ----------------------------------------------------------------------------------
def test_label_config() -> None:
    cfg = parse_label_config(BRUSH_CONFIG)
    assert cfg.images == {"image": "image"}
    out = cfg.output_for()
    assert (out.name, out.tag, out.to_name, out.labels) == ("tag", "BrushLabels", "image",
                                                            ("Banana", "Orange"))  # fmt: skip
    assert out.label_for("tangerine") == "Orange" and out.label_for("banana") == "Banana"
    assert out.label_for("Cat") == "Banana"  # unknown: the first label
    assert cfg.control("tag2").smart and cfg.control("tag2").result_type == "keypointlabels"
    assert parse_label_config(POLYGON_CONFIG).output_for().tag == "PolygonLabels"
    both = BRUSH_CONFIG.replace("</View>", '<PolygonLabels name="p" toName="image"/></View>')
    assert parse_label_config(both).output_for().tag == "BrushLabels"  # brush first
    with pytest.raises(ConfigError, match="no <Image"):
        parse_label_config("<View><Text name='t' value='$text'/></View>")
    with pytest.raises(ConfigError, match="DOCTYPE"):
        parse_label_config('<!DOCTYPE x [<!ENTITY a "b">]><View/>')
    with pytest.raises(ConfigError, match="not valid XML"):
        parse_label_config("<View>")
    with pytest.raises(ConfigError, match="no BrushLabels or PolygonLabels"):
        parse_label_config(BRUSH_CONFIG.replace("BrushLabels", "Choices")).output_for()


# -- context: percent -> pixels ----------------------------------------------------------------
def _kp(x: float, y: float, positive: bool = True, label: str = "Banana") -> dict:
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.3, "keypointlabels": [label]},
            "is_positive": positive, "id": "k", "from_name": "tag2", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}  # fmt: skip


def _rect(x: float, y: float, w: float, h: float) -> dict:
    return {"original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": ["Banana"]},
            "id": "r", "from_name": "tag3", "to_name": "image",
            "type": "rectanglelabels"}  # fmt: skip


def test_rotated_rectangle_gives_the_box_around_its_corners() -> None:
    """Label Studio turns a rectangle clockwise about its top-left corner (x, y); SAM gets
    the axis-aligned box around the turned corners, clipped to the image."""
    r = _rect(50, 50, 10, 20)  # in pixels of 144 x 96: x 72, y 48, 14.4 x 19.2
    r["value"]["rotation"] = 90  # clockwise: the sides run down and to the left
    assert parse_context({"result": [r]}, (H, W)).box == pytest.approx([52.8, 48.0, 72.0, 62.4])
    r["value"]["rotation"] = 180
    assert parse_context({"result": [r]}, (H, W)).box == pytest.approx([57.6, 28.8, 72.0, 48.0])
    r["value"]["rotation"] = 45
    s = math.sqrt(0.5)
    box = parse_context({"result": [r]}, (H, W)).box
    assert box == pytest.approx([72 - 19.2 * s, 48.0, 72 + 14.4 * s, 48 + (14.4 + 19.2) * s])
    big = _rect(80, 80, 50, 50)
    big["value"]["rotation"] = 30
    assert parse_context({"result": [big]}, (H, W)).box[2:] == [W, H]  # clipped
    r["value"]["rotation"] = "a lot"
    with pytest.raises(Exception, match="rotation must be a finite number"):
        parse_context({"result": [r]}, (H, W))


def test_context_percent_to_pixels() -> None:
    p = parse_context({"result": [_kp(25, 50), _kp(50, 12.5, positive=False)]}, (H, W))
    assert p.points == [[36.0, 48.0], [72.0, 12.0]] and p.labels == [1, 0] and p.box is None
    p = parse_context({"result": [_rect(10, 20, 50, 25)]}, (H, W))
    assert p.box == pytest.approx([14.4, 19.2, 86.4, 43.2]) and p.points == []
    # the image as decoded is twice Label Studio's size: percentages are of the image
    p = parse_context({"result": [_kp(25, 50)]}, (2 * H, 2 * W))
    assert p.points == [[72.0, 96.0]]
    # without the image size, original_width / original_height
    assert parse_context({"result": [_kp(25, 50)]}).points == [[36.0, 48.0]]
    assert parse_context({"result": [_kp(10, 10, False)]}, (H, W)).negative_only


# -- the routes over a recording session ---------------------------------------------------------
class StubSession:
    """Records the prompts; answers a fixed rectangle mask (rows 24..71, cols 36..107)."""

    name, model_id, backend_name, detector_name = "stub", "0123456789abcdef", "torch", None

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def read_image(self, data: bytes) -> np.ndarray:
        from segany.transforms import load_image

        return load_image(data)

    def best_mask(self, rgb, *, points=(), labels=(), box=None):
        self.calls.append({"points": points, "labels": labels, "box": box})
        mask = np.zeros(rgb.shape[:2], bool)
        mask[24:72, 36:108] = True
        return mask, 0.875


def _app(session, **options):
    from segany.integrations.app import create_app

    return create_app(session, **options)


@pytest.fixture()
def ls_image():
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[24:72, 36:108] = (200, 40, 40)
    with fake_label_studio() as (fake, url):
        fake.files["/data/upload/1/img.png"] = png_bytes(rgb)
        fake.files["/data/local-files/?d=pics/img.png"] = png_bytes(rgb)
        yield fake, url


def _router_client(session, **options):
    """The router alone in an app (to reach its backend's options and state)."""
    from fastapi import FastAPI

    from segany.integrations.labelstudio import router

    r = router(session, **options)
    app = FastAPI()
    app.include_router(r, prefix="/labelstudio")
    return TestClient(app, base_url="http://127.0.0.1"), r.backend


def _predict_body(context=None, config=BRUSH_CONFIG, image="/data/upload/1/img.png"):
    return {
        "tasks": [{"id": 7, "data": {"image": image}, "project": 1}],
        "label_config": config,
        "project": "1.1700000000",
        "params": {"login": None, "password": None, "context": context},
    }


def _client(monkeypatch, url: str | None, key: str | None, session=None, **opts):
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY",
                "LABEL_STUDIO_ACCESS_TOKEN"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    if url:
        monkeypatch.setenv("LABEL_STUDIO_URL", url)
    if key:
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", key)
    session = session or StubSession()
    return TestClient(_app(session, **opts), base_url="http://127.0.0.1"), session


def test_interactive_keypoints_answer_a_brush(monkeypatch, ls_image) -> None:
    fake, url = ls_image
    client, session = _client(monkeypatch, url, LEGACY)
    ctx = {"result": [_kp(50, 50), _kp(10, 10, positive=False)]}
    r = client.post("/labelstudio/predict", json=_predict_body(ctx))
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["results"] and len(body["results"]) == 1
    pred = body["results"][0]
    assert set(pred) == {"result", "score", "model_version"}
    assert pred["model_version"] == "segany-stub-01234567" and pred["score"] == 0.875
    (region,) = pred["result"]
    assert set(region) == {"id", "from_name", "to_name", "original_width", "original_height",
                           "image_rotation", "value", "score", "type", "readonly"}  # fmt: skip
    assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image",
                                                                       "brushlabels")  # fmt: skip
    assert (region["original_width"], region["original_height"]) == (W, H)
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Banana"]
    want = np.zeros((H, W), bool)
    want[24:72, 36:108] = True
    assert (brush.rle_to_mask(region["value"]["rle"], H, W) == want).all()
    assert session.calls == [{"points": [[72.0, 48.0], [14.4, 9.6]], "labels": [1, 0],
                              "box": None}]  # fmt: skip
    assert fake.requests[-1] == ("GET", "/data/upload/1/img.png", f"Token {LEGACY}")
    # a second click on the same task reads no image again
    client.post("/labelstudio/predict", json=_predict_body({"result": [_kp(20, 20)]}))
    assert sum(1 for m, p, _ in fake.requests if p == "/data/upload/1/img.png") == 1


def test_interactive_rectangle_and_label_choice(monkeypatch, ls_image) -> None:
    _, url = ls_image
    client, session = _client(monkeypatch, url, LEGACY)
    ctx = {"result": [_rect(25, 25, 50, 50), _kp(50, 50, label="Orange")]}
    r = client.post("/labelstudio/predict", json=_predict_body(ctx))
    assert r.status_code == 200
    assert session.calls[0]["box"] == [36.0, 24.0, 108.0, 72.0]
    assert r.json()["results"][0]["result"][0]["value"]["brushlabels"] == ["Orange"]


def test_negative_keypoints_only_select_nothing(monkeypatch, ls_image) -> None:
    _, url = ls_image
    client, session = _client(monkeypatch, url, LEGACY)
    ctx = {"result": [_kp(10, 10, positive=False), _kp(90, 90, positive=False)]}
    r = client.post("/labelstudio/predict", json=_predict_body(ctx))
    assert r.status_code == 200
    assert r.json()["results"] == [{"result": [], "score": 0.0,
                                    "model_version": "segany-stub-01234567"}]  # fmt: skip
    assert session.calls == []


def test_polygon_config_answers_polygons_in_percent(monkeypatch, ls_image) -> None:
    _, url = ls_image
    client, _ = _client(monkeypatch, url, LEGACY)
    r = client.post("/labelstudio/predict", json=_predict_body({"result": [_kp(50, 50)]},
                                                               config=POLYGON_CONFIG))  # fmt: skip
    (region,) = r.json()["results"][0]["result"]
    assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Banana"]
    assert region["value"]["closed"] is True
    # the mask's corner pixels (36, 24), (107, 71) in percent of 144 x 96
    corners = {(25.0, 25.0), (25.0, 73.9583), (74.3056, 73.9583), (74.3056, 25.0)}
    assert {tuple(p) for p in region["value"]["points"]} == corners


def test_local_files_url_and_pat(monkeypatch, ls_image) -> None:
    fake, url = ls_image
    client, _ = _client(monkeypatch, url, PAT)
    body = _predict_body({"result": [_kp(50, 50)]}, image="/data/local-files/?d=pics/img.png")
    assert client.post("/labelstudio/predict", json=body).status_code == 200
    assert ("POST", "/api/token/refresh/", None) in fake.requests
    assert fake.requests[-1] == ("GET", "/data/local-files/?d=pics/img.png", "Bearer access-abc")


def test_setup_gives_the_url_and_key(monkeypatch, ls_image) -> None:
    """Label Studio sends its address and the project owner's token to /setup: with nothing
    in segany's environment, images are read with those."""
    fake, url = ls_image
    client, _ = _client(monkeypatch, None, None)
    r = client.post("/labelstudio/setup", json={
        "project": "1.1700000000", "schema": BRUSH_CONFIG, "hostname": url,
        "access_token": LEGACY, "extra_params": None})  # fmt: skip
    assert r.status_code == 200 and r.json() == {"model_version": "segany-stub-01234567"}
    r = client.post("/labelstudio/predict", json=_predict_body({"result": [_kp(50, 50)]}))
    assert r.status_code == 200 and r.json()["results"][0]["result"]


def test_no_url_no_key_bad_key_bad_path_are_clear(monkeypatch, ls_image) -> None:
    fake, url = ls_image
    body = _predict_body({"result": [_kp(50, 50)]})
    client, _ = _client(monkeypatch, None, None)
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 424
    assert r.json()["status"] == 424 and "set LABEL_STUDIO_URL" in r.json()["detail"]
    health = client.get("/labelstudio/health").json()
    assert "LABEL_STUDIO_URL" in health["last_error"]["message"]

    client, _ = _client(monkeypatch, url, None)
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 424 and "has no API key" in r.json()["detail"]
    assert "LABEL_STUDIO_API_KEY" in r.json()["detail"]

    client, _ = _client(monkeypatch, url, "wrong-legacy-key")
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 424 and "refused" in r.json()["detail"]
    assert "legacy token" in r.json()["detail"]

    client, _ = _client(monkeypatch, url, LEGACY)
    r = client.post(
        "/labelstudio/predict",
        json=_predict_body(body["params"]["context"], image="/data/upload/9/gone.png"),
    )
    assert r.status_code == 424 and "not found" in r.json()["detail"]

    client, _ = _client(monkeypatch, "http://127.0.0.1:9", LEGACY)  # nothing listens
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 502 and "cannot reach Label Studio" in r.json()["detail"]

    client, _ = _client(monkeypatch, url, LEGACY)
    r = client.post(
        "/labelstudio/predict", json=_predict_body(body["params"]["context"], image="ftp-nonsense")
    )
    assert r.status_code == 422 and "cannot read the image" in r.json()["detail"]


def test_bad_requests(monkeypatch, ls_image) -> None:
    _, url = ls_image
    client, _ = _client(monkeypatch, url, LEGACY)
    r = client.post("/labelstudio/predict", content=b"{not json",
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["detail"] == "the body is not JSON"
    r = client.post("/labelstudio/predict", json={"tasks": [], "label_config": BRUSH_CONFIG})
    assert r.status_code == 400 and "tasks" in r.json()["detail"]
    body = _predict_body({"result": [_kp(50, 50)]}, config="<View><Image name='i'/></View>")
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 422 and "no <Image" in r.json()["detail"]
    bad = _kp(50, 50)
    bad["value"]["x"] = "left"
    r = client.post("/labelstudio/predict", json=_predict_body({"result": [bad]}))
    assert r.status_code == 422 and "x must be a finite number" in r.json()["detail"]
    body = _predict_body({"result": [_kp(50, 50)]})
    body["tasks"][0]["data"] = {"img": "/data/upload/1/img.png"}
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 422 and "no image under data.image" in r.json()["detail"]


def test_oversized_body_is_refused(monkeypatch, ls_image) -> None:
    _, url = ls_image
    client, session = _client(monkeypatch, url, LEGACY, max_body=4096)
    body = _predict_body({"result": [_kp(50, 50)] * 40})
    assert len(json.dumps(body)) > 4096
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 413 and session.calls == []


def test_health_setup_webhook_shapes(monkeypatch) -> None:
    client, _ = _client(monkeypatch, None, None)
    h = client.get("/labelstudio/health").json()
    assert h["status"] == "UP" and h["model_class"] == "segany"
    assert client.get("/labelstudio/").json()["status"] == "UP"
    assert client.get("/labelstudio/metrics").json() == {}
    r = client.post("/labelstudio/webhook", json={"action": "TASKS_CREATED", "project": {"id": 1}})
    assert r.status_code == 200 and r.json() == {"status": "Unknown event"}
    project = {"id": 1, "label_config": BRUSH_CONFIG}
    r = client.post(
        "/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "project": project}
    )
    assert r.status_code == 201 and r.json()["status"] == "ok"
    assert r.json()["result"] == {"queued": False, "events": 1}  # train_every = 0
    r = client.post("/labelstudio/setup", json={"project": "1.1", "schema": "<View>"})
    assert r.status_code == 422 and "not valid XML" in r.json()["detail"]


def test_preannotation_modes(monkeypatch, ls_image, tiny_model) -> None:
    from segany.integrations.core import ModelSession
    from segany.predictor import Predictor

    _, url = ls_image
    session = ModelSession(Predictor(tiny_model, model_id="tiny"), name="tiny")
    _client(monkeypatch, url, LEGACY)  # the environment
    loose = {
        "preset": "reference",
        "points_per_side": 4,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "max_masks": 3,
    }  # a random tiny model's masks
    client, _ = _router_client(session, everything=loose)
    body = _predict_body(None)
    body["tasks"].append({"id": 8, "data": {"image": "/data/local-files/?d=pics/img.png"}})
    r = client.post("/labelstudio/predict", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2  # one prediction per task, as Label Studio requires
    for pred in results:
        assert pred["model_version"] == "segany-tiny-tiny"
        for region in pred["result"]:
            assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Banana"]
            assert brush.rle_to_mask(region["value"]["rle"], H, W).any()
    assert 1 <= len(results[0]["result"]) <= 3
    assert len(results[0]["result"]) == len(results[1]["result"])  # the same image
    # a project's extra params turn it off
    client.post("/labelstudio/setup", json={"project": "1.1700000000", "schema": BRUSH_CONFIG,
                                            "extra_params": '{"preannotate": "off"}'})  # fmt: skip
    r = client.post("/labelstudio/predict", json=body)
    assert [p["result"] for p in r.json()["results"]] == [[], []]


# -- the real (tiny) model, end to end inside segany ---------------------------------------------
def test_click_through_the_model_decodes_to_the_models_mask(monkeypatch, ls_image, tiny_model):
    from segany.integrations.core import ModelSession
    from segany.predictor import Predictor

    _, url = ls_image
    session = ModelSession(Predictor(tiny_model, model_id="tiny"), name="tiny")
    client, _ = _client(monkeypatch, url, LEGACY, session=session)
    r = client.post("/labelstudio/predict", json=_predict_body({"result": [_kp(50, 50)]}))
    region = r.json()["results"][0]["result"][0]
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[24:72, 36:108] = (200, 40, 40)
    want, score = session.best_mask(rgb, points=[[72.0, 48.0]], labels=[1])
    assert (brush.rle_to_mask(region["value"]["rle"], H, W) == want).all()
    assert region["score"] == pytest.approx(min(1.0, max(0.0, score)))


def test_start_training_fine_tunes_and_switches(monkeypatch, ls_image, tmp_path: Path) -> None:
    from segany.integrations.core import ModelSession
    from segany.predictor import Predictor

    fake, url = ls_image
    base = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), base)
    session = ModelSession(Predictor(tiny_sam(), model_id="tiny"), name="tiny.pt")
    session.model_source = str(base)
    mask = np.zeros((H, W), bool)
    mask[24:72, 36:108] = True
    fake.export = [
        {"id": 7, "data": {"image": "/data/upload/1/img.png"}, "annotations": [
            {"id": 1, "was_cancelled": False, "result": [
                {"type": "brushlabels", "from_name": "tag", "to_name": "image",
                 "original_width": W, "original_height": H,
                 "value": {"format": "rle", "rle": brush.mask_to_rle(mask),
                           "brushlabels": ["Banana"]}},
                {"type": "polygonlabels", "from_name": "p", "to_name": "image",
                 "original_width": W, "original_height": H,
                 "value": {"points": [[5, 5], [20, 5], [20, 20]], "polygonlabels": ["Orange"]}}]},
            {"id": 2, "was_cancelled": True, "result": [
                {"type": "brushlabels", "original_width": W, "original_height": H,
                 "value": {"format": "rle", "rle": brush.mask_to_rle(~mask)}}]}]},
        {"id": 8, "data": {"image": "/data/upload/1/img.png"}, "annotations": []},
    ]  # fmt: skip
    recipe = {"steps": 2, "images_per_step": 1, "masks_per_image": 2, "point_rounds": 0,
              "empty_rounds": 0, "warmup_steps": 1, "log_every": 1}  # fmt: skip
    _client(monkeypatch, url, LEGACY)  # the environment
    client, backend = _router_client(session, train_overrides=recipe, models_dir=tmp_path / "m")
    monkeypatch.setenv("SEGANY_BACKEND", "torch")
    before = backend.model_version
    project = {"id": 1, "label_config": BRUSH_CONFIG}
    r = client.post("/labelstudio/webhook", json={"action": "START_TRAINING", "project": project})
    assert r.status_code == 201 and r.json()["result"]["started"] is True
    assert backend.job.wait(300)
    status = client.get("/labelstudio/train/status").json()
    assert status["state"] == "done", status
    assert status["masks"] == 2 and status["steps"] == 2 and status["step"] == 2
    assert Path(status["result"]["checkpoint"]).is_file()
    assert status["result"]["base_model"] == str(base)
    assert backend.model_version != before == "segany-tiny.pt-tiny"
    assert session.name == Path(status["result"]["checkpoint"]).name
    assert any(p == "/api/projects/1/export?exportType=JSON&download_all_tasks=false"
               for _, p, _ in fake.requests)  # fmt: skip
    # clicks are answered by the new model
    r = client.post("/labelstudio/predict", json=_predict_body({"result": [_kp(50, 50)]}))
    assert r.json()["results"][0]["model_version"] == backend.model_version
