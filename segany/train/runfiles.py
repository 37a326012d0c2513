"""The files of a training run (see :mod:`.trainer`): their paths, the atomic checkpoint
write, the per-step statistics and the CSV / JSON-lines log, and the loss-curve plot.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import validate as V
from ..files import atomic_file

LOG_FIELDS = (
    "step",
    "lr",
    "loss",
    "focal",
    "dice",
    "iou_mse",
    "object",
    "iou_first",
    "iou_last",
    "replay",
    "rehearse",
    "masks",
    "val_loss",
    "val_iou_first",
    "seconds",
)
STATE_FORMAT = "segany-train-state/1"
META_FORMAT = "segany-train/1"


def output_paths(out: str | Path) -> dict[str, Path]:
    """The files of a run whose weights go to ``out`` (see the module doc)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return {
        "weights": out,
        "meta": stem.with_name(stem.name + ".json"),
        "state": stem.with_name(stem.name + ".train-state.pt"),
        "csv": stem.with_name(stem.name + ".log.csv"),
        "jsonl": stem.with_name(stem.name + ".log.jsonl"),
        "plot": stem.with_name(stem.name + ".loss.png"),
        "val": stem.with_name(stem.name + ".val.json"),
    }


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`segany.files.atomic_file` (durable)."""
    with atomic_file(path) as f:
        torch.save(obj, f)


@dataclass
class StepStats:
    loss: float = 0.0
    focal: float = 0.0
    dice: float = 0.0
    iou_mse: float = 0.0
    object: float = 0.0
    iou_first: float = 0.0
    iou_last: float = 0.0
    masks: int = 0
    replay: float = 0.0
    rehearse: float = 0.0


def add_stats(acc: StepStats, st: StepStats, w: float) -> None:
    for name in ("loss", "focal", "dice", "iou_mse", "object", "iou_first", "iou_last",
                 "replay", "rehearse"):  # fmt: skip
        setattr(acc, name, getattr(acc, name) + getattr(st, name) * w)
    acc.masks += st.masks


def log_row(step: int, lr: float, acc: StepStats, n: int, seconds: float) -> dict[str, Any]:
    n = max(1, n)
    return {
        "step": step,
        "lr": lr,
        "loss": round(acc.loss / n, 6),
        "focal": round(acc.focal / n, 6),
        "dice": round(acc.dice / n, 6),
        "iou_mse": round(acc.iou_mse / n, 6),
        "object": round(acc.object / n, 6),
        "iou_first": round(acc.iou_first / n, 5),
        "iou_last": round(acc.iou_last / n, 5),
        "replay": round(acc.replay / n, 6),
        "rehearse": round(acc.rehearse / n, 6),
        "masks": acc.masks,
        "seconds": round(seconds, 1),
    }


def append_log(paths: dict[str, Path], row: dict[str, Any]) -> None:
    new = not paths["csv"].is_file()
    with paths["csv"].open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in LOG_FIELDS})
    with paths["jsonl"].open("a") as f:
        f.write(V.dumps(row) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV log, numbers as floats (empty cells dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
        ]


def truncate_logs(paths: dict[str, Path], step: int) -> None:
    """Drop log rows after ``step`` (written after the last checkpoint of a stopped run)."""
    rows = [r for r in read_log(paths["csv"]) if r["step"] <= step]
    for key in ("csv", "jsonl"):
        paths[key].unlink(missing_ok=True)
    for r in rows:
        r["step"] = int(r["step"])
        r["masks"] = int(r.get("masks", 0))
        append_log(paths, r)


def plot_log(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss and first-round IoU against the step (train, and validation when logged)."""
    rows = read_log(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [r["loss"] for r in rows], label="train")
    ax2.plot(steps, [r["iou_first"] for r in rows], label="train, round 1")
    ax2.plot(steps, [r["iou_last"] for r in rows], label="train, last round", alpha=0.7)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax2.plot([r["step"] for r in val], [r["val_iou_first"] for r in val], "o-",
                 label="validation, round 1")  # fmt: skip
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (focal x20 + dice + IoU MSE)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("IoU of the fed-back mask")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
