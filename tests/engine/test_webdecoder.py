"""The browser decoder (docs/annotate.md, "Decoder in the browser"): the payload and routes
on the server, then the page in the system Chromium decoding with onnxruntime-web.

Known values: the golden image ``tests/data/golden_coffee_small`` (MobileSAM, 400x600) and
its prompts. The page's masks are compared with the server's ``/predict`` for the same
prompt and with the goldens' recorded masks (Meta's implementation), with the goldens'
tolerances (tests/golden.py): per mask at most 25 pixels and at most 0.1% of the mask
differ, predicted IoUs within 1e-3. Measured with the float16 payload: 0-13 pixels.
"""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from segany.engine import ortweb
from segany.engine.server import create_app
from segany.engine.service import AnnotationService
from segany.engine.store import Store
from segany.engine.webdecoder import read_payload
from segany.masks import rle_to_mask
from segany.predictor import Predictor

from ..conftest import TEST_DATA
from ..golden import IOU_ATOL, MAX_MASK_PIXELS, unpack
from .helpers import open_page, server_thread

CASES = ("c0", "c2", "c4", "c6")
GOLDEN = json.loads((TEST_DATA / "golden_coffee_small.json").read_text())


@pytest.fixture(scope="module")
def coffee(tmp_path_factory, mobile_sam):
    if not ortweb.available():
        try:
            ortweb.fetch()
        except Exception as exc:  # no registry: the page would fall back to the server
            pytest.skip(f"onnxruntime-web {ortweb.VERSION} not cached and not fetched: {exc}")
    tmp = tmp_path_factory.mktemp("webdec")
    images = tmp / "images"
    images.mkdir()
    z = np.load(TEST_DATA / "golden_coffee_small.npz")
    Image.fromarray(z["image"]).save(images / "coffee.png")
    svc = AnnotationService(
        Store(tmp / "db.sqlite"),
        images,
        Predictor(mobile_sam),
        cache_dir=tmp / "cache",
        model_name="mobile_sam",
        prefetch=False,
        web_decoder=True,
    )
    svc.rescan()
    with server_thread(create_app(svc)) as base:
        yield base, svc, z
    svc.close()
    svc.store.close()


def _image_id(svc) -> int:
    return svc.store.image_by_path("coffee.png").id


def _prompt(case: dict) -> dict:
    return {
        "points": case.get("point_coords", []),
        "labels": case.get("point_labels", []),
        "box": case.get("box"),
        "multimask": case["multimask_output"],
    }


def _close(ours: np.ndarray, ref: np.ndarray, what: str) -> int:
    diff = int((ours != ref).sum())
    assert diff <= MAX_MASK_PIXELS and diff <= max(1, 0.001 * ref.sum()), (what, diff)
    return diff


@pytest.mark.weights
def test_payload_routes_and_headers(coffee) -> None:
    base, svc, _ = coffee
    iid = _image_id(svc)
    cfg = httpx.get(base + "/api/config").json()["web_decoder"]
    assert cfg["available"] and cfg["dtype"] == "float16" and cfg["version"] == ortweb.VERSION
    # the embedding and the per-image decoder context, as the model computes them
    item = svc.embedding(svc.store.image(iid))
    with torch.inference_mode():
        ctx = svc.model.prepare_decoder(item.embedding)
    want = {"image_embeddings": item.embedding, "keys": ctx.keys, "k": ctx.k, "v": ctx.v,
            "q": ctx.q}  # fmt: skip
    sizes = {}
    for dtype, rtol in (("float32", 0), ("float16", 2**-11)):
        r = httpx.get(f"{base}/api/images/{iid}/embedding?dtype={dtype}", timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        header, tensors = read_payload(r.content)
        assert header["original_size"] == [400, 600] and header["input_size"] == [683, 1024]
        assert header["img_size"] == 1024 and header["mask_input_size"] == [256, 256]
        for name, t in want.items():
            np.testing.assert_allclose(tensors[name], t.numpy(), rtol=rtol, atol=1e-7)
        sizes[dtype] = len(r.content)
    values = 256 * 64 * 64 + 64 * 64 * (256 + 3 * 128)
    assert 2 * values < sizes["float16"] < 2 * values + 1024
    assert 4 * values < sizes["float32"] < 4 * values + 1024
    assert httpx.get(f"{base}/api/images/{iid}/embedding?dtype=int8").status_code == 422
    # the graphs of the current model only; onnxruntime-web's files only
    assert httpx.get(base + cfg["graphs"]["prompt"]).content[:2] == b"\x08\x08"  # ONNX (ir v8)
    assert httpx.get(f"{base}/api/graphs/other-model/prompt.onnx").status_code == 404
    assert httpx.get(f"{base}/api/graphs/{svc.model_id}/encoder.onnx").status_code == 404
    wasm = httpx.get(base + cfg["runtime"] + "ort-wasm-simd-threaded.wasm")
    assert wasm.headers["content-type"] == "application/wasm" and wasm.content[:4] == b"\0asm"
    assert httpx.get(base + cfg["runtime"] + "ort.all.min.js").status_code == 404
    # cross-origin isolation on the pages and their scripts, not on /docs (CDN assets)
    for path in ("/", "/stats", "/static/app.js", cfg["runtime"] + "ort-wasm-simd-threaded.mjs"):
        h = httpx.get(base + path).headers
        assert h["cross-origin-opener-policy"] == "same-origin", path
        assert h["cross-origin-embedder-policy"] == "require-corp", path
    assert "cross-origin-embedder-policy" not in httpx.get(base + "/docs").headers


def test_ortweb_integrity(tmp_path) -> None:
    """A tarball whose SHA-512 is not the pinned one is refused before anything is written."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ortweb.FILES:
            info = tarfile.TarInfo(f"package/dist/{name}")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(RuntimeError, match="integrity"):
        ortweb.extract(buf.getvalue(), tmp_path / "ort")
    assert not (tmp_path / "ort").exists() and not ortweb.available(tmp_path / "ort")
    assert ortweb.sri(b"") == (
        "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="
    )


def _page(browser, url: str):
    page, errors = open_page(browser, url, viewport={"width": 1200, "height": 800})
    page.wait_for_function("S.img !== null")
    return page, errors


def _click(page, x: float, y: float, button: str = "left") -> None:
    sx, sy = page.evaluate(f"toScreen({x}, {y})")
    box = page.locator("#canvas").bounding_box()
    page.mouse.click(box["x"] + sx, box["y"] + sy, button=button)


def _wait_painted(page, n_points: int) -> dict:
    page.wait_for_function(
        f"current() && current().points.length === {n_points} && current().result !== null"
        " && !current().paint",
        timeout=60_000,
    )
    return page.evaluate(
        "(() => { const r = current().result; return {local: !!r.local, sel: current().sel,"
        " points: current().points, labels: current().labels,"
        " masks: r.masks.map(m => ({seg: m.segmentation, score: m.score}))}; })()"
    )


def _server(base: str, iid: int, body: dict) -> dict:
    r = httpx.post(f"{base}/api/images/{iid}/predict", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.weights
def test_browser_masks_equal_server_and_goldens(browser, coffee) -> None:
    base, svc, z = coffee
    iid = _image_id(svc)
    page, errors = _page(browser, base + "/")
    assert page.evaluate("S.decoder") is True, page.evaluate("WD.reason")
    assert page.evaluate("self.crossOriginIsolated") is True
    # the warm-up: two runs of each graph on the first image's tensors, before any click
    page.wait_for_function("WD.warm !== null", timeout=60_000)
    assert page.evaluate("WD.warm.then(() => WD.runs)") == 4
    diffs = {}
    for key in CASES:
        case = GOLDEN[key]
        p = _prompt(case)
        js = page.evaluate(
            "async ([id, p]) => { const r = await wdPredict(id, p.points, p.labels, p.box, null,"
            " p.multimask); return r.masks.map(m => ({seg: m.segmentation, score: m.score})); }",
            [iid, p],
        )
        server = _server(base, iid, p)["masks"]
        gold = unpack(z[f"{key}_masks"], 600)
        assert len(js) == len(server) == len(gold)
        for k, (m, s, g) in enumerate(zip(js, server, gold)):
            ours = rle_to_mask(m["seg"])
            on_server = rle_to_mask(s["segmentation"])
            diffs[f"{key}.{k}"] = (_close(ours, on_server, f"{key}.{k} server"),
                                   _close(ours, g, f"{key}.{k} golden"))  # fmt: skip
            assert abs(m["score"] - s["score"]) <= IOU_ATOL
            assert abs(m["score"] - float(z[f"{key}_iou"][k])) <= IOU_ATOL
    # the golden refinement: its mask input (Meta's logits of c0's best mask) through
    # decoder.onnx in the page
    ref = GOLDEN["refine"]
    js = page.evaluate(
        "async ([id, p, low]) => { const r = await wdPredict(id, p.points, p.labels, null,"
        " Float32Array.from(low), false); return r.masks[0].segmentation; }",
        [iid, _prompt(ref), z["refine_mask_input"].ravel().tolist()],
    )
    diffs["refine"] = _close(rle_to_mask(js), unpack(z["refine_masks"], 600)[0], "refine golden")
    print("pixels differing (page vs server, page vs golden):", diffs)

    # real clicks: a click, then a background click that passes the chosen mask back
    page.evaluate("S.latencies = []")
    _click(page, *GOLDEN["c0"]["point_coords"][0])
    first = _wait_painted(page, 1)
    assert first["local"] and len(first["masks"]) == 3
    # the server gets the points the page made of the mouse positions (a tenth of a pixel)
    click1 = {"points": first["points"], "labels": first["labels"], "box": None, "multimask": True}
    server1 = _server(base, iid, click1)
    for m, s in zip(first["masks"], server1["masks"]):
        _close(rle_to_mask(m["seg"]), rle_to_mask(s["segmentation"]), "click 1")
    assert first["sel"] == server1["best"]
    _click(page, 229, 343, button="right")
    second = _wait_painted(page, 2)
    assert second["local"] and len(second["masks"]) == 1
    assert second["labels"] == [1, 0]
    body = {"points": second["points"], "labels": [1, 0], "box": None, "multimask": False,
            "mask_input_id": server1["masks"][server1["best"]]["mask_input_id"]}  # fmt: skip
    server2 = _server(base, iid, body)["masks"][0]
    _close(rle_to_mask(second["masks"][0]["seg"]), rle_to_mask(server2["segmentation"]), "click 2")
    lat = page.evaluate("S.latencies")
    assert len(lat) == 2 and all(x["local"] and 0 < x["ms"] < 60_000 for x in lat)
    assert "click\u2192paint" in page.locator("#latency").inner_text()
    assert "in the page" in page.locator("#latency").inner_text()
    # accept: the page's mask is stored, the page's clicks counted
    page.locator("#category").fill("cup")
    page.keyboard.press("Enter")
    page.wait_for_selector("#objects li")
    (ann,) = svc.store.annotations(iid)
    # clicks of the object: the page's two, and the test's own 6 calls of /predict as the
    # same (local) user on the same image
    assert ann.category == "cup" and ann.clicks == 2 + len(CASES) + 2
    assert np.array_equal(rle_to_mask(ann.segmentation), rle_to_mask(second["masks"][0]["seg"]))
    assert errors == []
    page.close()


@pytest.mark.weights
def test_server_fallback_flag(browser, coffee) -> None:
    """``?decoder=server``: every click is the server's (as without WebAssembly, or with a
    server started without --web-decoder)."""
    base, svc, _ = coffee
    page, errors = _page(browser, base + "/?decoder=server")
    assert page.evaluate("S.decoder") is False
    assert page.locator("#decoder").inner_text() == "decoder: server"
    _click(page, *GOLDEN["c0"]["point_coords"][0])
    res = _wait_painted(page, 1)
    assert not res["local"] and len(res["masks"]) == 3
    assert page.evaluate("current().result.masks[0].mask_input_id")
    assert "(server" in page.locator("#latency").inner_text()
    assert errors == []
    page.close()
