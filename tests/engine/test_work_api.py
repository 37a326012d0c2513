"""Several annotators and unreliable networks in the API (issue #24, items 4-6): writes
retried with an ``Idempotency-Key`` are applied once, image leases refuse a second page's
writes (409) until they expire, review transitions (illegal ones 409), the per-user queue,
background pre-fills with progress and cancel, and hostile keys / ids (clear 4xx). Each
test runs on SQLite and on PostgreSQL (the unique rules are the database's)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from segany.engine.server import create_app
from segany.engine.store import SCHEMA_VERSION, Store
from segany.masks import masks_to_coco_rle

from .conftest import image_id, make_service
from .helpers import old_database


def _mask_body(h: int = 96, w: int = 144, category: str = "cat") -> dict:
    m = np.zeros((h, w), dtype=bool)
    m[10:30, 20:60] = True
    return {"segmentation": masks_to_coco_rle(m[None])[0], "category": category}


def _count(service, image: int | None = None) -> int:
    return len(service.store.annotations(image, light=True))


def _keys(service) -> int:
    with service.store.session() as s:
        return s.execute(sa.text("SELECT COUNT(*) FROM request_keys")).scalar()


# -- idempotent writes -----------------------------------------------------------------------
def test_accept_with_the_same_key_twice_is_one_object(client, service):
    iid = image_id(client, "a.png")
    h = {"Idempotency-Key": "accept-0001-abcdef"}
    r1 = client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=h)
    r2 = client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=h)
    assert r1.status_code == r2.status_code == 201
    assert r1.json() == r2.json()  # the first result, not a second object
    assert _count(service, iid) == 1 and _keys(service) == 1
    # a new key is a new object
    r3 = client.post(
        f"/api/images/{iid}/annotations", json=_mask_body(), headers={"Idempotency-Key": "x" * 64}
    )
    assert r3.status_code == 201 and r3.json()["id"] != r1.json()["id"]
    assert _count(service, iid) == 2
    # the same key for another image is refused, and writes nothing
    other = image_id(client, "b.jpg")
    r = client.post(f"/api/images/{other}/annotations", json=_mask_body(120, 80), headers=h)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("Idempotency-Key 'accept-0001-abcdef' was used for")
    assert _count(service, other) == 0


@pytest.mark.parametrize(
    "key", ["short", "k" * 65, "../../etc/passwd", "ключ-12345678", "a b c d e f g h"]
)
def test_hostile_idempotency_keys_are_refused(client, service, key):
    iid = image_id(client, "a.png")
    r = client.post(
        f"/api/images/{iid}/annotations",
        json=_mask_body(),
        headers={"Idempotency-Key": key.encode("utf-8")},
    )
    assert r.status_code == 400
    assert r.json()["detail"].startswith("Idempotency-Key must be 8-64 letters, digits")
    assert _count(service) == 0 and _keys(service) == 0


def test_patch_and_delete_repeats_are_not_applied_twice(client, service):
    iid = image_id(client, "a.png")
    ann = client.post(f"/api/images/{iid}/annotations", json=_mask_body()).json()
    k = {"Idempotency-Key": "patch-key-0001"}
    r1 = client.patch(f"/api/annotations/{ann['id']}", json={"status": "rejected"}, headers=k)
    assert r1.status_code == 200 and r1.json()["status"] == "rejected"
    # someone accepts it again; then the lost answer's retry arrives: not applied again
    r = client.patch(f"/api/annotations/{ann['id']}", json={"status": "accepted"})
    assert r.json()["status"] == "accepted"
    r2 = client.patch(f"/api/annotations/{ann['id']}", json={"status": "rejected"}, headers=k)
    assert r2.status_code == 200 and r2.json()["status"] == "accepted"
    assert service.store.annotation(ann["id"]).status == "accepted"
    d = {"Idempotency-Key": "delete-key-0001"}
    assert client.delete(f"/api/annotations/{ann['id']}", headers=d).status_code == 204
    assert client.delete(f"/api/annotations/{ann['id']}", headers=d).status_code == 204
    assert client.delete(f"/api/annotations/{ann['id']}").status_code == 404
    assert _count(service) == 0
    # the accept of a key whose object was deleted since: 409, not a new object
    a = {"Idempotency-Key": "accept-then-deleted"}
    first = client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=a).json()
    client.delete(f"/api/annotations/{first['id']}")
    r = client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=a)
    assert r.status_code == 409 and f"annotation {first['id']}" in r.json()["detail"]
    assert _count(service) == 0


def test_concurrent_retries_with_one_key_make_one_object(service):
    """Eight threads send the same keyed accept at once: the unique rule of the database
    lets one insert win; the others are answered with its object."""
    iid = service.list_images().images[0].id
    from segany.engine.schemas import AcceptRequest

    req = AcceptRequest(**_mask_body())
    user = service.local_user
    out: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run() -> None:
        barrier.wait()
        try:
            out.append(service.accept(iid, req, user, "same-key-for-all").id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(out) == 8 and len(set(out)) == 1
    assert _count(service, iid) == 1 and _keys(service) == 1


# -- leases ----------------------------------------------------------------------------------
def test_two_tabs_one_image_lease_refuses_the_second(client, service):
    iid = image_id(client, "a.png")
    t1 = {"X-Segany-Session": "tab-one-0001"}
    t2 = {"X-Segany-Session": "tab-two-0002"}
    o1 = client.post(f"/api/images/{iid}/open", headers=t1).json()
    assert o1["lock"]["held"] is True and o1["lock"]["by"] is None
    o2 = client.post(f"/api/images/{iid}/open", headers=t2).json()
    assert o2["lock"]["held"] is False and o2["lock"]["by"] == "local (another tab)"
    assert o2["image"]["locked_by"] == "local"
    r = client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=t2)
    assert r.status_code == 409
    assert r.json()["detail"].startswith(f"image {iid} is locked in another tab")
    r = client.post(f"/api/images/{iid}/annotations", json=_mask_body())  # a script: refused too
    assert r.status_code == 409 and _count(service) == 0
    r = client.post(f"/api/images/{iid}/done", json={"done": True}, headers=t2)
    assert r.status_code == 409 and not service.store.image(iid).done
    assert (
        client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=t1).status_code
        == 201
    )
    # the holder leaves the image: the other tab takes it
    assert client.delete(f"/api/images/{iid}/lease", headers=t1).status_code == 204
    assert client.post(f"/api/images/{iid}/lease", headers=t2).json()["held"] is True
    r = client.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=t1)
    assert r.status_code == 409 and _count(service) == 1


def test_expired_lease_is_taken_over_and_opening_another_image_releases(client, service):
    a, b = image_id(client, "a.png"), image_id(client, "b.jpg")
    t1 = {"X-Segany-Session": "tab-one-0001"}
    t2 = {"X-Segany-Session": "tab-two-0002"}
    assert client.post(f"/api/images/{a}/open", headers=t1).json()["lock"]["held"] is True
    lease = client.post(f"/api/images/{a}/lease", headers=t2).json()
    assert lease["held"] is False and 50 < lease["expires_in"] <= 60
    # tab one stopped renewing (closed, offline) and its lease ran out (the clock moved on)
    with service.store.session() as s:
        q = "UPDATE image_work SET lease_expires = :t WHERE image_id = :i"
        s.execute(sa.text(q), {"t": time.time() - 1, "i": a})
        s.commit()
    assert client.post(f"/api/images/{a}/lease", headers=t2).json()["held"] is True
    r = client.post(f"/api/images/{a}/annotations", json=_mask_body(), headers=t1)
    assert r.status_code == 409
    assert client.post(f"/api/images/{a}/lease", headers=t2).json()["held"] is True
    assert client.post(f"/api/images/{b}/open", headers=t2).json()["lock"]["held"] is True
    # tab two moved on to b: a is free for tab one at once
    assert client.post(f"/api/images/{a}/lease", headers=t1).json()["held"] is True
    # the lease answer carries the embedding's and the image's status
    bad = image_id(client, "broken.jpg")
    r = client.post(f"/api/images/{bad}/lease", headers=t1).json()
    assert r["status"] == "error" and "not a readable image" in r["error"]


@pytest.mark.parametrize("session", ["short", "x" * 65, "tab;drop table", "../../x/y/z"])
def test_hostile_session_ids_are_refused(client, service, session):
    iid = image_id(client, "a.png")
    r = client.post(f"/api/images/{iid}/open", headers={"X-Segany-Session": session})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("X-Segany-Session must be 8-64 letters")
    assert service.work.get(iid) is None  # no lease taken


# -- review and queues -----------------------------------------------------------------------
@pytest.fixture()
def team(db_url, images_dir, tiny_predictor, tmp_path):
    svc = make_service(db_url, images_dir, tiny_predictor, tmp_path / "cache", auth=True)
    tokens = {}
    for name, admin in (("admin", True), ("alice", False), ("bob", False)):
        _, tok = svc.store.issue_token(name, is_admin=admin)
        tokens[name] = {"Authorization": f"Bearer {tok}"}
    with TestClient(create_app(svc), base_url="http://localhost") as c:
        yield c, svc, tokens
    svc.close()
    svc.store.close()


def test_review_submit_return_resubmit_approve(team):
    c, svc, tok = team
    alice, bob = tok["alice"], tok["bob"]
    iid = image_id(c, "a.png", alice)
    review = lambda who, body: c.post(f"/api/images/{iid}/review", json=body, headers=who)  # noqa: E731
    r = review(bob, {"action": "approve"})
    assert r.status_code == 409
    assert r.json()["detail"] == f"image {iid} is none: only a submitted image can be approved"
    assert (
        c.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=alice).status_code
        == 201
    )
    r = c.post(f"/api/images/{iid}/done", json={"done": True}, headers=alice)
    assert r.json()["review"] == "submitted" and r.json()["submitted_by"] == "alice"
    assert r.json()["done"] is True
    r = review(alice, {"action": "approve"})
    assert r.status_code == 409 and "another annotator reviews it" in r.json()["detail"]
    r = review(bob, {"action": "return"})
    assert r.status_code == 422 and "needs a comment" in r.json()["detail"]
    r = review(bob, {"action": "return", "comment": "  the  cat's tail is missing "})
    assert r.status_code == 200
    out = r.json()
    assert out["review"] == "returned" and out["comment"] == "the cat's tail is missing"
    assert out["reviewer"] == "bob" and out["done"] is False
    # back in alice's queue, first; not in bob's
    qa = c.get("/api/queue", headers=alice).json()
    assert qa["returned"] == [iid] and qa["next_id"] == iid
    qb = c.get("/api/queue", headers=bob).json()
    assert iid not in qb["returned"] and qb["next_id"] != iid
    assert review(bob, {"action": "approve"}).status_code == 409  # returned, not submitted
    assert (
        c.post(f"/api/images/{iid}/done", json={"done": True}, headers=alice).json()["review"]
        == "submitted"
    )
    approved = review(bob, {"action": "approve"})
    assert approved.status_code == 200
    assert approved.json()["review"] == "approved" and approved.json()["done"]
    # approved: frozen until a reviewer returns it
    r = c.post(f"/api/images/{iid}/annotations", json=_mask_body(), headers=alice)
    assert r.status_code == 409 and "approved" in r.json()["detail"]
    assert c.post(f"/api/images/{iid}/done", json={"done": False}, headers=alice).status_code == 409
    again = review(bob, {"action": "approve"})  # bob's retry: the same answer, no change
    assert again.status_code == 200 and again.json() == approved.json()
    r = review(tok["admin"], {"action": "approve"})  # another reviewer: not submitted
    assert r.status_code == 409
    assert r.json()["detail"] == f"image {iid} is approved: only a submitted image can be approved"
    assert len(svc.store.annotations(iid, light=True)) == 1
    assert review(bob, {"action": "return", "comment": "one more"}).json()["review"] == "returned"
    r = review(bob, {"action": "reject"})
    assert r.status_code == 422  # not an action


def test_queue_skips_locked_assigned_and_done_images(team):
    c, svc, tok = team
    alice, bob, admin = tok["alice"], tok["bob"], tok["admin"]
    ids = {im["path"]: im["id"] for im in c.get("/api/images", headers=alice).json()["images"]}
    a, b, sub = ids["a.png"], ids["b.jpg"], ids["sub/c.png"]
    assert c.get("/api/queue", headers=alice).json()["next_id"] == a
    # bob's page holds a: alice's queue skips it
    c.post(f"/api/images/{a}/open", headers={**bob, "X-Segany-Session": "bobs-tab-01"})
    assert c.get("/api/queue", headers=alice).json()["next_id"] == b
    # b is assigned to bob: only bob's
    r = c.post(f"/api/images/{b}/assign", json={"user": "bob"}, headers=alice)
    assert r.status_code == 403
    r = c.post(f"/api/images/{b}/assign", json={"user": "nobody"}, headers=admin)
    assert r.status_code == 404
    r = c.post(f"/api/images/{b}/assign", json={"user": "bob"}, headers=admin)
    assert r.status_code == 200 and r.json()["assignee"] == "bob"
    q = c.get("/api/queue", headers=alice).json()
    assert q["next_id"] == sub and q["remaining"] == 1
    assert c.get(f"/api/queue?after={a}", headers=bob).json()["next_id"] == b
    c.post(f"/api/images/{sub}/done", json={"done": True}, headers=alice)
    assert c.get("/api/queue", headers=alice).json() == {
        "next_id": None,
        "remaining": 0,
        "returned": [],
    }
    listed = {im["path"]: im for im in c.get("/api/images", headers=alice).json()["images"]}
    assert listed["a.png"]["locked_by"] == "bob" and listed["b.jpg"]["assignee"] == "bob"
    assert listed["sub/c.png"]["review"] == "submitted"


# -- pre-fill jobs ---------------------------------------------------------------------------
class GatedGenerator:
    """Ten batches of ten points; after the third it waits for ``gate``; then four
    rectangles (as the real generator's records)."""

    gate = threading.Event()

    def __init__(self, req) -> None:
        self.req = req

    def generate(self, rgb, *, progress=None):
        for k in range(10):
            if progress is not None:
                progress(10 * (k + 1), 100)
            if k == 2:
                assert self.gate.wait(20), "the test did not open the gate"
        h, w = rgb.shape[:2]
        out = []
        for k in range(4):
            m = np.zeros((h, w), dtype=bool)
            m[5 + 20 * k : 20 + 20 * k, 10 : 40 + 20 * k] = True
            out.append(
                {
                    "segmentation": masks_to_coco_rle(m[None])[0],
                    "predicted_iou": 0.9,
                    "stability_score": 0.95,
                    "point_coords": [[15.0, 10.0 + 20 * k]],
                }
            )
        return out


def _wait_job(c, job_id: str, until, timeout: float = 20.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        j = c.get(f"/api/prefill-jobs/{job_id}").json()
        if until(j):
            return j
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stayed {j}")


def test_prefill_job_progress_cancel_and_done(client, service):
    service._generator_factory = GatedGenerator
    GatedGenerator.gate.set()
    iid = image_id(client, "a.png")
    r = client.post(f"/api/images/{iid}/prefill-jobs", json={})
    assert r.status_code == 202 and r.json()["state"] == "running"
    done = _wait_job(client, r.json()["id"], lambda j: j["state"] == "done")
    assert done["points_done"] == done["points_planned"] == 100
    assert done["result"]["created"] == 4
    first_ids = sorted(a.id for a in service.store.annotations(iid, statuses=["pending"]))
    assert len(first_ids) == 4
    # a second run, cancelled while it runs: nothing saved, the first run's objects kept
    GatedGenerator.gate.clear()
    job = client.post(f"/api/images/{iid}/prefill-jobs", json={}).json()
    mid = _wait_job(client, job["id"], lambda j: j["points_done"] >= 30)
    assert mid["state"] == "running" and mid["points_planned"] == 100
    r = client.post(f"/api/images/{iid}/prefill-jobs", json={})
    assert r.status_code == 409 and job["id"] in r.json()["detail"]
    assert client.post(f"/api/prefill-jobs/{job['id']}/cancel").json()["state"] == "running"
    GatedGenerator.gate.set()
    end = _wait_job(client, job["id"], lambda j: j["state"] != "running")
    assert end["state"] == "cancelled" and end["points_done"] == 40 and end["result"] is None
    assert sorted(a.id for a in service.store.annotations(iid, statuses=["pending"])) == first_ids
    # cancelling a finished job changes nothing and says what happened
    r = client.post(f"/api/prefill-jobs/{done['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "done"
    for bad in ("0123456789abcdef", "zz", "...", "A" * 300):
        r = client.get(f"/api/prefill-jobs/{bad}")
        assert r.status_code == 404 and r.json()["detail"].startswith("no pre-fill job")
        assert client.post(f"/api/prefill-jobs/{bad}/cancel").status_code == 404
    assert client.get("/api/prefill-jobs/..%2F..%2Fetc").status_code == 404  # no route
    # a job on an image that cannot be annotated fails at once, with the reason
    r = client.post(f"/api/images/{image_id(client, 'broken.jpg')}/prefill-jobs", json={})
    assert r.status_code == 422 and "cannot be annotated" in r.json()["detail"]


def test_mask_generator_reports_progress(tiny_predictor):
    """The real generator's callback: points decoded grow to the prompts it made, and an
    exception from the callback stops it."""
    from segany.everything import MaskGenerator

    rgb = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    gen = MaskGenerator(
        tiny_predictor,
        preset="fast",
        points_per_side=4,
        refine_points_per_side=8,
        points_per_batch=16,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    calls: list[tuple[int, int]] = []
    gen.generate(rgb, progress=lambda d, p: calls.append((d, p)))
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and dones[0] == 16
    assert calls[-1] == (gen.last_prompts, gen.last_prompts)
    assert all(d <= p <= 16 + 64 for d, p in calls)

    class Stop(Exception):
        pass

    def stop(done: int, planned: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        gen.generate(rgb, progress=stop)
    assert gen._progress is None  # not left behind for the next call


def test_upgrade_from_schema_3(tmp_path):
    """A version-3 database (no image_work, no request_keys) opens at the current version
    (7): the tables are created, a done image stays done."""
    url = old_database(tmp_path / "old.db", 3, ("image_work", "request_keys", "video_work"))
    store = Store(url)
    try:
        with store.session() as s:
            v = s.execute(sa.text("SELECT value FROM segany_meta WHERE key='schema_version'"))
            assert int(v.scalar()) == SCHEMA_VERSION == 7
            assert s.execute(sa.text("SELECT COUNT(*) FROM request_keys")).scalar() == 0
        assert store.image(1).done is True
    finally:
        store.close()


def test_new_routes_with_ids_beyond_the_integer_columns(client, service):
    """Ids past the database's integer columns (PostgreSQL: 32-bit) are 404, never an
    overflow, and nothing is written."""
    s = {"X-Segany-Session": "tab-one-0001"}
    for n in (2**31, 2**63, 2**64, 10**30):
        for method, url, body in (
            ("POST", f"/api/images/{n}/lease", None),
            ("DELETE", f"/api/images/{n}/lease", None),
            ("POST", f"/api/images/{n}/review", {"action": "approve"}),
            ("POST", f"/api/images/{n}/assign", {"user": "local"}),
            ("POST", f"/api/images/{n}/prefill-jobs", {}),
        ):
            r = client.request(method, url, json=body, headers=s)
            assert r.status_code == 404, (method, url, r.status_code, r.text)
            assert r.json()["detail"] == f"no image with id {n}"
        r = client.get(f"/api/queue?after={n}")
        assert r.status_code == 200 and r.json()["next_id"] == image_id(client, "a.png")
    r = client.get("/api/queue?after=abc")
    assert r.status_code == 422 and "after" in r.text
    assert service.work.all() == {}


def test_cli_assign_deals_unassigned_images(tmp_path, images_dir, tiny_predictor, monkeypatch):
    """``segany annotate DIR --assign alice,bob`` deals the readable unassigned images in
    turn at start (the model and the server are stubbed: only the dealing runs)."""
    from segany.cli import main
    from segany.engine import server

    db = f"sqlite:///{tmp_path / 'a.db'}"
    made = []

    def build(root, **kw):
        lease = kw["lease_seconds"]
        made.append(make_service(kw["db"], root, tiny_predictor, tmp_path / "cache"))
        made[-1].lease_seconds = lease
        return made[-1]

    monkeypatch.setattr(server, "build_service", build)
    monkeypatch.setattr(server, "serve", lambda svc, **kw: None)
    argv = ["annotate", str(images_dir), "--db", db, "--assign", "alice, bob"]
    assert main([*argv, "--lease-seconds", "30"]) == 0
    svc = made[0]
    assert svc.lease_seconds == 30.0
    names = {u.id: u.name for u in svc.store.users()}
    got = {
        svc.store.image(i).path: names[w.assignee_id]
        for i, w in svc.work.all().items()
        if w.assignee_id is not None
    }
    assert got == {"a.png": "alice", "b.jpg": "bob", "sub/c.png": "alice"}
    svc.close()
    svc.store.close()
    assert main(["annotate", str(images_dir), "--db", db, "--assign", "bad name!"]) == 2
    assert main(["annotate", str(images_dir), "--db", db, "--assign", " , "]) == 2
    assert main(["annotate", str(images_dir), "--db", db, "--lease-seconds", "0"]) == 2
    assert len(made) == 1  # refused before the model loads
