"""A video in the annotator, end to end in headless Chromium (Playwright, the system
package; the fixtures of test_e2e.py): open a folder of frames, click the square on frame 0,
Enter makes it an object, T propagates it (progress in the page), scrub with the keys and
the slider, correct the object on frame 3 (a click on the disc, Enter), T propagates from
there, A accepts the track, and both video exports download. Screenshot:
build/test-artifacts/annotate-video-e2e.png (docs/img/annotate-video.png with
SEGANY_DOCS_SCREENSHOT=1)."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from segany.masks import rle_to_mask
from segany.predictor import Predictor
from segany.video.outputs import read_davis_png

from ..conftest import REPO
from ..test_video import _clip
from .helpers import open_page
from .test_e2e import ARTIFACTS, _screen
from .test_video_annotator import N, _iou, clip_server


@pytest.fixture()
def video_app(tmp_path: Path, mobile_sam):
    predictor = Predictor(mobile_sam, model_id="mobile_sam-video-e2e")
    with clip_server(tmp_path, predictor, model_name="mobile_sam") as app:
        yield app


def _frame(page, k: int) -> None:
    page.wait_for_function(f"S.video && S.video.frame === {k} && V.shown === {k}", timeout=30_000)
    page.wait_for_timeout(150)  # the frame's masks are drawn


def _shown_mask(page) -> np.ndarray:
    """The object's mask the page draws on the shown frame."""
    segs = page.evaluate("S.objects.map((a) => a.segmentation)")
    assert len(segs) == 1, segs
    return rle_to_mask(segs[0])


def _click(page, x: float, y: float) -> None:
    sx, sy = _screen(page, x, y)
    page.mouse.click(sx, sy)
    page.wait_for_function("current() && current().result !== null", timeout=60_000)


def _propagated(page, text: str) -> None:
    page.wait_for_function(
        f"document.querySelector('#propagate-status').textContent.includes({text!r})",
        timeout=180_000,
    )


@pytest.mark.weights
def test_video_click_propagate_scrub_correct_accept_export(browser, video_app):
    base, svc = video_app
    _, squares, discs = _clip(N)
    viewport = {"width": 1400, "height": 860}
    page, errors = open_page(
        browser, base + "/", "#videos li", viewport=viewport, accept_downloads=True
    )
    assert page.locator("#videos li").count() == 3  # clip, movie.mp4, broken.mp4 (struck out)
    page.locator("#videos li", has_text="clip").click()
    _frame(page, 0)
    assert "video-mode" in page.evaluate("document.body.className")
    assert page.locator("#videobar").is_visible() and page.locator("#video-box").is_visible()
    assert page.locator("#frame-slider").get_attribute("max") == str(N - 1)

    # a click on the square of frame 0; Enter makes it an object named "box"
    _click(page, 25, 35)
    sel = page.evaluate("current().result.masks[current().sel].segmentation")
    assert _iou(rle_to_mask(sel), squares[0]) > 0.85
    page.locator("#category").fill("box")
    page.locator("#category").press("Enter")
    page.wait_for_selector("#tracks li")
    (track,) = svc.video_store.tracks()
    assert (track.category, track.object_id, track.status) == ("box", 1, "pending")

    # T propagates it; the page shows the progress, then the result
    page.keyboard.press("t")
    page.wait_for_function(
        "document.querySelector('#propagate-status').textContent.includes('frames')"
    )
    _propagated(page, "propagated object 1 from frame 0")
    assert svc.get_track(track.id).frames == N

    # scrub: the arrow keys, then the slider
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    _frame(page, 3)
    assert page.locator("#frame-slider").input_value() == "3"
    assert page.locator("#frame-label").inner_text().startswith("frame 4 / 6")
    assert _iou(_shown_mask(page), squares[3]) > 0.8
    page.evaluate(
        "() => { const s = document.getElementById('frame-slider'); s.value = 5;"
        " s.dispatchEvent(new Event('input')); }"
    )
    _frame(page, 5)
    assert _iou(_shown_mask(page), squares[5]) > 0.8
    page.keyboard.press("Shift+ArrowLeft")  # 10 frames back: the first
    _frame(page, 0)
    page.locator("#frame-next").click()  # the buttons scrub too
    page.locator("#frame-next").click()
    page.locator("#frame-next").click()
    _frame(page, 3)

    # the correction: the object is the disc from frame 3 on (a click, Enter), T from there
    page.locator("#canvas").focus()
    _click(page, 100 - 4 * 3, 70)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#tracks li').textContent.includes('keys 0,3')")
    page.keyboard.press("t")
    _propagated(page, "propagated object 1 from frame 3")
    rows = {r.frame: r for r in svc.video_store.frames([track.id])}
    for f in range(N):
        got = rle_to_mask(rows[f].segmentation)
        want = squares[f] if f < 3 else discs[f]
        assert _iou(got, want) > 0.75, f
    page.keyboard.press("End")
    _frame(page, 5)
    assert _iou(_shown_mask(page), discs[5]) > 0.75
    page.keyboard.press("Home")
    _frame(page, 0)
    assert _iou(_shown_mask(page), squares[0]) > 0.8

    # A accepts the track
    page.keyboard.press("a")
    page.wait_for_selector("#tracks li.accepted")
    assert svc.video_store.track(track.id).status == "accepted"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "annotate-video-e2e.png"
    page.screenshot(path=str(shot))
    if os.environ.get("SEGANY_DOCS_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "img" / "annotate-video.png")

    # the exports, from the menu
    def download(kind: str) -> bytes:
        page.locator("#export-btn").click()
        with page.expect_download() as dl:
            page.locator(f'[data-export="{kind}"]').click()
        return Path(dl.value.path()).read_bytes()

    data = json.loads(download("video"))
    (ann,) = data["annotations"]
    assert data["videos"][0]["name"] == "clip" and data["categories"][0]["name"] == "box"
    assert _iou(rle_to_mask(ann["segmentations"][0]), squares[0]) > 0.85
    assert _iou(rle_to_mask(ann["segmentations"][5]), discs[5]) > 0.75
    z = zipfile.ZipFile(io.BytesIO(download("davis")))
    assert len(z.namelist()) == N
    lab = read_davis_png(io.BytesIO(z.read("Annotations/clip/5.png")))
    assert set(np.unique(lab)) == {0, 1} and _iou(lab == 1, discs[5]) > 0.75

    # back to an image: the image tools come back
    page.locator("#images li", has_text="still.png").click()
    page.wait_for_function("!S.video && S.img !== null && S.current.path === 'still.png'")
    assert "video-mode" not in page.evaluate("document.body.className")
    assert errors == []
    page.close()
