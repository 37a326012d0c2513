"""The annotator in a real headless Chromium when the network and other annotators get in
the way (issue #24, items 4-6), on the tiny random model: the offline banner comes and
goes, an accept made offline (or whose answer was lost) is saved exactly once, N while
offline keeps the clicks, a click made offline is answered when the server is back, the
status line is never stuck, a second tab on an image is read-only and cannot save until
the first tab's lease expires, the review round trip, and a pre-fill's progress and
cancel. Screenshots go to build/test-artifacts/ (and docs/img/annotate-offline.png,
annotate-readonly.png and annotate-review.png with SEGANY_DOCS_SCREENSHOT=1)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from segany.engine.server import create_app
from segany.engine.service import AnnotationService
from segany.engine.store import Store
from segany.masks import masks_to_coco_rle

from ..conftest import REPO
from .helpers import open_page, server_thread

ARTIFACTS = REPO / "build" / "test-artifacts"


@pytest.fixture()
def tiny_app(tmp_path: Path, images_dir: Path, tiny_predictor):
    """A server on the tiny model over SQLite, with 3-second leases."""

    def make(**kw):
        svc = AnnotationService(
            Store(tmp_path / "db.sqlite"),
            images_dir,
            tiny_predictor,
            cache_dir=tmp_path / "cache",
            model_name="tiny",
            lease_seconds=3.0,
            **kw,
        )
        svc.rescan()
        made.append(svc)
        return svc

    made: list[AnnotationService] = []
    yield make
    for svc in made:
        svc.close()
        svc.store.close()


def _page(browser, base: str, token: str | None = None):
    ctx = browser.new_context(viewport={"width": 1300, "height": 800})
    if token:
        ctx.add_init_script(f"localStorage.setItem('segany-token', {token!r})")
    return open_page(ctx, base + "/", "#images li")


def _open(page, path: str) -> None:
    page.locator("#images li", has_text=path).click()
    page.wait_for_function(f"S.img !== null && S.current.path === {path!r}")


def _click_object(page) -> None:
    """Click the image and choose a non-empty candidate (the tiny model's are random)."""
    for x, y in ((60, 40), (40, 70), (100, 30), (20, 20), (120, 80)):
        n = page.evaluate("S.hist.length")
        sx, sy = page.evaluate(f"toScreen({x}, {y})")
        box = page.locator("#canvas").bounding_box()
        page.mouse.click(box["x"] + sx, box["y"] + sy)
        page.wait_for_function(f"S.hist.length === {n + 1} && current().result !== null")
        k = page.evaluate("current().result.masks.findIndex((m) => m.area > 0)")
        if k >= 0:
            page.keyboard.press(str(k + 1))
            return
        page.keyboard.press("Escape")
    raise AssertionError("the tiny model gave only empty masks")


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, pattern: str, timeout: float = 20_000) -> str:
    page.wait_for_function(
        "(p) => new RegExp(p).test(document.querySelector('#status').textContent)",
        arg=pattern,
        timeout=timeout,
    )
    return _status(page)


def _wait_reported(page, pattern: str, timeout: float = 20_000) -> None:
    """Wait until the status line or the toast says ``pattern``: a review action reports in
    both, and in reviewer mode the next image may open (and set the status) at once."""
    page.wait_for_function(
        "(p) => [document.querySelector('#status'), document.querySelector('#toast')]"
        ".some((e) => new RegExp(p).test(e.textContent))",
        arg=pattern,
        timeout=timeout,
    )


def _save(page, name: str, clip: dict | None = None) -> Path:
    """The page (or ``clip`` of it) to build/test-artifacts/``name``, and to docs/img/ with
    SEGANY_DOCS_SCREENSHOT=1, as test_e2e.py and test_edit_tools.py do."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / name
    page.screenshot(path=str(out), clip=clip)
    if os.environ.get("SEGANY_DOCS_SCREENSHOT"):
        (REPO / "docs" / "img").mkdir(exist_ok=True)
        shutil.copy(out, REPO / "docs" / "img" / name)
    return out


def _n(svc, path: str = "a.png") -> int:
    return len(svc.store.annotations(svc.store.image_by_path(path).id, light=True))


def test_offline_banner_accept_saved_once_and_clicks_kept(browser, tiny_app):
    svc = tiny_app(prefetch=True)
    with server_thread(create_app(svc)) as base:
        page, errors = _page(browser, base)
        _open(page, "a.png")
        # the status line follows the embedding: never left on "computing..."
        _wait_status(page, "^ready: click on an object")
        _click_object(page)
        assert _status(page).startswith("1 point(s): choose a candidate")

        # the server goes away: N fails first and keeps the image and its click
        page.route("**/api/**", lambda route: route.abort())
        page.keyboard.press("n")
        page.wait_for_selector("#offline:not(.hidden)")
        assert page.evaluate("[S.current.path, S.hist.length, S.pos]") == ["a.png", 1, 1]
        assert _status(page).startswith("offline: the server cannot be reached")
        # an accept while offline is kept and saved when the server is back, once
        page.keyboard.press("Enter")
        _wait_status(page, "^offline: the accept is kept and will be saved")
        assert "1 change will be saved" in page.locator("#offline").inner_text()
        _save(page, "annotate-offline.png", clip={"x": 0, "y": 0, "width": 1300, "height": 500})
        assert _n(svc) == 0
        page.unroute("**/api/**")
        page.wait_for_selector("#offline.hidden", state="attached", timeout=10_000)
        _wait_status(page, r"^accepted object \d+")
        assert _n(svc) == 1
        assert page.locator("#objects li").count() == 1

        # the answer of an accept is lost after the server saved it: the retry (same key)
        # is answered with the first object, not saved again
        lost = {"n": 0}

        def lose_answer(route):
            if route.request.method == "POST" and lost["n"] == 0:
                lost["n"] += 1
                route.fetch()  # reaches the server, which saves the object
                route.abort()  # ... and the page never hears of it
            else:
                route.continue_()

        page.route("**/api/images/*/annotations", lose_answer)
        _click_object(page)
        page.keyboard.press("Enter")
        _wait_status(page, r"^accepted object \d+")
        assert lost["n"] == 1 and _n(svc) == 2
        page.wait_for_function("document.querySelectorAll('#objects li').length === 2")
        with svc.store.session() as s:
            assert s.execute(sa.text("SELECT COUNT(*) FROM request_keys")).scalar() == 2
        page.unroute("**/api/images/*/annotations")

        # a click while offline is kept and answered when the server is back
        page.route("**/api/**", lambda route: route.abort())
        n = page.evaluate("S.hist.length")
        sx, sy = page.evaluate("toScreen(50, 50)")
        box = page.locator("#canvas").bounding_box()
        page.mouse.click(box["x"] + sx, box["y"] + sy)
        _wait_status(page, "^offline: your click is kept and will be answered")
        assert page.evaluate("S.hist.length") == n + 1
        assert page.evaluate("current().result") is None
        page.unroute("**/api/**")
        page.wait_for_function("current().result !== null", timeout=10_000)
        _wait_status(page, r"^1 point\(s\): choose a candidate")
        assert errors == []


def test_two_tabs_one_image_and_lease_takeover(browser, tiny_app):
    svc = tiny_app(prefetch=False)
    with server_thread(create_app(svc)) as base:
        one, e1 = _page(browser, base)
        _open(one, "a.png")
        assert one.locator("#lockbar").is_hidden()
        two, e2 = _page(browser, base)
        _open(two, "a.png")
        lock = two.locator("#lockbar")
        assert lock.is_visible()
        assert lock.inner_text().startswith("Locked by local (another tab): read-only here")
        _save(two, "annotate-readonly.png", clip={"x": 0, "y": 0, "width": 1300, "height": 300})
        _click_object(two)  # clicks are allowed (nothing is written) ...
        two.keyboard.press("Enter")  # ... saving is refused, with the reason
        _wait_status(two, r"^image \d+ is locked in another tab")
        assert _n(svc) == 0
        # tab one goes silent (closed without a word, offline): its lease expires (3 s)
        # and tab two's renewal takes it over
        one.evaluate("clearInterval(NET.beat)")
        one.route("**/api/**", lambda route: route.abort())
        two.wait_for_selector("#lockbar.hidden", state="attached", timeout=20_000)
        two.keyboard.press("Enter")
        _wait_status(two, r"^accepted object \d+")
        assert _n(svc) == 1
        # tab one, back, cannot write over it
        one.unroute("**/api/**")
        _click_object(one)
        one.keyboard.press("Enter")
        _wait_status(one, r"^image \d+ is locked in another tab")
        assert _n(svc) == 1
        assert e1 == [] and e2 == []


def test_review_return_resubmit_approve(browser, tiny_app):
    svc = tiny_app(prefetch=False, auth=True)
    _, alice_token = svc.store.issue_token("alice")
    _, bob_token = svc.store.issue_token("bob")
    with server_thread(create_app(svc)) as base:
        alice, ea = _page(browser, base, alice_token)
        _open(alice, "a.png")
        alice.keyboard.press("Shift+Enter")  # mark done: submitted; the queue's next opens
        alice.wait_for_function("S.current.path !== 'a.png' && S.img !== null")
        a_id = svc.store.image_by_path("a.png").id
        assert svc.work.get(a_id).review == "submitted"

        bob, eb = _page(browser, base, bob_token)
        bob.locator("#reviewer-mode").check()
        bob.wait_for_function("S.current && S.current.path === 'a.png'")
        assert [t.split("\n")[0] for t in bob.locator("#images li .name").all_inner_texts()] == [
            "a.png"
        ]
        assert bob.locator("#review-state").text_content() == "submitted for review (by alice)"
        bob.locator("#return").click()  # no comment: refused in the page
        assert svc.work.get(a_id).review == "submitted"
        bob.locator("#review-text").fill("the red box is missing")
        _save(bob, "annotate-review.png", clip={"x": 970, "y": 0, "width": 330, "height": 750})
        bob.locator("#return").click()
        _wait_reported(bob, "^returned a.png to alice")
        w = svc.work.get(a_id)
        assert (w.review, w.comment) == ("returned", "the red box is missing")

        # alice's queue: the returned image first, with the comment
        alice.keyboard.press("Shift+Enter")
        alice.wait_for_function("S.current.path === 'a.png' && S.img !== null")
        assert (
            alice.locator("#review-comment").inner_text()
            == "bob: \u201cthe red box is missing\u201d"
        )
        assert (
            alice.locator("#review-state").text_content() == "returned to its annotator (by alice)"
        )
        alice.keyboard.press("Shift+Enter")  # resubmit
        alice.wait_for_function("S.current.path !== 'a.png' && S.img !== null")
        assert svc.work.get(a_id).review == "submitted"

        bob.locator("#reviewer-mode").uncheck()
        bob.locator("#reviewer-mode").check()  # the list of now: a.png waits again
        bob.wait_for_function("S.current.path === 'a.png' && S.current.review === 'submitted'")
        bob.locator("#approve").click()
        _wait_reported(bob, "^approved a.png")
        assert svc.work.get(a_id).review == "approved"
        assert svc.store.image(a_id).done is True
        assert ea == [] and eb == []


class SlowGenerator:
    """Thirty batches of ten points, 50 ms each, then two rectangles."""

    def __init__(self, req) -> None:
        self.req = req

    def generate(self, rgb, *, progress=None):
        for k in range(30):
            time.sleep(0.05)
            if progress is not None:
                progress(10 * (k + 1), 300)
        h, w = rgb.shape[:2]
        out = []
        for k in range(2):
            m = np.zeros((h, w), dtype=bool)
            m[5 + 30 * k : 25 + 30 * k, 10:50] = True
            out.append(
                {
                    "segmentation": masks_to_coco_rle(m[None])[0],
                    "predicted_iou": 0.9,
                    "stability_score": 0.95,
                    "point_coords": [[20.0, 10.0 + 30 * k]],
                }
            )
        return out


def test_prefill_progress_and_cancel(browser, tiny_app):
    svc = tiny_app(prefetch=False, generator_factory=SlowGenerator)
    with server_thread(create_app(svc)) as base:
        page, errors = _page(browser, base)
        _open(page, "a.png")
        page.keyboard.press("g")
        text = _wait_status(page, r"^pre-filling \(segment everything\): \d+ / 300 points")
        assert re.search(r"\(\d+%\) \u2014 Shift\+X or Cancel stops it$", text)
        assert page.locator("#prefill-cancel").is_visible()
        page.keyboard.press("g")  # refused while one runs
        assert page.locator("#toast").inner_text() == "a pre-fill is running on this image"
        page.keyboard.press("Shift+X")  # x alone is the eraser
        _wait_status(page, "^pre-fill cancelled: nothing was saved")
        assert page.locator("#prefill-cancel").is_hidden()
        iid = svc.store.image_by_path("a.png").id
        assert svc.store.annotations(iid, statuses=["pending"]) == []
        # run to the end: progress, then the masks
        page.keyboard.press("g")
        _wait_status(page, r"^pre-filled 2 masks in")
        assert len(svc.store.annotations(iid, statuses=["pending"])) == 2
        assert page.locator("#objects li.pending").count() == 2
        assert errors == []
