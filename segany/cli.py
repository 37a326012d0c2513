"""Command line: one thin command per job; defaults live in the library.

segany segment IMAGE --point X,Y[,LABEL] ... [--box X0,Y0,X1,Y1] --out mask.png
segany segment IMAGE --text "dog . person" [--detector NAME|PATH] --out mask.png
segany everything IMAGE_OR_DIR... --out DIR [--format sa1b|coco|png|yolo] [--preset fast]
segany weights list | fetch NAME | path NAME
segany eval points|boxes|proposals|instances DATASET [--model M]... --out DIR
segany annotate IMAGES_DIR [--db URL] [--model NAME|PATH] [--host H] [--port P]
segany serve [--model NAME|PATH] [--host H] [--port P] [--token TOKEN]...
segany label SOURCE --out DIR [--preset P] [--workers N] [--ray [ADDRESS]] [--resume]
segany stats DIR|COCO.json [--compare OTHER] --out DIR
segany train --data SRC --model mobile_sam --train decoder --steps N --out CKPT
segany retrain IMAGES_DIR [--db URL] [--out CKPT] [--server URL]
segany track VIDEO|FRAMES_DIR --frame K --point X,Y [--object ID]... --out DIR
segany info [--json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import validate as V
from . import weights as W
from .cli_common import CliError, add_detector_args, add_model_args


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} must be numbers separated by commas: {text!r}"
        ) from None
    if len(vals) not in n:
        raise argparse.ArgumentTypeError(
            f"{what} needs {' or '.join(map(str, n))} values: {text!r}"
        )
    return vals


def _point(text: str) -> list[float]:
    vals = _floats(text, (2, 3), "--point X,Y[,LABEL]")
    if len(vals) == 3 and vals[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(
            f"point label must be 1 (object) or 0 (background): {text}"
        )
    return vals if len(vals) == 3 else [*vals, 1.0]


def _box(text: str) -> list[float]:
    return _floats(text, (4,), "--box X0,Y0,X1,Y1")


# -- segment ---------------------------------------------------------------------------------
def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment one image from point, box or text prompts")
    p.add_argument("image", help="image file")
    p.add_argument(
        "--point",
        type=_point,
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="image pixel; label 1 = object (default), 0 = background; repeatable",
    )
    p.add_argument("--box", type=_box, metavar="X0,Y0,X1,Y1", help="box in image pixels")
    add_model_args(p)
    p.add_argument("--out", required=True, help="mask PNG (0/255) of the best mask")
    p.add_argument("--overlay", help="PNG of the image with the mask(s) and prompts drawn")
    p.add_argument(
        "--all-masks",
        action="store_true",
        help="also write every candidate mask as OUT_<i>.png (three with multimask output); "
        "the overlay then shows the candidates side by side",
    )
    mm = p.add_mutually_exclusive_group()
    mm.add_argument(
        "--multimask",
        dest="multimask",
        action="store_const",
        const=True,
        help="three candidates (default for a single point without box)",
    )
    mm.add_argument(
        "--single",
        dest="multimask",
        action="store_const",
        const=False,
        help="one mask (default for a box or several points)",
    )
    p.add_argument("--embedding-cache", help="folder keeping image embeddings across runs")
    p.add_argument(
        "--hq-token-only",
        action="store_true",
        help="HQ-SAM models (one mask per prompt): the HQ output's mask alone instead of "
        "its sum with SAM's (see docs/hq-sam.md)",
    )
    _add_text_args(p)
    from .geo_cli import add_large_image_args

    add_large_image_args(p, prompts=True)  # segany/geo_cli.py: tiles, GeoTIFF, --max-pixels
    p.set_defaults(func=_run_segment, multimask=None)


def _add_text_args(p: argparse.ArgumentParser) -> None:
    from .text import pipeline as TP

    g = p.add_argument_group(
        "text prompts", "find objects by name with an open-vocabulary detector, then segment "
        "each box (needs: pip install 'segany[text]'); --out is then the union of the masks",
    )  # fmt: skip
    g.add_argument("--text", metavar='"dog . person"', help="class names separated by ' . '")
    add_detector_args(g)
    g.add_argument(
        "--nms-threshold",
        type=float,
        default=TP.NMS_THRESHOLD,
        help=f"class-wise NMS IoU (default: {TP.NMS_THRESHOLD})",
    )
    g.add_argument("--coco", help="also write COCO JSON with the classes as categories")


def _run_segment(args: argparse.Namespace) -> int:
    from PIL import Image

    from .datasets import rle_bbox, to_rle
    from .loader import load_predictor
    from .transforms import MAX_PIXELS, load_image
    from .viz import candidates_panel, overlay_prediction

    if args.text is not None:
        if args.point or args.box is not None:
            raise CliError("--text finds its own boxes: give --text, or --point/--box, not both")
        return _run_segment_text(args)
    from .geo_cli import handles_segment, run_segment

    if handles_segment(args):
        return run_segment(args)
    if not args.point and args.box is None:
        raise CliError("give at least one --point, a --box or --text")
    image = load_image(args.image, max_pixels=args.max_pixels or MAX_PIXELS)
    predictor = load_predictor(
        args.model, cache_dir=args.embedding_cache, backend=args.backend, precision=args.precision
    )
    if args.hq_token_only:
        from .models import SamHQ

        if not isinstance(predictor.model, SamHQ):
            raise CliError("--hq-token-only is for HQ-SAM models (sam_hq_vit_*)")
        predictor.hq_token_only = True
    predictor.set_image(image)
    pts = np.asarray(args.point, dtype=np.float64).reshape(-1, 3)
    coords = pts[:, :2] if len(pts) else None
    labels = pts[:, 2].astype(np.int64) if len(pts) else None
    box = np.asarray(args.box, dtype=np.float64) if args.box is not None else None
    multimask = args.multimask
    if multimask is None:
        multimask = len(pts) == 1 and box is None
    pred = predictor.predict(
        point_coords=coords, point_labels=labels, box=box, multimask_output=multimask
    )
    order = np.argsort(-pred.scores)
    best = int(order[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pred.masks[best].astype(np.uint8) * 255).save(out)
    records = []
    for i in range(len(pred.scores)):
        m = pred.masks[i]
        bbox = [int(v) for v in rle_bbox(to_rle(m))]
        rec = {
            "index": i,
            "score": round(float(pred.scores[i]), 4),
            "area": int(m.sum()),
            "bbox": bbox,
        }
        if args.all_masks:
            path = out.with_name(f"{out.stem}_{i}{out.suffix}")
            Image.fromarray(m.astype(np.uint8) * 255).save(path)
            rec["file"] = str(path)
        records.append(rec)
    if args.overlay:
        if args.all_masks and len(pred.scores) > 1:
            pic = candidates_panel(
                image, pred.masks, pred.scores, points=coords, labels=labels, box=box, best=best
            )
        else:
            pic = overlay_prediction(
                image, pred.masks[best : best + 1], points=coords, labels=labels, box=box
            )
        Path(args.overlay).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pic).save(args.overlay)
    summary = {
        "image": str(args.image),
        "size": [int(image.shape[1]), int(image.shape[0])],
        "model": str(args.model),
        "best": best,
        "mask": str(out),
        "overlay": args.overlay,
        "masks": records,
    }
    print(V.dumps(summary, indent=2))
    return 0


def _run_segment_text(args: argparse.Namespace) -> int:
    from PIL import Image

    from .text import DEFAULT_DETECTOR, TextSegmenter, coco_writer, parse_queries
    from .transforms import load_image
    from .viz import overlay_labeled

    image = load_image(args.image)
    try:
        queries = parse_queries(args.text)
        seg = TextSegmenter.load(
            args.model,
            args.detector,
            cache_dir=args.embedding_cache,
            box_threshold=args.box_threshold,
            text_threshold=args.text_threshold,
            nms_threshold=args.nms_threshold,
            multimask_output=bool(args.multimask),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    result = seg.segment(image, queries)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    union = result.masks.any(0) if len(result) else np.zeros(image.shape[:2], bool)
    Image.fromarray(union.astype(np.uint8) * 255).save(out)
    records = result.summary()
    for i, rec in enumerate(records):
        rec["index"] = i
        if args.all_masks:
            path = out.with_name(f"{out.stem}_{i}{out.suffix}")
            Image.fromarray(result.masks[i].astype(np.uint8) * 255).save(path)
            rec["file"] = str(path)
    if args.overlay:
        captions = [f"{p} {s:.2f}" for p, s in zip(result.phrases, result.scores)]
        pic = overlay_labeled(
            image, result.masks, captions, boxes=result.boxes, class_ids=result.labels
        )
        Path(args.overlay).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pic).save(args.overlay)
    if args.coco:
        writer = coco_writer(queries)
        result.add_to(writer, file_name=Path(args.image).name)
        writer.write(args.coco)
    summary = {
        "image": str(args.image),
        "size": [int(image.shape[1]), int(image.shape[0])],
        "model": str(args.model),
        "detector": str(args.detector or DEFAULT_DETECTOR),
        "classes": queries,
        "mask": str(out),
        "overlay": args.overlay,
        "coco": args.coco,
        "masks": records,
    }
    print(V.dumps(summary, indent=2))
    return 0


# -- everything ------------------------------------------------------------------------------
def _add_everything(sub: argparse._SubParsersAction) -> None:
    from .everything_cli import add_parser

    add_parser(sub)  # segany/everything_cli.py: automatic mask generation over images


# -- weights ---------------------------------------------------------------------------------
def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="list, fetch and locate model checkpoints")
    wsub = p.add_subparsers(dest="weights_cmd", required=True)
    ls = wsub.add_parser("list", help="the catalogue, and what is cached")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_run_weights_list)
    f = wsub.add_parser("fetch", help="download (or extract) a checkpoint into the cache")
    f.add_argument("name", help="catalogue name (see segany weights list)")
    f.add_argument("--force", action="store_true", help="fetch again even if cached")
    f.set_defaults(func=_run_weights_fetch)
    pa = wsub.add_parser("path", help="print the cached path (fetching it if needed)")
    pa.add_argument("name", help="catalogue name (see segany weights list)")
    pa.set_defaults(func=_run_weights_path)


def _run_weights_list(args: argparse.Namespace) -> int:
    rows = W.describe()
    if args.json:
        print(V.dumps(rows, indent=2, default=str))
        return 0
    nw = max(12, *(len(r["name"]) for r in rows))
    vw = max(7, *(len(r["variant"]) for r in rows))
    print(f"{'name':<{nw}} {'variant':<{vw}} {'size':>9}  {'sha256':<12}  {'cached':<6}  source")
    for r in rows:
        size = f"{r['size'] / 1e6:.0f} MB" if r.get("size") else "?"
        sha = r["sha256"] or "not public"  # fetched only with an explicit hash
        cached = "yes" if r["cached"] else "no"
        print(f"{r['name']:<{nw}} {r['variant']:<{vw}} {size:>9}  {sha:<12}  {cached:<6}  "
              f"{r['source']}")  # fmt: skip
    print(f"\ncache: {W.weights_dir()}  (set SEGANY_CACHE to move it)")
    return 0


def _run_weights_fetch(args: argparse.Namespace) -> int:
    print(W.fetch(args.name, force=args.force))
    return 0


def _run_weights_path(args: argparse.Namespace) -> int:
    print(W.fetch(args.name))
    return 0


# -- eval ------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .eval.cli import add_parser

    add_parser(sub)  # segany/eval/cli.py: protocols, report and plots (docs/evaluation.md)


# -- annotate --------------------------------------------------------------------------------
def _add_annotate(sub: argparse._SubParsersAction) -> None:
    from .engine.cli import add_parser

    add_parser(sub)  # segany/engine/cli.py: the web annotator (docs/annotate.md)


# -- serve ---------------------------------------------------------------------------------
def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .integrations.cli import add_parser

    add_parser(sub)  # segany/integrations/cli.py: Label Studio, CVAT, X-AnyLabeling backends


# -- label, stats ----------------------------------------------------------------------------
def _add_label(sub: argparse._SubParsersAction) -> None:
    from .engine.label_cli import add_label_parser, add_stats_parser

    add_label_parser(sub)  # segany/engine/label_cli.py: stage 3 labeling (docs/labeling.md)
    add_stats_parser(sub)


# -- train, retrain --------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.cli import add_parser

    add_parser(sub)  # segany/train/cli.py: fine-tuning, model in the loop (docs/training.md)


# -- track -----------------------------------------------------------------------------------
def _add_track(sub: argparse._SubParsersAction) -> None:
    from .video.cli import add_parser

    add_parser(sub)  # segany/video/cli.py: follow objects through a video (docs/video.md)


# -- export ----------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    from .export.cli import add_parser

    add_parser(sub)  # segany/export/cli.py: ONNX graphs of any model (docs/sam2.md)


# -- info ------------------------------------------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
    from .info import add_parser

    add_parser(sub)  # segany/info.py: versions, CPU, threads, backends, folders


# -- entry point -----------------------------------------------------------------------------
# command -> the function adding its parser (several commands may share one)
_GROUPS = {
    "segment": _add_segment,
    "everything": _add_everything,
    "weights": _add_weights,
    "eval": _add_eval,
    "annotate": _add_annotate,
    "serve": _add_serve,
    "label": _add_label,
    "stats": _add_label,
    "train": _add_train,
    "retrain": _add_train,
    "track": _add_track,
    "export": _add_export,
    "info": _add_info,
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (after the global options), if any."""
    args = iter(argv)
    for tok in args:
        if tok == "--threads":
            next(args, None)
        elif not tok.startswith("-"):
            return tok
        elif not tok.startswith("--threads="):
            return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``segany`` parser; with a known ``command``, only that command's parser is
    added (the others import their modules: a tenth of a second saved per run)."""
    parser = argparse.ArgumentParser(prog="segany", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for inference (default: all cores)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    adders = [_GROUPS[command]] if command in _GROUPS else list(dict.fromkeys(_GROUPS.values()))
    for add in adders:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .predictor import PromptError
    from .runtime import PrecisionError
    from .text.detectors import DetectorError
    from .transforms import ImageError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if args.threads is not None:
        from .runtime import set_threads

        try:
            set_threads(args.threads)
        except ValueError as exc:
            parser.error(f"--threads: {exc}")
    try:
        return int(args.func(args) or 0)
    except (
        CliError,
        DetectorError,
        ImageError,
        PrecisionError,
        PromptError,
        W.WeightsError,
    ) as exc:
        print(f"segany: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only, a file where a folder should be, ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"segany: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except MemoryError:
        print("segany: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("segany: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
