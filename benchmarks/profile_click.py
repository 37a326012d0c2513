"""Where the time of one click goes: torch profiler table of ``Predictor.predict`` (one
positive point, three masks at image size) on a cached embedding. ``--refine``: the
annotator's later clicks instead (a positive and a negative point, one mask, the previous
click's best low-res logits as ``mask_input``, the low-res logits read back).

    .venv/bin/python benchmarks/profile_click.py [--threads 2] [--clicks 10] [--refine]
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
    ap.add_argument("--refine", action="store_true", help="a click with a mask input")
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
    first = pred.predict(point_coords=pt, point_labels=lab, multimask_output=True)

    def click():
        if not args.refine:
            return pred.predict(point_coords=pt, point_labels=lab, multimask_output=True)
        best = first.low_res_logits[int(np.argmax(first.scores))][None]
        return pred.predict(
            point_coords=np.array([[200.0, 150.0], [320.0, 400.0]]),
            point_labels=np.array([1, 0]),
            mask_input=best,
            multimask_output=False,
        ).low_res_logits

    for _ in range(5):
        click()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(30):
        click()
    wall, cpu = (time.perf_counter() - t) / 30 * 1e3, (time.process_time() - c) / 30 * 1e3
    kind = "refinement click" if args.refine else "click"
    print(f"{kind}: {wall:.1f} ms, CPU {cpu:.1f} ms ({args.threads} threads)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.clicks):
            click()
    print(f"totals over {args.clicks} clicks:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
