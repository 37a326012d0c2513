"""``segany serve``: the app around the contracts (health, guards, token, logs, the shared
cache, the Label Studio mount) and the command as a real server in a subprocess."""

from __future__ import annotations

import base64
import importlib.machinery
import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
import urllib.request

import numpy as np
import pytest
import torch
from fastapi import APIRouter

from segany.integrations import app as serve_app
from segany.integrations.app import request_token
from segany.models.registry import MODEL_CONFIG_KEY, custom_config
from segany.predictor import EmbeddingCache, Predictor

from .conftest import REPO, tiny_sam
from .serve_common import b64, client, cvat_decode, frame, png_bytes, reference_mask, tiny_session

CLICK = {"pos_points": [[60, 40]], "neg_points": [], "obj_bbox": None}


def test_health_needs_no_token_and_names_the_model():
    s = tiny_session()
    http = client(s, tokens=["sek"])
    r = http.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "tiny" and body["backend"] == "torch"
    assert body["model_id"] == s.model_id
    assert {"cvat", "xanylabeling"} <= set(body["contracts"])
    assert http.get("/cvat/health").json() == {"status": "ok", "model": "tiny"}
    assert serve_app.PREFIXES == {
        "labelstudio": "/labelstudio",
        "cvat": "/cvat",
        "xanylabeling": "/xanylabeling",
    }


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({b"authorization": b"Bearer abc"}, "abc"),
        ({b"authorization": b"Token abc"}, "abc"),
        ({b"authorization": b"Basic " + base64.b64encode(b"user:abc")}, "abc"),
        ({b"token": b"abc"}, "abc"),
        ({b"x-segany-token": b"abc"}, "abc"),
        ({b"authorization": b"Basic !!"}, None),
        ({}, None),
    ],
)
def test_token_conventions(headers, token):
    assert request_token(headers) == token


def test_bad_and_missing_tokens_are_refused_before_any_work():
    s = tiny_session()
    http = client(s, tokens=["sek", "other"])
    body = {"image": b64(frame()), **CLICK}
    r = http.post("/cvat", json=body)
    assert r.status_code == 401 and "needs a token" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = http.post("/cvat", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json() == {"detail": "unknown token"}
    assert len(s.cache._memory) == 0  # nothing embedded
    r = http.post("/cvat", json=body, headers={"Authorization": "Bearer other"})
    assert r.status_code == 200


def test_oversized_body_is_413():
    http = client(tiny_session(), max_body=4096)
    body = {"image": b64(frame()), **CLICK}  # a PNG of 96 x 144 noise: about 55 kB
    r = http.post("/cvat", json=body)
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
    r = http.post("/xanylabeling/v1/predict", json={"model": "tiny", "image": body["image"]})
    assert r.status_code == 413


def test_host_and_origin_guards():
    http = client(tiny_session())
    assert http.get("/health", headers={"host": "evil.example"}).status_code == 421
    r = http.post("/cvat", json={"image": "x", **CLICK}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403


def test_one_log_line_per_request(caplog):
    http = client(tiny_session())
    with caplog.at_level(logging.INFO, logger="segany.serve"):
        http.get("/health")
        http.post("/cvat", json={"image": "@@", **CLICK})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage()[:1] == "{"]
    assert [(x["method"], x["route"], x["status"]) for x in lines] == [
        ("GET", "/health", 200),
        ("POST", "/cvat", 400),
    ]
    assert all(isinstance(x["ms"], float) and x["ms"] >= 0 for x in lines)


def test_contracts_share_one_embedding(monkeypatch, tmp_path):
    """A CVAT click and an X-AnyLabeling click on the same frame embed it once; the file on
    disk has the key Predictor.set_image (and the annotator) use, so they reuse it."""
    s = tiny_session(cache_dir=tmp_path)
    calls = []
    embed = Predictor.embed

    def counted(self, rgb):
        calls.append(rgb.shape)
        return embed(self, rgb)

    monkeypatch.setattr(Predictor, "embed", counted)
    http = client(s)
    img = frame()
    assert http.post("/cvat", json={"image": b64(img), **CLICK}).status_code == 200
    xbody = {"model": "tiny", "image": "data:image/png;base64," + b64(img)}
    xbody["params"] = {"marks": [{"type": "point", "data": [60, 40], "label": 1}]}
    assert http.post("/xanylabeling/v1/predict", json=xbody).status_code == 200
    assert calls == [(96, 144, 3)]
    files = list(tmp_path.glob("*.pt"))
    assert [f.stem for f in files] == [s.cache_key(img)]
    p = Predictor(s.model, cache=EmbeddingCache(tmp_path), model_id=s.model_id)
    p.set_image(img)  # found on disk: no second embed
    assert calls == [(96, 144, 3)]


def test_concurrent_first_clicks_embed_once(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    s = tiny_session()
    calls = []
    embed = Predictor.embed

    def slow(self, rgb):
        calls.append(1)
        time.sleep(0.2)
        return embed(self, rgb)

    monkeypatch.setattr(Predictor, "embed", slow)
    img = frame()
    with ThreadPoolExecutor(4) as pool:
        masks = list(pool.map(lambda _: s.best_mask(img, points=[[60, 40]], labels=[1]), range(4)))
    assert calls == [1]
    want, _ = reference_mask(s.model, img, points=[[60, 40]], labels=[1])
    for m, _ in masks:
        np.testing.assert_array_equal(m, want)


def test_labelstudio_router_is_mounted_under_its_prefix(monkeypatch):
    """The Label Studio contract plugs in as ``router(session) -> APIRouter``."""
    name = "segany.integrations.labelstudio"
    fake = types.ModuleType(name)
    fake.__spec__ = importlib.machinery.ModuleSpec(name, None)
    seen = []

    def router(session):
        seen.append(session)
        r = APIRouter()
        r.add_api_route("/health", lambda: {"status": "UP", "model_class": "segany"})
        return r

    fake.router = router
    monkeypatch.setitem(sys.modules, name, fake)
    s = tiny_session()
    http = client(s)
    assert seen == [s]
    assert http.get("/labelstudio/health").json() == {"status": "UP", "model_class": "segany"}
    assert "labelstudio" in http.get("/health").json()["contracts"]


def test_max_pixels_is_enforced():
    http = client(tiny_session(max_pixels=96 * 144 - 1))
    r = http.post("/cvat", json={"image": b64(frame()), **CLICK})
    assert r.status_code == 422 and "above the limit" in r.json()["detail"]


# -- the command, as a real server ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def test_segany_serve_answers_health_and_a_cvat_click(tmp_path):
    path = tmp_path / "tiny_sam.pt"
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
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SEGANY_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "segany", "serve", "--model", str(path), "--backend", "torch"]
    cmd += ["--port", str(port), "--token", "sek", "--cache-dir", str(tmp_path / "emb")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                status, health = _get(base + "/health")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(proc.stderr.read()) from None
                time.sleep(0.3)
        assert status == 200 and health["model"] == "tiny_sam.pt"
        img = frame()
        body = json.dumps({"image": base64.b64encode(png_bytes(img)).decode(), **CLICK})
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sek"}
        status, answer = _get(base + "/cvat", body.encode(), headers)
        assert status == 200
        from segany.loader import load_model

        want, _ = reference_mask(load_model(str(path)), img, points=[[60, 40]], labels=[1])
        np.testing.assert_array_equal(cvat_decode(answer, 96, 144), want)
        assert len(list((tmp_path / "emb").glob("*.pt"))) == 1
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "CVAT interactor:             " + base + "/cvat" in err
    assert '"route":"/cvat","status":200' in err  # the structured request log
