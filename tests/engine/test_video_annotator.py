"""The annotator's videos through its API: video files found by the rescan, folders of
frames registered, frames served lazily, clicks on a frame, tracks with key frames,
propagation jobs (progress, cancel, one per track), corrections carried forward, accept,
the COCO video JSON and DAVIS PNG exports, a restart, the schema 5 -> 6 upgrade, and bad
input. The clip is the synthetic one of tests/test_video.py (a red square moving right, a
blue disc moving left)."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from segany.engine.schemas import VideoRequest
from segany.engine.server import create_app
from segany.engine.store import SCHEMA_VERSION, Store
from segany.engine.video_store import VideoStore
from segany.masks import masks_to_coco_rle, rle_to_mask
from segany.predictor import Predictor
from segany.video.outputs import read_davis_png
from segany.video.tracker import TrackResult

from ..test_sam2_video import CLIP, golden, tiny_video_model  # noqa: F401 - fixtures used here
from ..test_video import _clip, _write_frames, _write_mp4
from .conftest import make_service
from .helpers import old_database, server_thread

N = 6


def _rle(mask: np.ndarray) -> dict:
    return masks_to_coco_rle(mask[None])[0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def make_video_dir(root: Path) -> Path:
    """``clip/`` (6 PNG frames), ``movie.mp4`` (the same frames), ``broken.mp4`` (not a
    video), ``still.png`` (an image) and an empty folder."""
    frames, _, _ = _clip(N)
    _write_frames(root / "clip", frames)
    _write_mp4(root / "movie.mp4", frames)
    (root / "broken.mp4").write_bytes(b"this is not a video")
    Image.fromarray(frames[0]).save(root / "still.png")
    (root / "empty").mkdir()
    return root


@contextmanager
def clip_server(tmp_path: Path, predictor: Predictor, **kw: object) -> Iterator[tuple[str, object]]:
    """A real server (a thread) over :func:`make_video_dir`'s folder in ``tmp_path`` with
    ``clip`` registered: ``(base URL, service)``."""
    images = make_video_dir(tmp_path / "images")
    svc = make_service(
        tmp_path / "db.sqlite", images, predictor, tmp_path / "cache", prefetch=False, **kw
    )
    svc.register_video(VideoRequest(path="clip"))
    try:
        with server_thread(create_app(svc)) as base:
            yield base, svc
    finally:
        svc.close()
        svc.store.close()


@pytest.fixture()
def video_dir(tmp_path: Path) -> Path:
    return make_video_dir(tmp_path / "images")


@pytest.fixture()
def vclient(db_url, video_dir, tiny_predictor, tmp_path):
    svc = make_service(db_url, video_dir, tiny_predictor, tmp_path / "cache", prefetch=False)
    with TestClient(create_app(svc), base_url="http://localhost") as c:
        yield c, svc
    svc.close()
    svc.store.close()


def _video(client, path: str) -> dict:
    for v in client.get("/api/videos").json()["videos"]:
        if v["path"] == path:
            return v
    r = client.post("/api/videos", json={"path": path})
    assert r.status_code == 201, r.text
    return r.json()


def _wait(client, job: dict, timeout: float = 120.0) -> dict:
    end = time.time() + timeout
    while job["state"] in ("running", "saving"):
        assert time.time() < end, job
        time.sleep(0.05)
        job = client.get(f"/api/propagation-jobs/{job['id']}").json()
    return job


def _propagate(client, track_id: int, start: int | None = None) -> dict:
    body = {} if start is None else {"start": start}
    r = client.post(f"/api/tracks/{track_id}/propagate", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "running"
    job = _wait(client, r.json())
    assert job["state"] == "done", job
    return job


def _masks(client, vid: int, track_id: int) -> dict[int, dict]:
    """The track's mask row on each frame that has one."""
    out = {}
    for f in range(N):
        for m in client.get(f"/api/videos/{vid}/frames/{f}/masks").json()["masks"]:
            if m["track_id"] == track_id:
                out[f] = m
    return out


# -- videos and frames -----------------------------------------------------------------------
def test_videos_found_registered_and_served(vclient, video_dir):
    client, _ = vclient
    frames, _, _ = _clip(N)
    by = {v["path"]: v for v in client.get("/api/videos").json()["videos"]}
    assert set(by) == {"movie.mp4", "broken.mp4"}  # video files are found by the rescan
    mv = by["movie.mp4"]
    assert [mv[k] for k in ("kind", "width", "height", "length", "status")] == [
        "file", 128, 96, N, "ok"
    ]  # fmt: skip
    assert mv["names"] == [f"{i:05d}" for i in range(N)]
    assert by["broken.mp4"]["status"] == "error"
    assert "not a readable video" in by["broken.mp4"]["error"]
    paths = {im["path"] for im in client.get("/api/images").json()["images"]}
    assert {"clip/0.png", "still.png"} <= paths and "movie.mp4" not in paths

    r = client.post("/api/videos", json={"path": "clip/"})
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["path"], v["kind"], v["length"], v["names"]) == ("clip", "frames", N, list("012345"))
    assert client.post("/api/videos", json={"path": "clip"}).json()["id"] == v["id"]  # once
    paths = {im["path"] for im in client.get("/api/images").json()["images"]}
    assert "still.png" in paths and not any(p.startswith("clip/") for p in paths)
    assert client.post("/api/rescan").json()["videos"] == 3

    r = client.get(f"/api/videos/{v['id']}/frames/2")
    assert r.status_code == 200 and r.content == (video_dir / "clip" / "2.png").read_bytes()
    r = client.get(f"/api/videos/{mv['id']}/frames/3")  # decoded from the file, sent as JPEG
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    shown = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float64)
    assert shown.shape == (96, 128, 3) and np.abs(shown - frames[3]).mean() < 10


def test_bad_video_input(vclient, video_dir):
    client, _ = vclient
    vid = _video(client, "clip")["id"]
    broken = _video(client, "broken.mp4")["id"]
    pt = {"points": [[20, 30]], "labels": [1]}

    def err(r, status, text):
        assert r.status_code == status, r.text
        assert text in r.json()["detail"], r.json()

    err(client.get("/api/videos/999"), 404, "no video with id 999")
    err(client.get("/api/videos/999/frames/0"), 404, "no video with id 999")
    err(client.post("/api/videos/999/frames/0/predict", json=pt), 404, "no video")
    for path in (f"/api/videos/{vid}/frames/6", f"/api/videos/{vid}/frames/-1/masks"):
        err(client.get(path), 404, "has frames 0 to 5")
    err(client.post(f"/api/videos/{vid}/frames/6/predict", json=pt), 404, "has frames 0 to 5")
    err(client.post(f"/api/videos/{broken}/frames/0/predict", json=pt), 422, "cannot be annotated")
    err(client.get(f"/api/videos/{broken}/frames/0"), 422, "not a readable video")
    # registering
    err(client.post("/api/videos", json={"path": "nope"}), 404, "no video file or folder")
    err(client.post("/api/videos", json={"path": "still.png"}), 422, "not a video")
    err(client.post("/api/videos", json={"path": "../images"}), 400, "without '..'")
    err(client.post("/api/videos", json={"path": "empty"}), 422, "no frames")
    err(client.post("/api/videos", json={"path": "broken.mp4"}), 422, "not a readable video")
    err(client.post("/api/videos", json={"path": "."}), 422, "not itself")
    # tracks
    sq = _rle(_clip(N)[1][0])
    tracks = f"/api/videos/{vid}/tracks"
    err(client.post(tracks, json={"frame": 6, "segmentation": sq}), 404, "has frames 0 to 5")
    err(
        client.post(tracks, json={"frame": 0, "segmentation": _rle(np.ones((5, 5), bool))}),
        422,
        "size",
    )
    err(
        client.post(tracks, json={"frame": 0, "segmentation": _rle(np.zeros((96, 128), bool))}),
        422,
        "empty",
    )
    err(client.post(tracks, json={"frame": 0}), 422, "exactly one of")
    err(client.post(tracks, json={"frame": 0, "mask_id": "nope"}), 404, "unknown or expired")
    cands = client.post(f"/api/videos/{vid}/frames/0/predict", json=pt).json()["masks"]
    err(
        client.post(tracks, json={"frame": 1, "mask_id": cands[0]["mask_input_id"]}),
        422,
        f"belongs to frame 0 of video {vid}",
    )
    iid = next(
        i["id"] for i in client.get("/api/images").json()["images"] if i["path"] == "still.png"
    )
    img_mask = client.post(f"/api/images/{iid}/predict", json=pt).json()["masks"][0]
    err(
        client.post(tracks, json={"frame": 0, "mask_id": img_mask["mask_input_id"]}),
        422,
        f"belongs to image {iid}",
    )
    refine = {**pt, "mask_input_id": cands[0]["mask_input_id"]}
    err(client.post(f"/api/videos/{vid}/frames/2/predict", json=refine), 422, "belongs to frame 0")
    err(
        client.post(
            f"/api/videos/{vid}/frames/0/predict", json={"points": [[500, 30]], "labels": [1]}
        ),
        422,
        "outside",
    )
    t = client.post(tracks, json={"frame": 0, "segmentation": sq}).json()
    err(client.put(f"/api/tracks/{t['id']}/frames/7", json={"segmentation": sq}), 404, "0 to 5")
    err(client.put("/api/tracks/999/frames/1", json={"segmentation": sq}), 404, "no track")
    err(client.patch(f"/api/tracks/{t['id']}", json={"status": "done"}), 422, "status")
    err(client.post("/api/tracks/999/propagate", json={}), 404, "no track")
    err(client.post(f"/api/tracks/{t['id']}/propagate", json={"start": 3}), 422, "not a key frame")
    err(client.post(f"/api/tracks/{t['id']}/propagate", json={"start": 9}), 404, "0 to 5")
    err(client.get("/api/propagation-jobs/0123456789abcdef"), 404, "no propagation job")
    err(client.get("/api/propagation-jobs/..%2f"), 404, "")
    err(client.delete("/api/tracks/999"), 404, "no track")
    assert client.get(f"/api/tracks/{t['id']}").json()["frames"] == 1  # nothing changed


# -- tracks, propagation, export, restart ----------------------------------------------------
def test_tracks_propagation_correction_export_and_restart(
    vclient, video_dir, tiny_predictor, db_url, tmp_path
):
    client, svc = vclient
    _, squares, discs = _clip(N)
    vid = _video(client, "clip")["id"]
    r = client.post(
        f"/api/videos/{vid}/tracks",
        json={"frame": 0, "segmentation": _rle(squares[0]), "category": "box"},
    )
    assert r.status_code == 201, r.text
    t1 = r.json()
    assert (t1["object_id"], t1["category"], t1["status"]) == (1, "box", "pending")
    assert (t1["key_frames"], t1["frames"]) == ([0], 1)
    t2 = client.post(
        f"/api/videos/{vid}/tracks",
        json={"frame": 2, "segmentation": _rle(discs[2]), "category": "ball"},
    ).json()
    assert (t2["object_id"], t2["key_frames"]) == (2, [2])

    job = _propagate(client, t1["id"])
    assert (job["start"], job["frames_done"], job["frames_planned"], job["frames_saved"]) == (
        0,
        N,
        N,
        N - 1,
    )
    job = _propagate(client, t2["id"])  # forward from frame 2, and back to frame 0
    assert (job["frames_planned"], job["frames_saved"]) == (N, N - 1)
    before = _masks(client, vid, t1["id"])
    assert sorted(before) == list(range(N)) and before[0]["key"] and not before[1]["key"]
    assert rle_to_mask(before[0]["segmentation"]).tolist() == squares[0].tolist()

    # a correction on frame 3, propagated from there: frames 0-2 keep their masks
    r = client.put(f"/api/tracks/{t1['id']}/frames/3", json={"segmentation": _rle(squares[3])})
    assert r.status_code == 200 and r.json()["key_frames"] == [0, 3]
    job = _propagate(client, t1["id"], start=3)
    assert (job["start"], job["frames_planned"], job["frames_saved"]) == (3, N - 3, N - 4)
    after = _masks(client, vid, t1["id"])
    for f in (0, 1, 2):
        assert after[f]["segmentation"] == before[f]["segmentation"], f
    assert after[3]["key"] and rle_to_mask(after[3]["segmentation"]).tolist() == squares[3].tolist()
    # a full propagation from the first key frame keeps both key frames
    _propagate(client, t1["id"])
    again = _masks(client, vid, t1["id"])
    assert [f for f in range(N) if again[f]["key"]] == [0, 3]
    assert again[3]["segmentation"] == after[3]["segmentation"]

    r = client.patch(f"/api/tracks/{t1['id']}", json={"status": "accepted"})
    assert r.status_code == 200 and r.json()["status"] == "accepted"
    assert client.get(f"/api/videos/{vid}").json()["accepted"] == 1

    # COCO video JSON (YouTube-VIS layout): the accepted track, its masks per frame
    data = client.get("/api/export/video").json()
    (video,) = data["videos"]
    assert (video["id"], video["name"], video["length"], video["width"], video["height"]) == (
        vid,
        "clip",
        N,
        128,
        96,
    )
    assert video["file_names"] == [f"{i}.png" for i in range(N)]
    assert video["source"] == str((video_dir / "clip").resolve())
    (ann,) = data["annotations"]
    labels = {c["name"]: c["id"] for c in data["categories"]}
    assert (ann["id"], ann["video_id"], ann["track_id"], ann["category_id"]) == (
        t1["id"],
        vid,
        1,
        labels["box"],
    )
    assert list(labels) == ["box"]
    for f in (0, 3):
        m = rle_to_mask(ann["segmentations"][f])
        assert m.tolist() == squares[f].tolist()
        assert ann["areas"][f] == int(squares[f].sum())
        enc = mask_utils.encode(np.asfortranarray(squares[f].astype(np.uint8)))
        assert ann["bboxes"][f] == [float(v) for v in mask_utils.toBbox(enc)]
    for f in range(N):
        seg = again[f]["segmentation"]
        if again[f]["area"]:
            assert ann["segmentations"][f]["counts"] == seg["counts"]
        else:
            assert ann["segmentations"][f] is None
    both = client.get("/api/export/video?include_pending=true").json()
    assert [a["track_id"] for a in both["annotations"]] == [1, 2]
    assert {c["name"] for c in both["categories"]} == {"box", "ball"}

    # DAVIS palette PNGs: each pixel its object's id
    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/davis").content))
    assert sorted(z.namelist()) == [f"Annotations/clip/{i}.png" for i in range(N)]
    png = Image.open(io.BytesIO(z.read("Annotations/clip/0.png")))
    assert png.mode == "P"
    lab = read_davis_png(io.BytesIO(z.read("Annotations/clip/0.png")))
    assert lab.tolist() == squares[0].astype(np.uint8).tolist()
    lab3 = read_davis_png(io.BytesIO(z.read("Annotations/clip/3.png")))
    assert lab3.tolist() == squares[3].astype(np.uint8).tolist()
    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/davis?include_pending=1").content))
    lab2 = read_davis_png(io.BytesIO(z.read("Annotations/clip/2.png")))
    assert (lab2[discs[2]] == 2).all() and set(np.unique(lab2)) <= {0, 1, 2}

    # both exports read back by the one dataset reader: frames with their objects' masks
    from segany.datasets import open_dataset

    (tmp_path / "export.json").write_text(json.dumps(both))
    ds = open_dataset(tmp_path / "export.json")  # the frames where the export's source says
    assert ds.kind == "video"
    assert [im.key for im in ds.images] == [f"clip/{i}.png" for i in range(N)]
    assert {c["name"] for c in ds.categories} == {"box", "ball"}
    for f, im in enumerate(ds.images):
        want = {a["track_id"]: a["segmentations"][f] for a in both["annotations"]}
        want = {k: seg for k, seg in want.items() if seg is not None}
        assert list(im.ann_ids) == sorted(want)
        for m, mask in zip(im.annotations, im.masks(), strict=True):
            assert mask.tolist() == rle_to_mask(want[m.id]).tolist()
    davis = client.get("/api/export/davis?include_pending=1").content
    (tmp_path / "davis.zip").write_bytes(davis)
    dv = open_dataset(tmp_path / "davis.zip", images=video_dir)
    assert dv.kind == "davis" and [im.key for im in dv.images] == [f"clip/{i}" for i in range(N)]
    assert list(dv.images[2].ann_ids) == sorted(set(np.unique(lab2)) - {0})
    for m, mask in zip(dv.images[2].annotations, dv.images[2].masks(), strict=True):
        assert mask.tolist() == (lab2 == m.id).tolist()
    assert dv.images[2].load().tolist() == ds.images[2].load().tolist()

    # a restart: the same tracks, masks and export from the database
    tracks = client.get(f"/api/videos/{vid}/tracks").json()
    kept = _masks(client, vid, t1["id"])
    svc.close()
    svc.store.close()
    svc2 = make_service(db_url, video_dir, tiny_predictor, tmp_path / "cache2", prefetch=False)
    try:
        with TestClient(create_app(svc2), base_url="http://localhost") as c2:
            assert c2.get(f"/api/videos/{vid}/tracks").json() == tracks
            assert c2.get("/api/export/video").json() == data
            assert _masks(c2, vid, t1["id"]) == kept
            r = c2.delete(f"/api/tracks/{t2['id']}")
            assert r.status_code == 204
            assert [t["id"] for t in c2.get(f"/api/videos/{vid}/tracks").json()] == [t1["id"]]
    finally:
        svc2.close()
        svc2.store.close()


class _SlowTracker:
    """Reports one frame, waits to be released, then reports the next (where a cancel is
    seen), so that a test can cancel a running job at a known point."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def track(self, video, prompts, progress=None):
        progress(1)
        self.release.wait(30)
        progress(1)
        return TrackResult(list(video.names), video.size, [1])


def test_propagation_progress_cancel_and_one_job_per_track(vclient, monkeypatch):
    client, _ = vclient
    _, squares, _ = _clip(N)
    vid = _video(client, "clip")["id"]
    t = client.post(
        f"/api/videos/{vid}/tracks", json={"frame": 0, "segmentation": _rle(squares[0])}
    ).json()
    release = threading.Event()
    monkeypatch.setattr(
        "segany.video.sam2_tracker.tracker_for", lambda predictor: _SlowTracker(release)
    )
    job = client.post(f"/api/tracks/{t['id']}/propagate", json={}).json()
    assert (job["state"], job["frames_planned"]) == ("running", N)
    end = time.time() + 30
    while job["frames_done"] < 1:
        assert time.time() < end
        time.sleep(0.02)
        job = client.get(f"/api/propagation-jobs/{job['id']}").json()
    assert job["state"] == "running"
    r = client.post(f"/api/tracks/{t['id']}/propagate", json={})
    assert r.status_code == 409 and job["id"] in r.json()["detail"]
    assert client.post(f"/api/propagation-jobs/{job['id']}/cancel").json()["state"] == "running"
    release.set()
    job = _wait(client, job)
    assert (job["state"], job["frames_saved"]) == ("cancelled", 0)
    assert client.get(f"/api/tracks/{t['id']}").json()["frames"] == 1  # nothing saved
    # cancelling a finished job changes nothing; the real tracker runs again
    assert client.post(f"/api/propagation-jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    monkeypatch.undo()
    assert _propagate(client, t["id"])["frames_saved"] == N - 1
    assert client.get(f"/api/tracks/{t['id']}").json()["frames"] == N


def test_upgrade_from_schema_5(tmp_path):
    """A version-5 database (no video tables) opens at the current version (7), with them."""
    url = old_database(tmp_path / "old.db", 5, ("video_work", "track_frames", "tracks", "videos"))
    store = Store(url)
    try:
        with store.session() as s:
            v = s.execute(sa.text("SELECT value FROM segany_meta WHERE key='schema_version'"))
            assert int(v.scalar()) == SCHEMA_VERSION == 7
            assert s.execute(sa.text("SELECT COUNT(*) FROM tracks")).scalar() == 0
        vs = VideoStore(store)
        v, created = vs.save_video("clip", {"kind": "frames", "length": 2, "names": ["0", "1"]})
        assert created and vs.by_path("clip").id == v.id
        seg = _rle(np.ones((4, 4), bool))
        t = vs.add_track(
            v.id,
            {"category": "x", "status": "pending"},
            {"frame": 1, "segmentation": seg, "area": 16, "bbox": [0, 0, 4, 4]},
        )
        assert t.object_id == 1 and vs.frame_counts([t.id]) == {t.id: ([1], 1)}
        assert store.image(1).done is True
    finally:
        store.close()


# -- real masks: MobileSAM on the clip -------------------------------------------------------
@pytest.fixture()
def mobile_client(tmp_path, mobile_sam):
    images = make_video_dir(tmp_path / "images")
    svc = make_service(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        images,
        Predictor(mobile_sam, model_id="mobile_sam-video-test"),
        tmp_path / "cache",
        prefetch=False,
    )
    with TestClient(create_app(svc), base_url="http://localhost") as c:
        yield c
    svc.close()
    svc.store.close()


@pytest.mark.weights
def test_click_propagate_and_a_correction_carried_forward(mobile_client):
    """A click on the square of frame 0 makes an object; propagation follows the square;
    the object set to the disc on frame 3 (a correction) and propagated from there follows
    the disc on frames 3-5 while frames 0-2 keep the square."""
    client = mobile_client
    _, squares, discs = _clip(N)
    vid = _video(client, "clip")["id"]
    r = client.post(
        f"/api/videos/{vid}/frames/0/predict", json={"points": [[25, 35]], "labels": [1]}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["video_id"], out["frame"], out["width"], out["height"]) == (vid, 0, 128, 96)
    best = out["masks"][out["best"]]
    assert _iou(rle_to_mask(best["segmentation"]), squares[0]) > 0.85
    r = client.post(
        f"/api/videos/{vid}/tracks",
        json={"frame": 0, "mask_id": best["mask_input_id"], "category": "box"},
    )
    assert r.status_code == 201, r.text
    t = r.json()
    _propagate(client, t["id"])
    first = _masks(client, vid, t["id"])
    for f in range(N):
        assert _iou(rle_to_mask(first[f]["segmentation"]), squares[f]) > 0.8, f

    # the correction: a click on the disc of frame 3, refined by a second click
    pt = [[100 - 4 * 3, 70]]
    r = client.post(f"/api/videos/{vid}/frames/3/predict", json={"points": pt, "labels": [1]})
    m = r.json()["masks"][r.json()["best"]]
    r = client.post(
        f"/api/videos/{vid}/frames/3/predict",
        json={
            "points": pt + [[25, 35]],
            "labels": [1, 0],
            "mask_input_id": m["mask_input_id"],
            "multimask": False,
        },
    )
    m = r.json()["masks"][0]
    assert _iou(rle_to_mask(m["segmentation"]), discs[3]) > 0.8
    r = client.put(f"/api/tracks/{t['id']}/frames/3", json={"mask_id": m["mask_input_id"]})
    assert r.status_code == 200 and r.json()["key_frames"] == [0, 3]
    _propagate(client, t["id"], start=3)
    after = _masks(client, vid, t["id"])
    for f in (0, 1, 2):
        assert after[f] == first[f]
    for f in (3, 4, 5):
        got = rle_to_mask(after[f]["segmentation"])
        assert _iou(got, discs[f]) > 0.75 and _iou(got, squares[f]) < 0.05, f

    # frames of a video file, read lazily: a click on frame 2 of movie.mp4
    mv = _video(client, "movie.mp4")["id"]
    r = client.post(
        f"/api/videos/{mv}/frames/2/predict", json={"points": [[33, 35]], "labels": [1]}
    )
    out = r.json()
    assert _iou(rle_to_mask(out["masks"][out["best"]]["segmentation"]), squares[2]) > 0.8


# -- SAM 2: the memory tracker behind the same API -------------------------------------------
def test_sam2_video_model_propagates_with_its_memory_tracker(tmp_path, tiny_video_model):  # noqa: F811
    """With a SAM 2 video model the job runs :class:`Sam2Tracker`: the stored masks are
    those of ``Sam2Tracker.track`` on the same key frame (frames other than the key)."""
    from segany.video.sam2_tracker import Sam2Tracker
    from segany.video.tracker import ObjectPrompt
    from segany.videos import open_video

    model = tiny_video_model
    images = tmp_path / "images"
    shutil.copytree(CLIP, images / "clip")
    svc = make_service(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        images,
        Predictor(model, model_id="tiny-sam2v"),
        tmp_path / "cache",
        prefetch=False,
    )
    try:
        with TestClient(create_app(svc), base_url="http://localhost") as client:
            vid = _video(client, "clip")["id"]
            video = open_video(images / "clip")
            h, w = video.size
            key = np.zeros((h, w), bool)
            key[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
            t = client.post(
                f"/api/videos/{vid}/tracks", json={"frame": 1, "segmentation": _rle(key)}
            ).json()
            _propagate(client, t["id"])
            got = {}
            for f in range(len(video)):
                for m in client.get(f"/api/videos/{vid}/frames/{f}/masks").json()["masks"]:
                    got[f] = m["segmentation"]
            want = Sam2Tracker(model).track(video, {1: {1: ObjectPrompt(mask=key)}})
            for f in range(len(video)):
                if f != 1:
                    assert got[f]["counts"] == want.masks[f][1]["counts"], f
            assert rle_to_mask(got[1]).tolist() == key.tolist()
    finally:
        svc.close()
        svc.store.close()


@pytest.mark.weights
def test_annotate_video_option(tmp_path, monkeypatch, mobile_sam, capsys):
    """``segany annotate DIR --video FOLDER`` registers the folder of frames before serving;
    a folder that is not one is an error naming it."""
    from segany.cli import main

    images = make_video_dir(tmp_path / "images")
    seen: dict = {}

    def serve(svc, **kw):
        seen["videos"] = {v.path: v.kind for v in svc.list_videos().videos}
        svc.close()

    monkeypatch.setattr("segany.engine.server.serve", serve)
    args = ["annotate", str(images), "--db", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    args += ["--backend", "torch", "--no-prefetch", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--video", "clip"]) == 0
    assert seen["videos"] == {"clip": "frames", "movie.mp4": "file", "broken.mp4": "file"}
    assert "3 videos" in capsys.readouterr().err
    assert main([*args, "--video", "empty"]) == 2
    err = capsys.readouterr().err
    assert "--video empty" in err and "no frames" in err


def test_frames_leading_out_of_the_folder_are_refused(vclient, video_dir, tmp_path):
    """As for images: a folder of frames with a symlink leading out of the images folder is
    not read (422, nothing registered)."""
    client, _ = vclient
    outside = tmp_path / "outside.png"
    shutil.copy(video_dir / "clip" / "0.png", outside)
    shutil.copytree(video_dir / "clip", video_dir / "leaky")
    (video_dir / "leaky" / "6.png").symlink_to(outside)
    r = client.post("/api/videos", json={"path": "leaky"})
    assert r.status_code == 422 and "6.png points outside" in r.json()["detail"]
    assert "leaky" not in {v["path"] for v in client.get("/api/videos").json()["videos"]}
