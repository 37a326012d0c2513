"""Labels that cannot go wrong: one spelling per class, class ids that never shift, and an
old database's classes merged on upgrade (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from sqlalchemy import create_engine, text

from segany import masks as M
from segany.engine.store import SCHEMA_VERSION, Store


def _accept(client, image_id, category, y0=10):
    m = np.zeros((96, 144), bool)
    m[y0 : y0 + 20, 10:40] = True
    seg = M.masks_to_coco_rle(m[None])[0]
    r = client.post(f"/api/images/{image_id}/annotations",
                    json={"segmentation": seg, "category": category})  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()


def _exports(client):
    coco = client.get("/api/export/coco").json()
    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/yolo").content))
    return (
        [(c["id"], c["name"]) for c in coco["categories"]],
        z.read("classes.txt").decode().splitlines(),
    )


def test_class_ids_never_shift_and_spellings_merge(client):
    iid = client.get("/api/images").json()["images"][0]["id"]
    _accept(client, iid, "zebra")
    _accept(client, iid, "dog", 40)
    before = _exports(client)
    assert before == ([(1, "zebra"), (2, "dog")], ["zebra", "dog"])
    # a class that sorts first by name comes last by id: nothing before it moves
    _accept(client, iid, "apple", 60)
    coco_cats, yolo = _exports(client)
    assert coco_cats[:2] == before[0] and coco_cats[2] == (3, "apple")
    assert yolo == ["zebra", "dog", "apple"]
    # "Dog", " dog " and "DOG" are the class "dog"
    for spelling in ("Dog", " dog ", "DOG"):
        assert _accept(client, iid, spelling, 70)["category"] == "dog"
    a = _accept(client, iid, "cat", 5)
    r = client.patch(f"/api/annotations/{a['id']}", json={"category": "ZEBRA"})
    assert r.status_code == 200 and r.json()["category"] == "zebra"
    # "cat" has no object left: COCO lists the classes in use, YOLO keeps every index
    assert _exports(client) == (
        [(1, "zebra"), (2, "dog"), (3, "apple")],
        ["zebra", "dog", "apple", "cat"],
    )
    stored = client.get(f"/api/images/{iid}/annotations").json()["annotations"]
    assert sorted({a["category"] for a in stored}) == ["apple", "dog", "zebra"]


def test_upgrade_from_schema_2_merges_spellings(tmp_path):
    """A version-2 database with "Dog" then "dog" and "cat": one class "Dog" (first used)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url).close()  # today's schema, then made to look like version 2
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("DROP TABLE categories"))
        c.execute(text("UPDATE segany_meta SET value = '2' WHERE key = 'schema_version'"))
        c.execute(
            text(
                "INSERT INTO images (id, path, width, height, size_bytes, mtime, status, stage,"
                " done, created_at) VALUES (1, 'a.png', 4, 4, 1, 0, 'ok', 1, 0, 0)"
            )
        )
        for i, cat in ((1, "Dog"), (2, "cat"), (3, "dog ")):
            c.execute(
                text(
                    "INSERT INTO annotations (id, image_id, category, status, stage, source,"
                    " segmentation, bbox, area, clicks, created_at, updated_at) VALUES "
                    "(:i, 1, :c, 'accepted', 1, 'manual', '{}', '[]', 1, 0, 0, 0)"
                ),  # fmt: skip
                {"i": i, "c": cat},
            )
    eng.dispose()
    store = Store(url)
    try:
        assert store.category_table() == [(1, "Dog"), (2, "cat")]
        assert [a.category for a in store.annotations(light=True)] == ["Dog", "cat", "Dog"]
        with store.session() as s:
            v = s.execute(text("SELECT value FROM segany_meta WHERE key='schema_version'"))
            assert int(v.scalar()) == SCHEMA_VERSION == 7
    finally:
        store.close()
