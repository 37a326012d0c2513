"""Peak memory and time of tiled segment-everything against image size (docs/microscopy.md).

For each size, a square mosaic of real DSB2018 nuclei images is written as a tiled BigTIFF
(tile by tile: the benchmark never holds it whole) and segmented by `TiledMaskGenerator` with
MobileSAM in a fresh process, which reports its peak RSS (getrusage). Memory should stay
near that of one tile whatever the image size; time grows with the number of tiles.

    python benchmarks/bench_tiles.py --sizes 1024,2048,4096 --tile 1024 --overlap 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "dsb2018_nuclei"


def write_mosaic(path: Path, size: int, cell: int = 256) -> None:
    """A size x size RGB BigTIFF of nuclei images in `cell`-px cells, written tile by tile."""
    import tifffile

    sys.path.insert(0, str(REPO))
    from tests.mosaic import NUCLEI, load_coco

    root = SHARED if SHARED.is_dir() else NUCLEI
    items = [rgb for rgb, _ in load_coco(root) if min(rgb.shape[:2]) >= cell]
    cols = -(-size // cell)

    def tiles():
        for r in range(cols):
            for c in range(cols):
                yield items[(r * cols + c) % len(items)][:cell, :cell]

    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(cell, cell),
        photometric="rgb",
        bigtiff=True,
    )


def run_one(path: str, tile: int, overlap: int, out: str) -> None:
    """Child process: segment `path`, print JSON with seconds, objects and peak RSS."""
    sys.path.insert(0, str(REPO))
    from segany.everything import MaskGenerator
    from segany.loader import load_predictor
    from segany.tiled_everything import TiledMaskGenerator

    gen = MaskGenerator(load_predictor("mobile_sam"), preset="fast")
    t0 = time.perf_counter()
    seg = TiledMaskGenerator(gen, tile=tile, overlap=overlap).generate(path, out, progress=False)
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": secs, "objects": len(seg.objects), "peak_rss_mb": rss}))


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048", help="image sides in pixels")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--child", nargs=3, metavar=("IMAGE", "OUT", "_"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_one(args.child[0], args.tile, args.overlap, args.child[1])
        return 0
    import torch

    print(f"CPU: {cpu_model()}; torch threads: {torch.get_num_threads()}")
    print(f"tile {args.tile} px, overlap {args.overlap} px, MobileSAM, preset fast")
    print(f"{'side':>6} {'MP':>6} {'tiles':>5} {'objects':>7} {'s':>7} {'s/MP':>6} {'RSS MB':>7}")
    from segany.tiles import TileGrid

    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            img = Path(tmp) / "mosaic.tif"
            write_mosaic(img, size)
            cmd = [sys.executable, __file__, "--tile", str(args.tile), "--overlap"]
            cmd += [str(args.overlap), "--child", str(img), str(Path(tmp) / "run"), "-"]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
        side = size
        g = TileGrid(height=side, width=side, tile=args.tile, overlap=args.overlap)
        mp = side * side / 1e6
        print(
            f"{side:>6} {mp:>6.1f} {g.shape[0] * g.shape[1]:>5} {r['objects']:>7} "
            f"{r['seconds']:>7.1f} {r['seconds'] / mp:>6.1f} {r['peak_rss_mb']:>7.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
