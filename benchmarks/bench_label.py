"""Throughput of ``segany label``: local process pool vs Ray, 1 and 2 workers, same images.

Each configuration runs the real command (``python -m segany label``) in a fresh process on
the same images into a fresh output folder, and reads its ``report.json``:

- ``images/s``: labeled images / command wall time (process start, Ray start, model load
  and shard writing included);
- ``steady images/s``: from the first finished image to the end (start-up excluded);
- scaling efficiency of N workers = steady images/s of N workers x T threads / (N x steady
  images/s of 1 worker x T threads): 1.0 when each added worker adds a full worker's speed;
- CPU scaling efficiency = CPU seconds per image (generate) of 1 worker / of N workers: < 1
  when workers slow each other down, whatever CPU share the job gets. On a shared Linux
  machine with autogroup scheduling, a session (this job and its workers) gets an equal
  share with each other busy session, so wall-clock scaling there measures the neighbours.

    .venv/bin/python benchmarks/bench_label.py [--images 8] [--preset fast] \
        [--configs local:1x2,local:1x1,local:2x1,ray:1x2,ray:1x1,ray:2x1] [--repeat 2] \
        [--json out.json]

``local:2x1`` = local pool, 2 workers x 1 thread. The machine's load average is printed
with each run: on a shared machine the figures move with the neighbours' work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO10 = REPO.parent / "shared" / "data" / "coco10" / "images"
DEFAULT_CONFIGS = "local:1x2,local:1x1,local:2x1,ray:1x2,ray:1x1,ray:2x1"


def run_config(
    backend: str,
    workers: int,
    threads: int,
    listing: Path,
    work: Path,
    args: argparse.Namespace,
    rep_no: int = 0,
) -> dict:
    out = work / f"{backend}_{workers}x{threads}_{rep_no}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "segany", "label", str(listing), "--out", str(out)]
    cmd += ["--model", args.model, "--preset", args.preset, "--workers", str(workers)]
    cmd += ["--threads-per-worker", str(threads), "--shard-size", str(args.shard_size)]
    cmd += ["--no-progress"]
    if backend == "ray":
        cmd += ["--ray=local"]  # a fresh local Ray instance, started inside the timing
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    return {
        "config": f"{backend}:{workers}x{threads}",
        "backend": backend,
        "workers": workers,
        "threads": threads,
        "images": rep["images"],
        "masks_per_image": rep["masks_per_image"],
        "command_seconds": round(wall, 2),
        "images_per_second": round(rep["images"] / wall, 4),
        "steady_images_per_second": rep["steady_images_per_second"],
        "first_image_seconds": rep["first_image_seconds"],
        "model_load_seconds": rep["model_load_seconds"],
        "seconds_per_image": rep["seconds_per_image"],
        "generate_cpu_seconds_per_image": rep["generate_cpu_seconds_per_image"],
        "finalize_seconds": rep["finalize_seconds"],
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "out": str(out),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="first N images of --source")
    ap.add_argument("--source", default=str(COCO10), help="folder of images (default: coco10)")
    ap.add_argument("--model", default="mobile_sam")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", help="keep the outputs in this folder (default: a temp folder)")
    args = ap.parse_args()

    images = sorted(
        p for p in Path(args.source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )[: args.images]
    if not images:
        raise SystemExit(f"no images in {args.source}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_label_"))
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    print(
        f"{len(images)} images of {args.source}, preset {args.preset}, model {args.model}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )

    specs = []
    for spec in args.configs.split(","):
        backend, wt = spec.split(":")
        workers, threads = (int(v) for v in wt.split("x"))
        specs.append((backend, workers, threads))
    runs = []
    for rep_no in range(args.repeat):  # interleaved, every other pass reversed (drift)
        for backend, workers, threads in specs if rep_no % 2 == 0 else specs[::-1]:
            row = run_config(backend, workers, threads, listing, work, args, rep_no)
            runs.append(row)
            print(
                f"  {row['config']:<10} {row['images_per_second']:.4f} img/s (steady "
                f"{row['steady_images_per_second']}), first image after "
                f"{row['first_image_seconds']} s, "
                f"generate CPU {row['generate_cpu_seconds_per_image']} s/img, "
                f"load avg {row['load_average']}",
                flush=True,
            )
    rows = []
    for backend, workers, threads in specs:
        mine = [r for r in runs if (r["backend"], r["workers"], r["threads"]) == (
            backend, workers, threads)]  # fmt: skip

        def med(key: str, sub: str | None = None, mine=mine) -> float | None:
            vals = [(r[key] if sub is None else r[key].get(sub)) for r in mine]
            vals = [v for v in vals if v is not None]
            return round(statistics.median(vals), 4) if vals else None

        rows.append(
            {
                "config": f"{backend}:{workers}x{threads}",
                "backend": backend,
                "workers": workers,
                "threads": threads,
                "runs": len(mine),
                "images_per_second": med("images_per_second"),
                "steady_images_per_second": med("steady_images_per_second"),
                "first_image_seconds": med("first_image_seconds"),
                "model_load_seconds": med("model_load_seconds"),
                "generate_seconds_per_image": med("seconds_per_image", "generate"),
                "write_seconds_per_image": med("seconds_per_image", "write"),
                "generate_cpu_seconds_per_image": med("generate_cpu_seconds_per_image"),
                "masks_per_image": med("masks_per_image"),
                "load_average": [r["load_average"] for r in mine],
            }
        )
    base = {
        (r["backend"], r["threads"]): r["steady_images_per_second"]
        for r in rows
        if r["workers"] == 1
    }
    cpu_base = {
        (r["backend"], r["threads"]): r["generate_cpu_seconds_per_image"]
        for r in rows
        if r["workers"] == 1
    }
    for r in rows:
        b = base.get((r["backend"], r["threads"]))
        s = r["steady_images_per_second"]
        r["scaling_efficiency"] = round(s / (r["workers"] * b), 3) if b and s else None
        # CPU work per image of 1 worker / of N workers: < 1 when workers slow each other
        # down (memory bandwidth, caches); independent of the CPU share the job gets
        c, c1 = r["generate_cpu_seconds_per_image"], cpu_base.get((r["backend"], r["threads"]))
        r["cpu_scaling_efficiency"] = round(c1 / c, 3) if c and c1 else None

    print()
    print(f"median of {args.repeat} run(s) per configuration")
    print(
        "| config | workers x threads | images/s (command) | steady images/s | first image s "
        "| model load s | generate s/img | generate CPU s/img | write s/img "
        "| scaling efficiency | CPU scaling efficiency | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        eff = "" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}"
        ceff = "" if r["cpu_scaling_efficiency"] is None else f"{r['cpu_scaling_efficiency']:.2f}"
        loads = ", ".join(f"{a:.1f}" for a, _ in r["load_average"])
        print(
            f"| {r['backend']} | {r['workers']} x {r['threads']} | {r['images_per_second']:.4f} "
            f"| {r['steady_images_per_second']} | {r['first_image_seconds']} "
            f"| {r['model_load_seconds']} | {r['generate_seconds_per_image']} "
            f"| {r['generate_cpu_seconds_per_image']} | {r['write_seconds_per_image']} "
            f"| {eff} | {ceff} | {loads} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"images": len(images), "rows": rows, "runs": runs}, indent=1)
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
