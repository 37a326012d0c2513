"""The annotator's JSON API on SQLite and on a PostgreSQL server started by the tests
(each test runs on both; the PostgreSQL run is skipped, with the reason, only where the
server cannot be started)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
from pycocotools import mask as mask_utils

from segany.masks import masks_to_coco_rle, rle_to_mask

from .conftest import image_id


def decode(rle: dict) -> np.ndarray:
    return rle_to_mask(rle)


def test_images_registered_and_bad_files_reported(client):
    data = client.get("/api/images").json()
    by_path = {im["path"]: im for im in data["images"]}
    assert set(by_path) == {"a.png", "b.jpg", "sub/c.png", "broken.jpg", "huge.png"}
    assert by_path["a.png"]["status"] == "ok" and by_path["a.png"]["width"] == 144
    assert by_path["sub/c.png"]["height"] == 64
    assert by_path["broken.jpg"]["status"] == "error"
    assert "not a readable image" in by_path["broken.jpg"]["error"]
    assert "/" not in by_path["broken.jpg"]["error"].split(":", 1)[1].replace("sub/", "")
    assert by_path["huge.png"]["status"] == "error" and "too large" in by_path["huge.png"]["error"]
    assert data["total"] == 5 and data["done"] == 0


def test_click_refine_accept_reload_delete(client, service):
    iid = image_id(client, "a.png")
    r = client.post(f"/api/images/{iid}/open")
    assert r.status_code == 200 and r.json()["next_id"] is not None
    r = client.post(f"/api/images/{iid}/predict", json={"points": [[60, 40]], "labels": [1]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["masks"]) == 3 and out["width"] == 144 and out["height"] == 96
    for m in out["masks"]:
        mask = decode(m["segmentation"])
        assert mask.shape == (96, 144) and int(mask.sum()) == m["area"]
    assert out["best"] == int(np.argmax([m["score"] for m in out["masks"]]))
    # refine with a background click and the chosen candidate as mask input
    chosen = out["masks"][1]
    r = client.post(
        f"/api/images/{iid}/predict",
        json={
            "points": [[60, 40], [10, 10]],
            "labels": [1, 0],
            "multimask": False,
            "mask_input_id": chosen["mask_input_id"],
        },
    )
    assert r.status_code == 200, r.text
    refined = r.json()["masks"]
    assert len(refined) == 1
    # a box prompt
    r = client.post(f"/api/images/{iid}/predict", json={"box": [30, 20, 90, 60]})
    assert r.status_code == 200, r.text

    # accept (the RLE as returned) with a category
    seg = refined[0]["segmentation"]
    r = client.post(f"/api/images/{iid}/annotations", json={"segmentation": seg, "category": "cat"})
    assert r.status_code == 201, r.text
    ann = r.json()
    assert ann["category"] == "cat" and ann["status"] == "accepted" and ann["stage"] == 1
    assert ann["clicks"] == 3 and ann["seconds"] is not None and ann["user"] == "local"
    assert ann["model_id"] == "tiny-test-model"
    assert np.array_equal(decode(ann["segmentation"]), decode(seg))
    # accept a candidate by id; the category is normalised
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"mask_id": out["masks"][2]["mask_input_id"], "category": "  big   dog "},
    )
    assert r.status_code == 201 and r.json()["category"] == "big dog"
    assert r.json()["clicks"] == 0

    listed = client.get(f"/api/images/{iid}/annotations").json()["annotations"]
    assert [a["category"] for a in listed] == ["cat", "big dog"]
    assert client.get("/api/images").json()["categories"] == ["big dog", "cat"]

    r = client.patch(f"/api/annotations/{ann['id']}", json={"category": "tabby"})
    assert r.status_code == 200 and r.json()["category"] == "tabby"
    assert client.delete(f"/api/annotations/{ann['id']}").status_code == 204
    assert client.delete(f"/api/annotations/{ann['id']}").status_code == 404
    left = client.get(f"/api/images/{iid}/annotations").json()["annotations"]
    assert [a["category"] for a in left] == ["big dog"]


def test_accept_validates_the_mask(client):
    iid = image_id(client, "a.png")
    wrong = masks_to_coco_rle(np.ones((1, 10, 10), dtype=bool))[0]
    r = client.post(f"/api/images/{iid}/annotations", json={"segmentation": wrong})
    assert r.status_code == 422 and "does not match" in r.json()["detail"]
    empty = masks_to_coco_rle(np.zeros((1, 96, 144), dtype=bool))[0]
    r = client.post(f"/api/images/{iid}/annotations", json={"segmentation": empty})
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"segmentation": {"size": [96, 144], "counts": "!!!garbage"}},
    )
    assert r.status_code == 422 and "RLE" in r.json()["detail"]
    r = client.post(f"/api/images/{iid}/annotations", json={"category": "x"})
    assert r.status_code == 422
    r = client.post(f"/api/images/{iid}/annotations", json={"mask_id": "nope-0"})
    assert r.status_code == 404
    # uncompressed RLE is accepted and stored compressed
    m = np.zeros((96, 144), dtype=bool)
    m[10:20, 5:50] = True
    counts = [5 * 96 + 10]
    for _ in range(45):
        counts += [10, 86]
    counts[-1] = 96 * 144 - sum(counts[:-1])
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"segmentation": {"size": [96, 144], "counts": counts}, "category": "strip"},
    )
    assert r.status_code == 201, r.text
    got = r.json()
    assert isinstance(got["segmentation"]["counts"], str) and got["area"] == 450
    assert np.array_equal(decode(got["segmentation"]), m)
    assert got["bbox"] == [5.0, 10.0, 45.0, 10.0]


def test_embedding_cached_on_disk_and_next_image_prefetched(client, service, tmp_path):
    ids = {im["path"]: im["id"] for im in client.get("/api/images").json()["images"]}
    client.post(f"/api/images/{ids['a.png']}/open")
    service.wait_prefetch()
    a = service.store.image(ids["a.png"])
    b = service.store.image(ids["b.jpg"])
    assert service.embedding_ready(a)
    assert service.embedding_ready(b)  # the next image of the queue was embedded ahead
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    # a new service (a restart) reads the embedding from disk: no encoder run
    from segany.predictor import Predictor

    from .conftest import make_service

    calls = []
    orig = Predictor.embed

    def counting(self, rgb):
        calls.append(rgb.shape)
        return orig(self, rgb)

    Predictor.embed = counting
    try:
        svc2 = make_service(
            service.store.url,
            service.root,
            service._new_predictor(),
            tmp_path / "cache",
            prefetch=False,
        )
        try:
            emb = svc2.embedding(svc2.store.image(ids["a.png"]))
            assert emb.original_size == (96, 144)
            assert calls == []
            svc2.embedding(svc2.store.image(ids["sub/c.png"]))
            assert len(calls) == 1
        finally:
            svc2.close()
    finally:
        Predictor.embed = orig


class FakeGenerator:
    """Four rectangles with predicted IoUs 0.95, 0.9, 0.8, 0.7; the thresholds of the
    request filter them as the real generator would."""

    def __init__(self, req):
        self.req = req

    def generate(self, rgb):
        h, w = rgb.shape[:2]
        out = []
        for k, iou in enumerate((0.95, 0.9, 0.8, 0.7)):
            m = np.zeros((h, w), dtype=bool)
            m[5 + 20 * k : 20 + 20 * k, 10 : 10 + 30 * (k + 1)] = True
            if iou < self.req.pred_iou_thresh:
                continue
            out.append(
                {
                    "segmentation": masks_to_coco_rle(m[None])[0],
                    "area": int(m.sum()),
                    "bbox": [0, 0, 1, 1],
                    "predicted_iou": iou,
                    "stability_score": 0.97,
                    "point_coords": [[15.0, 10.0 + 20 * k]],
                }
            )
        return out


def test_prefill_with_the_real_generator(client):
    iid = image_id(client, "a.png")
    r = client.post(
        f"/api/images/{iid}/prefill",
        json={
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
            "min_area": 0,
            "points_per_side": 4,
        },
    )
    assert r.status_code == 200, r.text
    pre = r.json()
    assert pre["created"] >= 1
    assert all(a["status"] == "pending" and a["source"] == "prefill" for a in pre["annotations"])
    assert all(a["score"] is not None and a["stage"] == 2 for a in pre["annotations"])


def test_prefill_accept_reject_fix_and_stats(client, service):
    service._generator_factory = FakeGenerator
    iid = image_id(client, "a.png")
    client.post(f"/api/images/{iid}/open")
    # one manual object first: a pre-filled mask overlapping it is skipped
    m = np.zeros((96, 144), dtype=bool)
    m[5:20, 10:40] = True
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"segmentation": masks_to_coco_rle(m[None])[0], "category": "red"},
    )
    assert r.status_code == 201
    r = client.post(f"/api/images/{iid}/prefill", json={"pred_iou_thresh": 0.75})
    assert r.status_code == 200, r.text
    pre = r.json()
    assert pre["created"] == 2 and pre["skipped_overlap"] == 1, pre
    assert all(a["status"] == "pending" and a["source"] == "prefill" for a in pre["annotations"])
    assert pre["settings"]["pred_iou_thresh"] == 0.75
    # another run with other thresholds replaces the pending ones
    r = client.post(f"/api/images/{iid}/prefill", json={"pred_iou_thresh": 0.5})
    assert r.status_code == 200 and r.json()["removed_pending"] == 2
    pending = r.json()["annotations"]
    assert [a["score"] for a in pending] == [0.9, 0.8, 0.7]
    img = client.get(f"/api/images/{iid}").json()
    assert img["stage"] == 2 and img["pending"] == len(pending)

    p0, p1 = pending[0], pending[1]
    r = client.patch(
        f"/api/annotations/{p0['id']}", json={"status": "accepted", "category": "thing"}
    )
    assert r.status_code == 200 and r.json()["status"] == "accepted" and r.json()["user"] == "local"
    # fix p1 with a click: the new mask replaces it
    r = client.post(f"/api/images/{iid}/predict", json={"points": [[20, 20]], "labels": [1]})
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={
            "mask_id": r.json()["masks"][0]["mask_input_id"],
            "category": "fixed",
            "replaces": p1["id"],
        },
    )
    assert r.status_code == 201 and r.json()["stage"] == 2
    assert client.get(f"/api/annotations/{p1['id']}").json()["status"] == "rejected"
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"mask_id": "x", "category": "fixed", "replaces": p1["id"]},
    )
    assert r.status_code == 404  # the mask id is checked first
    r = client.post(f"/api/images/{iid}/predict", json={"points": [[20, 20]], "labels": [1]})
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"mask_id": r.json()["masks"][0]["mask_input_id"], "replaces": p1["id"]},
    )
    assert r.status_code == 409  # already replaced
    r = client.patch(f"/api/annotations/{pending[2]['id']}", json={"status": "rejected"})
    assert r.status_code == 200 and r.json()["status"] == "rejected"

    s = client.get("/api/stats").json()
    stages = {row["stage"]: row for row in s["stages"]}
    assert stages[1]["masks"] == 1 and stages[1]["clicks_per_mask"] == 0.0
    assert stages[2]["masks"] == 2 and stages[2]["prefill"] == 1 and stages[2]["manual"] == 1
    assert stages[2]["masks_per_image"] == 2.0
    assert s["prefill"]["proposed"] == 3 and s["prefill"]["accepted"] == 1
    assert s["prefill"]["fixed"] == 1 and s["prefill"]["rejected"] == 1
    assert s["prefill"]["acceptance_rate"] == round(1 / 3, 3)
    assert s["rows"][0]["annotator"] == "local"
    assert s["categories"] == {"fixed": 1, "red": 1, "thing": 1}


def test_undo_events_counted(client):
    iid = image_id(client, "a.png")
    assert client.post(f"/api/images/{iid}/events", json={"kind": "undo"}).status_code == 204
    assert client.post(f"/api/images/{iid}/events", json={"kind": "hack"}).status_code == 422
    client.app.state.service._events.close()  # flush the background writer
    client.app.state.service._events = type(client.app.state.service._events)(
        client.app.state.service.store
    )
    assert client.get("/api/stats").json()["undo_total"] == 1


def _accept_some(client) -> dict[str, int]:
    ids = {im["path"]: im["id"] for im in client.get("/api/images").json()["images"]}
    for path, cat in (("a.png", "red box"), ("a.png", "noise"), ("sub/c.png", "red box")):
        r = client.post(
            f"/api/images/{ids[path]}/predict", json={"points": [[40, 30]], "labels": [1]}
        )
        best = r.json()["masks"][r.json()["best"]]
        r = client.post(
            f"/api/images/{ids[path]}/annotations",
            json={"mask_id": best["mask_input_id"], "category": cat},
        )
        assert r.status_code == 201
    return ids


def test_export_coco_sa1b_yolo(client):
    from pycocotools.coco import COCO

    ids = _accept_some(client)
    r = client.get("/api/export/coco")
    assert r.status_code == 200
    data = r.json()
    # ids in order of first use (tests/engine/test_categories.py: they never shift)
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "red box"), (2, "noise")]
    assert {im["file_name"] for im in data["images"]} == {"a.png", "b.jpg", "sub/c.png"}
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    assert len(coco.getAnnIds(imgIds=[ids["a.png"]])) == 2
    stored = client.get(f"/api/images/{ids['a.png']}/annotations").json()["annotations"]
    for a in stored:
        ann = coco.anns[a["id"]]
        assert np.array_equal(coco.annToMask(ann).astype(bool), decode(a["segmentation"]))
        assert coco.cats[ann["category_id"]]["name"] == a["category"]
        assert ann["area"] == a["area"]

    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/sa1b").content))
    assert sorted(z.namelist()) == ["a.png.json", "b.jpg.json", "sub/c.png.json"]
    sa = json.loads(z.read("a.png.json"))
    assert sa["image"]["width"] == 144 and len(sa["annotations"]) == 2
    assert {a["category"] for a in sa["annotations"]} == {"red box", "noise"}
    m = mask_utils.decode(
        {
            "size": sa["annotations"][0]["segmentation"]["size"],
            "counts": sa["annotations"][0]["segmentation"]["counts"].encode(),
        }
    )
    assert m.shape == (96, 144)

    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/yolo").content))
    assert z.read("classes.txt").decode().splitlines() == ["red box", "noise"]
    lines = z.read("labels/a.txt").decode().splitlines()
    assert len(lines) <= 2 and all(line.split()[0] in ("0", "1") for line in lines)
    for line in lines:
        vals = [float(v) for v in line.split()[1:]]
        assert len(vals) % 2 == 0 and all(0 <= v <= 1 for v in vals)
    assert "names:" in z.read("data.yaml").decode()


def test_import_coco_for_review(client):
    ids = _accept_some(client)
    exported = client.get("/api/export/coco").json()
    n_before = len(exported["annotations"])
    # a polygon too, and an image the folder does not have
    exported["annotations"].append(
        {
            "id": 999,
            "image_id": ids["b.jpg"],
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[10, 10, 60, 10, 60, 50, 10, 50]],
        }
    )
    exported["images"].append({"id": 77, "file_name": "nowhere.png", "width": 5, "height": 5})
    exported["annotations"].append(
        {"id": 1000, "image_id": 77, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}
    )
    r = client.post("/api/import/coco", json=exported)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["annotations"] == n_before + 1 and out["skipped_images"] == ["nowhere.png"]
    assert out["skipped_annotations"] == 1
    b = client.get(f"/api/images/{ids['b.jpg']}/annotations").json()["annotations"]
    assert len(b) == 1 and b[0]["status"] == "pending" and b[0]["source"] == "import"
    assert b[0]["category"] == "red box" and 1900 < b[0]["area"] < 2200
    s = client.get("/api/stats").json()
    assert s["imported"] == n_before + 1
    # malformed imports
    assert client.post("/api/import/coco", json={"images": "x"}).status_code == 422
    assert client.post("/api/import/coco", json=[1, 2]).status_code == 422
    r = client.post("/api/import/coco?status=weird", json=exported)
    assert r.status_code == 400


def test_rescan_picks_up_new_and_missing_files(client, images_dir):
    from PIL import Image

    Image.new("RGB", (40, 30), (0, 200, 0)).save(images_dir / "sub" / "new.png")
    (images_dir / "b.jpg").unlink()
    r = client.post("/api/rescan")
    assert r.status_code == 200
    assert r.json()["added"] == 1 and r.json()["missing"] == 1
    by_path = {im["path"]: im for im in client.get("/api/images").json()["images"]}
    assert by_path["sub/new.png"]["status"] == "ok"
    assert by_path["b.jpg"]["status"] == "missing"
    assert client.get(f"/api/images/{by_path['b.jpg']['id']}/file").status_code == 404
    r = client.get(f"/api/images/{by_path['sub/new.png']['id']}/file")
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"


def test_mark_done_progress(client):
    iid = image_id(client, "a.png")
    r = client.post(f"/api/images/{iid}/done", json={"done": True})
    assert r.status_code == 200 and r.json()["done"] is True
    assert client.get("/api/images").json()["done"] == 1


def test_ui_pages_served_without_external_assets(client):
    html = client.get("/").text
    assert "<canvas" in html and "http://" not in html and "https://" not in html
    for asset in ("app.js", "rle.js", "style.css", "stats.js"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "https://" not in r.text
    assert "Per annotator" in client.get("/stats").text
    assert client.get("/openapi.json").json()["paths"]["/api/images/{image_id}/predict"]


def test_tokens_when_auth_is_on(client, service):
    service.auth = True
    assert client.get("/api/config").json()["auth"] is True
    r = client.get("/api/images")
    assert r.status_code == 401 and "token" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/images", headers={"Authorization": "Bearer nope"}).status_code == 401
    _, admin = service.store.issue_token("boss", is_admin=True)
    h = {"Authorization": f"Bearer {admin}"}
    assert client.get("/api/me", headers=h).json()["name"] == "boss"
    r = client.post("/api/users", json={"name": "ann"}, headers=h)
    assert r.status_code == 201
    ann_h = {"Authorization": f"Bearer {r.json()['token']}"}
    assert client.post("/api/users", json={"name": "eve"}, headers=ann_h).status_code == 403
    assert client.post("/api/users", json={"name": "bad name!"}, headers=h).status_code == 422
    iid = image_id(client, "a.png", headers=ann_h)
    r = client.post(
        f"/api/images/{iid}/predict", json={"points": [[5, 5]], "labels": [1]}, headers=ann_h
    )
    assert r.status_code == 200
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"mask_id": r.json()["masks"][0]["mask_input_id"]},
        headers=ann_h,
    )
    assert r.status_code == 201 and r.json()["user"] == "ann"
    assert client.post(f"/api/images/{iid}/annotations", json={"mask_id": "x"}).status_code == 401
    # a new token for the same user revokes the old one
    service.store.issue_token("ann")
    assert client.get("/api/me", headers=ann_h).status_code == 401


# -- stage 2 by class names (text detector) -----------------------------------------------------
class BoxDetector:
    """A text detector with fixed boxes on a.png (96 x 144): the first query at 0.9 on the
    red rectangle, the second at 0.6 lower right, the first again at 0.2 top left."""

    name = "stub-det"
    default_box_threshold = 0.3
    default_text_threshold = 0.25

    def __init__(self):
        self.calls = []

    def detect(self, image, queries, *, box_threshold=None, text_threshold=None):
        from segany.text import Detections

        self.calls.append((list(queries), box_threshold, text_threshold))
        boxes = np.array([[30, 20, 90, 60], [100, 60, 140, 90], [0, 0, 24, 16]], float)
        scores = np.array([0.9, 0.6, 0.2])
        labels = np.array([0, 1, 0]) % len(queries)
        bt = self.default_box_threshold if box_threshold is None else box_threshold
        keep = np.flatnonzero(scores > bt)
        return Detections(
            boxes[keep], scores[keep], labels[keep], [f"a {queries[i]}" for i in labels[keep]],
            list(queries),
        )  # fmt: skip


def _text_client(db_url, images_dir, predictor, tmp_path, detector):
    from fastapi.testclient import TestClient

    from segany.engine.server import create_app

    from .conftest import make_service

    svc = make_service(db_url, images_dir, predictor, tmp_path / "cache", detector=detector,
                       prefetch=False)  # fmt: skip
    return svc, TestClient(create_app(svc), base_url="http://localhost")


def test_prefill_with_classes_and_coco_export(db_url, images_dir, tiny_predictor, tmp_path):
    from pycocotools.coco import COCO

    stub = BoxDetector()
    svc, client = _text_client(db_url, images_dir, tiny_predictor, tmp_path, stub)
    try:
        assert client.get("/api/config").json()["detector"] == "stub-det"
        iid = image_id(client, "a.png")
        r = client.post(
            f"/api/images/{iid}/prefill",
            json={"classes": " dog .  cat . dog", "box_threshold": 0.1, "text_threshold": 0.4,
                  "category": "ignored", "pred_iou_thresh": 1.0},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        pre = r.json()
        assert stub.calls[-1] == (["dog", "cat"], 0.1, 0.4)
        assert pre["settings"]["classes"] == "dog . cat"
        assert pre["settings"]["detector"] == "stub-det"
        anns = pre["annotations"]
        assert pre["created"] == len(anns) == 3  # pred_iou_thresh does not apply to classes
        assert [a["category"] for a in anns] == ["dog", "cat", "dog"]
        assert [a["detector_score"] for a in anns] == [0.9, 0.6, 0.2]
        assert [a["phrase"] for a in anns] == ["a dog", "a cat", "a dog"]
        for a in anns:
            assert a["status"] == "pending" and a["source"] == "prefill" and a["stage"] == 2
            assert a["model_id"] == "tiny-test-model+stub-det"
            assert a["score"] is not None and a["stability"] is not None
            assert a["area"] == int(decode(a["segmentation"]).sum()) > 0
        # stored, not only answered: the listing has the same categories and scores
        listed = client.get(f"/api/images/{iid}/annotations").json()["annotations"]
        assert [(a["category"], a["detector_score"]) for a in listed] == [
            ("dog", 0.9),
            ("cat", 0.6),
            ("dog", 0.2),
        ]
        # the detector's default threshold (0.3) drops the weak box; the run replaces the last
        r = client.post(f"/api/images/{iid}/prefill", json={"classes": "dog . cat"})
        assert r.status_code == 200, r.text
        assert r.json()["removed_pending"] == 3 and r.json()["created"] == 2
        assert stub.calls[-1] == (["dog", "cat"], None, None)
        r = client.post(f"/api/images/{iid}/prefill", json={"classes": "cat", "max_masks": 1})
        assert r.status_code == 200 and [a["category"] for a in r.json()["annotations"]] == ["cat"]
        r = client.post(f"/api/images/{iid}/prefill", json={"classes": "dog . cat"})
        assert r.status_code == 200 and r.json()["created"] == 2

        # COCO export: pending objects only when asked, with their classes as categories
        plain = client.get("/api/export/coco").json()
        assert plain["annotations"] == []
        assert not {"cat", "dog"} & {c["name"] for c in plain["categories"]}
        data = client.get("/api/export/coco", params={"include_pending": "true"}).json()
        assert sorted(c["name"] for c in data["categories"]) == ["cat", "dog"]
        api = COCO()
        api.dataset = data
        api.createIndex()
        names = {c["id"]: c["name"] for c in data["categories"]}
        exported = sorted(
            (names[a["category_id"]], a["attributes"]["detector_score"], a["attributes"]["phrase"])
            for a in api.loadAnns(api.getAnnIds())
        )
        assert exported == [("cat", 0.6, "a cat"), ("dog", 0.9, "a dog")]
        for a in api.loadAnns(api.getAnnIds()):
            assert api.annToMask(a).sum() == a["area"]

        # bad class lists are refused before any work
        n = len(stub.calls)
        r = client.post(f"/api/images/{iid}/prefill", json={"classes": " . , "})
        assert r.status_code == 422 and "no class names" in r.text
        r = client.post(f"/api/images/{iid}/prefill", json={"classes": "x" * 200})
        assert r.status_code == 422 and "longer than" in r.text
        r = client.post(f"/api/images/{iid}/prefill", json={"classes": "dog", "box_threshold": 2})
        assert r.status_code == 422 and len(stub.calls) == n
    finally:
        client.close()
        svc.close()
        svc.store.close()


def test_prefill_with_classes_needs_a_detector(client, service, db_url, images_dir,
                                               tiny_predictor, tmp_path):  # fmt: skip
    iid = image_id(client, "a.png")
    assert client.get("/api/config").json()["detector"] is None
    r = client.post(f"/api/images/{iid}/prefill", json={"classes": "dog"})
    assert r.status_code == 409 and "--detector" in r.json()["detail"]
    assert client.get(f"/api/images/{iid}/annotations").json()["annotations"] == []
    assert client.get(f"/api/images/{iid}").json()["stage"] == 1
    # configured, but its weights are not there: the loader's message, as a 409
    svc, other = _text_client(db_url, images_dir, tiny_predictor, tmp_path / "x",
                              tmp_path / "nowhere")  # fmt: skip
    try:
        assert other.get("/api/config").json()["detector"] == str(tmp_path / "nowhere")
        r = other.post(f"/api/images/{iid}/prefill", json={"classes": "dog"})
        assert r.status_code == 409, r.text
        assert "no such folder" in r.json()["detail"] and "nowhere" in r.json()["detail"]
        assert other.get(f"/api/images/{iid}/annotations").json()["annotations"] == []
    finally:
        other.close()
        svc.close()
        svc.store.close()


def test_prefill_with_classes_tiny_grounding_dino(db_url, images_dir, tmp_path):
    """The wiring of `segany annotate --detector FOLDER`: build_service with a checkpoint and
    the tiny Grounding DINO folder, loaded once on the first pre-fill by class names."""
    import pytest
    import torch
    from fastapi.testclient import TestClient

    pytest.importorskip("transformers")
    from segany.engine.server import build_service, create_app

    from ..conftest import tiny_sam
    from ..test_text import _save_gdino

    det_dir = tmp_path / "gdino"
    _save_gdino(det_dir)
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), ckpt)
    svc = build_service(images_dir, db=db_url, model=str(ckpt), cache_dir=tmp_path / "cache",
                        prefetch=False, detector=str(det_dir))  # fmt: skip
    try:
        assert svc._detector is None  # lazily loaded
        with TestClient(create_app(svc), base_url="http://localhost") as client:
            iid = image_id(client, "a.png")
            body = {"classes": "dog . person", "box_threshold": 0.0}
            r = client.post(f"/api/images/{iid}/prefill", json=body)
            assert r.status_code == 200, r.text
            anns = r.json()["annotations"]
            assert anns and {a["category"] for a in anns} <= {"dog", "person"}
            assert all(a["model_id"].endswith("+gdino") for a in anns)
            scores = [a["detector_score"] for a in anns]
            assert all(0.0 < s <= 1.0 for s in scores)
            loaded = svc._detector
            assert loaded is not None
            r = client.post(f"/api/images/{iid}/prefill", json=body)
            assert r.status_code == 200 and svc._detector is loaded  # loaded once
            assert [a["category"] for a in r.json()["annotations"]] == [a["category"] for a in anns]
    finally:
        svc.close()
        svc.store.close()


def test_stats_keep_deleted_prefills_and_cap_idle_time(client, service, monkeypatch):
    """A pre-filled mask deleted (not rejected) still counts as proposed; a long pause
    with the image open counts as IDLE_CAP seconds, not as annotation time."""
    from segany.engine import predictions as P

    service._generator_factory = FakeGenerator
    iid = image_id(client, "a.png")
    clock = [1000.0]
    monkeypatch.setattr(P, "clock", lambda: clock[0])
    client.post(f"/api/images/{iid}/open")  # t = 1000
    r = client.post(f"/api/images/{iid}/prefill", json={"pred_iou_thresh": 0.5})
    pending = r.json()["annotations"]
    assert len(pending) == 4
    assert client.delete(f"/api/annotations/{pending[0]['id']}").status_code == 204
    clock[0] += 10.0  # a click 10 s after opening
    r = client.post(f"/api/images/{iid}/predict", json={"points": [[20, 20]], "labels": [1]})
    clock[0] += 3600.0  # an hour away, then the accept
    mid = r.json()["masks"][0]["mask_input_id"]
    ann = client.post(f"/api/images/{iid}/annotations", json={"mask_id": mid}).json()
    assert ann["seconds"] == 10.0 + P.IDLE_CAP and ann["clicks"] == 1
    s = client.get("/api/stats").json()
    assert s["prefill"]["proposed"] == 4 and s["prefill"]["deleted"] == 1
    assert s["prefill"]["pending"] == 3 and s["prefill"]["acceptance_rate"] == 0.0
    assert s["stages"][0]["seconds_per_mask"] == 10.0 + P.IDLE_CAP
