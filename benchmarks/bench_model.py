"""Encoder and one-click latency of segany (each backend) against the reference code.

One invocation times, on the same images and in interleaved rounds (so that load from
other processes hits every contestant alike):
- the reference implementation (MobileSAM's own ``SamPredictor``), run by the python of
  the reference venv (``--reference-python``; see ``../shared/tools/reference-venv.sh``);
- segany's ``Predictor`` with each requested backend (default: torch, onnx).
Each contestant runs as ``--processes`` separate worker processes (so peak memory is its
own), each loaded once and given the same thread count; every process of every contestant
takes every image in every round, and a contestant's figures pool its processes (the
reference's encoder time moves from one process to the next with its page faults, so one
process is one draw of it; the spread over processes is printed). "encoder" =
``set_image`` on an image not seen before (resize, normalise, encode; segany's embedding
cache is off); "click" = ``predict`` with one positive point, multimask output, masks at
image size. Reported: the minimum and the median over all repetitions, the ratio of the
reference's median to ours, the peak resident memory of the contestant's largest process,
and per encoder call its CPU time, the part of it spent in the kernel and its minor page
faults (the reference's vary from process to process and move its time).

    python benchmarks/bench_model.py --reference-python /path/to/reference/venv/bin/python

The images (``--images``): by default the three images of the reference goldens (one of
them square, the case in which the padding of the model input saves nothing); or every
image file in a folder, e.g. ``../shared/data/coco10/images`` (``--max-images`` caps them).
The per-image table gives each image's median encoder time and ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
IMAGES = ("mobilesam_astronaut.npz", "mobilesam_coffee.npz", "mobilesam_bike_trial.npz")
# Environment variables that cap the instruction sets of torch's own kernels, oneDNN and MKL
# (set them on the command line to measure e.g. the AVX2 case on an AVX-512 CPU; onnxruntime
# has no such switch).
ISA_CAPS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)
WEIGHTS = Path.home() / ".cache" / "segany" / "weights" / "mobile_sam.pt"

# The worker loop shared by both sides: read a command per line, answer one JSON line.
WORKER = r"""
import json, resource, sys, time
import numpy as np
import torch
images = {}
def load(path):
    if path not in images:
        if path.endswith(".npz"):
            z = np.load(path)
            images[path] = (z["image"], None)
        else:
            from PIL import Image, ImageOps
            img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            images[path] = (np.asarray(img), None)
    return images[path]
print(json.dumps({"ready": True, "isa": torch.backends.cpu.get_cpu_capability(),
                  "torch": torch.__version__}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
        break
    img, _ = load(cmd["image"])
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c, t = time.process_time(), time.perf_counter()
    if cmd["op"] == "embed":
        set_image(img)
    else:
        click(np.array([cmd["point"]], dtype=np.float64))
    dt, dc = time.perf_counter() - t, time.process_time() - c
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {"seconds": dt, "cpu": dc, "peak_mb": r1.ru_maxrss / 1024}
    out.update(sys=r1.ru_stime - r0.ru_stime, faults=r1.ru_minflt - r0.ru_minflt)
    print(json.dumps(out), flush=True)
"""

REFERENCE_SETUP = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from mobile_sam import SamPredictor, sam_model_registry
sam = sam_model_registry["vit_t"](checkpoint=sys.argv[1]).eval()
pred = SamPredictor(sam)
def set_image(img):
    pred.set_image(img)
def click(pt):
    pred.predict(point_coords=pt, point_labels=np.array([1]), multimask_output=True)
"""

OURS_SETUP = r"""
import sys
from segany import load_predictor
from segany.predictor import EmbeddingCache
from segany.runtime import set_threads
set_threads(int(sys.argv[2]))
backend, _, bf = sys.argv[3].partition("-bf")
if backend == "compat":  # Meta's API through segany.compat (keeps no embedding cache)
    from segany.compat import SamPredictor, sam_model_registry
    pred = SamPredictor(sam_model_registry["vit_t"](checkpoint=sys.argv[1]))
else:
    pred = load_predictor(
        sys.argv[1],
        backend=backend,
        precision="bf16" if bf else "fp32",
        cache=EmbeddingCache(max_items=0),
    )
def set_image(img):
    pred.set_image(img)
def click(pt):
    pred.predict(point_coords=pt, point_labels=np.array([1]), multimask_output=True)
"""


class Worker:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.peak_mb = 0.0
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {name} failed to start")
        ready = json.loads(line)
        self.isa, self.torch = ready["isa"], ready["torch"]

    def ask(self, **cmd) -> dict[str, float]:
        """One command; the worker's answer: seconds (wall), cpu and sys (process time, and
        the part of it in the kernel), faults (minor page faults), peak_mb."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died")
        out = json.loads(line)
        self.peak_mb = max(self.peak_mb, out["peak_mb"])
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reference-python", help="python of the reference venv (optional)")
    ap.add_argument(
        "--backends",
        default="torch,onnx",
        help="comma-separated segany backends: torch, onnx, onnx-int8, torch-bf16 (torch "
        "with a bfloat16 image encoder; not the reference's numbers, see docs/performance.md), "
        "compat (segany.compat.SamPredictor, Meta's API, fused as torch);"
        " '@NAME=VALUE' after one sets an environment variable for its workers, e.g. "
        "torch,torch@SEGANY_KEEP_FREED_MEMORY=0 (torch-bf16 is refused on a CPU without "
        "native bfloat16; torch-bf16@SEGANY_FORCE_BF16=1 measures it anyway)",
    )
    ap.add_argument("--weights", default=str(WEIGHTS), help="mobile_sam.pt")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all images")
    ap.add_argument("--clicks", type=int, default=5, help="clicks per image and round (at least 1)")
    ap.add_argument(
        "--processes", type=int, default=3, help="worker processes per contestant (pooled)"
    )
    ap.add_argument(
        "--passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for every worker: on a machine shared with other jobs,"
        " spinning OpenMP threads otherwise burn the time slices their partners need",
    )
    ap.add_argument(
        "--images",
        default="golden",
        help="'golden' (the reference goldens' three images) or a folder of image files",
    )
    ap.add_argument("--max-images", type=int, default=None, help="first N images of a folder")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.clicks < 1 or args.rounds < 1 or args.processes < 1:
        ap.error("--clicks, --rounds and --processes must be at least 1")
    for b in args.backends.split(","):
        if any("=" not in a for a in b.split("@")[1:]):
            ap.error(f"--backends: {b!r}: write an environment setting as @NAME=VALUE")

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from segany.runtime import default_threads

    threads = args.threads or default_threads()
    base = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if args.passive:
        base["OMP_WAIT_POLICY"] = "PASSIVE"
    env = dict(base, PYTHONPATH=str(root))
    # The workers run one after the other, never at the same time: each may use all threads.
    contestants: list[tuple[str, list[str], dict[str, str]]] = []
    if args.reference_python:
        code = "import numpy as np\n" + REFERENCE_SETUP + WORKER
        # -W ignore: the reference's timm registry warnings, printed once per process
        argv = [args.reference_python, "-W", "ignore", "-c", code, args.weights, str(threads)]
        contestants.append(("reference", argv, base))
    for b in args.backends.split(","):
        spec, *assigns = b.split("@")
        extra = dict(a.split("=", 1) for a in assigns)
        code = "import numpy as np\n" + OURS_SETUP + WORKER
        argv = [sys.executable, "-c", code, args.weights, str(threads), spec]
        contestants.append((f"segany-{b}", argv, {**env, **extra}))
    workers = [
        Worker(name, argv, env=e) for _ in range(args.processes) for name, argv, e in contestants
    ]
    names = [name for name, _, _ in contestants]
    import numpy as np
    from PIL import Image, ImageOps

    if args.images == "golden":
        images = [str(REFERENCE / f) for f in IMAGES]
    else:
        suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
        images = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix.lower() in suffixes)
        if not images:
            raise SystemExit(f"no image files in {args.images}")
    images = images[: args.max_images]
    points, shapes = [], []
    for f in images:
        if f.endswith(".npz"):
            h, w = np.load(f)["image"].shape[:2]
        else:
            w, h = ImageOps.exif_transpose(Image.open(f)).size
        points.append([w / 2.0, h / 2.0])
        shapes.append((h, w))
    ops = ("embed", "click", "embed_cpu", "click_cpu", "embed_sys", "embed_faults")
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in ops} for n in names}
    per_image: dict[str, dict[str, list[float]]] = {n: {f: [] for f in images} for n in names}
    per_process: dict[Worker, list[float]] = {w: [] for w in workers}
    for w in workers:  # warm-up: first calls allocate and (onnxruntime) plan
        w.ask(op="embed", image=images[0])
        w.ask(op="click", image=images[0], point=points[0])
    for _ in range(args.rounds):
        for img, pt in zip(images, points):
            for w in workers:
                out = w.ask(op="embed", image=img)
                per_process[w].append(out["seconds"])
                times[w.name]["embed"].append(out["seconds"])
                per_image[w.name][img].append(out["seconds"])
                times[w.name]["embed_cpu"].append(out["cpu"])
                times[w.name]["embed_sys"].append(out["sys"])
                times[w.name]["embed_faults"].append(out["faults"])
                for _ in range(args.clicks):
                    out = w.ask(op="click", image=img, point=pt)
                    times[w.name]["click"].append(out["seconds"])
                    times[w.name]["click_cpu"].append(out["cpu"])
    for w in workers:
        w.close()

    def med(name: str, op: str) -> float:
        return statistics.median(times[name][op])

    ref = "reference" if args.reference_python else None
    from segany.runtime import cpu_info

    cpu = cpu_info()
    caps = {k: base[k] for k in ISA_CAPS if k in base}
    print(
        f"CPU: {cpu['model']} ({cpu['arch']}, {os.cpu_count()} logical CPUs);"
        f" instruction-set caps: {caps or 'none'}"
    )
    for name in names:
        w = next(w for w in workers if w.name == name)
        print(f"  {name:18s} torch {w.torch}, kernels dispatched for {w.isa}")
    print(
        f"threads {threads}, {args.rounds} rounds x {len(images)} images, {args.clicks} clicks,"
        f" {args.processes} processes per contestant"
        + (", OMP_WAIT_POLICY=PASSIVE" if args.passive else "")
    )
    print(
        f"{'':18s} {'encoder min/median s':>22s} {'click min/median ms':>22s} {'peak MB':>8s}"
        f" {'ref/ours enc':>12s} {'ref/ours click':>14s}"
    )
    rows = {}
    for name in names:
        procs = [w for w in workers if w.name == name]
        e, c = times[name]["embed"], times[name]["click"]
        row = dict(
            encoder_min=min(e),
            encoder_median=med(name, "embed"),
            click_min=min(c),
            click_median=med(name, "click"),
            peak_mb=max(w.peak_mb for w in procs),
            encoder_median_per_process=[statistics.median(per_process[w]) for w in procs],
        )
        ratio_e = ratio_c = ""
        if ref and name != ref:
            row["encoder_speedup"] = med(ref, "embed") / row["encoder_median"]
            row["click_speedup"] = med(ref, "click") / row["click_median"]
            ratio_e = f"{row['encoder_speedup']:.2f}x"
            ratio_c = f"{row['click_speedup']:.2f}x"
        rows[name] = row
        print(
            f"{name:18s} {min(e):10.3f} / {row['encoder_median']:6.3f}     "
            f"{1e3 * min(c):9.1f} / {1e3 * row['click_median']:6.1f}   {row['peak_mb']:8.0f}"
            f" {ratio_e:>12s} {ratio_c:>14s}"
        )
    if args.processes > 1:
        print("encoder median s of each process:")
        for name in names:
            cells = " ".join(f"{t:.3f}" for t in rows[name]["encoder_median_per_process"])
            print(f"  {name:18s} {cells}")
        if ref:
            for name in names:
                if name == ref:
                    continue
                lo = min(rows[ref]["encoder_median_per_process"]) / rows[name]["encoder_median"]
                hi = max(rows[ref]["encoder_median_per_process"]) / rows[name]["encoder_median"]
                print(f"  ref/{name} encoder over the reference's processes: {lo:.2f}-{hi:.2f}x")
    if len(images) > 1:
        ours = [n for n in names if n != ref]
        head = ("reference / " if ref else "") + " / ".join(ours)
        print(f"per image: encoder median s, {head}" + (" (ratios)" if ref else ""))
        for f, (h, w) in zip(images, shapes):
            r = statistics.median(per_image[ref][f]) if ref else None
            cells = []
            for name in ours:
                o = statistics.median(per_image[name][f])
                cells.append(f"{o:.3f}" + (f" ({r / o:.2f}x)" if r else ""))
            first = f"{r:.3f} / " if r else ""
            print(f"  {Path(f).name[:28]:28s} {h:5d}x{w:<5d} {first}" + " / ".join(cells))
    print(
        "CPU time (process time of the worker; with --threads 1 it hardly depends on load),"
        " of it in the kernel (sys), and minor page faults per encoder call (medians):"
    )
    for name in names:
        e, c = med(name, "embed_cpu"), med(name, "click_cpu")
        e_sys, faults = med(name, "embed_sys"), med(name, "embed_faults")
        rows[name].update(
            encoder_cpu_median=e,
            click_cpu_median=c,
            encoder_sys_median=e_sys,
            encoder_page_faults_median=faults,
        )
        ratio = ""
        if ref and name != ref:
            ratio = (
                f"   ref/ours enc {med(ref, 'embed_cpu') / e:.2f}x"
                f"  click {med(ref, 'click_cpu') / c:.2f}x"
            )
        print(
            f"{name:18s} encoder {e:7.3f} s (sys {e_sys:5.3f} s, {faults:7.0f} faults)"
            f"   click {1e3 * c:7.1f} ms{ratio}"
        )
    load = os.getloadavg()
    print(f"load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        report = {"threads": threads, "cpu": cpu["model"], "isa_caps": caps, "results": rows}
        report["isa"] = {name: next(w.isa for w in workers if w.name == name) for name in names}
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
