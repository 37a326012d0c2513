"""``segany everything``: automatic mask generation over images and folders, written as
SA-1B JSON, COCO, PNG or YOLO (or, for large and georeferenced images, through
:mod:`segany.geo_cli`); hooked into :mod:`segany.cli` by :func:`add_parser`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import validate as V
from .cli_common import CliError, add_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .datasets import FORMATS
    from .everything import DEFAULT_PRESET, PRESETS

    p = sub.add_parser(
        "everything", help="segment everything in images (automatic mask generation)"
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders")
    p.add_argument("--out", required=True, help="output folder")
    from .geo_cli import GEO_FORMATS, add_large_image_args

    p.add_argument("--format", choices=FORMATS + GEO_FORMATS, default="sa1b", help="default: sa1b")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help=f"default: {DEFAULT_PRESET}",
    )
    p.add_argument("--points-per-side", type=int, help="override the preset's grid size")
    p.add_argument("--crop-layers", type=int, help="override the preset's crop layers")
    p.add_argument(
        "--pred-iou-thresh", type=float, help="override the preset's predicted-IoU threshold"
    )
    p.add_argument(
        "--stability-thresh", type=float, help="override the preset's stability threshold"
    )
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay PNGs")
    add_model_args(p)
    add_large_image_args(p, prompts=False)  # segany/geo_cli.py: tiled, georeferenced outputs
    p.set_defaults(func=_run_everything)


def _collect_images(inputs: list[str]) -> list[Path]:
    """The images of folders (:func:`segany.files.find_images`) and files given as they are."""
    from .files import find_images

    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        found.extend(find_images(path) if path.is_dir() else [path])
    return found


def _run_everything(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from .datasets.coco import CocoWriter
    from .datasets.png import write_png
    from .datasets.sa1b import write_sa1b
    from .datasets.yolo import write_yolo
    from .everything import MaskGenerator
    from .loader import load_predictor
    from .transforms import MAX_PIXELS, ImageError, load_image
    from .viz import overlay_records

    images = _collect_images(args.inputs)
    if not images:
        raise CliError("no images found in " + " ".join(args.inputs))
    from .geo_cli import handles_everything, run_everything

    if handles_everything(args):
        return run_everything(args, images)
    try:
        gen = MaskGenerator(
            load_predictor(args.model, backend=args.backend, precision=args.precision),
            preset=args.preset,
            points_per_side=args.points_per_side,
            crop_n_layers=args.crop_layers,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_thresh,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; everything writes into a folder")
    out.mkdir(parents=True, exist_ok=True)
    coco = CocoWriter() if args.format == "coco" else None
    used: set[str] = set()
    failed: list[tuple[str, str]] = []
    total = 0
    bar = tqdm(images, unit="img", desc="everything")
    for path in bar:
        try:
            rgb = load_image(path, max_pixels=args.max_pixels or MAX_PIXELS)
            records = gen.generate(rgb)
        except (ImageError, ValueError, RuntimeError, MemoryError) as exc:
            # one bad image never stops the batch; writing errors (OSError) do
            failed.append((str(path), str(exc)))
            tqdm.write(f"segany: skipped {path}: {exc}", file=sys.stderr)
            continue
        total += len(records)
        bar.set_postfix(masks=total, last=len(records))
        stem = path.stem
        k = 1
        while stem in used:
            stem, k = f"{path.stem}_{k}", k + 1
        used.add(stem)
        h, w = rgb.shape[:2]
        if args.format == "sa1b":
            write_sa1b(
                out / f"{stem}.json",
                records,
                image_id=len(used),
                file_name=path.name,
                width=w,
                height=h,
            )
        elif args.format == "png":
            write_png(out / stem, records)
        elif args.format == "yolo":
            write_yolo(out / f"{stem}.txt", records)
        elif coco is not None:
            coco.add(records, file_name=path.name, width=w, height=h)
        if not args.no_overlay:
            (out / "overlays").mkdir(exist_ok=True)
            Image.fromarray(overlay_records(rgb, records)).save(out / "overlays" / f"{stem}.png")
    bar.close()
    if coco is not None:
        coco.write(out / "annotations.json")
    summary = {
        "images": len(images) - len(failed),
        "masks": total,
        "skipped": [{"path": p, "error": e} for p, e in failed],
        "out": str(out),
        "format": args.format,
        "preset": args.preset,
    }
    print(V.dumps(summary, indent=2))
    return 0 if len(failed) < len(images) else 2
