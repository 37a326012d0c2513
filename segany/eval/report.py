"""Write an evaluation's outputs: ``report.md``, ``results.json``, per-mask details, plots.

One run (one model): ``results.json`` is that run's figures (``dataset``, ``model``,
``masks``, ...). Several runs of the same protocol (several ``--model``): ``results.json``
holds ``{"protocol", "dataset", "models", "runs": [...]}`` and the plots draw one line per
model. Per-mask (points, boxes) or per-image (proposals) details go to ``per_mask.json`` /
``per_image.json`` (a list per model when several).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import validate as V
from ..files import atomic_write

DETAIL_KEYS = ("per_mask", "per_image")


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """A run's figures without its per-mask / per-image details."""
    return {k: v for k, v in run.items() if k not in DETAIL_KEYS}


# -- markdown --------------------------------------------------------------------------------
def _points_md(runs: list[dict[str, Any]]) -> list[str]:
    clicks = list(runs[0]["miou"])
    header = ["model", "masks", "1 click (auto)", "1 click (oracle)"]
    header += [f"{k} clicks" for k in clicks if k != "1"] + ["NoC@85", "NoC@90", "s/image"]
    rows = [
        [r["model"], r["masks"], r["miou"]["1"], r["oracle_miou_1"]]
        + [r["miou"].get(k) for k in clicks if k != "1"]
        + [r["noc85"], r["noc90"], r["seconds_per_image"]]
        for r in runs
    ]
    lines = ["mIoU (%) after N simulated clicks.", ""] + _table(header, rows)
    lines += ["", "One click, by object size (COCO areas): mIoU auto / oracle (masks).", ""]
    lines += _table(
        ["model", "small", "medium", "large"],
        [
            [r["model"]]
            + [
                f"{_fmt(r['miou_by_size_1'][s]['miou'])} / "
                f"{_fmt(r['oracle_miou_by_size_1'][s]['miou'])} ({r['miou_by_size_1'][s]['masks']})"
                for s in ("small", "medium", "large")
            ]
            for r in runs
        ],
    )
    r0 = runs[0]
    how = "farthest from the boundary" if r0["clicks"] == "center" else f"random, seed {r0['seed']}"
    lines += [
        "",
        f"Clicks: {how}; click 1 multimask (auto = highest predicted IoU), later clicks single "
        f"output{' with the previous low-res logits fed back' if r0['feedback'] else ''}.",
    ]
    return lines


def _boxes_md(runs: list[dict[str, Any]]) -> list[str]:
    header = ["model", "masks", "mIoU", "small", "medium", "large"]
    header += ["IoU>=0.5 (%)", "IoU>=0.75 (%)", "IoU>=0.9 (%)", "s/image"]
    rows = [
        [r["model"], r["masks"], r["miou"]]
        + [
            f"{_fmt(r['miou_by_size'][s]['miou'])} ({r['miou_by_size'][s]['masks']})"
            for s in ("small", "medium", "large")
        ]
        + [r["iou_above_50"], r["iou_above_75"], r["iou_above_90"], r["seconds_per_image"]]
        for r in runs
    ]
    r0 = runs[0]
    jitter = (
        f", jittered (std {r0['jitter']:g} x side, at most {r0['max_shift']:g} px, "
        f"seed {r0['seed']})"
        if r0["jitter"] > 0
        else ""
    )
    return [
        f"mIoU (%) from the ground-truth box{jitter}, single output; by size: mIoU (masks).",
        "",
        *_table(header, rows),
    ]


def _proposals_md(runs: list[dict[str, Any]]) -> list[str]:
    header = ["model", "preset", "images", "proposals", "AR@10", "AR@100", "AR@1000"]
    header += ["AR small", "AR medium", "AR large", "best-proposal mIoU", "s/image"]
    rows = [
        [r["model"], r["preset"], r["images"], r["proposals"]]
        + [r[k] for k in ("ar_10", "ar_100", "ar_1000", "ar_small", "ar_medium", "ar_large")]
        + [r["best_proposal_miou"], r["seconds_per_image"]]
        for r in runs
    ]
    return [
        "Class-agnostic mask recall (%) of segment-everything (COCOeval segm, useCats=0, "
        "score = predicted IoU; AR by size at 1000).",
        "",
        *_table(header, rows),
    ]


def _instances_md(runs: list[dict[str, Any]]) -> list[str]:
    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    header = ["model", "boxes", "detections", "mask AP", "AP50", "AP75", "AP S", "AP M", "AP L"]
    header += ["box AP", "s/image"]
    rows = [
        [r["model"], r["boxes"], r["detections"]]
        + [r[f"mask_{k}"] for k in keys]
        + [r["box_ap"], r["seconds_per_image"]]
        for r in runs
    ]
    return [
        "Mask AP (%) of masks prompted by detector boxes (COCOeval segm); the boxes' own AP "
        "(bbox) beside it.",
        "",
        *_table(header, rows),
    ]


SECTIONS = {
    "points": _points_md,
    "boxes": _boxes_md,
    "proposals": _proposals_md,
    "instances": _instances_md,
}


def markdown(runs: list[dict[str, Any]], command: str | None = None) -> str:
    r0 = runs[0]
    lines = [f"# {r0['protocol']} on {r0['dataset']}", ""]
    lines += SECTIONS[r0["protocol"]](runs)
    lines += ["", f"Dataset: `{r0['dataset_path']}`, {r0['images']} images."]
    times = ", ".join(f"{r['model']} {r['seconds']:.1f} s" for r in runs)
    lines += [f"Wall time: {times}."]
    if command:
        lines += ["", "Command:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_clicks(runs: list[dict[str, Any]], path: Path) -> Path:
    """mIoU against the number of clicks, one line per model (oracle at 1 click marked)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in runs:
        ys = r["miou_per_click"]
        xs = list(range(1, len(ys) + 1))
        (line,) = ax.plot(xs, ys, marker="o", label=r["model"])
        ax.plot([1], [r["oracle_miou_1"]], marker="*", ms=11, color=line.get_color(), ls="")
    ax.plot([], [], marker="*", color="gray", ls="", label="1-click oracle")
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{runs[0]['dataset']}: mIoU vs clicks")
    ax.set_xticks(range(1, len(runs[0]["miou_per_click"]) + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _hist_values(run: dict[str, Any]) -> dict[str, list[float]]:
    rows = run.get("per_mask", [])
    if run["protocol"] == "points":
        first = [r["iou"][0] for r in rows]
        last = [r["iou"][-1] for r in rows]
        n = run["max_clicks"]
        first_label = "1 click (auto)"
        return {first_label: first} if n == 1 else {first_label: first, f"{n} clicks": last}
    if run["protocol"] == "boxes":
        return {"box": [r["iou"] for r in rows]}
    return {}


def plot_iou_hist(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Histogram of per-mask IoU (points: at 1 click and at the last click)."""
    series = [(r["model"], k, v) for r in runs for k, v in _hist_values(r).items() if v]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    bins = np.linspace(0, 1, 21)
    for model, what, vals in series:
        label = what if len(runs) == 1 else f"{model}, {what}"
        ax.hist(vals, bins=bins, histtype="step", linewidth=1.6, label=label)
    ax.set_xlabel("IoU with ground truth")
    ax.set_ylabel("masks")
    ax.set_title(f"{runs[0]['dataset']}: IoU per mask ({runs[0]['protocol']})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_recall(runs: list[dict[str, Any]], path: Path) -> Path:
    """Proposal recall against the IoU threshold, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in runs:
        c = r["recall_vs_iou"]
        ax.plot(c["iou"], c["recall"], marker="o", label=f"{r['model']} ({r['preset']})")
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("recall (%) at 1000 proposals")
    ax.set_title(f"{runs[0]['dataset']}: proposal recall")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- all outputs -----------------------------------------------------------------------------
def write_report(
    runs: list[dict[str, Any]], out_dir: str | Path, *, command: str | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``results.json``, details and plots into ``out_dir``; returns the
    paths written by name."""
    if not runs:
        raise ValueError("no runs to report")
    protocols = {r["protocol"] for r in runs}
    if len(protocols) > 1:
        raise ValueError(f"runs of different protocols: {sorted(protocols)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if len(runs) == 1:
        results: dict[str, Any] = summary(runs[0])
    else:
        results = {
            "protocol": runs[0]["protocol"],
            "dataset": runs[0]["dataset"],
            "models": [r["model"] for r in runs],
            "runs": [summary(r) for r in runs],
        }
    if command:
        results["command"] = command
    written["results"] = out / "results.json"
    atomic_write(written["results"], V.dumps(results, indent=2) + "\n")
    for key in DETAIL_KEYS:
        if any(key in r for r in runs):
            detail = runs[0].get(key, []) if len(runs) == 1 else [r.get(key, []) for r in runs]
            written[key] = out / f"{key}.json"
            atomic_write(written[key], V.dumps(detail) + "\n")
    written["report"] = out / "report.md"
    atomic_write(written["report"], markdown(runs, command))
    protocol = runs[0]["protocol"]
    if protocol == "points":
        written["plot_clicks"] = plot_clicks(runs, out / "miou_vs_clicks.png")
    if protocol in ("points", "boxes"):
        hist = plot_iou_hist(runs, out / "iou_hist.png")
        if hist is not None:
            written["plot_hist"] = hist
    if protocol == "proposals":
        written["plot_recall"] = plot_recall(runs, out / "recall_vs_iou.png")
    return written
