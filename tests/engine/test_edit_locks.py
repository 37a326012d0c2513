"""The edit routes (mask PATCH, delete into the trash, restore) under the leases, the approved
freeze and the retried keys of :mod:`segany.engine.work`, and the schema 4 -> 5 upgrade (the
``trash`` table). Each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

from segany.engine import edits
from segany.engine.store import SCHEMA_VERSION, Store
from segany.masks import masks_to_coco_rle

from .conftest import image_id
from .helpers import old_database

T1 = {"X-Segany-Session": "tab-one-0001"}
T2 = {"X-Segany-Session": "tab-two-0002"}


def _rle(rows: slice, cols: slice, h: int = 96, w: int = 144) -> dict:
    m = np.zeros((h, w), dtype=bool)
    m[rows, cols] = True
    return masks_to_coco_rle(m[None])[0]


def _accept(client, iid: int, headers: dict) -> dict:
    body = {"segmentation": _rle(slice(10, 30), slice(20, 60)), "category": "cat"}
    r = client.post(f"/api/images/{iid}/annotations", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def _events(service, ann_id: int) -> list[str]:
    return [e.kind for e in edits.history(service.store, ann_id)]


def test_restore_and_mask_edit_on_an_image_leased_by_another_session_are_409(client, service):
    iid = image_id(client, "a.png")
    assert client.post(f"/api/images/{iid}/open", headers=T1).json()["lock"]["held"] is True
    gone = _accept(client, iid, T1)
    assert client.delete(f"/api/annotations/{gone['id']}", headers=T1).status_code == 204
    kept = _accept(client, iid, T1)
    before = service.store.annotation(kept["id"]).segmentation
    # tab two opens the image read-only: its restore, mask edit and delete change nothing
    assert client.post(f"/api/images/{iid}/open", headers=T2).json()["lock"]["held"] is False
    r = client.post(f"/api/annotations/{gone['id']}/restore", headers=T2)
    assert r.status_code == 409 and r.json()["detail"].startswith(f"image {iid} is locked")
    assert service.store.annotation(gone["id"]) is None
    assert edits.trashed(service.store, gone["id"]) is not None
    new_mask = {"segmentation": _rle(slice(5, 40), slice(10, 70))}
    r = client.patch(f"/api/annotations/{kept['id']}", json=new_mask, headers=T2)
    assert r.status_code == 409 and "locked" in r.json()["detail"]
    r = client.delete(f"/api/annotations/{kept['id']}", headers=T2)
    assert r.status_code == 409
    r = client.post(f"/api/annotations/{gone['id']}/restore")  # a script (no session): refused
    assert r.status_code == 409
    a = service.store.annotation(kept["id"])
    assert a is not None and a.segmentation == before
    assert _events(service, kept["id"]) == ["accept"]
    assert _events(service, gone["id"]) == ["accept", "delete"]
    # the holder can
    r = client.post(f"/api/annotations/{gone['id']}/restore", headers=T1)
    assert r.status_code == 200 and r.json()["id"] == gone["id"]
    r = client.patch(f"/api/annotations/{kept['id']}", json=new_mask, headers=T1)
    assert r.status_code == 200 and r.json()["area"] == 35 * 60


def test_approved_image_is_frozen_for_restore_and_mask_edits(client, service):
    iid = image_id(client, "a.png")
    gone = _accept(client, iid, {})
    kept = _accept(client, iid, {})
    assert client.delete(f"/api/annotations/{gone['id']}").status_code == 204
    service.work.set_review(iid, ("none",), "approved", done=True)
    r = client.post(f"/api/annotations/{gone['id']}/restore")
    assert r.status_code == 409 and "approved" in r.json()["detail"]
    assert service.store.annotation(gone["id"]) is None
    r = client.patch(
        f"/api/annotations/{kept['id']}", json={"segmentation": _rle(slice(0, 9), slice(0, 9))}
    )
    assert r.status_code == 409 and "approved" in r.json()["detail"]
    assert service.store.annotation(kept["id"]).area == 20 * 40


def test_restore_and_delete_retried_with_their_keys(client, service):
    """A resent restore (its answer lost) answers the restored object again; a resent
    delete answers 204 again; the object is restored and deleted once each."""
    iid = image_id(client, "a.png")
    a = _accept(client, iid, {})
    d = {"Idempotency-Key": "delete-key-0001"}
    assert client.delete(f"/api/annotations/{a['id']}", headers=d).status_code == 204
    assert client.delete(f"/api/annotations/{a['id']}", headers=d).status_code == 204
    k = {"Idempotency-Key": "restore-key-0001"}
    r1 = client.post(f"/api/annotations/{a['id']}/restore", headers=k)
    r2 = client.post(f"/api/annotations/{a['id']}/restore", headers=k)
    assert r1.status_code == r2.status_code == 200
    assert r1.json()["id"] == r2.json()["id"] == a["id"]
    assert _events(service, a["id"]) == ["accept", "delete", "restore"]
    # without its key, a second restore is refused: the object exists
    r = client.post(f"/api/annotations/{a['id']}/restore")
    assert r.status_code == 409 and "exists" in r.json()["detail"]
    # the key of the delete again, now that the object is back: answered, not applied
    assert client.delete(f"/api/annotations/{a['id']}", headers=d).status_code == 204
    assert service.store.annotation(a["id"]) is not None
    # a key used for a delete cannot restore
    r = client.post(f"/api/annotations/{a['id']}/restore", headers=d)
    assert r.status_code == 422


def test_upgrade_from_schema_4(tmp_path):
    """A version-4 database (no ``trash``) opens at the current version (7): the table is
    made, and a delete then restore keeps the id."""
    url = old_database(tmp_path / "old.db", 4, ("trash", "video_work"))
    store = Store(url)
    try:
        with store.session() as s:
            v = s.execute(sa.text("SELECT value FROM segany_meta WHERE key='schema_version'"))
            assert int(v.scalar()) == SCHEMA_VERSION == 7
            assert s.execute(sa.text("SELECT COUNT(*) FROM trash")).scalar() == 0
        seg = _rle(slice(0, 4), slice(0, 1), 4, 4)
        (a,) = store.add_annotations(
            [{"image_id": 1, "segmentation": seg, "area": 4, "bbox": [0, 0, 1, 4]}]
        )
        assert edits.trash(store, a.id) is not None
        assert edits.restore(store, a.id, {"kind": "restore"}).id == a.id
        assert store.image(1).done is True
    finally:
        store.close()
