"""segany serve as the ML backend of a real Label Studio (slow: minutes).

Label Studio 1.23.2 lives in its own venv (``tools/labelstudio-venv.sh``: built here when
missing, a few minutes and about 1 GB) and runs as its own server on localhost, started once
for the module; ``segany serve`` runs as a real uvicorn server in another process, with no
``LABEL_STUDIO_*`` variables: it reads the images with what Label Studio sends to
``/setup``. Everything goes through Label Studio's own API: the project, the image upload,
connecting the ML backend, the interactive request, annotations, predictions, the exports
and the training button. Label Studio's own brush decoder
(``label_studio_sdk.converter.brush.decode_rle``) runs in its venv.

``SEGANY_SKIP_LABELSTUDIO=1`` skips the module. ``SEGANY_DOCS_SCREENSHOT=1`` also writes the
browser screenshot to docs/img/labelstudio.png.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from segany.integrations.labelstudio import brush

from ..conftest import REPO
from ..engine.helpers import CHROMIUM_ARGS, chromium_path, free_port
from .conftest import background_build

pytestmark = pytest.mark.skipif(
    os.environ.get("SEGANY_SKIP_LABELSTUDIO") == "1", reason="SEGANY_SKIP_LABELSTUDIO=1"
)

KITCHEN = REPO / "examples" / "kitchen.jpg"
ARTIFACTS = REPO / "build" / "test-artifacts"
EMAIL, PASSWORD, TOKEN = "data-team@example.com", "segany-test-pass-1", "segany-test-legacy-token"
BRUSH_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Person" background="#e02020"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Person" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
</View>"""
POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="outline" toName="image">
    <Label value="Person" background="#2080e0"/>
  </PolygonLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Person" background="#000000"/>
  </RectangleLabels>
</View>"""
CLICK = (62.0, 62.0)  # percent of the image: the cook's green shirt
BOX = (45.0, 10.0, 45.0, 88.0)  # x, y, width, height in percent: around him


def log(msg: str) -> None:
    print(f"[labelstudio] {msg}", file=sys.stderr, flush=True)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ls_python() -> Path:
    t0 = time.time()
    built = background_build()  # started at collection (tests/integrations/conftest.py)
    if built is not None and built[0] == 0:
        stdout = built[1]
    else:  # not started, or failed: build here, with its progress on the terminal
        log("tools/labelstudio-venv.sh: checking / building Label Studio's venv")
        proc = subprocess.run(
            ["bash", str(REPO / "tools" / "labelstudio-venv.sh")],
            stdout=subprocess.PIPE,
            stderr=None,  # its progress lines go to the terminal
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            pytest.skip("Label Studio could not be installed (no PyPI here?): see the output above")
        stdout = proc.stdout
    py = Path(stdout.strip().splitlines()[-1])
    log(f"Label Studio venv ready in {time.time() - t0:.0f}s: {py}")
    return py


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait(url: str, proc: subprocess.Popen, timeout: float, logfile: Path) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited ({proc.returncode}):\n{logfile.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{logfile.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def label_studio(ls_python: Path, tmp_path_factory):
    """A fresh Label Studio server; yields ``(base URL, legacy token)``."""
    root = tmp_path_factory.mktemp("labelstudio")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(root / "data"),
        # segany serve listens on 127.0.0.1: Label Studio's SSRF guard refuses ML backends
        # on reserved networks unless told otherwise (docs/labelstudio.md)
        "USE_DEFAULT_BANNED_SUBNETS": "false",
    }
    logfile = root / "label-studio.log"
    cmd = [str(ls_python.parent / "label-studio"), "start", "--no-browser",
           "--port", str(port), "--username", EMAIL, "--password", PASSWORD,
           "--user-token", TOKEN, "--enable-legacy-api-token"]  # fmt: skip
    log(f"starting Label Studio on port {port} (about a minute or two; log: {logfile})")
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=root)  # fmt: skip
    try:
        took = _wait(f"http://127.0.0.1:{port}/health", proc, 600, logfile)
        log(f"Label Studio answers after {took:.0f}s")
        yield f"http://127.0.0.1:{port}", TOKEN
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory):
    """``segany serve`` with MobileSAM in its own process, no LABEL_STUDIO_* variables."""
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update(SEGANY_BACKEND="torch", PYTHONUNBUFFERED="1", SEGANY_LS_PREANNOTATE="everything",
               SEGANY_LS_MODELS_DIR=str(root / "models"))  # fmt: skip
    logfile = root / "serve.log"
    cmd = [sys.executable, "-m", "segany", "serve", "--model", "mobile_sam", "--backend",
           "torch", "--port", str(port), "--cache-dir", str(root / "emb")]  # fmt: skip
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)  # fmt: skip
    try:
        _wait(f"http://127.0.0.1:{port}/health", proc, 180, logfile)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        log("segany serve log (tail):\n" + logfile.read_text()[-2500:])


class LS:
    """Label Studio's REST API with the legacy token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, timeout=300,
                                 headers={"Authorization": f"Token {token}"})  # fmt: skip

    def __call__(self, method: str, path: str, **kw):
        r = self.http.request(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:1000]}"
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def project(
        self, title: str, config: str, backend: str, extra: dict | None = None
    ) -> tuple[int, int, int]:
        """A project with the kitchen image and segany as its interactive ML backend;
        ``(project id, task id, ML backend id)``."""
        p = self("POST", "/api/projects", json={"title": title, "label_config": config})
        with open(KITCHEN, "rb") as f:
            self("POST", f"/api/projects/{p['id']}/import", files={"file": ("kitchen.jpg", f)})
        (task,) = self("GET", f"/api/tasks?project={p['id']}")["tasks"]
        ml = self("POST", "/api/ml", json={"url": backend + "/labelstudio", "project": p["id"],
                                           "is_interactive": True, "title": "segany",
                                           "extra_params": extra})  # fmt: skip
        assert ml["readable_state"] == "Connected", ml
        return p["id"], task["id"], ml["id"]


@pytest.fixture(scope="module")
def ls(label_studio) -> LS:
    return LS(*label_studio)


@pytest.fixture(scope="module")
def session():
    """The model segany serve runs, loaded the same way, for the expected masks."""
    from segany.integrations.core import build_session

    return build_session("mobile_sam", backend="torch", cache_dir=None)


@pytest.fixture(scope="module")
def kitchen() -> np.ndarray:
    from segany.transforms import load_image

    return load_image(KITCHEN)


def ls_decode(ls_python: Path, rles: list[list[int]]) -> list[np.ndarray]:
    """Label Studio's own decoder, in its venv: each rle -> its flat RGBA values."""
    code = (
        "import sys, json, base64, numpy as np\n"
        "from label_studio_sdk.converter.brush import decode_rle\n"
        "out = [base64.b64encode(np.asarray(decode_rle(r), np.uint8).tobytes()).decode()\n"
        "       for r in json.load(sys.stdin)]\n"
        "json.dump(out, sys.stdout)\n"
    )
    proc = subprocess.run([str(ls_python), "-c", code], input=json.dumps(rles),
                          capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return [np.frombuffer(base64.b64decode(s), np.uint8) for s in json.loads(proc.stdout)]


def _keypoint(w: int, h: int) -> dict:
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": CLICK[0], "y": CLICK[1], "width": 0.6, "keypointlabels": ["Person"]},
            "is_positive": True, "id": "click1", "from_name": "click", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}  # fmt: skip


def _export_json(ls: LS, pid: int, export_type: str) -> dict:
    data = ls("GET", f"/api/projects/{pid}/export?exportType={export_type}")
    if isinstance(data, (bytes, bytearray)) and data[:2] == b"PK":
        z = zipfile.ZipFile(io.BytesIO(data))
        name = next(n for n in z.namelist() if n.endswith(".json"))
        return json.loads(z.read(name))
    return data if isinstance(data, dict) else json.loads(data)


def _coco_union(coco_dict: dict, tmp: Path) -> np.ndarray:
    """Every annotation of the export's one image, through pycocotools, as one mask."""
    from pycocotools.coco import COCO

    path = tmp / "coco.json"
    path.write_text(json.dumps(coco_dict))
    coco = COCO(str(path))
    (img_id,) = coco.getImgIds()
    info = coco.loadImgs(img_id)[0]
    union = np.zeros((info["height"], info["width"]), bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
        union |= coco.annToMask(ann) > 0
    return union


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# -- the tests -----------------------------------------------------------------------------------
def test_brush_click_through_label_studio(ls, ls_python, serve_url, session, kitchen, tmp_path):
    h, w = kitchen.shape[:2]
    # a short fine-tune for the training test (the project's model settings: extra params)
    extra = {"train": {"steps": 3, "images_per_step": 1, "masks_per_image": 1}}
    pid, tid, ml = ls.project("segany brush", BRUSH_CONFIG, serve_url, extra)
    t0 = time.time()
    answer = ls("POST", f"/api/ml/{ml}/interactive-annotating",
                json={"task": tid, "context": {"result": [_keypoint(w, h)]}})  # fmt: skip
    log(f"interactive request through Label Studio: {time.time() - t0:.2f}s (first: embedding)")
    assert "errors" not in answer, answer
    (region,) = answer["data"]["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "mask"
    assert region["value"]["brushlabels"] == ["Person"]
    assert (region["original_width"], region["original_height"]) == (w, h)

    want, _ = session.best_mask(kitchen, points=[[CLICK[0] * w / 100, CLICK[1] * h / 100]],
                                labels=[1])  # fmt: skip
    assert want.sum() > 0.05 * w * h  # the cook, not a speck
    (flat,) = ls_decode(ls_python, [region["value"]["rle"]])
    theirs = flat.reshape(h, w, 4)
    assert set(np.unique(theirs).tolist()) <= {0, 255}
    assert (theirs[:, :, 3] > 0).sum() == want.sum()
    assert ((theirs[:, :, 3] > 0) == want).all()

    # a second click on the task: the embedding is cached on segany's side
    t0 = time.time()
    ls("POST", f"/api/ml/{ml}/interactive-annotating",
       json={"task": tid, "context": {"result": [_keypoint(w, h)]}})  # fmt: skip
    log(f"second interactive request through Label Studio: {time.time() - t0:.3f}s")

    # the annotator accepts it: Label Studio stores it; read back and decode with its decoder
    ann = ls("POST", f"/api/tasks/{tid}/annotations", json={"result": [region]})
    stored = ls("GET", f"/api/annotations/{ann['id']}")
    (flat,) = ls_decode(ls_python, [stored["result"][0]["value"]["rle"]])
    assert ((flat.reshape(h, w, 4)[:, :, 3] > 0) == want).all()

    # Label Studio's brush -> COCO export, read with pycocotools (LS turns masks into polygons)
    coco = _export_json(ls, pid, "BRUSH_TO_COCO")
    union = _coco_union(coco, tmp_path)
    assert union.shape == (h, w) and _iou(union, want) > 0.95
    _screenshot(ls, pid, tid)


def test_preannotation_is_stored_and_decodes(ls, ls_python, serve_url, kitchen):
    h, w = kitchen.shape[:2]
    pid, tid, _ = ls.project("segany pre-annotation", BRUSH_CONFIG, serve_url)
    t0 = time.time()
    done = ls("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
              json={"selectedItems": {"all": True, "excluded": []}})  # fmt: skip
    log(f"pre-annotation (segment-everything) through Label Studio: {time.time() - t0:.1f}s")
    assert done["processed_items"] == 1
    (pred,) = ls("GET", f"/api/predictions?task={tid}")
    health = httpx.get(serve_url + "/labelstudio/health").json()
    assert pred["model_version"] == health["model_version"]
    regions = pred["result"]
    assert 5 <= len(regions) <= 100
    rles = [r["value"]["rle"] for r in regions]
    for flat, rle in zip(ls_decode(ls_python, rles), rles, strict=True):
        theirs = flat.reshape(h, w, 4)[:, :, 3] > 0
        assert theirs.any() and (theirs == brush.rle_to_mask(rle, h, w)).all()


def test_polygons_export_as_coco(ls, serve_url, session, kitchen, tmp_path):
    h, w = kitchen.shape[:2]
    pid, tid, ml = ls.project("segany polygons", POLYGON_CONFIG, serve_url)
    x, y, bw, bh = BOX
    rect = {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": bw, "height": bh, "rotation": 0,
                      "rectanglelabels": ["Person"]},
            "id": "box1", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "origin": "manual"}  # fmt: skip
    answer = ls("POST", f"/api/ml/{ml}/interactive-annotating",
                json={"task": tid, "context": {"result": [rect]}})  # fmt: skip
    regions = answer["data"]["result"]
    assert regions and all(r["type"] == "polygonlabels" for r in regions)
    ls("POST", f"/api/tasks/{tid}/annotations", json={"result": regions})
    box = [x * w / 100, y * h / 100, (x + bw) * w / 100, (y + bh) * h / 100]
    want, _ = session.best_mask(kitchen, box=box)
    coco = _export_json(ls, pid, "COCO")
    assert [c["name"] for c in coco["categories"]] == ["Person"]
    union = _coco_union(coco, tmp_path)
    assert union.shape == (h, w) and _iou(union, want) > 0.95


def test_personal_access_token(ls, label_studio):
    """segany's client with a Personal Access Token (JWT refresh -> Bearer access token)."""
    from segany.integrations.labelstudio.client import Credentials, LabelStudioClient

    pat = ls("POST", "/api/token/")["token"]
    projects = ls("GET", "/api/projects")["results"]
    pid = next(p["id"] for p in projects if p["title"] == "segany brush")
    (task,) = ls("GET", f"/api/tasks?project={pid}")["tasks"]
    client = LabelStudioClient(Credentials(label_studio[0], pat, "environment"))
    assert client.image_bytes(task["data"]["image"], task["id"]) == KITCHEN.read_bytes()


def test_training_button_fine_tunes_and_switches(ls, serve_url):
    projects = ls("GET", "/api/projects")["results"]
    pid = next(p["id"] for p in projects if p["title"] == "segany brush")
    (ml,) = ls("GET", f"/api/ml?project={pid}")
    before = httpx.get(serve_url + "/labelstudio/health").json()["model_version"]
    t0 = time.time()
    ls("POST", f"/api/ml/{ml['id']}/train", json={})
    while time.time() - t0 < 900:
        status = httpx.get(serve_url + "/labelstudio/train/status").json()
        if status["state"] in ("done", "failed"):
            break
        time.sleep(2)
    log(f"training through Label Studio's button: {time.time() - t0:.0f}s, {status}")
    assert status["state"] == "done", status
    assert status["project"] == str(pid) and status["masks"] == 1
    after = httpx.get(serve_url + "/labelstudio/health").json()["model_version"]
    assert after != before and after == status["result"]["model_version"]


def _red_pixels(png: Path) -> int:
    from PIL import Image

    shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    return int(((r > 150) & (r - g > 60) & (r - b > 60)).sum())


def _screenshot(ls: LS, pid: int, tid: int) -> None:
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe = None
    if exe is None:
        log("no chromium / playwright: no screenshot")
        return
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / "labelstudio.png"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            page = b.new_page(viewport={"width": 1280, "height": 800})
            page.goto(ls.base + "/user/login/")
            page.fill("input[name=email]", EMAIL)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url, timeout=90000)
            # Label Studio's pages keep polling: wait for elements, not for an idle network
            page.goto(f"{ls.base}/projects/{pid}/data?task={tid}", timeout=90000)
            page.get_by_text("Regions").first.wait_for(timeout=90000)
            page.locator("canvas").first.wait_for(timeout=90000)
            # the page shows its loading veil a while after the image: poll the screenshot
            # until the mask's red (#e02020 over the image) is drawn at full strength
            red = 0
            for _ in range(40):
                page.wait_for_timeout(3000)
                page.screenshot(path=str(out))
                red = _red_pixels(out)
                if red > 10000:
                    break
        finally:
            b.close()
    assert red > 10000, f"the mask is not drawn on Label Studio's page ({red} red pixels)"
    if os.environ.get("SEGANY_DOCS_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(exist_ok=True)
        shutil.copy(out, REPO / "docs" / "img" / "labelstudio.png")
    log(f"screenshot: {out}")
