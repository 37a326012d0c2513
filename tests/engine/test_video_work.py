"""Videos at the images' level for several annotators and a bad network (issues #21, #24),
through the API on SQLite and PostgreSQL: every write on a video's objects honours its
``Idempotency-Key`` (the same key twice is one write, also across a restart for a
propagation), a video's lease (a second page is refused with 409 and nothing changes;
release, expiry, one lease per page session), the videos' section of ``/api/stats`` with
exact numbers (timers moved by a fake clock), the purge of old request keys and trash
entries (clocks moved by writing timestamps), and the schema 6 -> 7 upgrade."""

from __future__ import annotations

import time

import numpy as np
import pytest
import sqlalchemy as sa

from segany.engine import predictions as P
from segany.engine.purge import REQUEST_KEY_SECONDS, TRASH_SECONDS, Purger
from segany.engine.store import SCHEMA_VERSION, Store
from segany.engine.video_store import VideoStore
from segany.engine.work_store import WorkStore

from ..test_video import _clip
from .conftest import image_id, make_service
from .helpers import old_database
from .test_video_annotator import N, _masks, _rle, _video, _wait, vclient, video_dir  # noqa: F401

T1 = {"X-Segany-Session": "tab-one-0001"}
T2 = {"X-Segany-Session": "tab-two-0002"}


def _key(k: str, headers: dict | None = None) -> dict:
    return {**(headers or {}), "Idempotency-Key": k}


def _keys(svc, kind: str | None = None) -> list[tuple[str, str, int, int | None]]:
    q = "SELECT key, kind, target, annotation_id FROM request_keys"
    with svc.store.session() as s:
        rows = [tuple(r) for r in s.execute(sa.text(q + " ORDER BY id"))]
    return [r for r in rows if kind is None or r[1] == kind]


def _new_track(client, vid: int, frame: int = 0, headers: dict | None = None) -> dict:
    _, squares, _ = _clip(N)
    r = client.post(
        f"/api/videos/{vid}/tracks",
        json={"frame": frame, "segmentation": _rle(squares[frame]), "category": "box"},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    return r.json()


# -- keyed writes ----------------------------------------------------------------------------
def test_video_writes_with_one_key_are_applied_once(
    vclient,  # noqa: F811
    db_url,
    video_dir,  # noqa: F811
    tiny_predictor,
    tmp_path,
):
    client, svc = vclient
    _, squares, discs = _clip(N)
    vid = _video(client, "clip")["id"]
    body = {"frame": 0, "segmentation": _rle(squares[0]), "category": "box"}
    r1 = client.post(f"/api/videos/{vid}/tracks", json=body, headers=_key("new-object-01"))
    r2 = client.post(f"/api/videos/{vid}/tracks", json=body, headers=_key("new-object-01"))
    assert r1.status_code == r2.status_code == 201
    assert r1.json()["id"] == r2.json()["id"]
    assert len(client.get(f"/api/videos/{vid}/tracks").json()) == 1
    tid = r1.json()["id"]
    assert _keys(svc) == [("new-object-01", "track", vid, tid)]

    # a key frame: the repeat of the first write does not overwrite the second write
    url = f"/api/tracks/{tid}/frames/2"
    a = client.put(url, json={"segmentation": _rle(squares[2])}, headers=_key("key-frame-01"))
    assert a.status_code == 200 and a.json()["key_frames"] == [0, 2]
    b = client.put(url, json={"segmentation": _rle(discs[2])}, headers=_key("key-frame-02"))
    assert b.status_code == 200
    again = client.put(url, json={"segmentation": _rle(squares[2])}, headers=_key("key-frame-01"))
    assert again.status_code == 200 and again.json()["key_frames"] == [0, 2]
    m = _masks(client, vid, tid)[2]
    assert m["key"] and m["area"] == int(discs[2].sum())  # still the second write's mask

    # a label edit and an accept, each repeated
    p = f"/api/tracks/{tid}"
    assert (
        client.patch(p, json={"category": "crate"}, headers=_key("label-0001")).json()["category"]
        == "crate"
    )
    assert client.patch(p, json={"category": "bin"}).json()["category"] == "bin"
    r = client.patch(p, json={"category": "crate"}, headers=_key("label-0001"))
    assert r.status_code == 200 and r.json()["category"] == "bin"  # nothing written again
    for _ in range(2):
        r = client.patch(p, json={"status": "accepted"}, headers=_key("accept-0001"))
        assert r.status_code == 200 and r.json()["status"] == "accepted"
    # a key used for another request is refused
    r = client.delete(p, headers=_key("accept-0001"))
    assert r.status_code == 422 and "was used for another request" in r.json()["detail"]
    assert client.get(p).status_code == 200

    # a propagation: the repeat answers the same job, and after a restart the saved result
    job = client.post(f"{p}/propagate", json={}, headers=_key("propagate-01")).json()
    same = client.post(f"{p}/propagate", json={}, headers=_key("propagate-01"))
    assert same.status_code == 202 and same.json()["id"] == job["id"]
    job = _wait(client, job)
    assert (job["state"], job["frames_saved"]) == ("done", N - 2)
    assert (
        client.post(f"{p}/propagate", json={}, headers=_key("propagate-01")).json()["id"]
        == (job["id"])
    )
    assert len(_keys(svc, "propagate")) == 1
    svc2 = make_service(db_url, video_dir, tiny_predictor, tmp_path / "cache2", prefetch=False)
    try:
        from fastapi.testclient import TestClient

        from segany.engine.server import create_app

        with TestClient(create_app(svc2), base_url="http://localhost") as c2:
            r = c2.post(f"{p}/propagate", json={}, headers=_key("propagate-01"))
            assert r.status_code == 202
            assert (r.json()["state"], r.json()["frames_saved"]) == ("done", N - 2)
            assert c2.get(p).json()["frames"] == N  # no second run: the answer was "done"
    finally:
        svc2.close()
        svc2.store.close()

    # a delete, repeated: 204 both times, and 404 without the key
    assert client.delete(p, headers=_key("delete-0001")).status_code == 204
    assert client.delete(p, headers=_key("delete-0001")).status_code == 204
    assert client.delete(p).status_code == 404
    # the repeat of a write whose track is gone since is 409
    r = client.patch(p, json={"category": "crate"}, headers=_key("label-0001"))
    assert r.status_code == 409 and "has since been deleted" in r.json()["detail"]
    kinds = [k[1] for k in _keys(svc)]
    assert kinds == [
        "track", "key-frame", "key-frame", "track-patch", "track-patch", "propagate",
        "track-delete",
    ]  # fmt: skip


# -- leases ----------------------------------------------------------------------------------
def test_a_leased_video_refuses_other_pages(vclient):  # noqa: F811
    client, svc = vclient
    vid = _video(client, "clip")["id"]
    o1 = client.post(f"/api/videos/{vid}/open", headers=T1).json()
    assert o1["lock"]["held"] is True and o1["video"]["locked_by"] is None
    t = _new_track(client, vid, headers=T1)
    o2 = client.post(f"/api/videos/{vid}/open", headers=T2).json()
    assert o2["lock"]["held"] is False and o2["lock"]["by"] == "local (another tab)"
    assert o2["video"]["locked_by"] == "local" and 50 < o2["lock"]["expires_in"] <= 60
    listed = {v["id"]: v for v in client.get("/api/videos", headers=T2).json()["videos"]}
    assert listed[vid]["locked_by"] == "local"
    listed = {v["id"]: v for v in client.get("/api/videos", headers=T1).json()["videos"]}
    assert listed[vid]["locked_by"] is None

    _, squares, _ = _clip(N)
    seg = {"segmentation": _rle(squares[1])}
    p = f"/api/tracks/{t['id']}"
    refused = [
        client.post(f"/api/videos/{vid}/tracks", json={"frame": 1, **seg}, headers=T2),
        client.put(f"{p}/frames/1", json=seg, headers=T2),
        client.patch(p, json={"status": "accepted"}, headers=T2),
        client.patch(p, json={"category": "ball"}, headers=T2),
        client.post(f"{p}/propagate", json={}, headers=T2),
        client.delete(p, headers=T2),
        client.delete(p),  # a script without a session: refused too
    ]
    for r in refused:
        assert r.status_code == 409, r.text
        assert r.json()["detail"].startswith(f"video {vid} is locked in another tab")
    assert "nothing was saved" in refused[0].json()["detail"]
    after = client.get(p).json()
    assert (after["key_frames"], after["status"], after["category"]) == ([0], "pending", "box")
    assert len(client.get(f"/api/videos/{vid}/tracks").json()) == 1
    assert _keys(svc) == []

    # the holder lets go: the other tab takes it, and the first is refused now
    assert client.delete(f"/api/videos/{vid}/lease", headers=T1).status_code == 204
    assert client.post(f"/api/videos/{vid}/lease", headers=T2).json()["held"] is True
    r = client.put(f"{p}/frames/1", json=seg, headers=T1)
    assert r.status_code == 409
    assert client.put(f"{p}/frames/1", json=seg, headers=T2).json()["key_frames"] == [0, 1]
    # the holder stops renewing: its lease runs out (the clock moved on) and tab one takes it
    assert client.post(f"/api/videos/{vid}/lease", headers=T1).json()["held"] is False
    with svc.store.session() as s:
        q = "UPDATE video_work SET lease_expires = :t WHERE video_id = :v"
        s.execute(sa.text(q), {"t": time.time() - 1, "v": vid})
        s.commit()
    assert client.post(f"/api/videos/{vid}/lease", headers=T1).json()["held"] is True
    assert client.patch(p, json={"status": "accepted"}, headers=T1).status_code == 200
    # one lease per page session: tab one opening an image frees the video
    iid = image_id(client, "still.png")
    assert client.post(f"/api/images/{iid}/open", headers=T1).json()["lock"]["held"] is True
    assert client.post(f"/api/videos/{vid}/lease", headers=T2).json()["held"] is True
    # ... and tab one keeps its image
    assert client.post(f"/api/images/{iid}/lease", headers=T1).json()["held"] is True
    r = client.post(f"/api/videos/{vid}/lease", headers={"X-Segany-Session": "bad"})
    assert r.status_code == 400


# -- stats -----------------------------------------------------------------------------------
def test_video_stats_count_objects_and_cap_idle_time(vclient, monkeypatch):  # noqa: F811
    client, _ = vclient
    _, squares, discs = _clip(N)
    vid = _video(client, "clip")["id"]
    clock = [1000.0]
    monkeypatch.setattr(P, "clock", lambda: clock[0])
    client.post(f"/api/videos/{vid}/open", headers=T1)  # t = 1000: the object timer starts
    clock[0] += 10.0  # a click on frame 0, 10 s later
    r = client.post(
        f"/api/videos/{vid}/frames/0/predict",
        json={"points": [[20, 30]], "labels": [1]},
        headers=T1,
    )
    assert r.status_code == 200, r.text
    clock[0] += 5.0  # the object, 15 s after opening
    a = _new_track(client, vid, headers=T1)
    assert (a["clicks"], a["seconds"]) == (1, 15.0)
    clock[0] += 3600.0  # an hour away, then a key frame: counted as IDLE_CAP
    r = client.put(
        f"/api/tracks/{a['id']}/frames/3", json={"segmentation": _rle(squares[3])}, headers=T1
    )
    assert r.json()["seconds"] == 15.0 + P.IDLE_CAP
    clock[0] += 5.0
    r = client.patch(f"/api/tracks/{a['id']}", json={"status": "accepted"}, headers=T1)
    assert (r.json()["clicks"], r.json()["seconds"]) == (1, 80.0)
    clock[0] += 10.0
    b = client.post(
        f"/api/videos/{vid}/tracks",
        json={"frame": 2, "segmentation": _rle(discs[2]), "category": "ball"},
        headers=T1,
    ).json()
    assert (b["clicks"], b["seconds"]) == (0, 10.0)
    clock[0] += 2.0
    assert client.delete(f"/api/tracks/{b['id']}", headers=T1).status_code == 204
    clock[0] += 8.0  # the delete takes no time: the next object's 10 s run from b's
    c = _new_track(client, vid, frame=1, headers=T1)
    assert c["seconds"] == 10.0

    s = client.get("/api/stats").json()
    v = s["videos"]
    assert {k: v[k] for k in ("videos_total", "videos_annotated")} == {
        "videos_total": 2,  # clip and movie.mp4 (broken.mp4 cannot be read)
        "videos_annotated": 1,
    }
    assert (v["proposed"], v["accepted"], v["pending"], v["deleted"]) == (3, 1, 1, 1)
    expected = {
        "annotator": "local",
        "objects": 2,
        "accepted": 1,
        "videos": 1,
        "seconds_per_object": 80.0,
        "median_seconds": 80.0,
        "clicks_per_object": 1.0,
        "key_frames_per_object": 2.0,
    }
    assert v["rows"] == [expected]
    assert v["all"] == {**expected, "annotator": "all"}
    assert s["rows"] == [] and s["images_annotated"] == 0  # apart from the images


# -- purge -----------------------------------------------------------------------------------
def _mask_body() -> dict:
    m = np.zeros((96, 144), dtype=bool)
    m[10:30, 20:60] = True
    return {"segmentation": _rle(m), "category": "cat"}


def _age(svc, table: str, column: str, where: str, seconds: float, now: float) -> None:
    with svc.store.session() as s:
        q = f"UPDATE {table} SET {column} = :t WHERE {where}"
        s.execute(sa.text(q), {"t": now - seconds})
        s.commit()


def test_purge_drops_old_request_keys_and_trash_only(
    client, service, db_url, images_dir, tiny_predictor, tmp_path
):
    iid = image_id(client, "a.png")
    ids = []
    for k in ("accept-old-01", "accept-new-01", "accept-new-02"):
        r = client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=_key(k))
        ids.append(r.json()["id"])
    for a in ids[:2]:
        assert client.delete(f"/api/annotations/{a}").status_code == 204
    now = time.time()
    # one key and one trash entry just past their retention, one of each just inside it
    keys, trash = ("request_keys", "created_at"), ("trash", "deleted_at")
    _age(service, *keys, "key = 'accept-old-01'", REQUEST_KEY_SECONDS + 1, now)
    _age(service, *keys, "key = 'accept-new-01'", REQUEST_KEY_SECONDS - 60, now)
    _age(service, *trash, f"annotation_id = {ids[0]}", TRASH_SECONDS + 1, now)
    _age(service, *trash, f"annotation_id = {ids[1]}", TRASH_SECONDS - 60, now)

    assert service.purger.run(now) == {"request_keys": 1, "trash": 1}
    assert [k[0] for k in _keys(service)] == ["accept-new-01", "accept-new-02"]
    assert service.purger.run(now) == {"request_keys": 0, "trash": 0}
    # within the retention the undo still works; past it the object is gone for good
    assert client.post(f"/api/annotations/{ids[1]}/restore").status_code == 200
    assert client.post(f"/api/annotations/{ids[0]}/restore").status_code == 404
    # a retry whose key was purged is a new write (the documented limit)
    url = f"/api/images/{iid}/annotations"
    r = client.post(url, json=_mask_body(), headers=_key("accept-old-01"))
    assert r.status_code == 201 and r.json()["id"] not in ids
    # the fresh key still answers its first write
    r = client.post(url, json=_mask_body(), headers=_key("accept-new-02"))
    assert r.json()["id"] == ids[2]

    # at the start of a server: the rows past their retention go
    _age(service, *keys, "key = 'accept-new-01'", REQUEST_KEY_SECONDS + 5, time.time())
    svc2 = make_service(db_url, images_dir, tiny_predictor, tmp_path / "cache2", prefetch=False)
    try:
        assert [k[0] for k in _keys(svc2)] == ["accept-new-02", "accept-old-01"]
    finally:
        svc2.close()
        svc2.store.close()


def test_purger_runs_at_most_once_per_period(tmp_path):
    store = Store(tmp_path / "p.db")
    try:
        p = Purger(store, every=3600.0)
        assert p.run(now=1000.0) == {"request_keys": 0, "trash": 0}
        assert p.maybe(now=1000.0 + 3599.0) is None
        assert p.maybe(now=1000.0 + 3600.0) == {"request_keys": 0, "trash": 0}
        assert p.maybe(now=1000.0 + 3601.0) is None
    finally:
        store.close()


# -- schema ----------------------------------------------------------------------------------
def test_upgrade_from_schema_6(tmp_path):
    """A version-6 database (no ``video_work``, tracks without clicks and seconds, no
    indexes on the purged columns) opens as version 7; its tracks keep their rows."""
    url = old_database(tmp_path / "old.db", 6, ("video_work",))
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.execute(sa.text("DROP INDEX ix_request_keys_created_at"))
        c.execute(sa.text("DROP INDEX ix_trash_deleted_at"))
        c.execute(sa.text("ALTER TABLE tracks DROP COLUMN clicks"))
        c.execute(sa.text("ALTER TABLE tracks DROP COLUMN seconds"))
        video = (
            "INSERT INTO videos (id, path, kind, width, height, length, names, files, "
            "size_bytes, mtime, status, created_at) "
            "VALUES (1, 'clip', 'frames', 4, 4, 2, '[]', '[]', 0, 0, 'ok', 0)"
        )
        track = (
            "INSERT INTO tracks (id, video_id, object_id, category, status, created_at, "
            "updated_at) VALUES (1, 1, 1, 'x', 'accepted', 0, 0)"
        )
        c.execute(sa.text(video))
        c.execute(sa.text(track))
    eng.dispose()
    store = Store(url)
    try:
        with store.session() as s:
            v = s.execute(sa.text("SELECT value FROM segany_meta WHERE key='schema_version'"))
            assert int(v.scalar()) == SCHEMA_VERSION == 7
            assert s.execute(sa.text("SELECT COUNT(*) FROM video_work")).scalar() == 0
        insp = sa.inspect(store.engine)
        names = {i["name"] for t in ("request_keys", "trash") for i in insp.get_indexes(t)}
        assert {"ix_request_keys_created_at", "ix_trash_deleted_at"} <= names
        (t,) = VideoStore(store).tracks()
        assert (t.id, t.status, t.clicks, t.seconds) == (1, "accepted", 0, None)
        held, _ = WorkStore(store).take_lease(1, 1, "tab-one-0001", 60.0, "video")
        assert held is True
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["cat", ""])
def test_unknown_lease_kind_is_a_clear_error(tmp_path, kind):
    store = Store(tmp_path / "k.db")
    try:
        with pytest.raises(ValueError, match="is leased"):
            WorkStore(store).take_lease(1, 1, "tab-one-0001", 60.0, kind)
    finally:
        store.close()
