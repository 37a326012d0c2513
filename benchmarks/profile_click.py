"""Where the time of one click goes: torch profiler table of ``Predictor.predict`` (one
positive point, three masks at image size) on a cached embedding.

    .venv/bin/python benchmarks/profile_click.py [--threads 2] [--clicks 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()

    from skimage import data
    from torch.profiler import ProfilerActivity, profile

    from segany import load_predictor
    from segany.predictor import EmbeddingCache
    from segany.runtime import set_threads

    set_threads(args.threads)
    pred = load_predictor("mobile_sam", cache=EmbeddingCache(max_items=0))
    golden = REFERENCE / "mobilesam_astronaut.npz"
    image = np.load(golden)["image"] if golden.is_file() else data.astronaut()
    pred.set_image(image)
    pt, lab = np.array([[200.0, 150.0]]), np.array([1])
    for _ in range(5):
        pred.predict(point_coords=pt, point_labels=lab, multimask_output=True)
    t = time.perf_counter()
    for _ in range(30):
        pred.predict(point_coords=pt, point_labels=lab, multimask_output=True)
    print(f"click: {(time.perf_counter() - t) / 30 * 1e3:.1f} ms ({args.threads} threads)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.clicks):
            pred.predict(point_coords=pt, point_labels=lab, multimask_output=True)
    print(f"totals over {args.clicks} clicks:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
