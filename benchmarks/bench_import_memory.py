"""Peak memory of one COCO import (``POST /api/import/coco``) in a ``segany annotate`` server.

A server runs in its own process (tiny random model, SQLite) on a folder of images; a COCO
file of polygons (``--mb`` megabytes) is posted to it with a Content-Length; the server's
peak resident memory (``VmHWM`` of ``/proc/PID/status``) is read before and after.

    .venv/bin/python benchmarks/bench_import_memory.py                 # this tree, 37 MB
    .venv/bin/python benchmarks/bench_import_memory.py --code OTHER_TREE   # e.g. an old commit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(rest.split()[0]) // 1024  # MiB
    return out


def coco_file(path: Path, images: list[str], mb: float, w: int = 640, h: int = 480) -> int:
    """Polygons (circles of 400 vertices) until the file holds ``mb`` megabytes."""
    anns = []
    size = 0
    k = 0
    while size < mb * 1e6:
        cx, cy, r = 100 + (k * 37) % (w - 200), 100 + (k * 53) % (h - 200), 40 + k % 50
        poly = []
        for i in range(400):
            t = 2 * math.pi * i / 400
            poly += [round(cx + r * math.cos(t), 2), round(cy + r * math.sin(t), 2)]
        a = {"id": k + 1, "image_id": k % len(images) + 1, "category_id": 1 + k % 3,
             "segmentation": [poly], "iscrowd": 0}  # fmt: skip
        size += len(json.dumps(a)) + 2
        anns.append(a)
        k += 1
    data = {
        "images": [
            {"id": i + 1, "file_name": n, "width": w, "height": h} for i, n in enumerate(images)
        ],
        "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)],
        "annotations": anns,
    }
    path.write_text(json.dumps(data))
    return len(anns)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", default=str(ROOT), help="segany source tree to run the server from")
    ap.add_argument("--mb", type=float, default=37.0, help="size of the COCO file (MB)")
    args = ap.parse_args()
    import httpx
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_sam
    from tests.engine.helpers import free_port, wait_http

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        names = []
        for i in range(8):
            Image.fromarray(np.full((480, 640, 3), 30 * i, np.uint8)).save(images / f"{i}.png")
            names.append(f"{i}.png")
        ckpt = tmp / "tiny.pt"
        torch.save(tiny_sam().state_dict(), ckpt)
        coco = tmp / "coco.json"
        n = coco_file(coco, names, args.mb)
        file_mb = round(coco.stat().st_size / 1e6, 1)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": args.code, "SEGANY_THREADS": "1"}
        db = f"sqlite:///{tmp / 'a.db'}"
        cmd = [sys.executable, "-m", "segany", "annotate", str(images), "--db", db,
               "--model", str(ckpt), "--port", str(port), "--no-prefetch",
               "--log-level", "warning", "--cache-dir", str(tmp / "cache")]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, cwd=args.code, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/api/health", timeout=120, proc=proc)
            before = status(proc.pid)
            t0 = time.perf_counter()
            with coco.open("rb") as f:
                r = httpx.post(
                    base + "/api/import/coco",
                    content=f.read(),
                    headers={"content-type": "application/json"},
                    timeout=600,
                )
            secs = time.perf_counter() - t0
            after = status(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        json.dumps(
            {
                "code": args.code,
                "file_mb": file_mb,
                "annotations": n,
                "status": r.status_code,
                "answer": r.json() if r.status_code == 200 else r.text[:200],
                "seconds": round(secs, 1),
                "rss_before_mib": before["VmRSS"],
                "peak_before_mib": before["VmHWM"],
                "peak_after_mib": after["VmHWM"],
                "import_peak_increase_mib": after["VmHWM"] - before["VmRSS"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
