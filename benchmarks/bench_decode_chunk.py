"""How many prompts the torch decoder should run together on this CPU.

Times ``Predictor.decode_low_res`` on the same prompts with several ``decode_chunk`` sizes
(the predictor splits a batch into chunks of that many prompts) and prints milliseconds per
prompt. The default, ``segany.predictor.CPU_DECODE_CHUNK``, comes from this table.

    .venv/bin/python benchmarks/bench_decode_chunk.py [--threads 2] [--prompts 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from segany import transforms as T
from segany.loader import load_model
from segany.predictor import CPU_DECODE_CHUNK, Predictor

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", default="1,2,3,4,8,16,64")
    ap.add_argument("--image", default=str(ROOT / "examples" / "kitchen.jpg"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("mobile_sam", progress=False)
    image = T.load_image(args.image)
    rng = np.random.default_rng(0)
    h, w = image.shape[:2]
    pts = rng.uniform([0, 0], [w, h], size=(args.prompts, 2))
    coords = T.coords_to_model(pts, (h, w), model.img_size)[:, None, :]
    labels = torch.ones(args.prompts, 1, dtype=torch.int64)
    chunks = [int(c) for c in args.chunks.split(",")]
    preds = {c: Predictor(model, decode_chunk=c) for c in chunks}
    for p in preds.values():
        p.set_image(image)
        p.decode_low_res(coords[:2], labels[:2])  # warm-up
    times: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(args.rounds):  # interleaved, so drift hits every size alike
        for c, p in preds.items():
            t = time.perf_counter()
            p.decode_low_res(coords, labels)
            times[c].append((time.perf_counter() - t) * 1000 / args.prompts)
    print(f"{args.prompts} prompts, {args.threads} threads, image {h}x{w}; median of {args.rounds}")
    print("chunk  ms/prompt")
    for c in chunks:
        mark = "  <- default" if c == CPU_DECODE_CHUNK else ""
        print(f"{c:>5}  {statistics.median(times[c]):9.2f}{mark}")


if __name__ == "__main__":
    main()
