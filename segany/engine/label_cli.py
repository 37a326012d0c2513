"""``segany label`` (data engine stage 3) and ``segany stats`` (dataset statistics).

segany label SOURCE --out DIR [--preset fast|sa1b|reference|sam2] [--workers N] [--ray [ADDRESS]]
             [--shard-size N] [--resume]
segany label SOURCE --out DIR --classes "dog . cat" [--detector NAME|FOLDER]
             [--box-threshold F] [--text-threshold F] ...   # + OUT/instances.json (COCO)
segany stats DIR|COCO.json [--compare OTHER] --out DIR
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from .. import validate as V


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()  # a bare word, e.g. algorithm=fast
    return key.strip(), parsed


def add_label_parser(sub: argparse._SubParsersAction) -> None:
    from ..everything import DEFAULT_PRESET, PRESETS
    from ..weights import DEFAULT_WEIGHTS
    from .label import DEFAULT_SHARD_SIZE, DEFAULT_THREADS_PER_WORKER

    p = sub.add_parser(
        "label",
        help="label a whole image collection automatically into SA-1B layout (data engine "
        "stage 3), on local processes or on Ray",
        description="Run segment-everything over every image of SOURCE (a folder, searched "
        "recursively, or a text file with one image path per line) and write an SA-1B style "
        "dataset to --out: shards/sa_NNNNNN.tar (image + per-image JSON), manifest.json, "
        "errors.jsonl, report.json. A killed job continues with --resume; nothing finished "
        "is redone and every readable image ends up exactly once. Video files in SOURCE "
        "(mp4, mov, avi, mkv, webm) are labeled too: segment-everything on the first frame, "
        "each object tracked through the clip, one YouTube-VIS style JSON per video in "
        "OUT/videos/. See docs/labeling.md and docs/video.md.",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="folder of images and videos, or text file of paths"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--video-objects",
        type=int,
        default=None,
        metavar="N",
        help="videos: track at most N objects of the first frame, best predicted IoU first "
        "(default 64)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"generator preset (default: {DEFAULT_PRESET}; on --resume: the job's)",
    )
    p.add_argument("--points-per-side", type=int, help="override the preset's grid size")
    p.add_argument("--crop-layers", type=int, help="override the preset's crop layers")
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any generator setting, e.g. --set pred_iou_thresh=0.8 (repeatable)",
    )
    p.add_argument(
        "--model",
        help=f"catalogue name or checkpoint path (default: {DEFAULT_WEIGHTS}; "
        "on --resume: the job's)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes (or Ray actors), each holding the model once; 0 = in this "
        f"process (default: one per {DEFAULT_THREADS_PER_WORKER} CPU(s), of the cluster on Ray)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        help="compute threads per worker (default: CPUs // workers, never oversubscribed)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: a cluster ADDRESS (auto, ray://HOST:10001, HOST:6379), or none: "
        "RAY_ADDRESS, a `ray start` cluster on this machine, else a new local one. Workers "
        "write to --out, so on several machines it must be a shared path "
        "(needs: pip install 'segany[ray]')",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        help=f"images per tar (default: {DEFAULT_SHARD_SIZE}; on --resume: the job's)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the job in --out: redo only what is missing, add new source images",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_class_args(p)
    p.set_defaults(func=run_label)


def _add_class_args(p: argparse.ArgumentParser) -> None:
    from ..cli_common import add_detector_args

    g = p.add_argument_group(
        "class names",
        "label with class names instead of segment-everything: an open-vocabulary detector "
        "finds them, SAM segments each box; the per-image JSONs keep category_id, label, "
        "phrase and score, and OUT/instances.json is COCO with the classes as categories "
        "(needs: pip install 'segany[text]'; see docs/text.md)",
    )
    g.add_argument(
        "--classes",
        metavar='"dog . cat"',
        help="class names separated by ' . ' (on --resume: the job's)",
    )
    add_detector_args(g, note="; on --resume: the job's")


def run_label(args: argparse.Namespace) -> int:
    overrides = dict(args.set)
    if args.points_per_side is not None:
        overrides["points_per_side"] = args.points_per_side
    if args.crop_layers is not None:
        overrides["crop_n_layers"] = args.crop_layers
    from ..video.label import find_videos

    videos = find_videos(args.source, exclude=args.out)
    code = 0
    if not videos or _has_images(args.source, args.out):
        code = _label_images(args, overrides)
    if videos:
        code = max(code, _label_videos(args, overrides, videos))
    return code


def _has_images(source: str, out: str) -> bool:
    from .label import LabelError, list_source

    try:
        return bool(list_source(source, exclude=Path(out).expanduser().resolve()))
    except LabelError:
        return True  # let the image labeler report it


def _label_videos(args: argparse.Namespace, overrides: dict, videos: list) -> int:
    """The videos of the source: segment-everything on the first frame, then tracked
    (:mod:`segany.video.label`)."""
    from ..cli_common import CliError
    from ..everything import DEFAULT_PRESET, MaskGenerator
    from ..loader import load_predictor
    from ..video.label import DEFAULT_MAX_OBJECTS, label_videos
    from ..video.sam2_tracker import tracker_for
    from ..weights import DEFAULT_WEIGHTS

    out = Path(args.out).expanduser().resolve()
    if args.classes is not None:
        raise CliError("--classes does not apply to videos yet; label them without it")
    if (out / "videos").is_dir() and any((out / "videos").iterdir()) and not args.resume:
        raise CliError(f"{out} already holds labeled videos; pass --resume to continue")
    predictor = load_predictor(args.model or DEFAULT_WEIGHTS, progress=not args.no_progress)
    try:
        generator = MaskGenerator(predictor, preset=args.preset or DEFAULT_PRESET, **overrides)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if args.video_objects is not None and args.video_objects < 1:
        raise CliError("--video-objects must be at least 1")
    report = label_videos(
        videos,
        args.source,
        out,
        tracker=tracker_for(predictor),
        generator=generator,
        max_objects=args.video_objects or DEFAULT_MAX_OBJECTS,
        progress=not args.no_progress,
    )
    print(V.dumps({"videos": report}, indent=2))
    print(
        f"segany label: {report['videos']} video(s) labeled ({report['skipped']} done before, "
        f"{len(report['errors'])} error(s)), {report['objects']} track(s), "
        f"{report['frames_per_second']:.2f} frames/s -> {out / 'videos'}",
        file=sys.stderr,
    )
    return 2 if report["errors"] and not report["videos"] and not report["skipped"] else 0


def _label_images(args: argparse.Namespace, overrides: dict) -> int:
    from ..cli_common import CliError
    from .label import LabelError, label

    try:
        report = label(
            args.source,
            args.out,
            model=args.model,
            preset=args.preset,
            overrides=overrides or None,
            workers=args.workers,
            threads=args.threads_per_worker or getattr(args, "threads", None),
            shard_size=args.shard_size,
            resume=args.resume,
            ray=args.ray is not None,
            ray_address=args.ray or None,
            progress=not args.no_progress,
            classes=args.classes,
            detector=args.detector,
            box_threshold=args.box_threshold,
            text_threshold=args.text_threshold,
        )
    except (LabelError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(V.dumps(report, indent=2))
    ips = report["steady_images_per_second"] or report["images_per_second"]
    print(
        f"segany label: {report['images']} image(s) labeled, {report['errors']} error(s) in "
        f"{report['seconds']:.1f} s: {report['images_per_second']:.3f} images/s "
        f"({ips:.3f} after start-up), {report['masks_per_image']:.1f} masks/image -> "
        f"{report['out']}/manifest.json",
        file=sys.stderr,
    )
    if "instances" in report:
        inst = report["instances"]
        print(
            f"segany label: {inst['annotations']} object(s) of {len(report['classes'])} "
            f"class(es) on {inst['images']} image(s) -> {inst['file']}",
            file=sys.stderr,
        )
    data = report["dataset"]
    return 2 if data["images"] == 0 and data["errors"] > 0 else 0


def add_stats_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="dataset statistics and plots like the paper's SA-1B figures",
        description="Masks per image, relative mask size, mask concavity, spatial "
        "distribution of mask centres and image resolution, as PNG plots and stats.json. "
        "DATASET: a `segany label` folder, a folder of SA-1B tars or per-image JSONs, a tar, "
        "or a COCO instances JSON.",
    )
    p.add_argument("dataset", metavar="DATASET", help="labeled folder, SA-1B tar/JSON or COCO")
    p.add_argument("--compare", metavar="OTHER", help="a second dataset, drawn side by side")
    p.add_argument("--out", required=True, help="folder for the PNGs and stats.json")
    p.add_argument("--name", help="label of DATASET in the plots (default: its folder name)")
    p.add_argument("--compare-name", help="label of OTHER in the plots")
    p.add_argument("--max-images", type=int, help="measure only the first N images of each")
    p.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    from ..cli_common import CliError
    from .dataset_stats import run

    if args.max_images is not None and args.max_images < 1:
        raise CliError("--max-images must be at least 1")
    try:
        result = run(
            args.dataset,
            args.out,
            compare=args.compare,
            max_images=args.max_images,
            names=(args.name, args.compare_name),
        )
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    for d in result["datasets"]:
        mpi = d["masks_per_image"]
        print(
            f"segany stats: {d['name']}: {d['images']} images, {d['masks']} masks, "
            f"{mpi.get('mean', 0):.1f} masks/image, median relative size "
            f"{d['relative_mask_size'].get('median', float('nan')):.3f}, median concavity "
            f"{d['concavity'].get('median', float('nan')):.3f}",
            file=sys.stderr,
        )
    print(V.dumps({"out": args.out, "plots": result["plots"], "json": "stats.json"}))
    return 0
