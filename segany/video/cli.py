"""``segany track``: segment objects on one frame, follow them through every frame.

    segany track VIDEO|FRAMES_DIR --frame K (--point X,Y[,L]... | --box X0,Y0,X1,Y1 |
        --mask PNG) [--object ID] ... --out DIR [--model NAME|PATH]

Prompts apply to the current object and frame: ``--object`` and ``--frame`` change them
for the prompts after them (defaults: object 1, frame 0), so one command can place several
objects and corrections on later frames. Writes DAVIS palette PNGs named after the frames
(``masks/``), ``track.json`` (per-frame RLE per object, YouTube-VIS layout) and
``overlay.mp4``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class _Prompt(argparse.Action):
    """Keeps every prompt option in command-line order in ``namespace.prompts``."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        items = list(getattr(namespace, "prompts", None) or [])
        items.append((self.dest, values))
        namespace.prompts = items


def _numbers(n: tuple[int, ...], what: str):
    def parse(text: str) -> list[float]:
        try:
            vals = [float(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: numbers separated by commas") from None
        if len(vals) not in n:
            raise argparse.ArgumentTypeError(f"{what}: {' or '.join(map(str, n))} numbers")
        return vals

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..cli_common import add_model_args

    p = sub.add_parser(
        "track",
        help="segment objects on one frame and follow them through a video",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("video", help="a video file, a folder of frames or a DAVIS sequence folder")
    p.add_argument("--object", dest="object", type=int, action=_Prompt, help="object id (1-255)")
    p.add_argument("--frame", dest="frame", type=int, action=_Prompt, help="frame index (0-based)")
    p.add_argument(
        "--point",
        dest="point",
        type=_numbers((2, 3), "--point X,Y[,LABEL]"),
        action=_Prompt,
        help="a click, label 1 (object, default) or 0 (background)",
    )
    p.add_argument("--box", dest="box", type=_numbers((4,), "--box"), action=_Prompt)
    p.add_argument(
        "--mask", dest="mask", action=_Prompt, help="a mask PNG (nonzero = object) for the frame"
    )
    p.add_argument("--out", required=True, help="output folder")
    add_model_args(p)
    p.add_argument("--no-video", action="store_true", help="skip overlay.mp4")
    p.set_defaults(func=run, prompts=None)


def parse_prompts(items: list[tuple[str, Any]], size: tuple[int, int]) -> dict[int, dict]:
    """The ordered prompt options -> ``{frame: {object: ObjectPrompt}}``."""
    from PIL import Image

    from ..cli_common import CliError
    from .tracker import ObjectPrompt

    obj, frame = 1, 0
    raw: dict[int, dict[int, dict[str, Any]]] = {}
    for kind, value in items:
        if kind == "object":
            if not 1 <= value <= 255:
                raise CliError(f"--object {value}: ids go from 1 to 255 (DAVIS PNG values)")
            obj = value
            continue
        if kind == "frame":
            frame = value
            continue
        slot = raw.setdefault(frame, {}).setdefault(obj, {"points": [], "labels": []})
        if kind == "point":
            slot["points"].append(value[:2])
            slot["labels"].append(int(value[2]) if len(value) == 3 else 1)
        elif kind == "box":
            slot["box"] = np.asarray(value)
        elif kind == "mask":
            m = np.asarray(Image.open(value).convert("L")) > 0
            if m.shape != size:
                raise CliError(
                    f"--mask {value} is {m.shape[1]}x{m.shape[0]}, frames {size[1]}x{size[0]}"
                )
            slot["mask"] = m
    out: dict[int, dict] = {}
    for f, objs in raw.items():
        for o, s in objs.items():
            pts = np.asarray(s["points"], float) if s["points"] else None
            labels = np.asarray(s["labels"]) if s["points"] else None
            out.setdefault(f, {})[o] = ObjectPrompt(
                points=pts, labels=labels, box=s.get("box"), mask=s.get("mask")
            )
    if not out:
        raise CliError("give a prompt: --point, --box or --mask (on --frame K, for --object ID)")
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..cli_common import CliError
    from ..loader import load_predictor
    from ..validate import dumps
    from ..videos import VideoError, open_video
    from .outputs import write_davis, write_overlay_video, write_video_json
    from .sam2_tracker import tracker_for

    try:
        video = open_video(args.video)
        prompts = parse_prompts(args.prompts or [], video.size)
        for f in prompts:
            if not 0 <= f < len(video):
                raise CliError(f"--frame {f}: the video has frames 0 to {len(video) - 1}")
    except VideoError as exc:
        raise CliError(str(exc)) from None
    predictor = load_predictor(args.model, backend=args.backend, precision=args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tqdm(total=len(video), unit="frame", desc="track") as bar:
        try:
            result = tracker_for(predictor).track(video, prompts, progress=bar.update)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    seconds = time.perf_counter() - t0
    fps = len(video) / seconds if seconds else float("inf")
    write_davis(result, out / "masks")
    names = getattr(video, "files", None)
    file_names = [f.name for f in names] if names else [f"{n}.png" for n in video.names]
    write_video_json(result, out / "track.json", name=Path(args.video).stem, file_names=file_names,
                     source=str(Path(args.video).resolve()))  # fmt: skip
    if not args.no_video:
        write_overlay_video(video, result, out / "overlay.mp4", fps=video.fps or 24.0)
    summary = {
        "video": str(args.video),
        "frames": len(video),
        "size": [video.size[1], video.size[0]],
        "objects": result.object_ids,
        "seconds": round(seconds, 2),
        "fps": round(fps, 2),
        "out": str(out),
        "masks": str(out / "masks"),
        "json": str(out / "track.json"),
        "overlay": None if args.no_video else str(out / "overlay.mp4"),
    }
    print(dumps(summary, indent=2), file=sys.stdout)
    return 0
