"""A video through the annotator's API, as an annotator runs it: a DAVIS sequence registered
as a folder of frames, one object made from the ground truth of its first frame (a key
frame), propagated by the background job (polled as the page polls it), then corrected on
the frame where it is worst (the ground truth there as a new key frame) and propagated from
that frame. Prints the seconds and frames per second of each propagation, the mean J
(mask IoU against the ground truth) of the frames after the first and of the frames after
the correction, and the load average.

    .venv/bin/python benchmarks/bench_annotate_video.py            # blackswan, MobileSAM
    .venv/bin/python benchmarks/bench_annotate_video.py --sequence breakdance --frames 30
    (from a worktree: PYTHONPATH=. so that its segany is imported)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
DAVIS = ROOT.parent / "shared" / "data" / "davis16_video"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--davis", default=str(DAVIS), help="a DAVIS root")
    ap.add_argument("--sequence", default="blackswan")
    ap.add_argument("--frames", type=int, default=0, help="the first N frames (0: all)")
    ap.add_argument("--model", default="mobile_sam")
    args = ap.parse_args()

    from segany.engine.server import create_app
    from segany.engine.service import AnnotationService
    from segany.engine.store import Store
    from segany.loader import load_predictor
    from segany.masks import masks_to_coco_rle, rle_to_mask
    from segany.video.metrics import j_measure
    from segany.video.outputs import read_davis_png

    src = Path(args.davis) / "JPEGImages" / "480p" / args.sequence
    gt_dir = Path(args.davis) / "Annotations" / "480p" / args.sequence
    names = sorted(p.stem for p in src.glob("*.jpg"))
    if args.frames:
        names = names[: args.frames]
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        (images / args.sequence).mkdir(parents=True)
        for n in names:  # copied: the annotator reads no file outside its folder
            shutil.copy(src / f"{n}.jpg", images / args.sequence / f"{n}.jpg")
        svc = AnnotationService(
            Store(Path(tmp) / "db.sqlite"),
            images,
            load_predictor(args.model, backend="torch"),
            model_name=args.model,
            prefetch=False,
        )
        svc.rescan()
        gts = [read_davis_png(gt_dir / f"{n}.png") > 0 for n in names]
        with TestClient(create_app(svc), base_url="http://localhost") as c:
            vid = c.post("/api/videos", json={"path": args.sequence}).json()["id"]
            seg = masks_to_coco_rle(gts[0][None])[0]
            t = c.post(f"/api/videos/{vid}/tracks", json={"frame": 0, "segmentation": seg}).json()

            def propagate(start: int) -> dict:
                job = c.post(f"/api/tracks/{t['id']}/propagate", json={"start": start}).json()
                while job["state"] in ("running", "saving"):
                    time.sleep(0.2)
                    job = c.get(f"/api/propagation-jobs/{job['id']}").json()
                assert job["state"] == "done", job
                return job

            def js() -> list[float]:
                rows = {r.frame: r for r in svc.video_store.frames([t["id"]])}
                masks = [rle_to_mask(rows[f].segmentation) for f in range(len(names))]
                return [j_measure(m, g) for m, g in zip(masks, gts, strict=True)]

            first = propagate(0)
            j1 = js()
            worst = int(np.argmin(j1[1:])) + 1
            fix = masks_to_coco_rle(gts[worst][None])[0]
            c.put(f"/api/tracks/{t['id']}/frames/{worst}", json={"segmentation": fix})
            second = propagate(worst)
            j2 = js()
        svc.close()
        svc.store.close()
    out = {
        "sequence": args.sequence,
        "frames": len(names),
        "size": list(gts[0].shape[::-1]),
        "model": args.model,
        "propagate_s": first["seconds"],
        "propagate_fps": round(len(names) / first["seconds"], 2),
        "J_mean_after_first": round(float(np.mean(j1[1:])), 4),
        "corrected_frame": worst,
        "J_at_corrected_before": round(j1[worst], 4),
        "repropagate_s": second["seconds"],
        "repropagate_frames": second["frames_planned"],
        "J_mean_from_corrected_before": round(float(np.mean(j1[worst:])), 4),
        "J_mean_from_corrected_after": round(float(np.mean(j2[worst:])), 4),
        "frames_before_kept": all(abs(a - b) < 1e-12 for a, b in zip(j1[:worst], j2[:worst])),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpu": _cpu(),
    }
    print(json.dumps(out, indent=2))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
