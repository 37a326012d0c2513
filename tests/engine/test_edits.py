"""Issue #24 items 2 and 3 on the API (SQLite and PostgreSQL): an accepted object's mask
replaced by a brush edit (the edit history keeps the old mask), a delete undone under the
same id, an undone fix no longer counted, and the label set; bad input gets a clear 4xx and
changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from segany.engine import labels as L
from segany.masks import masks_to_coco_rle, rle_to_mask

from .conftest import image_id

H, W = 96, 144  # a.png


def _rle(y0: int, y1: int, x0: int, x1: int) -> dict:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return masks_to_coco_rle(m[None])[0]


def _accept(client, iid: int, seg: dict, category: str = "thing") -> dict:
    r = client.post(
        f"/api/images/{iid}/annotations", json={"segmentation": seg, "category": category}
    )
    assert r.status_code == 201, r.text
    return r.json()


def _exported(client, ann_id: int) -> np.ndarray:
    coco = client.get("/api/export/coco").json()
    (a,) = [a for a in coco["annotations"] if a["id"] == ann_id] or [None]
    assert a is not None, f"annotation {ann_id} not exported"
    return rle_to_mask(a["segmentation"])


def test_mask_edit_is_exported_and_keeps_its_history(client):
    iid = image_id(client, "a.png")
    a = _accept(client, iid, _rle(10, 30, 10, 50))
    brushed = np.zeros((H, W), bool)
    brushed[10:30, 10:50] = True
    brushed[40:44, 60:70] = True  # a stroke added
    brushed[10:12, 10:50] = False  # and one erased
    r = client.patch(
        f"/api/annotations/{a['id']}", json={"segmentation": masks_to_coco_rle(brushed[None])[0]}
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["id"] == a["id"] and got["area"] == 18 * 40 + 40 == int(brushed.sum())
    assert got["bbox"] == [10.0, 12.0, 60.0, 32.0]
    assert np.array_equal(_exported(client, a["id"]), brushed)

    hist = client.get(f"/api/annotations/{a['id']}/history").json()
    assert [e["kind"] for e in hist] == ["accept", "edit"]
    edit = hist[1]["data"]
    assert edit["area"] == [800, 760]
    assert np.array_equal(rle_to_mask(edit["previous"]), rle_to_mask(_rle(10, 30, 10, 50)))
    assert hist[1]["user"] == "local"

    # bad masks: 422 with the reason, the object unchanged
    bad = [
        (masks_to_coco_rle(np.ones((1, 10, 10), bool))[0], "does not match"),
        (masks_to_coco_rle(np.zeros((1, H, W), bool))[0], "empty"),
        ({"size": [H, W], "counts": "!!!garbage"}, "RLE"),
        ({"size": [2**31, 2**31], "counts": [0]}, "size"),
        ({"size": [H, W], "counts": [-5, 10]}, "counts"),
        ({"size": [H, W], "counts": [H * W + 1]}, "counts"),
        ({"size": [H, W]}, ""),
    ]
    for seg, word in bad:
        r = client.patch(f"/api/annotations/{a['id']}", json={"segmentation": seg})
        assert r.status_code == 422, (seg, r.text)
        assert word in r.text, (word, r.text)
    assert np.array_equal(_exported(client, a["id"]), brushed)
    assert client.get(f"/api/annotations/{a['id']}").json()["area"] == 760
    # unknown or hostile ids
    seg = masks_to_coco_rle(brushed[None])[0]
    for bad_id, status in (("424242", 404), (str(2**70), 404), ("-1", 404), ("x", 422)):
        r = client.patch(f"/api/annotations/{bad_id}", json={"segmentation": seg})
        assert r.status_code == status, (bad_id, r.text)
        assert client.get(f"/api/annotations/{bad_id}/history").status_code == status
    # the same mask again changes nothing and records no edit
    r = client.patch(f"/api/annotations/{a['id']}", json={"segmentation": seg})
    assert r.status_code == 200
    assert len(client.get(f"/api/annotations/{a['id']}/history").json()) == 2


def test_delete_is_undone_under_the_same_id(client):
    iid = image_id(client, "a.png")
    a = _accept(client, iid, _rle(10, 30, 10, 50), "cat")
    b = _accept(client, iid, _rle(50, 60, 10, 50), "dog")
    assert client.delete(f"/api/annotations/{b['id']}").status_code == 204
    assert client.get(f"/api/annotations/{b['id']}").status_code == 404
    # a new object meanwhile does not take the deleted one's id
    c = _accept(client, iid, _rle(70, 80, 10, 50), "cow")
    assert c["id"] not in (a["id"], b["id"])
    r = client.post(f"/api/annotations/{b['id']}/restore")
    assert r.status_code == 200, r.text
    back = r.json()
    assert back["id"] == b["id"] and back["category"] == "dog" and back["status"] == "accepted"
    assert back["created_at"] == b["created_at"] and back["clicks"] == b["clicks"]
    assert np.array_equal(_exported(client, b["id"]), rle_to_mask(_rle(50, 60, 10, 50)))
    listed = client.get(f"/api/images/{iid}/annotations").json()["annotations"]
    assert sorted(x["id"] for x in listed) == sorted([a["id"], b["id"], c["id"]])
    # restoring twice, or something never deleted, or unknown ids: 409 / 404, nothing changes
    r = client.post(f"/api/annotations/{b['id']}/restore")
    assert r.status_code == 409 and "nothing to restore" in r.json()["detail"]
    assert client.post("/api/annotations/424242/restore").status_code == 404
    assert client.post(f"/api/annotations/{2**70}/restore").status_code == 404
    assert client.post("/api/annotations/x/restore").status_code == 422
    assert len(client.get(f"/api/images/{iid}/annotations").json()["annotations"]) == 3
    hist = client.get(f"/api/annotations/{b['id']}/history").json()
    assert [e["kind"] for e in hist] == ["accept", "delete", "restore"]
    # delete and restore again: the same id each time
    assert client.delete(f"/api/annotations/{b['id']}").status_code == 204
    assert client.post(f"/api/annotations/{b['id']}/restore").json()["id"] == b["id"]


def _pending(service, iid: int, n: int) -> list[int]:
    items = [
        {
            "image_id": iid,
            "category": "object",
            "status": "pending",
            "stage": 2,
            "source": "prefill",
            "segmentation": _rle(5 + 20 * k, 20 + 20 * k, 10, 40),
            "bbox": [10.0, 5.0 + 20 * k, 30.0, 15.0],
            "area": 450,
            "score": 0.9 - 0.1 * k,
        }
        for k in range(n)
    ]
    return [a.id for a in service.store.add_annotations(items)]


def test_undo_and_redo_keep_the_stage2_figures(client, service):
    """Delete / restore of a pre-filled mask, and an undone (then redone) fix."""
    iid = image_id(client, "a.png")
    p0, p1 = _pending(service, iid, 2)
    pre = lambda: client.get("/api/stats").json()["prefill"]  # noqa: E731
    assert client.delete(f"/api/annotations/{p0}").status_code == 204
    assert pre()["deleted"] == 1 and pre()["proposed"] == 2
    assert client.post(f"/api/annotations/{p0}/restore").status_code == 200
    assert pre()["deleted"] == 0 and pre()["proposed"] == 2 and pre()["pending"] == 2

    fix = client.post(
        f"/api/images/{iid}/annotations",
        json={"segmentation": _rle(25, 40, 10, 45), "category": "fixed", "replaces": p1},
    ).json()
    assert pre()["fixed"] == 1 and pre()["rejected"] == 0
    # undo the fix: delete it, the pending object back to pending
    assert client.delete(f"/api/annotations/{fix['id']}").status_code == 204
    r = client.patch(f"/api/annotations/{p1}", json={"status": "pending"})
    assert r.status_code == 200 and r.json()["status"] == "pending"
    s = pre()
    assert (s["fixed"], s["rejected"], s["pending"], s["accepted"]) == (0, 0, 2, 0)
    # redo: rejected again, the fix restored (replacing it again)
    assert client.patch(f"/api/annotations/{p1}", json={"status": "rejected"}).status_code == 200
    back = client.post(f"/api/annotations/{fix['id']}/restore").json()
    assert back["id"] == fix["id"]
    assert service.store.annotation(fix["id"]).replaces_id == p1
    s = pre()
    assert (s["fixed"], s["rejected"], s["pending"]) == (1, 0, 1)
    # a second fix of p1 is refused, as before the undo
    r = client.post(
        f"/api/images/{iid}/annotations",
        json={"segmentation": _rle(25, 40, 10, 45), "replaces": p1},
    )
    assert r.status_code == 409


def test_label_set_api(client):
    assert client.get("/api/labels").json() == []
    r = client.post("/api/labels", json={"name": " Person "})
    assert r.status_code == 201
    assert r.json() == {"id": 1, "name": "Person", "color": L.PALETTE[0], "hotkey": "Shift+1"}
    # other spellings are the same label; ids follow first use
    assert client.post("/api/labels", json={"name": "PERSON"}).json()["id"] == 1
    for name in ("dog", "car"):
        client.post("/api/labels", json={"name": name})
    got = client.get("/api/labels").json()
    assert [(x["id"], x["name"], x["hotkey"]) for x in got] == [
        (1, "Person", "Shift+1"),
        (2, "dog", "Shift+2"),
        (3, "car", "Shift+3"),
    ]
    assert [x["color"] for x in got] == list(L.PALETTE[:3])
    # an object accepted as "DOG" is the label dog
    iid = image_id(client, "a.png")
    assert _accept(client, iid, _rle(10, 30, 10, 50), "DOG")["category"] == "dog"
    # bad names: 422, the set unchanged
    for body in (
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 200},
        {"name": "a\x00b"},
        {"name": "bell\x07"},
        {"name": 5},
        {"name": None},
        {},
        {"name": "ok", "color": "#000"},
    ):
        r = client.post("/api/labels", json=body)
        assert r.status_code == 422, (body, r.text)
    assert len(client.get("/api/labels").json()) == 3
    # hotkeys stop at nine; ids and colours go on
    for k in range(10):
        client.post("/api/labels", json={"name": f"class {k}"})
    got = client.get("/api/labels").json()
    assert [x["hotkey"] for x in got[8:]] == ["Shift+9"] + [None] * 4
    assert got[-1]["id"] == 13 and got[-1]["color"] == L.PALETTE[12]


def test_labels_option_parsing(tmp_path, capsys):
    from segany.cli import main
    from segany.engine.store import Store

    assert L.parse_labels("person, dog,,car\nDOG") == ["person", "dog", "car"]
    f = tmp_path / "labels.txt"
    f.write_text("zebra\n  big   cat \n\n", encoding="utf-8")
    assert L.read_labels_file(f) == ["zebra", "big cat"]
    with pytest.raises(ValueError, match="control"):
        L.parse_labels("ok,bad\x00name")
    with pytest.raises(ValueError, match="cannot read"):
        L.read_labels_file(tmp_path / "missing.txt")
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    store.category_name("tree")  # known before: keeps id 1
    got = L.register(store, ["person", "Tree", "dog"])
    assert [(x.id, x.name) for x in got] == [(1, "tree"), (2, "person"), (3, "dog")]
    store.close()
    images = tmp_path / "images"
    images.mkdir()
    argv = ["annotate", str(images), "--db", f"sqlite:///{tmp_path / 'c.db'}"]
    assert main([*argv, "--labels", "a," + "x" * 200]) == 2
    assert "label 'xxxxx" in (err := capsys.readouterr().err) and "at most 128" in err
    assert main([*argv, "--labels-file", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read the labels file" in capsys.readouterr().err


def test_annotate_labels_option_registers_the_set(tmp_path, monkeypatch, capsys):
    """``segany annotate DIR --labels ...`` (the server not started): the set, in order."""
    import torch

    from segany.cli import main
    from segany.engine import server
    from segany.engine.store import Store

    from ..conftest import tiny_sam

    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), ckpt)
    images = tmp_path / "images"
    images.mkdir()
    served = []
    monkeypatch.setattr(server, "serve", lambda svc, **kw: served.append(svc.close()))
    db = f"sqlite:///{tmp_path / 'a.db'}"
    argv = ["annotate", str(images), "--db", db, "--model", str(ckpt), "--backend", "torch",
            "--no-prefetch", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main([*argv, "--labels", "person, Dog,car"]) == 0 and len(served) == 1
    f = tmp_path / "more.txt"
    f.write_text("dog\nbicycle\n", encoding="utf-8")
    assert main([*argv, "--labels-file", str(f)]) == 0  # known labels keep their ids
    store = Store(db)
    try:
        assert [(x.id, x.name, x.hotkey) for x in L.label_set(store)] == [
            (1, "person", "Shift+1"),
            (2, "Dog", "Shift+2"),
            (3, "car", "Shift+3"),
            (4, "bicycle", "Shift+4"),
        ]
    finally:
        store.close()
