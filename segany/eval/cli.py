"""``segany eval points|boxes|proposals|instances|video DATASET --out DIR [--model M]...``.

Hooked into :mod:`segany.cli` by :func:`add_parser`; the work is done by
:mod:`segany.eval.protocols` and :mod:`segany.eval.report`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .. import validate as V

PROTOCOL_HELP = {
    "points": "simulated clicks: mIoU after 1..N clicks (1 click: auto and oracle)",
    "boxes": "ground-truth boxes (optionally jittered): mIoU overall and by size",
    "proposals": "segment everything: class-agnostic mask recall AR@10/100/1000",
    "instances": "detector boxes (COCO results JSON) -> masks -> mask AP",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command and its four protocols to the ``segany`` parser."""
    from ..everything import PRESETS
    from ..weights import DEFAULT_WEIGHTS

    p = sub.add_parser("eval", help="zero-shot evaluation on a COCO-format dataset")
    psub = p.add_subparsers(dest="protocol", required=True)
    for name, text in PROTOCOL_HELP.items():
        q = psub.add_parser(name, help=text, description=text)
        q.add_argument("dataset", help="folder with images/ and annotations.json (or the file)")
        q.add_argument(
            "--model",
            action="append",
            default=None,
            help=f"catalogue name or checkpoint path; repeat to compare (default: "
            f"{DEFAULT_WEIGHTS})",
        )
        q.add_argument("--out", required=True, help="folder for report.md, results.json, plots")
        q.add_argument("--limit", type=int, help="only the first N images")
        q.add_argument(
            "--images",
            help="image folder, or a segany label output holding the images (default: "
            "DATASET/images); tracked videos: the folder holding the videos by name",
        )
        q.add_argument("--embedding-cache", help="folder keeping image embeddings across runs")
        q.add_argument(
            "--backend",
            choices=("auto", "torch", "onnx", "onnx-int8"),
            default="auto",
            help="inference backend of the predictor (default auto: the faster exact one "
            "here, timed once)",
        )
        q.add_argument(
            "--precision",
            choices=("fp32", "bf16"),
            default="fp32",
            help="image encoder precision of the torch backend (default: fp32)",
        )
        q.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
        if name in ("points", "boxes", "instances"):
            q.add_argument(
                "--batch-size", type=int, default=16, help="prompts decoded at once (default 16)"
            )
        q.set_defaults(func=run)
    from ..video.evaluate import add_parser as add_video

    add_video(psub)  # segany/video/evaluate.py: DAVIS J&F (docs/video.md)
    pts = psub.choices["points"]
    pts.add_argument("--max-clicks", type=int, default=9, help="clicks per mask (default 9)")
    pts.add_argument(
        "--clicks",
        choices=("center", "random"),
        default="center",
        help="center: farthest from the boundary (default); random: uniform, seeded",
    )
    pts.add_argument("--seed", type=int, default=0, help="seed of --clicks random")
    pts.add_argument(
        "--no-feedback",
        action="store_true",
        help="do not feed the previous low-res logits back as mask input",
    )
    box = psub.choices["boxes"]
    box.add_argument(
        "--jitter", type=float, default=0.0, help="box noise std as a fraction of the side"
    )
    box.add_argument("--max-shift", type=float, default=20.0, help="noise cap in pixels (20)")
    box.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    prop = psub.choices["proposals"]
    prop.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="reference",
        help="generator preset (default: reference, the released generator's defaults)",
    )
    prop.add_argument("--points-per-side", type=int, help="override the preset's grid size")
    prop.add_argument("--crop-layers", type=int, help="override the preset's crop layers")
    inst = psub.choices["instances"]
    inst.add_argument(
        "--boxes",
        required=True,
        help="COCO results JSON of detections (bbox XYWH, score, category_id), or 'gt' for "
        "the ground-truth boxes",
    )
    inst.add_argument("--score-thresh", type=float, default=0.0, help="drop weaker detections")
    inst.add_argument("--max-per-image", type=int, default=100, help="detections kept per image")


def model_label(model: str) -> str:
    """A short name for a model: the catalogue name, or a checkpoint file's stem."""
    path = Path(model)
    return path.stem if path.suffix or len(path.parts) > 1 else model


def command_line(args: argparse.Namespace) -> str:
    """The canonical command that reproduces ``args``."""
    parts = ["segany", "eval", args.protocol, args.dataset]
    for m in args.models:
        parts += ["--model", m]
    parts += ["--out", args.out]
    skip = {"func", "protocol", "dataset", "model", "models", "out", "quiet", "command"}
    skip |= {"threads", "embedding_cache", "batch_size"}
    if args.backend in ("auto", "torch"):
        skip.add("backend")
    if args.precision == "fp32":
        skip.add("precision")
    randomised = getattr(args, "clicks", None) == "random" or getattr(args, "jitter", 0.0) > 0
    if not randomised:
        skip.add("seed")
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..cli_common import CliError
    from ..loader import load_predictor
    from ..weights import DEFAULT_WEIGHTS
    from . import protocols as P
    from .report import summary, write_report

    args.models = args.model or [DEFAULT_WEIGHTS]
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    if getattr(args, "max_clicks", 1) < 1:
        raise CliError("--max-clicks must be at least 1")
    if getattr(args, "batch_size", 1) < 1:
        raise CliError("--batch-size must be at least 1")
    try:
        dataset = P.CocoDataset(args.dataset, images=args.images)
        detections = (
            P.load_detections(args.boxes, dataset, score_thresh=args.score_thresh)
            if args.protocol == "instances"
            else None
        )
    except P.DatasetError as exc:
        raise CliError(str(exc)) from None
    images = dataset.select(args.limit)
    if not images:
        raise CliError(f"{args.dataset} lists no images")
    per_image = args.protocol in ("proposals", "instances")
    total = len(images) if per_image else dataset.count_masks(images)
    runs: list[dict[str, Any]] = []
    for model in args.models:
        label = model_label(model)
        predictor = load_predictor(
            model,
            cache_dir=args.embedding_cache,
            backend=args.backend,
            precision=args.precision,
        )
        if predictor.backend_name != "torch":
            label = f"{label} ({predictor.backend_name})"
        if args.precision != "fp32":
            label = f"{label} ({args.precision})"
        bar = tqdm(
            total=total,
            unit="img" if per_image else "mask",
            desc=f"{args.protocol} {label}",
            disable=args.quiet,
        )
        common: dict[str, Any] = {"model": label, "limit": args.limit, "progress": bar.update}
        try:
            if args.protocol == "points":
                res = P.run_points(
                    predictor,
                    dataset,
                    max_clicks=args.max_clicks,
                    clicks=args.clicks,
                    seed=args.seed,
                    feedback=not args.no_feedback,
                    batch_size=args.batch_size,
                    **common,
                )
            elif args.protocol == "boxes":
                res = P.run_boxes(
                    predictor,
                    dataset,
                    jitter=args.jitter,
                    max_shift=args.max_shift,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    **common,
                )
            elif args.protocol == "proposals":
                overrides = {
                    k: v
                    for k, v in (
                        ("points_per_side", args.points_per_side),
                        ("crop_n_layers", args.crop_layers),
                    )
                    if v is not None
                }
                res = P.run_proposals(
                    predictor, dataset, preset=args.preset, overrides=overrides, **common
                )
            else:
                assert detections is not None
                res = P.run_instances(
                    predictor,
                    dataset,
                    detections,
                    boxes_source=args.boxes,
                    max_per_image=args.max_per_image,
                    batch_size=args.batch_size,
                    **common,
                )
        except P.DatasetError as exc:
            raise CliError(str(exc)) from None
        except ValueError as exc:  # e.g. a bad generator override
            raise CliError(str(exc)) from None
        finally:
            bar.close()
        res["model_source"] = str(model)
        res["backend"] = predictor.backend_name
        res["precision"] = args.precision
        runs.append(res)
    command = command_line(args)
    written = write_report(runs, args.out, command=command)
    if not args.quiet:
        shown = [summary(r) for r in runs]
        for r in shown:
            for key in ("recall_vs_iou", "settings", "miou_per_click"):
                r.pop(key, None)
        print(V.dumps(shown[0] if len(shown) == 1 else shown, indent=2))
        print(f"report: {written['report']}", file=sys.stderr)
    return 0
