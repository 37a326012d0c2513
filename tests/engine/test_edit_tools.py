"""Issue #24 items 2 and 3 in a real headless Chromium: the brush and the eraser on a
candidate and on an accepted object (exported pixel for pixel), undo / redo of every kind of
action, label hotkeys with the label shown before the accept, accept-all with a score
filter. The tiny random model: the masks' content does not matter here (each test knows the
mask it starts from). Screenshots go to build/test-artifacts/ (and docs/img/annotate-brush.png
with SEGANY_DOCS_SCREENSHOT=1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from segany.engine import labels as L
from segany.engine.server import create_app
from segany.masks import masks_to_coco_rle, rle_to_mask
from segany.validate import segmentation_to_rle

from ..conftest import REPO
from .conftest import make_service
from .helpers import open_page, server_thread

ARTIFACTS = REPO / "build" / "test-artifacts"
KITCHEN = REPO / "examples" / "kitchen.jpg"
H, W = 426, 640
LABELS = ["person", "dog", "car"]


@pytest.fixture()
def app(tmp_path: Path, tiny_predictor):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(KITCHEN, images / "kitchen.jpg")
    from PIL import Image

    Image.new("RGB", (64, 48), (40, 90, 160)).save(images / "blue.png")
    svc = make_service(
        f"sqlite:///{tmp_path / 'db.sqlite'}", images, tiny_predictor, tmp_path / "cache",
        prefetch=False,
    )  # fmt: skip
    L.register(svc.store, LABELS)
    with server_thread(create_app(svc)) as base:
        yield base, svc
    svc.close()
    svc.store.close()


@pytest.fixture()
def page(browser, app):
    base, _ = app
    p, errors = open_page(
        browser, base + "/", "#images li", viewport={"width": 1400, "height": 860}
    )
    p.locator("#images li", has_text="kitchen.jpg").click()
    p.wait_for_function("S.img !== null && S.current.path === 'kitchen.jpg' && LB.list.length")
    yield p
    assert errors == []
    p.close()


def _screen(page, x: float, y: float) -> tuple[float, float]:
    sx, sy = page.evaluate(f"toScreen({x}, {y})")
    box = page.locator("#canvas").bounding_box()
    return box["x"] + sx, box["y"] + sy


def _pixel(page, x: float, y: float) -> np.ndarray:
    js = """([x, y]) => {
        const [sx, sy] = toScreen(x, y);
        const d = window.devicePixelRatio || 1;
        const c = canvas.getContext('2d');
        return Array.from(c.getImageData(Math.round(sx * d), Math.round(sy * d), 1, 1).data);
    }"""
    page.wait_for_timeout(50)  # one animation frame: the canvas is drawn
    return np.asarray(page.evaluate(js, [x, y])[:3], dtype=float)


def _drag(page, pts: list[tuple[float, float]]) -> None:
    page.mouse.move(*_screen(page, *pts[0]))
    page.mouse.down()
    for p in pts[1:]:
        page.mouse.move(*_screen(page, *p), steps=3)
    page.mouse.up()


def _settle(page) -> None:
    """Wait for the history's steps and any stroke being saved."""
    page.evaluate("T.chain.then(() => null)")
    page.wait_for_function("!T.saving && S.editing == null")


def _stamp(mask: np.ndarray, p0, p1, r: float, val: bool) -> None:
    """The page's stroke (tools.js stampSegment): pixels whose centre is within r of p0-p1."""
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]].astype(float)
    cx, cy = xs + 0.5, ys + 0.5
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    len2 = dx * dx + dy * dy
    t = ((cx - p0[0]) * dx + (cy - p0[1]) * dy) / len2 if len2 > 0 else np.zeros_like(cx)
    t = np.clip(t, 0, 1)
    ex, ey = cx - (p0[0] + t * dx), cy - (p0[1] + t * dy)
    mask[ex * ex + ey * ey <= r * r] = val


def _apply_last_stroke(page, mask: np.ndarray, back: int = 1) -> np.ndarray:
    """``mask`` with the page's last stroke (or the one ``back`` steps back in the history:
    its recorded points and size) applied."""
    js = f"""(() => {{ const s = T.done[T.done.length - {back}];
        return {{kind: s.kind, tool: s.tool, size: s.size, points: s.points}}; }})()"""
    st = page.evaluate(js)
    assert st["kind"] == "stroke" and len(st["points"]) >= 1
    out = mask.copy()
    pts = st["points"]
    val = st["tool"] == "brush"
    _stamp(out, pts[0], pts[0], st["size"] / 2, val)
    for a, b in zip(pts, pts[1:], strict=False):
        _stamp(out, a, b, st["size"] / 2, val)
    return out


def _candidate(page) -> np.ndarray:
    """The current candidate's mask: its RLE (what Enter would send), decoded here."""
    seg = page.evaluate("current().result.masks[current().sel].segmentation")
    return rle_to_mask(segmentation_to_rle(seg, H, W))


def _exported(base: str, ann_id: int) -> np.ndarray:
    import httpx

    coco = httpx.get(base + "/api/export/coco").json()
    (a,) = [a for a in coco["annotations"] if a["id"] == ann_id]
    return rle_to_mask(a["segmentation"])


def test_brush_and_eraser_on_a_candidate_and_an_object(page, app):
    base, svc = app
    iid = svc.store.image_by_path("kitchen.jpg").id
    page.mouse.click(*_screen(page, 300, 200))
    page.wait_for_function("current() && current().result !== null")
    want = _candidate(page)
    # brush (B) a stroke onto the candidate, 12 px wide
    page.evaluate("setBrushSize(12)")
    page.keyboard.press("b")
    assert page.evaluate("T.tool") == "brush"
    _drag(page, [(60, 60), (90, 64), (120, 80)])
    want = _apply_last_stroke(page, want)
    assert np.array_equal(_candidate(page), want)
    assert want[64, 90] and page.evaluate("current().result.masks[current().sel].edited")
    # eraser (X): one dab and a line through the model's mask
    page.keyboard.press("x")
    page.keyboard.press("]")  # 12 -> 15 px
    assert page.evaluate("T.size") == 15
    _drag(page, [(300, 200)])
    want = _apply_last_stroke(page, want)
    before_line = want
    _drag(page, [(62, 60), (62, 100)])
    want = _apply_last_stroke(page, want)
    assert not want[200, 300] and not want[70, 62] and (before_line & ~want).any()
    assert np.array_equal(_candidate(page), want)
    # undo / redo of strokes on the candidate
    page.keyboard.press("Control+z")
    _settle(page)
    assert np.array_equal(_candidate(page), before_line)  # the erased line is back
    page.keyboard.press("Control+y")
    _settle(page)
    assert np.array_equal(_candidate(page), want)
    # accept: the stored and exported mask is the edited candidate, pixel for pixel
    page.keyboard.press("Enter")
    page.wait_for_selector("#objects li")
    (ann,) = svc.store.annotations(iid)
    assert ann.area == int(want.sum())
    assert np.array_equal(_exported(base, ann.id), want)

    # brush on the accepted object (selected, no candidate)
    page.keyboard.press("x")  # the eraser off, the brush on
    page.keyboard.press("b")
    assert page.evaluate("T.tool") == "brush"
    page.evaluate(f"selectObject({ann.id}, false)")
    assert page.evaluate("describeTarget()") == f"object {ann.id} (object)"
    _drag(page, [(400, 300), (430, 320)])
    _settle(page)
    edited = _apply_last_stroke(page, want)
    assert edited.sum() > want.sum()
    assert np.array_equal(rle_to_mask(svc.store.annotation(ann.id).segmentation), edited)
    assert np.array_equal(_exported(base, ann.id), edited)
    x, y = _screen(page, 500, 120)  # the brush's outline where the mouse is, for the picture
    page.mouse.move(x, y)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(100)
    page.screenshot(path=str(ARTIFACTS / "annotate-brush-object.png"))
    # undo / redo of the object's stroke go through the server; the history keeps both masks
    page.keyboard.press("Control+z")
    _settle(page)
    assert np.array_equal(rle_to_mask(svc.store.annotation(ann.id).segmentation), want)
    page.keyboard.press("Control+y")
    _settle(page)
    assert np.array_equal(_exported(base, ann.id), edited)
    kinds = [e.kind for e in svc.store.events() if e.annotation_id == ann.id]
    assert kinds == ["accept", "edit", "edit", "edit"]
    # erasing the whole object is refused (422): the object stays as it was
    page.keyboard.press("x")
    page.evaluate("setBrushSize(256)")
    page.evaluate(f"selectObject({ann.id}, false)")
    _drag(page, [(0, 0), (640, 0), (640, 200), (0, 200), (0, 400), (640, 400)])
    _settle(page)
    assert "empty" in page.locator("#toast").inner_text()
    assert np.array_equal(_exported(base, ann.id), edited)


def _accept_candidate(page, x: float, y: float) -> int:
    n = page.evaluate("S.objects.length")
    page.mouse.click(*_screen(page, x, y))
    page.wait_for_function("current() && current().result !== null")
    page.keyboard.press("Enter")
    page.wait_for_function(f"S.objects.length === {n + 1}")
    return page.evaluate("T.done[T.done.length - 1].id")


def test_undo_redo_of_every_action(page, app):
    import httpx

    base, svc = app
    store = svc.store
    iid = store.image_by_path("kitchen.jpg").id
    # accept: undone it is deleted and its clicks come back; redone it is restored, same id
    a = _accept_candidate(page, 300, 200)
    assert store.annotation(a).status == "accepted"
    page.keyboard.press("Control+z")
    _settle(page)
    assert store.annotation(a) is None and len(page.evaluate("current().points")) == 1
    page.keyboard.press("Control+y")
    _settle(page)
    assert store.annotation(a).status == "accepted" and page.evaluate("current()") is None
    # delete (Del), undone (U as well as Ctrl+Z): the same object, same id and mask
    mask = rle_to_mask(store.annotation(a).segmentation)
    page.evaluate(f"selectObject({a}, false)")
    page.keyboard.press("Delete")
    page.wait_for_function("S.objects.length === 0")
    assert store.annotation(a) is None
    page.keyboard.press("u")
    _settle(page)
    assert np.array_equal(rle_to_mask(store.annotation(a).segmentation), mask)
    page.keyboard.press("Control+Shift+z")  # redo the delete
    _settle(page)
    assert store.annotation(a) is None
    page.keyboard.press("Control+z")
    _settle(page)
    assert store.annotation(a) is not None
    # category edit in the list
    field = page.locator(f'#objects li[data-id="{a}"] .cat')
    field.click()
    field.fill("DOG")
    field.press("Enter")
    page.wait_for_function(f"S.objects.find(o => o.id === {a}).category === 'dog'")
    assert store.annotation(a).category == "dog"
    page.keyboard.press("Control+z")
    _settle(page)
    assert store.annotation(a).category == "object"
    page.keyboard.press("Control+y")
    _settle(page)
    assert store.annotation(a).category == "dog"

    # pending objects: accept one (A), undo; then accept-all with a score filter, one undo
    items = []
    for k, score in enumerate((0.9, 0.6, 0.3)):
        m = np.zeros((H, W), bool)
        m[10 + 40 * k : 40 + 40 * k, 500:560] = True
        items.append({"image_id": iid, "category": "object", "status": "pending", "stage": 2,
                      "source": "prefill", "segmentation": masks_to_coco_rle(m[None])[0],
                      "bbox": [500.0, 10.0 + 40 * k, 60.0, 30.0], "area": 1800,
                      "score": score})  # fmt: skip
    p9, p6, p3 = (x.id for x in store.add_annotations(items))
    page.evaluate("loadObjects()")
    page.wait_for_function("S.objects.filter(o => o.status === 'pending').length === 3")
    page.keyboard.press("Shift+Digit3")  # the label "car"
    page.evaluate(f"selectObject({p3}, false)")
    page.keyboard.press("a")
    page.wait_for_function("S.objects.filter(o => o.status === 'pending').length === 2")
    assert (store.annotation(p3).status, store.annotation(p3).category) == ("accepted", "car")
    page.keyboard.press("Control+z")
    _settle(page)
    assert (store.annotation(p3).status, store.annotation(p3).category) == ("pending", "object")

    page.locator("#min-score").fill("0.5")
    page.locator("#canvas").focus()
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.accept()))
    page.keyboard.press("Shift+A")
    page.wait_for_function("S.objects.filter(o => o.status === 'pending').length === 1")
    assert asked == [
        'Accept 2 of 3 pending object(s) with score >= 0.5 (2 class-agnostic one(s) as "car")?'
    ]
    got = {i: (store.annotation(i).status, store.annotation(i).category) for i in (p9, p6, p3)}
    assert got == {p9: ("accepted", "car"), p6: ("accepted", "car"), p3: ("pending", "object")}
    page.keyboard.press("Control+z")  # one undo: all back to pending, as they were
    _settle(page)
    got = {i: (store.annotation(i).status, store.annotation(i).category) for i in (p9, p6, p3)}
    assert set(got.values()) == {("pending", "object")}
    page.keyboard.press("Control+y")
    _settle(page)
    assert store.annotation(p9).status == store.annotation(p6).status == "accepted"
    assert store.annotation(p3).status == "pending"
    # the measurements: each action is an event of the object, each undo and redo one too
    kinds = [e.kind for e in store.events() if e.annotation_id == a]
    assert kinds == ["accept", "delete", "restore", "delete", "restore", "delete", "restore",
                     "edit", "edit", "edit"]  # fmt: skip
    assert [e.kind for e in store.events() if e.annotation_id == p3] == ["accept", "status"]
    assert [e.kind for e in store.events() if e.annotation_id == p9] == [
        "accept", "status", "accept"
    ]  # fmt: skip
    for _ in range(50):  # the page's undo / redo events are written in the background
        kinds = [e.kind for e in store.events(kinds=["undo", "redo"])]
        if len(kinds) >= 10:
            break
        page.wait_for_timeout(100)
    assert kinds.count("undo") == 6 and kinds.count("redo") == 4

    # a fix (E, then Enter) undone: the fix deleted, the pending object pending again
    page.evaluate(f"selectObject({p3}, false)")
    page.keyboard.press("e")
    page.wait_for_function("current() && current().box && current().result !== null")
    page.keyboard.press("Enter")
    page.wait_for_function("S.objects.filter(o => o.status === 'pending').length === 0")
    fix = store.fix_of(p3)
    assert fix is not None and store.annotation(p3).status == "rejected"
    fixed = lambda: httpx.get(base + "/api/stats").json()["prefill"]["fixed"]  # noqa: E731
    assert fixed() == 1
    page.keyboard.press("Control+z")
    _settle(page)
    assert store.annotation(fix) is None and store.annotation(p3).status == "pending"
    assert fixed() == 0 and page.evaluate("S.fixing") == p3  # back to fixing it
    page.keyboard.press("Control+y")
    _settle(page)
    assert store.fix_of(p3) == fix and store.annotation(p3).status == "rejected"
    assert fixed() == 1


def test_label_hotkeys_shown_before_accept(page, app):
    base, svc = app
    iid = svc.store.image_by_path("kitchen.jpg").id
    chips = [t.split() for t in page.locator(".label-chip").all_inner_texts()]
    assert chips == [["person", "\u21e71"], ["dog", "\u21e72"], ["car", "\u21e73"]]
    page.keyboard.press("Shift+Digit2")
    assert page.locator("#label-now").inner_text() == "label: dog (Shift+2)"
    assert page.locator(".label-chip.chosen").inner_text().startswith("dog")
    # a mask painted from nothing: the candidate is drawn in the label's colour
    before = _pixel(page, 470, 320)
    page.keyboard.press("b")
    page.evaluate("setBrushSize(20)")
    _drag(page, [(470, 320)])
    alpha = 120 / 255
    dog = np.asarray(_rgb(L.PALETTE[1]), float)
    assert np.abs(_pixel(page, 470, 320) - (before * (1 - alpha) + dog * alpha)).max() <= 3
    page.keyboard.press("Shift+Digit3")  # another label: the same mask in car yellow
    car = np.asarray(_rgb(L.PALETTE[2]), float)
    assert page.locator("#label-now").inner_text() == "label: car (Shift+3)"
    assert np.abs(_pixel(page, 470, 320) - (before * (1 - alpha) + car * alpha)).max() <= 3
    page.keyboard.press("Shift+Digit1")
    _drag(page, [(480, 320), (520, 360), (560, 380)])  # a second stroke on it
    x, y = _screen(page, 600, 300)
    page.mouse.move(x, y)
    page.wait_for_timeout(100)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / "annotate-brush.png"
    page.screenshot(path=str(out))
    if os.environ.get("SEGANY_DOCS_SCREENSHOT"):
        (REPO / "docs" / "img").mkdir(exist_ok=True)
        shutil.copy(out, REPO / "docs" / "img" / "annotate-brush.png")
    want = _apply_last_stroke(page, np.zeros((H, W), bool), back=2)  # the dab
    want = _apply_last_stroke(page, want)  # and the stroke
    page.keyboard.press("Enter")
    page.wait_for_selector("#objects li")
    (ann,) = svc.store.annotations(iid)
    assert ann.category == "person" and ann.area == int(want.sum())
    assert np.array_equal(rle_to_mask(ann.segmentation), want)
    # the label stays chosen (and shown); a typed name is not carried to another image
    assert page.locator("#label-now").inner_text() == "label: person (Shift+1)"
    page.locator("#category").fill(" CAR")  # a label in another spelling is that label
    assert page.locator("#label-now").inner_text() == "label: car (Shift+3)"
    page.locator("#category").fill("zebra")
    assert page.locator("#label-now").inner_text() == "label: zebra (new)"
    page.locator("#canvas").focus()
    page.keyboard.press("p")  # the previous image
    page.wait_for_function("S.current.path === 'blue.png' && S.img !== null")
    assert page.locator("#category").input_value() == "person"
    assert page.locator("#label-now").inner_text() == "label: person (Shift+1)"
    # a label added on the page gets the next id, colour and hotkey
    page.locator("#category").fill("Traffic  light")
    page.locator("#add-label").click()
    page.wait_for_function("LB.list.length === 4")
    assert page.locator("#label-now").inner_text() == "label: Traffic light (Shift+4)"
    assert [(x.id, x.name, x.color) for x in L.label_set(svc.store)][-1] == (
        4, "Traffic light", L.PALETTE[3],
    )  # fmt: skip


def _rgb(hex_color: str) -> list[int]:
    return [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
