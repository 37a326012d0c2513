"""A video in headless Chromium when the network and another tab get in the way (issues #21
and #24), on the tiny random model: a key frame set while the server cannot be reached is
kept (the banner counts it) and saved once when the server is back; one whose answer is
lost after the server saved it is not saved twice; a second tab on the same video is
read-only (the lock banner; its key frame refused with the reason, nothing saved); the
masks of a frame that arrive after the page moved to another frame are not drawn on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import open_page
from .test_network_e2e import _click_object, _status
from .test_network_e2e import _wait_status as _wait_status_of
from .test_video_annotator import clip_server
from .test_video_work import _keys


@pytest.fixture()
def video_app(tmp_path: Path, tiny_predictor):
    with clip_server(tmp_path, tiny_predictor, lease_seconds=3.0) as app:
        yield app


def _page(browser, base: str):
    page, errors = open_page(
        browser, base + "/", "#videos li", viewport={"width": 1300, "height": 800}
    )
    page.locator("#videos li", has_text="clip").click()
    _frame(page, 0)
    return page, errors


def _wait_status(page, pattern: str) -> str:
    """:func:`.test_network_e2e._wait_status`, naming what the page shows when it times out."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        return _wait_status_of(page, pattern)
    except PlaywrightTimeout:
        shown = page.evaluate(
            "['#status', '#toast', '#offline', '#lockbar']"
            ".map((s) => s + ': ' + document.querySelector(s).textContent)"
        )
        raise AssertionError(f"the page never showed {pattern!r}; it shows {shown}") from None


def _frame(page, k: int) -> None:
    page.wait_for_function(f"S.video && S.video.frame === {k} && V.shown === {k}", timeout=30_000)


def _key_frames(svc) -> list[int]:
    (t,) = svc.video_store.tracks()
    return sorted(r.frame for r in svc.video_store.frames([t.id], keys_only=True))


def test_video_key_frame_offline_saved_once_and_second_tab_read_only(browser, video_app):
    base, svc = video_app
    one, e1 = _page(browser, base)
    assert one.locator("#lockbar").is_hidden()
    _click_object(one)
    one.keyboard.press("Enter")  # a new object on frame 0
    _wait_status(one, r"^object 1 \(.*\): key frame 0 set")
    assert _key_frames(svc) == [0]

    # the server goes away: a key frame on frame 2 is kept and saved when it is back, once
    one.keyboard.press("ArrowRight")
    one.keyboard.press("ArrowRight")
    _frame(one, 2)
    _click_object(one)
    one.route("**/api/**", lambda route: route.abort())
    one.keyboard.press("Enter")
    _wait_status(one, "^offline: the key frame 2 is kept and will be saved")
    one.wait_for_selector("#offline:not(.hidden)")
    assert "1 change will be saved" in one.locator("#offline").inner_text()
    assert _key_frames(svc) == [0]
    one.unroute("**/api/**")
    one.wait_for_selector("#offline.hidden", state="attached", timeout=10_000)
    _wait_status(one, r"^object 1 \(.*\): key frame 2 set")
    assert _key_frames(svc) == [0, 2]
    assert [k[1] for k in _keys(svc)] == ["track", "key-frame"]

    # the answer of a key frame is lost after the server saved it: the retry (same key) is
    # answered with the object and writes nothing
    lost = {"n": 0}

    def lose_answer(route):
        if route.request.method == "PUT" and lost["n"] == 0:
            lost["n"] += 1
            route.fetch()  # reaches the server, which saves the key frame
            route.abort()  # ... and the page never hears of it
        else:
            route.continue_()

    one.route("**/api/tracks/*/frames/*", lose_answer)
    one.keyboard.press("ArrowRight")
    one.keyboard.press("ArrowRight")
    _frame(one, 4)
    _click_object(one)
    one.keyboard.press("Enter")
    _wait_status(one, r"^object 1 \(.*\): key frame 4 set")
    one.unroute("**/api/tracks/*/frames/*")
    assert lost["n"] == 1 and _key_frames(svc) == [0, 2, 4]
    assert [k[1] for k in _keys(svc)] == ["track", "key-frame", "key-frame"]  # one per write
    one.wait_for_function("document.querySelector('#tracks li').textContent.includes('keys 0,2,4')")

    # a second tab on the same video: read-only, its key frame refused with the reason
    two, e2 = _page(browser, base)
    lock = two.locator("#lockbar")
    assert lock.is_visible()
    assert lock.inner_text().startswith("Locked by local (another tab): read-only here")
    assert "leaves the video" in lock.inner_text()
    assert "\u2298" in two.locator("#videos li", has_text="clip").inner_text()  # the list says so
    assert "\u2298" not in one.locator("#videos li", has_text="clip").inner_text()
    two.locator("#tracks li").first.click()  # select the object
    two.keyboard.press("ArrowRight")
    _frame(two, 1)
    _click_object(two)  # clicks are allowed (nothing is written) ...
    two.keyboard.press("Enter")  # ... saving is refused
    _wait_status(two, r"video \d+ is locked in another tab")
    assert _key_frames(svc) == [0, 2, 4] and len(_keys(svc)) == 3
    assert "locked" in _status(two)
    # the first tab can still write
    assert one.locator("#lockbar").is_hidden()
    assert e1 == [] and e2 == []
    one.close()
    two.close()


def test_a_late_reload_does_not_replace_the_masks_of_a_frame_shown_since(browser, video_app):
    """The masks of a frame asked for before the annotator moved on (a reload after a
    propagation, say) arrive after the newer frame's: they are dropped, not drawn on it."""
    base, _ = video_app
    page, errors = _page(browser, base)
    _click_object(page)
    page.keyboard.press("Enter")  # an object with one key frame: frame 0
    _wait_status(page, r"^object 1 \(.*\): key frame 0 set")
    assert page.evaluate("S.objects.length") == 1
    page.evaluate(
        """() => {
          const plain = api; // frame 0's masks answer late
          window.api = async (method, path, ...rest) => {
            if (path.endsWith('/frames/0/masks')) await new Promise((r) => setTimeout(r, 800));
            return plain(method, path, ...rest);
          };
          reloadFrame();
          showFrame(3);
        }"""
    )
    _frame(page, 3)
    page.wait_for_timeout(1500)  # past the late answer
    assert page.evaluate("S.video.frame") == 3
    assert page.evaluate("S.objects.length") == 0  # frame 3: no mask of the object yet
    assert errors == []
