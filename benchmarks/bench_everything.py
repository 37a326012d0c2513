"""Segment-everything benchmark: our fast preset (as the whole ``segany everything``
command), our reference-compatible mode, and the reference generator (MobileSAM's own
``SamAutomaticMaskGenerator`` run by the reference venv's python), side by side.

Prints time per image, masks per image and class-agnostic proposal recall (pycocotools
COCOeval, segm, useCats=0, maxDets 10/100/1000, score = predicted IoU) on the eval sets.

    .venv/bin/python benchmarks/bench_everything.py \\
        --reference-python /root/.cache/segany-reference/venv/bin/python

The reference needs minutes per image here, so its recall on the eval sets is read from
``benchmarks/reference_recall.json`` (re-measure with ``--measure-reference-recall``); its
speed is measured in every run on ``--speed-images`` images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEGANY_DATA", ROOT.parent / "shared" / "data"))
STORED = Path(__file__).with_name("reference_recall.json")
#: eval sets: folder and how many images (sorted by file name) are used
SETS = {
    "coco10": ("coco10", None),
    "davis": ("davis17_firstframes", None),
    "davis4": ("davis17_firstframes", 4),
    "dsb4": ("dsb2018_nuclei", 4),
}


def set_images(name: str) -> tuple[Path, list[Path]]:
    folder, n = SETS[name]
    root = DATA / folder
    imgs = sorted((root / "images").iterdir())
    return root / "annotations.json", imgs[:n] if n else imgs


def recall(ann: Path, results: dict[str, list[dict]]) -> dict[str, float]:
    """AR@10/100/1000 and AR small/medium/large (@1000), percent. ``results``: file name ->
    records with ``segmentation`` (COCO RLE) and ``score``."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
    by_name = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
    dets = []
    for name, recs in results.items():
        for r in recs:
            dets.append(
                {
                    "image_id": by_name[name],
                    "category_id": 1,
                    "segmentation": r["segmentation"],
                    "score": float(r["score"]),
                }
            )
    img_ids = [by_name[n] for n in results]
    if not dets:
        return {k: 0.0 for k in ("AR@10", "AR@100", "AR@1000", "ARs", "ARm", "ARl")}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "segm")
        ev.params.useCats = 0
        ev.params.imgIds = img_ids
        ev.params.maxDets = [10, 100, 1000]
        ev.evaluate()
        ev.accumulate()
    rec = ev.eval["recall"]  # T, K, A, M

    def ar(a: int, m: int) -> float:
        r = rec[:, :, a, m]
        r = r[r > -1]
        return float(r.mean() * 100) if r.size else float("nan")

    return {
        "AR@10": ar(0, 0),
        "AR@100": ar(0, 1),
        "AR@1000": ar(0, 2),
        "ARs": ar(1, 2),
        "ARm": ar(2, 2),
        "ARl": ar(3, 2),
    }


def run_cli(images: list[Path], preset: str, out: Path) -> tuple[float, dict[str, list[dict]]]:
    """The whole ``segany everything`` command (process start, model load, overlays)."""
    cmd = [sys.executable, "-m", "segany", "--threads", "2", "everything"]
    cmd += [str(p) for p in images] + ["--out", str(out), "--format", "coco", "--preset", preset]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sec = time.perf_counter() - t
    data = json.loads((out / "annotations.json").read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    res: dict[str, list[dict]] = {n: [] for n in names.values()}
    for a in data["annotations"]:
        res[names[a["image_id"]]].append({"segmentation": a["segmentation"], "score": a["score"]})
    return sec, res


def run_reference(python: str, images: list[Path], out: Path) -> dict:
    ckpt = Path.home() / ".cache" / "segany" / "weights" / "mobile_sam.pt"
    cmd = [python, str(Path(__file__).with_name("_reference_amg.py")), "--checkpoint", str(ckpt)]
    cmd += ["--out", str(out)] + [str(p) for p in images]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_ours_inprocess(
    images: list[Path], preset: str, threads: int = 2
) -> tuple[list[float], dict]:
    import torch

    from segany.everything import MaskGenerator
    from segany.loader import load_model
    from segany.transforms import load_image

    torch.set_num_threads(threads)
    gen = MaskGenerator(load_model(progress=False), preset=preset, output_mode="coco_rle")
    secs, res = [], {}
    for p in images:
        rgb = load_image(p)
        t = time.perf_counter()
        recs = gen.generate(rgb)
        secs.append(time.perf_counter() - t)
        res[p.name] = [
            {"segmentation": r["segmentation"], "score": r["predicted_iou"]} for r in recs
        ]
    return secs, res


def match_rate(a: list[dict], b: list[dict], thr: float = 0.9) -> float:
    """Fraction of masks of ``a`` matched by one of ``b`` at mask IoU >= thr."""
    from segany.masks import mask_iou_matrix

    if not a:
        return float("nan")
    iou = mask_iou_matrix([r["segmentation"] for r in a], [r["segmentation"] for r in b])
    return float((iou.max(1) >= thr).mean()) if iou.size else 0.0


def fmt(d: dict[str, float]) -> str:
    return " ".join(f"{d[k]:6.2f}" for k in ("AR@10", "AR@100", "AR@1000", "ARs", "ARm", "ARl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-python", required=True)
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated eval sets")
    ap.add_argument("--speed-images", type=int, default=2, help="images timed side by side")
    ap.add_argument("--skip-reference-compat", action="store_true")
    ap.add_argument(
        "--measure-reference-recall",
        nargs="?",
        const="reference",
        choices=("reference", "compat"),
        help="measure and store the reference's recall on --sets: by running the reference "
        "generator (default; minutes per image), or 'compat': by segany's reference-compatible "
        "mode, which gives the reference's masks (parity test, and checked on the speed "
        "images of every run) in about half the time",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads of in-process runs")
    ap.add_argument("--preset", default="fast")
    ap.add_argument(
        "--reference-json",
        help="reuse the output of a reference run (_reference_amg.py --out) instead of "
        "running the reference again (it must cover the speed images)",
    )
    args = ap.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    stored = json.loads(STORED.read_text()) if STORED.is_file() else {"sets": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench_everything_"))

    print(f"# recall (percent), preset {args.preset!r} as the whole CLI command")
    print(
        f"{'set':<8} {'who':<10} {'img':>3} {'s/img':>7} {'masks':>6}   "
        "AR@10 AR@100 AR@1000  ARs    ARm    ARl"
    )
    for name in sets:
        ann, imgs = set_images(name)
        sec, res = run_cli(imgs, args.preset, tmp / f"fast_{name}")
        ours = recall(ann, res)
        nm = np.mean([len(v) for v in res.values()])
        print(
            f"{name:<8} {'ours':<10} {len(imgs):>3} {sec / len(imgs):7.2f} {nm:6.1f}   {fmt(ours)}"
        )
        if args.measure_reference_recall == "reference":
            ref = run_reference(args.reference_python, imgs, tmp / f"ref_{name}.json")
            rres = {Path(i["path"]).name: i["records"] for i in ref["images"]}
            ref_secs = [i["seconds"] for i in ref["images"]]
            how = "MobileSAM's SamAutomaticMaskGenerator (reference venv), defaults"
        elif args.measure_reference_recall == "compat":
            ref_secs, rres = run_ours_inprocess(imgs, "reference", args.threads)
            how = (
                "segany preset 'reference' (reference-compatible: same masks as MobileSAM's "
                f"generator with its defaults), {args.threads} thread(s); seconds are segany's"
            )
        if args.measure_reference_recall:
            stored["sets"][name] = {
                "recall": recall(ann, rres),
                "seconds_per_image": float(np.mean(ref_secs)),
                "masks_per_image": float(np.mean([len(v) for v in rres.values()])),
                "images": len(imgs),
                "date": datetime.date.today().isoformat(),
                "measured_with": how,
                "command": " ".join(sys.argv),
            }
            STORED.write_text(json.dumps(stored, indent=1))
        if name in stored["sets"]:
            r = stored["sets"][name]
            print(
                f"{name:<8} {'reference':<10} {r['images']:>3} {r['seconds_per_image']:7.1f} "
                f"{r['masks_per_image']:6.1f}   {fmt(r['recall'])}  (stored, {r['date']})"
            )
        sys.stdout.flush()

    if args.speed_images <= 0:
        return 0
    # speed side by side on the same images
    ann, imgs = set_images("coco10")
    imgs = imgs[: args.speed_images]
    print(f"\n# speed side by side on {len(imgs)} coco10 images (2 threads)")
    sec_cli, fast_res = run_cli(imgs, args.preset, tmp / "speed_fast")
    if args.reference_json:
        ref = json.loads(Path(args.reference_json).read_text())
        ref["images"] = [i for i in ref["images"] if Path(i["path"]).name in {p.name for p in imgs}]
        print(f"(reference timings reused from {args.reference_json})")
    else:
        ref = run_reference(args.reference_python, imgs, tmp / "speed_ref.json")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    ref_sec = float(np.mean([i["seconds"] for i in ref["images"]]))
    ref_res = {Path(i["path"]).name: i["records"] for i in ref["images"]}
    print(f"reference generate():             {ref_sec:8.2f} s/image (model load excluded)")
    print(
        f"ours {args.preset!r}, whole command:      {sec_cli / len(imgs):8.2f} s/image "
        f"-> {ref_sec / (sec_cli / len(imgs)):.1f}x faster"
    )
    fr = [match_rate(ref_res[n], fast_res[n]) for n in ref_res]
    print(f"ours {args.preset!r}: reference masks matched at IoU>=0.9: {np.nanmean(fr) * 100:.1f}%")
    if not args.skip_reference_compat:
        secs, comp = run_ours_inprocess(imgs, "reference")
        a = [match_rate(ref_res[n], comp[n]) for n in ref_res]
        b = [match_rate(comp[n], ref_res[n]) for n in ref_res]
        print(
            f"ours 'reference' generate():      {np.mean(secs):8.2f} s/image; matched "
            f"ref->ours {np.nanmean(a) * 100:.1f}%, ours->ref {np.nanmean(b) * 100:.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
