"""Hostile input to the annotator's API (issue #18, items 3 and 8): non-finite numbers in
every body, a stored NaN that must not break exports, ids beyond any integer column, chunked
bodies over the limit, a locked, full, corrupt or unreachable database, and the last-resort
500. On SQLite and PostgreSQL where the store is involved."""

from __future__ import annotations

import io
import json
import math
import sqlite3
import zipfile

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from segany.engine.server import create_app
from segany.engine.store import Store

from .conftest import image_id, make_service
from .test_races import _pending, _rle


def strict(text: str):
    """JSON as a strict parser reads it: NaN / Infinity are not JSON."""

    def refuse(name):
        raise AssertionError(f"{name} in a JSON answer")

    return json.loads(text, parse_constant=refuse)


def post(client, url, text, method="POST"):
    return client.request(method, url, content=text, headers={"content-type": "application/json"})


# -- item 3: non-finite numbers ----------------------------------------------------------------
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400", "-1e999")


def test_non_finite_numbers_refused_in_every_body(client):
    iid = image_id(client, "a.png")
    seg = json.dumps(_rle(96, 144))
    for bad in NON_FINITE:
        cases = [
            (f"/api/images/{iid}/annotations", f'{{"segmentation": {seg}, "score": {bad}}}',
             "score"),
            (f"/api/images/{iid}/predict", f'{{"points": [[{bad}, 5]], "labels": [1]}}', "points"),
            (f"/api/images/{iid}/predict", f'{{"box": [1, 2, 30, {bad}]}}', "box"),
            (f"/api/images/{iid}/prefill", f'{{"pred_iou_thresh": {bad}}}', "pred_iou_thresh"),
            (f"/api/images/{iid}/prefill", f'{{"overlap_iou": {bad}}}', "overlap_iou"),
            (f"/api/images/{iid}/prefill", f'{{"box_threshold": {bad}}}', "box_threshold"),
        ]  # fmt: skip
        for url, body, field in cases:
            r = post(client, url, body)
            assert r.status_code == 422, (url, body, r.text)
            detail = r.json()["detail"]
            assert field in detail and "not NaN or infinity" in detail, (body, detail)
        r = post(client, f"/api/images/{iid}/events", f'{{"kind": "note", "data": {{"x": {bad}}}}}')
        assert r.status_code == 422
        assert r.json()["detail"] == "event data must not hold NaN or infinite numbers"
    # PATCH: the RLE size is an integer pair
    (pid,) = _pending(client.app.state.service, iid)
    body = '{"segmentation": {"size": [1e400, 5], "counts": ""}}'
    r = post(client, f"/api/annotations/{pid}", body, "PATCH")
    assert r.status_code == 422 and "segmentation.size" in r.json()["detail"]
    assert strict(client.get("/api/export/coco").text)["annotations"] == []
    assert client.get("/api/health").json() == {"ok": True}


def test_stored_non_finite_numbers_never_break_an_answer(client, service):
    """A row stored by an older segany (or by hand) with NaN / infinite numbers: every
    answer stays valid JSON, with null for those numbers."""
    iid = image_id(client, "a.png")
    item = {
        "image_id": iid,
        "category": "cat",
        "status": "accepted",
        "segmentation": _rle(96, 144),
        "bbox": [30.0, 20.0, 40.0, 30.0],
        "area": 1200,
        "score": math.inf,
        "stability": math.nan,
        "seconds": -math.inf,
    }
    (ann,) = service.store.add_annotations([item])
    r = client.get("/api/export/coco?include_pending=true")
    assert r.status_code == 200
    out = strict(r.text)["annotations"][0]
    assert out["id"] == ann.id and out["score"] is None and out["area"] == 1200
    r = client.get(f"/api/annotations/{ann.id}")
    assert r.status_code == 200
    got = strict(r.text)
    assert got["score"] is None and got["stability"] is None and got["seconds"] is None
    assert (
        strict(client.get(f"/api/images/{iid}/annotations").text)["annotations"][0]["id"] == ann.id
    )
    assert client.get("/api/stats").status_code == 200
    strict(client.get("/api/stats").text)
    with zipfile.ZipFile(io.BytesIO(client.get("/api/export/sa1b").content)) as z:
        sa1b = strict(z.read("a.png.json").decode())
    assert sa1b["annotations"][0]["predicted_iou"] is None
    assert client.get("/api/export/yolo").status_code == 200


# -- item 8: ids, bodies, the database -----------------------------------------------------------
BIG = (2**31, 2**63, 2**64, 10**30)


def test_ids_beyond_the_integer_columns(client):
    iid = image_id(client, "a.png")
    for n in BIG:
        for method, url, body in (
            ("GET", f"/api/images/{n}", None),
            ("GET", f"/api/images/{n}/file", None),
            ("POST", f"/api/images/{n}/open", None),
            ("POST", f"/api/images/{n}/done", {"done": True}),
            ("POST", f"/api/images/{n}/predict", {"points": [[1, 1]], "labels": [1]}),
            ("GET", f"/api/images/{n}/annotations", None),
            ("POST", f"/api/images/{n}/events", {"kind": "note"}),
            ("GET", f"/api/annotations/{n}", None),
            ("PATCH", f"/api/annotations/{n}", {"category": "x"}),
            ("DELETE", f"/api/annotations/{n}", None),
        ):
            r = client.request(method, url, json=body)
            assert r.status_code == 404, (method, url, r.status_code, r.text)
            assert str(n) in r.json()["detail"]
        seg = _rle(96, 144)
        r = client.post(f"/api/images/{iid}/annotations", json={"segmentation": seg, "replaces": n})
        assert r.status_code == 404 and f"no annotation {n}" in r.json()["detail"]
    assert client.get("/api/images/-1").status_code == 404
    assert client.get("/api/health").json() == {"ok": True}


def _chunks(total: int, size: int = 2**16):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


def test_chunked_bodies_over_the_limit_get_413(service):
    app = create_app(service, max_body=100_000, small_body=10_000)
    with TestClient(app, base_url="http://localhost") as c:
        iid = image_id(c, "a.png")
        h = {"content-type": "application/json"}
        for url, limit, size in (
            ("/api/import/coco", "100000 bytes", 150_000),
            (f"/api/images/{iid}/predict", "10000 bytes", 20_000),
            (f"/api/images/{iid}/annotations", "10000 bytes", 20_000),
        ):
            r = c.post(url, content=_chunks(size), headers=h)  # no Content-Length: chunked
            assert r.status_code == 413, (url, r.status_code, r.text)
            assert r.json()["detail"] == f"request body over the limit of this route ({limit})"
            r = c.post(url, content=b" " * size, headers=h)  # with Content-Length
            assert r.status_code == 413
        # under the route's limit: parsed as usual
        body = json.dumps({"points": [[1, 1]], "labels": [1]}).encode()
        assert (
            c.post(f"/api/images/{iid}/predict", content=iter([body]), headers=h).status_code == 200
        )
        assert c.get("/api/health").status_code == 200


def test_default_limits_per_route(service):
    from segany.engine.guards import IMPORT_BODY, SMALL_BODY, BodyLimit

    assert SMALL_BODY == 8 * 2**20 and IMPORT_BODY == 256 * 2**20
    app = create_app(service)
    mw = next(m for m in app.user_middleware if m.cls is BodyLimit)
    assert mw.kwargs == {"default": SMALL_BODY, "limits": {"/api/import/coco": IMPORT_BODY}}
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/api/import/coco", content=b"x", headers={"content-length": str(258 * 2**20)})
        assert r.status_code == 413 and "256 MiB" in r.json()["detail"]
        r = c.post("/api/images/1/predict", content=_chunks(9 * 2**20, 2**20))
        assert r.status_code == 413 and "8 MiB" in r.json()["detail"]


def test_last_resort_500_tells_nothing_inside(service, monkeypatch, caplog):
    def boom():
        raise RuntimeError("secret detail of /srv/annotations.db")

    monkeypatch.setattr(service, "stats", boom)
    app = create_app(service)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as c:
        r = c.get("/api/stats")
    assert r.status_code == 500
    assert r.json() == {
        "detail": "internal error: the server could not handle this request (logged)"
    }
    assert "secret detail" in caplog.text  # the traceback is in the log


@pytest.fixture(params=["sqlite"])
def sqlite_file(request, tmp_path):
    return tmp_path / "annotations.db"


def _client(svc):
    return TestClient(create_app(svc), base_url="http://localhost")


def test_locked_database_gets_503(sqlite_file, images_dir, tiny_predictor, tmp_path):
    svc = make_service(f"sqlite:///{sqlite_file}", images_dir, tiny_predictor, tmp_path / "c",
                       prefetch=False)  # fmt: skip
    svc.store.close()
    svc.store = Store(f"sqlite:///{sqlite_file}", busy_timeout=0.2)  # wait 0.2 s for a lock
    other = sqlite3.connect(sqlite_file, isolation_level=None)
    try:
        with _client(svc) as c:
            iid = image_id(c, "a.png")
            other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
            r = c.post(f"/api/images/{iid}/annotations", json={"segmentation": _rle(96, 144)})
            assert r.status_code == 503, r.text
            detail = "database unavailable: the database is locked by another process"
            assert r.json() == {"detail": detail}
            assert r.headers["retry-after"] == "5"
            assert c.get("/api/images").status_code == 200  # reads go on (WAL)
            other.execute("ROLLBACK")
            r = c.post(f"/api/images/{iid}/annotations", json={"segmentation": _rle(96, 144)})
            assert r.status_code == 201
    finally:
        other.close()
        svc.close()
        svc.store.close()


def test_full_database_gets_503(sqlite_file, images_dir, tiny_predictor, tmp_path):
    svc = make_service(f"sqlite:///{sqlite_file}", images_dir, tiny_predictor, tmp_path / "c",
                       prefetch=False)  # fmt: skip
    try:
        with _client(svc) as c:
            iid = image_id(c, "a.png")

            def cap(dbapi_conn, _record):  # the disk "fills up" at the current size
                dbapi_conn.execute("PRAGMA max_page_count = 1")

            sa.event.listen(svc.store.engine, "connect", cap)
            svc.store.engine.dispose()
            import numpy as np

            from segany.masks import masks_to_coco_rle

            checker = (np.indices((1, 96, 144)).sum(axis=0) % 2).astype(bool)
            big = {"segmentation": masks_to_coco_rle(checker)[0]}  # ~14k runs: new pages
            for _ in range(20):
                r = c.post(f"/api/images/{iid}/annotations", json=big)
                if r.status_code != 201:
                    break
            assert r.status_code == 503, r.text
            assert r.json()["detail"] == "database unavailable: the disk is full"
            assert c.get("/api/health").json() == {"ok": True}  # still readable
    finally:
        svc.close()
        svc.store.close()


def test_corrupt_database_gets_503(sqlite_file, images_dir, tiny_predictor, tmp_path):
    svc = make_service(f"sqlite:///{sqlite_file}", images_dir, tiny_predictor, tmp_path / "c",
                       prefetch=False)  # fmt: skip
    try:
        with _client(svc) as c:
            assert c.get("/api/health").json() == {"ok": True}
            svc.store.engine.dispose()
            for suffix in ("-wal", "-shm"):
                sqlite_file.with_name(sqlite_file.name + suffix).unlink(missing_ok=True)
            sqlite_file.write_bytes(b"this is no longer a database " * 200)
            r = c.get("/api/health")
            assert r.status_code == 503
            detail = "database unavailable: the database file is damaged"
            assert r.json() == {"ok": False, "detail": detail}
            r = c.get("/api/images")
            assert r.status_code == 503
            assert r.json()["detail"] == "database unavailable: the database file is damaged"
            assert str(sqlite_file) not in r.text
    finally:
        svc.close()
        svc.store.close()


def test_unreachable_postgresql_gets_503(postgres, images_dir, tiny_predictor, tmp_path):
    if isinstance(postgres, str):
        pytest.skip(f"PostgreSQL cannot be started here: {postgres}")
    url = postgres.new_database()
    name = sa.engine.make_url(url).database
    svc = make_service(url, images_dir, tiny_predictor, tmp_path / "c", prefetch=False)
    admin = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    try:
        with _client(svc) as c, admin.connect() as a:
            assert c.get("/api/health").json() == {"ok": True}
            a.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            a.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )
            r = c.get("/api/health")
            assert r.status_code == 503
            assert r.json()["detail"] == "database unavailable: the database cannot be reached"
            r = c.get("/api/images")
            assert r.status_code == 503 and "cannot be reached" in r.json()["detail"]
            a.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            assert c.get("/api/health").json() == {"ok": True}  # back when the database is
    finally:
        admin.dispose()
        svc.close()
        svc.store.close()


def test_rle_runs_must_sum_to_the_image(client):
    """Item 2: a compressed RLE whose runs sum to less or more than H*W decoded into
    uninitialised memory (201, a different mask on every decode)."""
    iid = image_id(client, "a.png")
    (pid,) = _pending(client.app.state.service, iid)
    good = _rle(96, 144)
    for counts, needle in (
        ("", "runs sum to 0, expected height * width = 13824"),
        ("1", "runs sum to 1, expected height * width = 13824"),
        (good["counts"] + "1", "runs sum to 13855"),  # one run more (stored as a difference)
        ([13824, 3], "runs sum to 13827"),
        ("ZZ", "ends in the middle of a run"),
    ):
        seg = {"size": [96, 144], "counts": counts}
        r = client.post(f"/api/images/{iid}/annotations", json={"segmentation": seg})
        assert r.status_code == 422 and needle in r.json()["detail"], (counts, r.text)
        r = client.patch(f"/api/annotations/{pid}", json={"segmentation": seg})
        assert r.status_code == 422 and needle in r.json()["detail"], (counts, r.text)
    assert len(client.app.state.service.store.annotations(iid)) == 1  # only the pending one
    r = client.post(f"/api/images/{iid}/annotations", json={"segmentation": good})
    assert r.status_code == 201 and r.json()["area"] == 1200
