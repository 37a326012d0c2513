"""The data engine's loop with MobileSAM on real images, with the mIoU before and after each
training (docs/training.md, "The loop with MobileSAM").

On the DSB2018 nuclei (split by image, seeded, half held out with their ground truth):

1. stage 3: ``segany label`` the training half (no labels used) with MobileSAM;
2. ``segany train --data DS`` on those automatic labels (the default recipe; ``--steps``);
3. serve the new model in the annotator and "annotate": accept the ground-truth masks of a
   few training images (what an annotator's corrected objects become);
4. ``segany retrain`` from the annotator's store, starting from the model of step 2;
5. ``segany label`` the training half again with the newest model.

After each training the held-out half is evaluated (``segany eval points``: 1-click mIoU,
auto and oracle). Accuracy does not depend on the machine's load; the times printed do.

    python benchmarks/bench_data_engine_loop.py --out runs/loop [--steps 120] [--annotate 8]
        [--eval-images N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUCLEI = REPO.parent / "shared" / "data" / "dsb2018_nuclei"


def _cpu() -> str:
    from segany.runtime import cpu_info

    return str(cpu_info()["model"])


def _run(argv: list[str]) -> float:
    from segany.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    if code != 0:
        sys.exit(f"segany {' '.join(argv)} failed ({code})")
    return time.perf_counter() - t0


def _eval(model: str, val: Path, images: Path, out: Path, limit: int | None) -> dict:
    lim = ["--limit", str(limit)] if limit else []
    _run(["eval", "points", str(val), "--images", str(images), "--model", model,
          "--max-clicks", "1", "--out", str(out), "--quiet", *lim])  # fmt: skip
    r = json.loads((out / "results.json").read_text())
    r = r["runs"][0] if "runs" in r else r
    return {"miou_1": r["miou"]["1"], "oracle_1": r["oracle_miou_1"], "masks": r["masks"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(NUCLEI), help="COCO folder (default: DSB2018 nuclei)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None, help="segany train steps (default: recipe)")
    ap.add_argument("--annotate", type=int, default=8, help="training images annotated")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--eval-images", type=int, default=None, help="held-out images scored")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from segany.datasets import open_dataset, to_coco
    from segany.engine.service import AcceptRequest, AnnotationService
    from segany.engine.store import Store
    from segany.loader import load_predictor
    from segany.train.data import split_by_image
    from segany.train.loop import model_history, switch_service_model

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = open_dataset(args.data)
    train, val = split_by_image(data.images, 0.5, 0)
    images = Path(args.data) / "images"
    val_json = out / "val.json"
    val_json.write_text(json.dumps(to_coco(val)))
    folder = out / "train_images"  # the unlabeled half, as files (the annotator's folder)
    folder.mkdir()
    for im in train:
        shutil.copy(im.path, folder / im.path.name)
    print(f"CPU: {_cpu()}; {len(train)} training images (labels unused), {len(val)} held out "
          f"({sum(i.num_masks for i in val)} masks)", flush=True)  # fmt: skip
    rows = []
    base = _eval("mobile_sam", val_json, images, out / "eval0", args.eval_images)
    rows.append(("mobile_sam", "-", base, 0.0))

    ds = out / "ds"
    t = _run(["label", str(folder), "--out", str(ds), "--preset", args.preset, "--no-progress"])
    auto = json.loads((ds / "manifest.json").read_text())["counts"]
    print(f"stage 3: {auto['images']} images, {auto['masks']} masks in {t:.0f} s", flush=True)
    ft1 = out / "ft1.pt"
    steps = ["--steps", str(args.steps)] if args.steps else []
    t = _run(["train", "--data", str(ds), "--out", str(ft1), "--val-fraction", "0", *steps,
              "--quiet"])  # fmt: skip
    rows.append(("ft1", f"{auto['masks']} automatic masks", _eval(str(ft1), val_json, images,
                 out / "eval1", args.eval_images), t))  # fmt: skip

    svc = AnnotationService(Store(folder / ".segany" / "annotations.db"), folder,
                            load_predictor(ft1, progress=False), model_name=ft1.name,
                            prefetch=False)  # fmt: skip
    try:
        svc.rescan()
        ids = {Path(im.path).name: im.id for im in svc.store.images()}
        accepted = 0
        for im in train[: args.annotate]:
            for a in im.annotations:
                svc.accept(ids[im.path.name], AcceptRequest(segmentation=a.segmentation()),
                           svc.local_user)  # fmt: skip
                accepted += 1
        t0 = time.perf_counter()
        _run(["retrain", str(folder), "--model", str(ft1), "--quiet", *steps])
        t = time.perf_counter() - t0
        ft2 = Path(model_history(svc.store)[-1]["checkpoint"])
        switch_service_model(svc, ft2)
    finally:
        svc.close()
        svc.store.close()
    scores = _eval(str(ft2), val_json, images, out / "eval2", args.eval_images)
    rows.append(("ft2", f"+ {accepted} accepted masks ({args.annotate} images)", scores, t))
    t = _run(["label", str(folder), "--out", str(out / "ds2"), "--model", str(ft2),
              "--preset", args.preset, "--no-progress"])  # fmt: skip
    again = json.loads((out / "ds2" / "manifest.json").read_text())["counts"]
    print(f"stage 3 again with ft2: {again['masks']} masks in {t:.0f} s\n")
    print("| model | trained on | held-out 1-click mIoU | oracle | train s |")
    print("|---|---|---|---|---|")
    for name, what, r, secs in rows:
        print(f"| {name} | {what} | {r['miou_1']:.2f} | {r['oracle_1']:.2f} | {secs:.0f} |")
    (out / "loop.json").write_text(json.dumps({"cpu": _cpu(), "rows": rows, "auto": auto,
                                               "again": again}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
