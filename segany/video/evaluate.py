"""``segany eval video DAVIS_ROOT``: the DAVIS semi-supervised protocol.

Each object of a sequence is given on its first frame, either as its ground-truth mask
(``--start mask``, the DAVIS protocol) or as one simulated click at its interior point
farthest from the boundary (``--start click``); the tracker follows it through the rest,
and J, F (mean, recall, decay) are measured on every frame but the first and the last.
Writes ``results.json``, ``report.md`` and ``jf.png`` (J&F per sequence).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import validate as V
from ..videos import VideoError, davis_sequences, open_video, read_davis_png
from .metrics import score_sequence
from .sam2_tracker import tracker_for
from .tracker import ObjectPrompt, PropagationTracker

STARTS = ("mask", "click")


def ground_truth(root: Path, seq: str, names: list[str], resolution: str) -> list[np.ndarray]:
    """``(H, W)`` object-id maps of a sequence's annotation PNGs, one per frame."""
    folder = root / "Annotations" / resolution / seq
    out = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.is_file():
            raise VideoError(f"{seq}: no annotation {path}")
        out.append(read_davis_png(path))
    return out


def evaluate_sequence(
    tracker: PropagationTracker, root: Path, seq: str, *, start: str, resolution: str
) -> dict[str, Any]:
    """Track every object of one sequence from its first frame; J and F per object."""
    from ..eval.clicks import first_click

    video = open_video(root / "JPEGImages" / resolution / seq)
    gt = ground_truth(root, seq, video.names, resolution)
    objects = [int(o) for o in np.unique(gt[0]) if o != 0]
    prompts: dict[int, ObjectPrompt] = {}
    for o in objects:
        m = gt[0] == o
        if start == "mask":
            prompts[o] = ObjectPrompt(mask=m)
        else:
            c = first_click(m)
            prompts[o] = ObjectPrompt(points=np.array([[c.x, c.y]], float), labels=np.array([1]))
    t0 = time.perf_counter()
    result = tracker.track(video, {0: prompts})
    seconds = time.perf_counter() - t0
    per_object = {}
    for o in objects:
        pred = [result.mask(i, o) for i in range(len(video))]
        scores = score_sequence(pred, [g == o for g in gt])
        per_object[str(o)] = {k: scores[k] for k in ("J", "F", "JF")}
    return {
        "sequence": seq,
        "frames": len(video),
        "objects": per_object,
        "seconds": round(seconds, 2),
        "fps": round(len(video) / seconds, 3) if seconds else None,
    }


def summarise(sequences: list[dict[str, Any]]) -> dict[str, float]:
    """DAVIS's global numbers: means over all objects of all sequences."""
    objs = [o for s in sequences for o in s["objects"].values()]
    out: dict[str, float] = {}
    for m in ("J", "F"):
        for k in ("mean", "recall", "decay"):
            out[f"{m}_{k}"] = float(np.mean([o[m][k] for o in objs]))
    out["JF_mean"] = (out["J_mean"] + out["F_mean"]) / 2
    frames = sum(s["frames"] for s in sequences)
    out["fps"] = frames / sum(s["seconds"] for s in sequences)
    return out


def _plot(sequences: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["sequence"] for s in sequences]
    jf = [np.mean([o["JF"] for o in s["objects"].values()]) * 100 for s in sequences]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), jf, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("J&F (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_parser(psub: argparse._SubParsersAction) -> None:
    """``segany eval video``, added to the ``eval`` command's protocols."""
    from ..weights import DEFAULT_WEIGHTS

    text = "video object segmentation on a DAVIS root: J&F from the first frame"
    q = psub.add_parser("video", help=text, description=__doc__.split("\n\n")[1])
    q.add_argument("dataset", help="DAVIS root (JPEGImages/480p/, Annotations/480p/)")
    q.add_argument("--model", default=DEFAULT_WEIGHTS, help="catalogue name or checkpoint path")
    q.add_argument("--out", required=True, help="folder for report.md, results.json, jf.png")
    q.add_argument("--start", choices=STARTS, default="mask", help="first-frame mask or one click")
    q.add_argument("--sequences", help="comma-separated names (default: all)")
    q.add_argument("--resolution", default="480p")
    q.add_argument("--embedding-cache", help="folder keeping frame embeddings across runs")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..cli_common import CliError
    from ..loader import load_predictor

    root = Path(args.dataset)
    try:
        seqs = args.sequences.split(",") if args.sequences else davis_sequences(root)
        predictor = load_predictor(args.model, cache_dir=args.embedding_cache)
        tracker = tracker_for(predictor)
        results = []
        for seq in tqdm(seqs, unit="seq", desc=f"eval video ({args.start})"):
            results.append(
                evaluate_sequence(tracker, root, seq, start=args.start, resolution=args.resolution)
            )
    except VideoError as exc:
        raise CliError(str(exc)) from None
    summary = summarise(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "protocol": "davis-semi-supervised",
        "start": args.start,
        "model": str(args.model),
        "tracker": "propagation",
        "dataset": str(root),
        "summary": summary,
        "sequences": results,
    }
    (out / "results.json").write_text(V.dumps(doc, indent=2) + "\n")
    _plot(results, out / "jf.png", f"{Path(str(args.model)).stem}, start: {args.start}")
    lines = [
        f"# DAVIS video evaluation ({args.start} on the first frame)",
        "",
        f"model `{args.model}`, propagation tracker, {len(results)} sequences",
        "",
        "| | J&F | J mean | J recall | J decay | F mean | F recall | F decay | fps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, s: dict[str, Any]) -> str:
        cells = [s["JF_mean"], s["J_mean"], s["J_recall"], s["J_decay"]]
        cells += [s["F_mean"], s["F_recall"], s["F_decay"]]
        return f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + f" | {s['fps']:.2f} |"

    lines.append(row("**all**", summary))
    for r in results:
        lines.append(row(r["sequence"], summarise([r])))
    lines += ["", "![J&F per sequence](jf.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print(V.dumps({"out": str(out), **{k: round(v, 4) for k, v in summary.items()}}, indent=2))
    sys.stdout.flush()
    return 0
