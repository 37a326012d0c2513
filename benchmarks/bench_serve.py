"""Click latency through each ``segany serve`` contract vs the predictor called directly.

Same image, warm embedding cache; each round runs every variant once (interleaved, so a
load change on the machine hits all of them alike) and the table reports medians:

- ``predictor``: ``Predictor.predict`` on the set embedding (one click, three candidates);
- ``session``: ``ModelSession.best_mask`` on decoded pixels (cache key hash + lookup);
- two parts of those costs alone: the frame's decoding, and an HTTP round trip through
  the app and the test client (``GET /health``);
- ``cvat`` / ``xanylabeling`` / ``labelstudio``: the whole HTTP request through the app
  in-process (Starlette's TestClient: JSON, base64, image decoding, middlewares, the
  answer's encoding). CVAT and X-AnyLabeling send the frame with every click, so its
  decoding is part of their contract's cost; Label Studio sends a task whose image the
  backend fetches once by URL (here from a local stand-in server, set with ``/setup``) and
  keeps for the next clicks, so its rows are the smart-keypoint request alone (percent
  coordinates in, brush RLE out).

    .venv/bin/python benchmarks/bench_serve.py                 # MobileSAM, a COCO image
    (from a worktree: PYTHONPATH=. so that its segany is imported)
    .venv/bin/python benchmarks/bench_serve.py --rounds 50 --image photo.jpg
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "coco10" / "images" / "000000074646.jpg"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


LS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/></KeyPointLabels>
</View>"""


def _image_server(data: bytes):
    """A stand-in for Label Studio's file storage: serves ``data`` at any path."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobile_sam")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from segany.integrations.app import create_app
    from segany.integrations.core import build_session
    from segany.runtime import cpu_info
    from segany.transforms import load_image

    if args.image.is_file():
        data = args.image.read_bytes()
        name = args.image.name
    else:  # no COCO sample here: a synthetic JPEG of 640 x 480
        import io

        from PIL import Image

        rng = np.random.default_rng(0)
        arr = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        arr[100:300, 200:450] = (200, 40, 40)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        data, name = buf.getvalue(), "synthetic 640x480 JPEG"
    rgb = load_image(data)
    h, w = rgb.shape[:2]
    x, y = w // 2, h // 2

    session = build_session(args.model, backend=args.backend, cache_dir=None)
    session.cache.directory = None  # memory only: the warm cache is what is measured
    http = TestClient(create_app(session), base_url="http://localhost")
    b64 = base64.b64encode(data).decode()
    cvat_body = {"image": b64, "pos_points": [[x, y]], "neg_points": [], "obj_bbox": None}
    xany_body = {
        "model": session.name,
        "image": "data:image/jpeg;base64," + b64,
        "params": {"marks": [{"type": "point", "data": [x, y], "label": 1}]},
    }
    has_ls = "labelstudio" in http.get("/health").json()["contracts"]

    emb = session.embedding(rgb)  # warm: embedded once
    p = session.predictor()
    pts, labs = np.array([[x, y]], float), np.array([1])

    def direct() -> None:
        if not (p.is_image_set and p.state is emb):
            p.set_embedding(emb)
        p.predict(point_coords=pts, point_labels=labs, multimask_output=True)

    def via_session() -> None:
        session.best_mask(rgb, points=[[x, y]], labels=[1])

    def via_cvat() -> None:
        r = http.post("/cvat", json=cvat_body)
        assert r.status_code == 200, r.text

    def via_xany() -> None:
        r = http.post("/xanylabeling/v1/predict", json=xany_body)
        assert r.status_code == 200, r.text

    ls_body = {
        "tasks": [{"id": 1, "data": {"image": "/data/upload/1/image.jpg"}, "project": 1}],
        "label_config": LS_CONFIG,
        "project": "1.1700000000",
        "params": {"context": {"result": [{
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 0.3,
                      "keypointlabels": ["object"]},
            "is_positive": True, "id": "k", "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}]}},
    }  # fmt: skip
    ls_server = None
    if has_ls:
        ls_server, ls_url = _image_server(data)
        r = http.post("/labelstudio/setup", json={
            "project": "1.1700000000", "schema": LS_CONFIG, "hostname": ls_url,
            "access_token": "bench-token"})  # fmt: skip
        assert r.status_code == 200, r.text

    def via_ls() -> None:
        r = http.post("/labelstudio/predict", json=ls_body)
        assert r.status_code == 200 and r.json()["results"][0]["result"], r.text

    def decode_only() -> None:
        load_image(base64.b64decode(b64))

    def round_trip() -> None:
        http.get("/health")

    variants = {
        "predictor": direct,
        "session": via_session,
        "cvat": via_cvat,
        "xanylabeling": via_xany,
        **({"labelstudio": via_ls} if has_ls else {}),
        "frame decode (base64 + image)": decode_only,
        "HTTP round trip (GET /health)": round_trip,
    }
    for fn in variants.values():  # warm-up: threads, decoder context, first requests
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k].append(_timed(fn))
    load1 = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["predictor"]

    cpu = cpu_info()
    print(
        f"CPU: {cpu['model'] or 'unknown'}; {len(os.sched_getaffinity(0))} CPUs available, "
        f"decode threads {session.decode_threads or 'adaptive'} (serve's default), encoder threads "
        f"{session.embed_threads}; load average {load0[0]:.2f} -> {load1[0]:.2f} "
        "(the machine may be shared: compare the ratios, not the absolute times)"
    )
    print(
        f"model {args.model} ({args.backend}), image {name} ({w}x{h}), one click at the "
        f"centre, warm cache, {args.rounds} interleaved rounds, medians"
    )
    if not has_ls:
        print("labelstudio: contract not installed here, not measured")
    print()
    print("| path | median ms | p90 ms | overhead vs predictor ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for k, v in times.items():
        p90 = float(np.percentile(v, 90))
        part = k.startswith(("frame", "HTTP"))
        over = "" if part or k == "predictor" else f"{med[k] - base:+.1f}"
        ratio = "" if part else f"{med[k] / base:.2f}"
        print(f"| {k} | {med[k]:.1f} | {p90:.1f} | {over} | {ratio} |")
    if args.json:
        out = {
            "cpu": cpu["model"],
            "cpus": len(os.sched_getaffinity(0)),
            "load": [load0[0], load1[0]],
            "image": [w, h],
            "median_ms": {k: round(v, 2) for k, v in med.items()},
        }
        print(json.dumps(out, indent=1))
    if ls_server is not None:
        ls_server.shutdown()


if __name__ == "__main__":
    main()
