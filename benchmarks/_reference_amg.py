"""Run the reference generator (MobileSAM's own ``SamAutomaticMaskGenerator``, defaults) on
images and write COCO-style results with timings. Executed by the *reference* venv's python
from ``bench_everything.py``; imports nothing from segany.

usage: python _reference_amg.py --checkpoint PATH --out OUT.json IMAGE...
"""

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from mobile_sam import SamAutomaticMaskGenerator, sam_model_registry

    sam = sam_model_registry["vit_t"](checkpoint=args.checkpoint).eval()
    gen = SamAutomaticMaskGenerator(sam, output_mode="coco_rle")
    load_s = time.perf_counter() - t0
    out = {"load_seconds": load_s, "images": []}
    for path in args.images:
        image = np.asarray(Image.open(path).convert("RGB"))
        t = time.perf_counter()
        recs = gen.generate(image)
        sec = time.perf_counter() - t
        out["images"].append(
            {
                "path": path,
                "seconds": sec,
                "records": [
                    {
                        "segmentation": r["segmentation"],
                        "score": r["predicted_iou"],
                        "bbox": r["bbox"],
                        "area": r["area"],
                    }
                    for r in recs
                ],
            }
        )
        print(json.dumps({"path": path, "seconds": round(sec, 1), "masks": len(recs)}), flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
