"""Requests that race (issue #18, item 4), with real threads against a uvicorn server, on
SQLite and PostgreSQL: two annotators fixing the same pending object, DELETE against PATCH,
PATCH against a fix. The store's rules hold without the service's checks too."""

from __future__ import annotations

import threading

import httpx
import pytest

from segany.engine.server import create_app
from segany.engine.store import StoreConflict
from segany.masks import masks_to_coco_rle

from .helpers import server_thread

ROUNDS = 8
THREADS = 4


def _rle(h: int, w: int, y0: int = 20, x0: int = 30) -> dict:
    import numpy as np

    m = np.zeros((1, h, w), dtype=bool)
    m[0, y0 : y0 + 30, x0 : x0 + 40] = True
    return masks_to_coco_rle(m)[0]


def _pending(service, iid: int, n: int = 1) -> list[int]:
    """``n`` pending pre-filled objects on image ``iid``; their ids."""
    im = service.store.image(iid)
    items = [
        {
            "image_id": iid,
            "category": "object",
            "status": "pending",
            "stage": 2,
            "source": "prefill",
            "segmentation": _rle(im.height, im.width),
            "bbox": [30.0, 20.0, 40.0, 30.0],
            "area": 1200,
        }
        for _ in range(n)
    ]
    return [a.id for a in service.store.add_annotations(items)]


def _together(calls: list) -> list:
    """Run the callables at the same moment (a barrier), each in its own thread."""
    barrier = threading.Barrier(len(calls))
    out: list = [None] * len(calls)

    def run(k: int) -> None:
        barrier.wait()
        try:
            out[k] = calls[k]()
        except Exception as exc:  # pragma: no cover - shown in the assertion
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


@pytest.fixture()
def base(service):
    with server_thread(create_app(service)) as url:
        yield url


def _a_png(service) -> int:
    return next(im.id for im in service.store.images() if im.path == "a.png")


def test_two_fixes_of_one_pending_object(service, base):
    iid = _a_png(service)
    im = service.store.image(iid)
    seg = _rle(im.height, im.width, 10, 10)
    ids = _pending(service, iid, ROUNDS)
    clients = [httpx.Client(base_url=base, timeout=60) for _ in range(THREADS)]
    try:
        for pid in ids:
            body = {"segmentation": seg, "category": "fixed", "replaces": pid}
            url = f"/api/images/{iid}/annotations"
            res = _together([lambda c=c, u=url, b=body: c.post(u, json=b) for c in clients])
            codes = sorted(r.status_code for r in res)
            assert codes == [201] + [409] * (THREADS - 1), (pid, [r.text for r in res])
            loser = next(r for r in res if r.status_code == 409).json()["detail"]
            assert f"annotation {pid} is rejected, not pending" in loser or "already fixed" in loser
    finally:
        for c in clients:
            c.close()
    fixes = service.store.annotations(iid, statuses=["accepted"])
    assert len(fixes) == ROUNDS and sorted(a.replaces_id for a in fixes) == sorted(ids)
    assert {a.status for a in service.store.annotations(iid, statuses=["rejected"])} == {"rejected"}
    assert len(service.store.annotations(iid, statuses=["rejected"])) == ROUNDS


def test_delete_racing_patch(service, base):
    iid = _a_png(service)
    ids = _pending(service, iid, ROUNDS * 3)
    with httpx.Client(base_url=base, timeout=60) as c1, httpx.Client(base_url=base) as c2:
        seen = set()
        for pid in ids:
            patch, delete = _together(
                [
                    lambda c=c1, p=pid: c.patch(
                        f"/api/annotations/{p}", json={"status": "accepted", "category": "x"}
                    ),
                    lambda c=c2, p=pid: c.delete(f"/api/annotations/{p}"),
                ]
            )
            assert patch.status_code in (200, 404), patch.text
            assert delete.status_code in (204, 404), delete.text
            if patch.status_code == 404:
                assert patch.json()["detail"] == f"no annotation with id {pid}"
            seen.add((patch.status_code, delete.status_code))
            assert service.store.annotation(pid) is None  # the delete always wins in the end
    assert (200, 204) in seen or (404, 204) in seen


def test_two_restores_of_one_deleted_object(service, base):
    """Undo of a delete from two tabs at once: the object comes back once, under its id."""
    iid = _a_png(service)
    ids = _pending(service, iid, ROUNDS)
    clients = [httpx.Client(base_url=base, timeout=60) for _ in range(THREADS)]
    try:
        for pid in ids:
            assert clients[0].delete(f"/api/annotations/{pid}").status_code == 204
            url = f"/api/annotations/{pid}/restore"
            res = _together([lambda c=c, u=url: c.post(u) for c in clients])
            codes = sorted(r.status_code for r in res)
            assert codes[0] == 200 and codes.count(200) == 1, [r.text for r in res]
            assert set(codes[1:]) <= {404, 409}, [r.text for r in res]  # gone from the trash
            assert next(r for r in res if r.status_code == 200).json()["id"] == pid
    finally:
        for c in clients:
            c.close()
    assert sorted(a.id for a in service.store.annotations(iid)) == sorted(ids)


def test_patch_racing_a_fix(service, base):
    """Accepting a pending object as it is and fixing it at the same time: one wins."""
    iid = _a_png(service)
    im = service.store.image(iid)
    seg = _rle(im.height, im.width, 5, 5)
    ids = _pending(service, iid, ROUNDS)
    with httpx.Client(base_url=base, timeout=60) as c1, httpx.Client(base_url=base) as c2:
        for pid in ids:
            patch, fix = _together(
                [
                    lambda c=c1, p=pid: c.patch(
                        f"/api/annotations/{p}", json={"status": "accepted"}
                    ),
                    lambda c=c2, p=pid: c.post(
                        f"/api/images/{iid}/annotations",
                        json={"segmentation": seg, "replaces": p},
                    ),
                ]
            )
            assert sorted([patch.status_code, fix.status_code]) in ([200, 409], [201, 409]), (
                patch.text,
                fix.text,
            )
    # every pending object became exactly one accepted object
    assert len(service.store.annotations(iid, statuses=["accepted"])) == ROUNDS


def test_a_fixed_object_cannot_be_accepted_again(service, base):
    """A PATCH that reads the object after its fix committed (now rejected) must not
    accept it again beside the fix (one object would become two)."""
    iid = _a_png(service)
    im = service.store.image(iid)
    (pid,) = _pending(service, iid)
    with httpx.Client(base_url=base) as c:
        seg = _rle(im.height, im.width, 5, 5)
        r = c.post(f"/api/images/{iid}/annotations", json={"segmentation": seg, "replaces": pid})
        assert r.status_code == 201, r.text
        r2 = c.patch(f"/api/annotations/{pid}", json={"status": "accepted"})
    assert r2.status_code == 409 and f"replaced by its fix {r.json()['id']}" in r2.text
    assert len(service.store.annotations(iid, statuses=["accepted"])) == 1


def test_store_refuses_a_second_fix_and_a_stale_status(service):
    iid = _a_png(service)
    (pid,) = _pending(service, iid)
    im = service.store.image(iid)
    item = {
        "image_id": iid,
        "segmentation": _rle(im.height, im.width),
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "area": 1,
        "replaces_id": pid,
    }
    service.store.add_annotations([item])
    # the unique index alone (no status change asked): a second fix of the same object
    with pytest.raises(StoreConflict, match="already fixed"):
        service.store.add_annotations([item])
    # a status change that expects 'pending' on an object that is no longer pending
    with pytest.raises(StoreConflict, match=f"annotation {pid} is pending, not accepted"):
        service.store.update_annotation(pid, {"status": "rejected"}, expect_status="accepted")
    with pytest.raises(StoreConflict, match=f"annotation {pid} is pending, not rejected"):
        service.store.add_annotations([], set_status={pid: ("rejected", "accepted")})
    assert service.store.update_annotation(10**6, {"category": "x"}) is None
    assert len(service.store.annotations(iid)) == 2  # nothing else was written
