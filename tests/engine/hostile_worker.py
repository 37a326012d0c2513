"""Runs hostile requests against the annotator's app in a process of its own whose address
space is capped (``RLIMIT_AS``), so that a request that makes pycocotools allocate without
bound (a NaN polygon: 17.8 GB before segany.validate) fails the test instead of the
machine. Used by ``test_import_hostile.py``.

python -m tests.engine.hostile_worker WORKDIR CASES.json   # prints one JSON answer a line
python -m tests.engine.hostile_worker WORKDIR --fuzz SEED N
"""

from __future__ import annotations

import json
import random
import resource
import sys
from pathlib import Path
from typing import Any

#: Address space allowed above what the process holds when the requests start.
HEADROOM = 1536 * 2**20


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _client(work: Path):
    from fastapi.testclient import TestClient

    from segany.engine.server import create_app
    from segany.predictor import Predictor

    from ..conftest import tiny_sam
    from .conftest import make_images, make_service

    images = make_images(work / "images") if not (work / "images").exists() else work / "images"
    svc = make_service(
        f"sqlite:///{work / 'a.db'}",
        images,
        Predictor(tiny_sam(), model_id="tiny-test-model"),
        work / "cache",
        prefetch=False,
    )
    return svc, TestClient(create_app(svc), base_url="http://localhost")


def _cap_memory() -> None:
    limit = _vm_bytes() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_cases(work: Path, cases: list[dict[str, Any]]) -> None:
    svc, client = _client(work)
    with client:
        _cap_memory()
        for case in cases:
            r = client.request(
                case.get("method", "POST"),
                case["url"],
                content=case["body"].encode(),
                headers={"content-type": "application/json"},
            )
            print(json.dumps({"status": r.status_code, "body": r.text}), flush=True)
        n = len(svc.store.annotations())
        print(json.dumps({"annotations": n, "health": client.get("/api/health").status_code}))
    svc.close()


# -- the fuzzer ------------------------------------------------------------------------------
ODD = [
    float("nan"), float("inf"), -float("inf"), 1e400, -1e9, 1e9, 0, -1, 2**31, 2**63, 2**64,
    10**30, 0.5, True, None, "", "1", "x" * 300, [], [1], {}, {"a": 1}, [[1, 2, 3]],
]  # fmt: skip


def _number(rng: random.Random, hi: float) -> Any:
    k = rng.random()
    if k < 0.6:
        return round(rng.uniform(-0.1 * hi, 1.1 * hi), 2)
    return rng.choice(ODD)


def _rle_like(rng: random.Random, h: int, w: int) -> Any:
    k = rng.randrange(8)
    if k == 0:  # counts that sum to too little / too much
        return {"size": [h, w], "counts": rng.choice(["", "1", "0", "PP", "a" * 50, "\x7f"])}
    if k == 1:
        return {"size": [h, w], "counts": [rng.randrange(-5, h * w + 5) for _ in range(3)]}
    if k == 2:
        return {"size": [rng.choice(ODD), w], "counts": ""}
    if k == 3:  # polygons with odd numbers
        return [[_number(rng, w) for _ in range(rng.choice([3, 6, 8, 9]))]]
    if k == 4:
        return {"size": [h, w], "counts": [h * w]}  # a valid empty mask
    if k == 5:
        return {"size": [h, w], "counts": [h * w // 2, h * w - h * w // 2]}  # valid
    if k == 6:
        return rng.choice(ODD)
    return [[10, 10, 60, 10, 60, 50, 10, 50]]  # a valid polygon


def _body(rng: random.Random, kind: str, iid: int, pending: int) -> dict[str, Any]:
    h, w = 96, 144
    if kind == "predict":
        body: dict[str, Any] = {}
        if rng.random() < 0.8:
            n = rng.choice([0, 1, 2, 3, 101])
            body["points"] = [[_number(rng, w), _number(rng, h)] for _ in range(n)]
            body["labels"] = [rng.choice([0, 1, 1, 2, -1, 0.5]) for _ in range(n)]
        if rng.random() < 0.5:
            body["box"] = [_number(rng, w) for _ in range(rng.choice([4, 4, 3]))]
        if rng.random() < 0.2:
            body["multimask"] = rng.choice(ODD)
        return body
    if kind == "accept":
        body = {"segmentation": _rle_like(rng, h, w), "category": rng.choice(["a", " ", "x" * 200])}
        if rng.random() < 0.4:
            body["score"] = _number(rng, 1.0)
        if rng.random() < 0.3:
            body["replaces"] = rng.choice([pending, *ODD])
        return body
    if kind == "update":
        body = {}
        if rng.random() < 0.5:
            body["segmentation"] = _rle_like(rng, h, w)
        if rng.random() < 0.5:
            body["status"] = rng.choice(["accepted", "pending", "rejected", "gone", 1])
        if rng.random() < 0.5:
            body["category"] = rng.choice(["b", "", None, 5])
        return body
    # a COCO import
    ann: dict[str, Any] = {"id": rng.choice([1, 2, *ODD]), "image_id": rng.choice([1, 1, *ODD])}
    if rng.random() < 0.9:
        ann["segmentation"] = _rle_like(rng, h, w)
    if rng.random() < 0.7:
        ann["category_id"] = rng.choice([1, 1, 2, *ODD])
    if rng.random() < 0.3:
        ann["score"] = _number(rng, 1.0)
    cat = {"id": rng.choice([1, 1, *ODD]), "name": rng.choice(["cat", "cat", " ", 3, None])}
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
        "categories": [cat] if rng.random() < 0.8 else [],
        "annotations": [ann],
    }


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def fuzz(work: Path, seed: int, n: int) -> None:
    svc, client = _client(work)
    rng = random.Random(seed)
    iid = next(im.id for im in svc.store.images() if im.path == "a.png")
    counts: dict[int, int] = {}
    with client:
        _cap_memory()
        for k in range(n):
            kind = ("predict", "accept", "update", "import")[k % 4]
            pid = 0
            if kind in ("accept", "update"):  # a fresh pending object to fix or edit
                pending = client.post(
                    "/api/import/coco",
                    json={
                        "images": [{"id": 1, "file_name": "a.png"}],
                        "annotations": [
                            {"id": 1, "image_id": 1, "segmentation": [[10, 10, 60, 10, 60, 50]]}
                        ],
                    },
                )
                assert pending.status_code == 200, pending.text
                pid = max(a.id for a in svc.store.annotations(iid, statuses=["pending"]))
            body = _body(rng, kind, iid, pid)
            url = {
                "predict": f"/api/images/{iid}/predict",
                "accept": f"/api/images/{iid}/annotations",
                "update": f"/api/annotations/{pid}",
                "import": "/api/import/coco",
            }[kind]
            text = json.dumps(body)  # NaN / Infinity as Python writes them
            r = client.request(
                "PATCH" if kind == "update" else "POST",
                url,
                content=text.encode(),
                headers={"content-type": "application/json"},
            )
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            try:  # always strict JSON: no NaN / Infinity
                json.loads(r.text, parse_constant=_refuse)
                strict = True
            except ValueError:
                strict = False
            if r.status_code >= 500 or not strict:
                print(json.dumps({"bad": r.status_code, "kind": kind, "body": text[:2000],
                                  "answer": r.text[:500]}))  # fmt: skip
                return
        for exp in ("coco", "sa1b", "yolo"):
            r = client.get(f"/api/export/{exp}?include_pending=true")
            if r.status_code != 200:
                print(json.dumps({"bad": r.status_code, "kind": f"export {exp}"}))
                return
        print(json.dumps({"ok": True, "statuses": counts}))
    svc.close()


if __name__ == "__main__":
    work = Path(sys.argv[1])
    if sys.argv[2] == "--fuzz":
        fuzz(work, int(sys.argv[3]), int(sys.argv[4]))
    else:
        run_cases(work, json.loads(Path(sys.argv[2]).read_text()))
