"""SAM 2.1 image embedding and one click: segany against the reference ``sam2`` package.

Both sides load the same checkpoint (random weights in the official layout, made here by
segany's builder with a fixed seed, or ``--checkpoint`` a real file) and take the same
image; each runs in its own worker process with the same thread count, and the two are
interleaved round by round so that load from other processes hits both alike. "embed" =
``set_image`` on a new image (resize, normalise, encode, and for segany the per-image
decoder preparation; segany's embedding cache is off); "click" = ``predict`` with one
positive point, multimask output, masks at image size. Printed: the CPU model, the median
and minimum per operation and the ratio reference / segany of the medians.

    python benchmarks/bench_sam2.py --reference-python ~/.cache/segany-reference/venv/bin/python \\
        [--config sam2.1_hiera_t] [--threads 2] [--rounds 5] [--clicks 10] \\
        [--backends torch,onnx]

Each segany backend named in ``--backends`` (``torch``: fused fp32, ``onnx``: the exported
graphs in onnxruntime, exported once before timing; ``torch-bf16``: the image encoder in
bfloat16, refused on a CPU without bfloat16 units, masks differ from fp32) runs in its own
worker beside the reference; ``backend="auto"`` picks the faster exact one on each machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "data" / "davis17_firstframes" / "images"
DEFAULT_IMAGE = IMAGE / "d17testdev_bike-trial_00000.jpg"

WORKER = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch
from PIL import Image
side, config, ckpt, threads, image = sys.argv[1:6]
backend = sys.argv[6] if len(sys.argv) > 6 else "torch"
torch.set_num_threads(int(threads))
rgb = np.asarray(Image.open(image).convert("RGB")).copy()
if side == "reference":
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    model = build_sam2(config, ckpt, device="cpu")
    pred = SAM2ImagePredictor(model)
    def set_image(img):
        pred.set_image(img)
    def click(pt):
        return pred.predict(point_coords=np.array([pt]), point_labels=np.array([1]))
else:
    from segany.compat import build_sam2
    from segany.predictor import EmbeddingCache, Predictor
    model = build_sam2(config, ckpt)
    bf16 = backend == "torch-bf16"
    pred = Predictor(model, cache=EmbeddingCache(max_items=0), fuse=True,
                     backend="torch" if bf16 else backend,
                     precision="bf16" if bf16 else "fp32")
    def set_image(img):
        pred.set_image(img)
    def click(pt):
        out = pred.predict(point_coords=np.array([pt]), point_labels=np.array([1]))
        return out.masks, out.scores
h, w = rgb.shape[:2]
print(json.dumps({"ready": True}), flush=True)
n = 0
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "embed":
        img = rgb.copy()
        img[0, 0, 0] = n % 251  # a new image every time (no cache can answer)
        n += 1
        with torch.inference_mode():
            t = time.perf_counter(); set_image(img); dt = time.perf_counter() - t
        print(json.dumps({"s": [dt]}), flush=True)
    else:
        times = []
        with torch.inference_mode():
            for i in range(cmd["n"]):
                pt = [w * (0.2 + 0.6 * ((i * 7) % 10) / 10), h * (0.3 + 0.4 * ((i * 3) % 10) / 10)]
                t = time.perf_counter(); click(pt); times.append(time.perf_counter() - t)
        print(json.dumps({"s": times}), flush=True)
"""


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Worker:
    def __init__(self, python: str, side: str, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [python, "-c", WORKER, side, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        json.loads(self.proc.stdout.readline())

    def ask(self, **cmd) -> list[float]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reference-python", required=True)
    ap.add_argument("--config", default="sam2.1_hiera_t", help="registry / official config name")
    ap.add_argument("--checkpoint", type=Path, help="default: random weights (seed 0)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument(
        "--backends",
        default="torch",
        help="segany backends, comma-separated: torch, onnx, torch-bf16",
    )
    a = ap.parse_args()

    import torch

    from segany.compat import sam2_variant
    from segany.models import build_model

    name = sam2_variant(a.config)
    version, size = name.split("_hiera_")
    config = f"configs/{version}/{name}.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = Path(tmp) / f"{name}.pt"
            torch.save({"model": build_model(name).state_dict()}, ckpt)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(REPO))
        args = [config, str(ckpt), str(a.threads), str(a.image)]
        workers = {
            "reference": Worker(a.reference_python, "reference", args, env),
        }
        for b in a.backends.split(","):
            workers[f"segany-{b}"] = Worker(sys.executable, "segany", [*args, b], env)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.rounds):
            for side, w in workers.items():
                times.setdefault((side, "embed"), []).extend(w.ask(op="embed"))
            for side, w in workers.items():
                times.setdefault((side, "click"), []).extend(w.ask(op="click", n=a.clicks))
        for w in workers.values():
            w.close()
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; threads {a.threads}; {name}; "
        f"image {a.image.name}; {a.rounds} rounds, {a.clicks} clicks per round"
    )
    print(f"{'op':<6} {'side':<14} {'median ms':>10} {'min ms':>8} {'ref/this':>9}")
    for op in ("embed", "click"):
        ref = statistics.median(times[("reference", op)])
        for side in workers:
            t = times[(side, op)]
            med = statistics.median(t)
            print(f"{op:<6} {side:<14} {1e3 * med:>10.1f} {1e3 * min(t):>8.1f} {ref / med:>8.2f}x")


if __name__ == "__main__":
    main()
