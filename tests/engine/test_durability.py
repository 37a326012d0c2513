"""Durability: ``kill -9`` the server right after an accepted mask is acknowledged; after a
restart the mask is there (the accept commits before it answers)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
import torch

from segany.engine.store import Store

from ..conftest import tiny_sam
from .helpers import free_port, start_server_process, wait_http


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(tiny_sam().state_dict(), path)
    return path


def _start(images: Path, db: str, model: Path, cache: Path) -> tuple[object, str]:
    port = free_port()
    proc = start_server_process(images, db, model, cache, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/api/health", timeout=90, proc=proc)
    except Exception:
        proc.kill()
        proc.wait()
        log = (cache / "server.log").read_text(errors="replace")
        raise RuntimeError(f"server did not start:\n{log[-3000:]}") from None
    return proc, base


def _stream_accepts(base: str, acked: list[int], enough: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=10) as c:
        iid = c.get("/api/images").json()["images"][0]["id"]
        r = c.post(f"/api/images/{iid}/predict", json={"points": [[10, 10]], "labels": [1]})
        seg = r.json()["masks"][0]["segmentation"]
        while True:
            try:
                r = c.post(f"/api/images/{iid}/annotations", json={"segmentation": seg})
            except httpx.HTTPError:
                return
            if r.status_code != 201:
                return
            acked.append(r.json()["id"])
            if len(acked) >= 15:
                enough.set()


def test_kill_9_right_after_accept(db_url, images_dir, tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    proc, base = _start(images_dir, db_url, tiny_checkpoint, cache)
    acked = []
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            images = {im["path"]: im["id"] for im in c.get("/api/images").json()["images"]}
            iid = images["a.png"]
            for k in range(4):
                r = c.post(
                    f"/api/images/{iid}/predict",
                    json={"points": [[20 + 20 * k, 40]], "labels": [1]},
                )
                assert r.status_code == 200, r.text
                m = r.json()["masks"][0]
                r = c.post(
                    f"/api/images/{iid}/annotations",
                    json={"segmentation": m["segmentation"], "category": f"obj{k}"},
                )
                assert r.status_code == 201, r.text
                acked.append(r.json())
            # a category edit, acknowledged, then killed at once
            r = c.patch(f"/api/annotations/{acked[0]['id']}", json={"category": "renamed"})
            assert r.status_code == 200
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, base = _start(images_dir, db_url, tiny_checkpoint, cache)
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            got = c.get(f"/api/images/{iid}/annotations").json()["annotations"]
            by_id = {a["id"]: a for a in got}
            for a in acked:
                assert a["id"] in by_id, f"acknowledged annotation {a['id']} lost"
                assert by_id[a["id"]]["segmentation"] == a["segmentation"]
            assert by_id[acked[0]["id"]]["category"] == "renamed"
            assert [by_id[a["id"]]["category"] for a in acked[1:]] == ["obj1", "obj2", "obj3"]
        if not db_url.startswith("sqlite"):
            return  # PostgreSQL's commit is the server's: one kill shows the commit-first order
        # another client keeps accepting while the server is killed: every acknowledged
        # accept survives (SQLite in WAL mode, synchronous=FULL)
        stream: list[int] = []
        enough = threading.Event()
        t = threading.Thread(target=_stream_accepts, args=(base, stream, enough))
        t.start()
        assert enough.wait(60), "the server did not accept 15 masks in 60 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        t.join(timeout=30)
        n_acked = len(stream)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the database as the next start would read it (a third server start adds nothing)
    store = Store(db_url)
    try:
        ids = {a.id for a in store.annotations(iid)}
    finally:
        store.close()
    assert set(stream[:n_acked]) <= ids
    assert len(ids) >= 4 + n_acked
