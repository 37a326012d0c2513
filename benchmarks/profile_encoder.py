"""Where the time of one image embedding goes: torch profiler totals by operator over
``Predictor.set_image`` (resize, normalise, encode, decoder context; no embedding cache)
on one of the reference goldens.

    .venv/bin/python benchmarks/profile_encoder.py [--image astronaut] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="astronaut", help="astronaut, coffee or bike_trial")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument(
        "--by-shape", action="store_true", help="split each operator by its input shapes"
    )
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from segany import load_predictor
    from segany.predictor import EmbeddingCache
    from segany.runtime import set_threads

    set_threads(args.threads)
    pred = load_predictor("mobile_sam", cache=EmbeddingCache(max_items=0))
    image = np.load(REFERENCE / f"mobilesam_{args.image}.npz")["image"]
    for _ in range(3):
        pred.set_image(image)
    t = time.perf_counter()
    for _ in range(args.runs):
        pred.set_image(image)
    wall = (time.perf_counter() - t) / args.runs
    print(f"set_image: {wall * 1e3:.1f} ms ({args.threads} threads, {image.shape[:2]})")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.runs):
            pred.set_image(image)
    averages = prof.key_averages(group_by_input_shape=args.by_shape)
    events = sorted(averages, key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / args.runs / 1e3
    print(f"per image under the profiler: {total:.1f} ms in torch operators")
    for e in events[: args.rows]:
        ms = e.self_cpu_time_total / args.runs / 1e3
        shapes = f"  {[s for s in e.input_shapes if s][:3]}" if args.by_shape else ""
        print(f"{ms:8.2f} ms {e.count // args.runs:5d} calls  {e.key}{shapes}")


if __name__ == "__main__":
    main()
