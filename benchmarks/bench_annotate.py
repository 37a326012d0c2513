"""Load benchmark of the annotator: N simulated annotators click on cached images.

A ``segany annotate`` server runs in its own process (as in use); each simulated annotator
is a thread with its own HTTP connection that works like a person in the paper's tool: it
opens an image, clicks (the first click asks for three candidates, later clicks add
positive or negative points and refine the chosen mask), accepts the object after 1-5
clicks, and thinks about 1 s (0.5-1.5 s, uniform) between clicks. A second run has no
think time (saturation). Images are embedded before the timed runs (they are "cached").

Prints p50/p95/p99 click-to-mask latency (request sent -> masks received and parsed) and
clicks/s, as a Markdown table (and JSON with --json).

    .venv/bin/python benchmarks/bench_annotate.py                   # 8 annotators, MobileSAM
    .venv/bin/python benchmarks/bench_annotate.py --annotators 4 --duration 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "coco10" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: argparse.Namespace, images: Path, work: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "segany"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += [
        "annotate",
        str(images),
        "--db",
        f"sqlite:///{work / 'bench.db'}",
        "--model",
        args.model,
        "--backend",
        args.backend,
        "--port",
        str(port),
        "--cache-dir",
        str(work / "cache"),
        "--no-prefetch",
        "--log-level",
        "warning",
        "--memory-items",
        str(max(16, args.images + 2)),
    ]
    log = open(work / "server.log", "wb")  # noqa: SIM115 - owned by the server process
    env = dict(os.environ)
    if args.passive:  # see docs/performance.md: spinning OpenMP threads on a busy machine
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError((work / "server.log").read_text()[-3000:])
        try:
            if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not start in 300 s")


class Annotator(threading.Thread):
    def __init__(
        self, k: int, base: str, images: list[dict], think: float, stop_at: float, seed: int
    ) -> None:
        super().__init__(daemon=True)
        self.base, self.images, self.think, self.stop_at = base, images, think, stop_at
        self.rng = random.Random(seed)
        self.image = images[k % len(images)]
        self.lat: list[float] = []
        self.server_ms: list[float] = []
        self.accept_lat: list[float] = []
        self.errors = 0
        self.name = f"annotator-{k}"

    def _wait(self) -> None:
        if self.think > 0:
            time.sleep(self.think * self.rng.uniform(0.5, 1.5))

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as c:
            iid, w, h = self.image["id"], self.image["width"], self.image["height"]
            c.post(f"/api/images/{iid}/open")
            self._wait()
            while time.time() < self.stop_at:
                n_clicks = self.rng.randint(1, 5)
                points: list[list[float]] = []
                labels: list[int] = []
                prev = None
                for j in range(n_clicks):
                    points.append([self.rng.uniform(0, w - 1), self.rng.uniform(0, h - 1)])
                    labels.append(1 if j == 0 or self.rng.random() < 0.7 else 0)
                    body = {"points": points, "labels": labels, "multimask": j == 0}
                    if prev is not None:
                        body["mask_input_id"] = prev
                    t0 = time.perf_counter()
                    r = c.post(f"/api/images/{iid}/predict", json=body)
                    out = r.json()  # parsing is part of click-to-mask
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        self.errors += 1
                        break
                    self.lat.append(dt)
                    self.server_ms.append(out["ms"])
                    prev = out["masks"][out["best"]]["mask_input_id"]
                    if time.time() >= self.stop_at:
                        return
                    self._wait()
                if prev is not None:
                    t0 = time.perf_counter()
                    r = c.post(
                        f"/api/images/{iid}/annotations",
                        json={"mask_id": prev, "category": "object"},
                    )
                    self.accept_lat.append(time.perf_counter() - t0)
                    if r.status_code != 201:
                        self.errors += 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(
    base: str, images: list[dict], n: int, think: float, duration: float, seed: int, pid: int
) -> dict:
    cpu0 = cpu_seconds(pid)
    stop_at = time.time() + duration
    team = [Annotator(k, base, images, think, stop_at, seed + k) for k in range(n)]
    t0 = time.perf_counter()
    for a in team:
        a.start()
    for a in team:
        a.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    lat = np.array([x for a in team for x in a.lat]) * 1e3
    srv = np.array([x for a in team for x in a.server_ms])
    acc = np.array([x for a in team for x in a.accept_lat]) * 1e3
    pct = lambda v, q: round(float(np.percentile(v, q)), 1) if len(v) else None  # noqa: E731
    return {
        "annotators": n,
        "think_s": think,
        "seconds": round(wall, 1),
        "clicks": int(len(lat)),
        "clicks_per_s": round(len(lat) / wall, 2),
        "p50_ms": pct(lat, 50),
        "p95_ms": pct(lat, 95),
        "p99_ms": pct(lat, 99),
        "server_p50_ms": pct(srv, 50),
        "server_p95_ms": pct(srv, 95),
        "accepts": int(len(acc)),
        "accept_p95_ms": pct(acc, 95),
        "errors": sum(a.errors for a in team),
        # server CPU time per click (accepts included): independent of other load
        "server_cpu_ms_per_click": round(1e3 * cpu / max(1, len(lat)), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobile_sam")
    ap.add_argument("--backend", default="torch", choices=("torch", "onnx", "onnx-int8"))
    ap.add_argument("--images-dir", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--images", type=int, default=8, help="images used (default 8)")
    ap.add_argument("--annotators", type=int, default=8)
    ap.add_argument("--think", type=float, default=1.0, help="mean seconds between clicks")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of the paced run")
    ap.add_argument(
        "--saturation",
        type=float,
        default=15.0,
        help="seconds of the run without think time (0: skip)",
    )
    ap.add_argument("--threads", type=int, help="server CPU threads (default: all cores)")
    ap.add_argument(
        "--passive", action="store_true", help="run the server with OMP_WAIT_POLICY=PASSIVE"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    src = args.images_dir
    if not src.is_dir():
        src = ROOT / "examples"
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[: args.images]
    work = Path(tempfile.mkdtemp(prefix="segany-bench-"))
    images_dir = work / "images"
    images_dir.mkdir()
    for f in files:
        shutil.copy(f, images_dir / f.name)
    proc, base = start_server(args, images_dir, work)
    try:
        images = [
            im for im in httpx.get(base + "/api/images").json()["images"] if im["status"] == "ok"
        ]
        t0 = time.perf_counter()
        with httpx.Client(base_url=base, timeout=300) as c:  # embed every image first
            for im in images:
                c.post(
                    f"/api/images/{im['id']}/predict",
                    json={"points": [[im["width"] / 2, im["height"] / 2]], "labels": [1]},
                )
            for _ in range(3):  # warm up the decoder
                c.post(
                    f"/api/images/{images[0]['id']}/predict",
                    json={"points": [[5, 5]], "labels": [1]},
                )
        embed_s = (time.perf_counter() - t0) / len(images)
        n = args.annotators
        phases = [run_phase(base, images, n, args.think, args.duration, args.seed, proc.pid)]
        if args.saturation > 0:
            phases.append(run_phase(base, images, n, 0.0, args.saturation, args.seed + 1, proc.pid))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    sizes = sorted({(im["width"], im["height"]) for im in images})
    info = {
        "model": args.model,
        "backend": args.backend,
        "cpus": len(os.sched_getaffinity(0)),
        "images": len(images),
        "image_sizes": [f"{w}x{h}" for w, h in sizes][:6],
        "embed_s_per_image": round(embed_s, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_wait_policy": "PASSIVE" if args.passive else os.environ.get("OMP_WAIT_POLICY"),
    }
    print(
        f"model {args.model} ({args.backend}), {info['cpus']} CPUs, {len(images)} images "
        f"{', '.join(info['image_sizes'])}; first click (embedding) {embed_s:.2f} s/image; "
        f"load average now {info['load_average']}"
        + (", OMP_WAIT_POLICY=PASSIVE" if args.passive else "")
    )
    print()
    print(
        "| run | annotators | clicks | clicks/s | p50 ms | p95 ms | p99 ms | server p50 / p95 ms "
        "| server CPU ms / click | accept p95 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ph in phases:
        name = f"paced (~{ph['think_s']:g} s think)" if ph["think_s"] else "saturation (no think)"
        print(
            f"| {name} | {ph['annotators']} | {ph['clicks']} | {ph['clicks_per_s']} | "
            f"{ph['p50_ms']} | {ph['p95_ms']} | {ph['p99_ms']} | "
            f"{ph['server_p50_ms']} / {ph['server_p95_ms']} | {ph['server_cpu_ms_per_click']} | "
            f"{ph['accept_p95_ms']} | "
            f"{ph['errors']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"info": info, "phases": phases}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
