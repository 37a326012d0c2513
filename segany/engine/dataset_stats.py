"""Dataset statistics like the SA-1B figures of the paper (Fig. 5 and 6): masks per image,
relative mask size, mask concavity, spatial distribution of mask centres, image sizes.

Reads whatever :func:`segany.datasets.open_dataset` reads: a labeled folder (``segany
label`` output: manifest + shard tars), raw SA-1B tars or per-image SA-1B JSON files in a
folder (``segany everything --format sa1b``), one shard tar, a COCO instances JSON or the
annotator's store. Two datasets are drawn side by side for comparison.

Definitions (per mask, decoded at image resolution):

- relative size: ``sqrt(mask area / image area)`` (the paper's x axis);
- concavity: ``1 - mask area / area of the mask's convex hull`` (OpenCV hull of the outer
  contours, rasterised so both areas count pixels the same way);
- centre: the mask's centre of mass divided by the image width and height.

COCO ``iscrowd`` regions are not objects and are skipped (and counted in the JSON).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .. import validate as V
from ..datasets import ImageRecord, open_dataset
from ..files import atomic_write

#: Masks-per-image groups of the paper's Fig. 6 (left), as inclusive ranges.
MASK_COUNT_BINS: tuple[tuple[int, int | None], ...] = (
    (0, 0),
    (1, 10),
    (11, 50),
    (51, 100),
    (101, 200),
    (201, None),
)
HIST_BINS = 40  # relative size and concavity histograms over [0, 1]
HEATMAP_BINS = 50  # centre heatmap cells per side
COLORS = ("#1f77b4", "#d62728")


@dataclass
class DatasetStats:
    """Per-image and per-mask measurements of one dataset."""

    name: str
    kind: str
    path: str
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    masks_per_image: list[int] = field(default_factory=list)
    rel_size: list[float] = field(default_factory=list)
    concavity: list[float] = field(default_factory=list)
    cx: list[float] = field(default_factory=list)
    cy: list[float] = field(default_factory=list)
    skipped_crowd: int = 0
    skipped_empty: int = 0

    @property
    def images(self) -> int:
        return len(self.masks_per_image)

    @property
    def masks(self) -> int:
        return len(self.rel_size)


# -- measuring -------------------------------------------------------------------------------
def mask_shape(mask: np.ndarray) -> tuple[int, float, float, float] | None:
    """``(area, concavity, centre x, centre y)`` in pixels, ``None`` for an empty mask."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.uint8)
    area = int(crop.sum())
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours))
    canvas = np.zeros_like(crop)
    cv2.fillConvexPoly(canvas, hull, 1)
    hull_area = max(int(canvas.sum()), area)
    m = cv2.moments(crop, binaryImage=True)
    cx = x0 + m["m10"] / m["m00"]
    cy = y0 + m["m01"] / m["m00"]
    return area, 1.0 - area / hull_area, float(cx), float(cy)


def compute(
    path: str | os.PathLike[str], *, name: str | None = None, max_images: int | None = None
) -> DatasetStats:
    """Measure the dataset at ``path`` (read by :func:`segany.datasets.open_dataset`; the
    first ``max_images`` images if given). A malformed dataset raises ``ValueError``
    naming the file, image and annotation."""
    ds = open_dataset(path)
    st = DatasetStats(name=name or _default_name(path), kind=ds.kind, path=os.fspath(path))
    for k, im in enumerate(ds.iter_images()):
        if max_images is not None and k >= max_images:
            break
        _measure(st, im)
    if not st.images:
        raise ValueError(f"{path}: no images")
    return st


def _measure(st: DatasetStats, im: ImageRecord) -> None:
    """Add one image and its masks to ``st``."""
    w, h = im.width, im.height
    st.widths.append(w)
    st.heights.append(h)
    n = 0
    for a in im.annotations:
        if a.iscrowd:
            st.skipped_crowd += 1
            continue
        shape = mask_shape(a.mask())
        if shape is None:
            st.skipped_empty += 1
            continue
        area, concavity, cx, cy = shape
        st.rel_size.append(math.sqrt(area / (w * h)))
        st.concavity.append(concavity)
        st.cx.append((cx + 0.5) / w)
        st.cy.append((cy + 0.5) / h)
        n += 1
    st.masks_per_image.append(n)


def _default_name(path: str | os.PathLike[str]) -> str:
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.stem in ("annotations", "instances", "manifest"):
        return p.parent.name if p.parent.name != "annotations" else p.parent.parent.name
    return p.stem if p.is_file() else p.name


# -- summaries -------------------------------------------------------------------------------
def _count_label(lo: int, hi: int | None) -> str:
    if hi is None:
        return f">{lo - 1}"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def mask_count_groups(counts: list[int]) -> dict[str, float]:
    """Percent of images per :data:`MASK_COUNT_BINS` group."""
    arr = np.asarray(counts)
    out = {}
    for lo, hi in MASK_COUNT_BINS:
        sel = (arr >= lo) & (arr <= hi) if hi is not None else arr >= lo
        out[_count_label(lo, hi)] = 100.0 * float(sel.mean()) if arr.size else 0.0
    return out


def _describe(values: list[float] | list[int], digits: int = 4) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, [10, 25, 50, 75, 90])
    return {
        "count": int(a.size),
        "mean": round(float(a.mean()), digits),
        "min": round(float(a.min()), digits),
        "p10": round(float(q[0]), digits),
        "p25": round(float(q[1]), digits),
        "median": round(float(q[2]), digits),
        "p75": round(float(q[3]), digits),
        "p90": round(float(q[4]), digits),
        "max": round(float(a.max()), digits),
    }


def _hist(values: list[float]) -> dict[str, Any]:
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), HIST_BINS, (0.0, 1.0))
    total = max(1, int(counts.sum()))
    return {
        "edges": [round(float(e), 4) for e in edges],
        "percent": [round(100.0 * c / total, 3) for c in counts],
    }


def heatmap(st: DatasetStats, bins: int = HEATMAP_BINS, *, smooth: bool = False) -> np.ndarray:
    """Mask centres per cell of a ``bins x bins`` grid (rows = y), as a density relative to
    a uniform spread (1.0 = as many as if centres were uniform). ``smooth``: Gaussian blur
    whose width shrinks with the number of masks (for pictures of small datasets)."""
    h, _, _ = np.histogram2d(st.cy, st.cx, bins=bins, range=[[0, 1], [0, 1]])
    if smooth and st.masks:
        sigma = float(np.clip(0.08 * bins / math.sqrt(st.masks / 100), 0.5, 0.12 * bins))
        h = cv2.GaussianBlur(h, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return h / max(1e-12, h.sum()) * bins * bins if st.masks else h


def summary(st: DatasetStats) -> dict[str, Any]:
    """The JSON-ready statistics of one dataset."""
    w = np.asarray(st.widths)
    h = np.asarray(st.heights)
    sizes: dict[str, int] = {}
    for a, b in zip(st.widths, st.heights):
        sizes[f"{a}x{b}"] = sizes.get(f"{a}x{b}", 0) + 1
    common = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    heat = heatmap(st, 10)
    centre_dist = np.hypot(np.asarray(st.cx) - 0.5, np.asarray(st.cy) - 0.5)
    return {
        "name": st.name,
        "kind": st.kind,
        "path": st.path,
        "images": st.images,
        "masks": st.masks,
        "skipped": {"crowd": st.skipped_crowd, "empty": st.skipped_empty},
        "masks_per_image": {
            **_describe(st.masks_per_image, 2),
            "groups_percent": mask_count_groups(st.masks_per_image),
        },
        "relative_mask_size": {**_describe(st.rel_size), "histogram": _hist(st.rel_size)},
        "concavity": {**_describe(st.concavity), "histogram": _hist(st.concavity)},
        "centers": {
            "mean_x": round(float(np.mean(st.cx)), 4) if st.masks else None,
            "mean_y": round(float(np.mean(st.cy)), 4) if st.masks else None,
            "mean_distance_from_image_centre": (
                round(float(centre_dist.mean()), 4) if st.masks else None
            ),
            "percent_in_central_cell_of_3x3": (
                round(
                    100.0
                    * float(
                        np.mean(
                            (np.abs(np.asarray(st.cx) - 0.5) < 1 / 6)
                            & (np.abs(np.asarray(st.cy) - 0.5) < 1 / 6)
                        )
                    ),
                    2,
                )
                if st.masks
                else None
            ),
            "heatmap_10x10_vs_uniform": [[round(float(v), 3) for v in row] for row in heat],
        },
        "resolution": {
            "width": _describe(st.widths, 1),
            "height": _describe(st.heights, 1),
            "megapixels": _describe((w * h / 1e6).tolist(), 3),
            "aspect_w_over_h": _describe((w / h).tolist(), 3),
            "most_common": [{"size": s, "images": n} for s, n in common],
        },
    }


# -- plots -----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "figure.dpi": 100})
    return plt


def _label(st: DatasetStats) -> str:
    return f"{st.name} ({st.images:,} img, {st.masks:,} masks)"


def _plot_mask_counts(ax: Any, sets: list[DatasetStats]) -> None:
    groups = [_count_label(lo, hi) for lo, hi in MASK_COUNT_BINS]
    x = np.arange(len(groups))
    width = 0.8 / len(sets)
    for k, st in enumerate(sets):
        pct = list(mask_count_groups(st.masks_per_image).values())
        bars = ax.bar(x + (k - (len(sets) - 1) / 2) * width, pct, width, color=COLORS[k])
        bars.set_label(f"{st.name} (mean {np.mean(st.masks_per_image):.1f})")
        for b, v in zip(bars, pct):
            if v > 0:
                ax.annotate(
                    f"{v:.0f}",
                    (b.get_x() + b.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 100 * 1.22)  # room for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("masks per image")
    ax.set_ylabel("percent of images")
    ax.set_title("Masks per image")
    ax.legend(fontsize=9, loc="upper right")


def _plot_hist(ax: Any, sets: list[DatasetStats], attr: str, xlabel: str, title: str) -> None:
    edges = np.linspace(0, 1, HIST_BINS + 1)
    for k, st in enumerate(sets):
        vals = getattr(st, attr)
        if not vals:
            continue
        counts, _ = np.histogram(vals, edges)
        pct = 100.0 * counts / max(1, counts.sum())
        med = float(np.median(vals))
        ax.stairs(pct, edges, color=COLORS[k], linewidth=2, label=f"{st.name} (median {med:.2f})")
        ax.stairs(pct, edges, color=COLORS[k], alpha=0.15, fill=True)
        ax.axvline(med, color=COLORS[k], linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("percent of masks")
    ax.set_title(title)
    ax.legend(fontsize=9, loc="upper right")


def _plot_heatmap(ax: Any, st: DatasetStats, fig: Any) -> None:
    heat = heatmap(st, smooth=True)
    im = ax.imshow(
        heat,
        extent=(0, 1, 1, 0),
        cmap="magma",
        vmin=0,
        vmax=max(2.0, float(heat.max())),
        interpolation="bilinear",
    )
    ax.set_title(f"Mask centres: {st.name}\n({st.masks:,} masks)")
    ax.set_xlabel("x / image width")
    ax.set_ylabel("y / image height")
    ax.set_aspect("equal")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("density / uniform density")


def _plot_resolution(ax: Any, sets: list[DatasetStats]) -> None:
    """One marker per distinct size, its area growing with the number of images."""
    for k, st in enumerate(sets):
        w, h = np.asarray(st.widths), np.asarray(st.heights)
        sizes, counts = np.unique(np.stack([w, h], 1), axis=0, return_counts=True)
        mp = np.median(w * h) / 1e6
        ax.scatter(
            sizes[:, 0],
            sizes[:, 1],
            s=25 + 220 * counts / counts.max(),
            facecolors="none" if k == 0 else COLORS[k],
            edgecolors=COLORS[k],
            linewidths=1.5,
            alpha=0.9 if k == 0 else 0.5,
            marker="os"[k % 2],
            label=f"{st.name}: median {np.median(w):.0f}x{np.median(h):.0f} ({mp:.2f} MP)",
        )
        if len(sizes) <= 12:
            for (x, y), c in zip(sizes, counts):
                if c > 1:
                    ax.annotate(
                        f"{c}",
                        (x, y),
                        xytext=(8, 2) if k == 0 else (-16, 2),
                        textcoords="offset points",
                        color=COLORS[k],
                        fontsize=8,
                    )
    lim = max(max(st.widths + st.heights) for st in sets) * 1.1
    ax.plot([0, lim], [0, lim], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, lim)
    ax.set_ylim(0, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image resolution (marker area ~ images)")
    ax.legend(fontsize=8, loc="lower right")


def _plot_numbers(ax: Any, st: DatasetStats) -> None:
    """The headline numbers as text (fills the overview's free panel for one dataset)."""
    mpi = np.asarray(st.masks_per_image)
    lines = [
        f"images: {st.images:,}",
        f"masks: {st.masks:,}",
        f"masks per image: mean {mpi.mean():.1f}, median {np.median(mpi):.0f}, max {mpi.max()}",
        f"relative mask size: median {np.median(st.rel_size):.3f}" if st.masks else "",
        f"concavity: median {np.median(st.concavity):.3f}" if st.masks else "",
        f"image size: median {np.median(st.widths):.0f} x {np.median(st.heights):.0f}",
    ]
    ax.text(0.02, 0.95, "\n".join(x for x in lines if x), va="top", fontsize=12, family="monospace")
    ax.set_title(st.name)
    ax.axis("off")


def plot(sets: list[DatasetStats], out: str | os.PathLike[str]) -> list[Path]:
    """Write the PNGs (one per statistic, and ``overview.png`` with all) into ``out``."""
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _plot_mask_counts(ax, sets)
    save(fig, "masks_per_image.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _plot_hist(ax, sets, "rel_size", "sqrt(mask area / image area)", "Relative mask size")
    save(fig, "mask_size.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _plot_hist(ax, sets, "concavity", "1 - mask area / convex hull area", "Mask concavity")
    save(fig, "concavity.png")
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.6), squeeze=False)
    for ax, st in zip(axes[0], sets):
        _plot_heatmap(ax, st, fig)
    save(fig, "centers.png")
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    _plot_resolution(ax, sets)
    save(fig, "resolution.png")

    # everything on one page
    fig = plt.figure(figsize=(17, 10.5))
    grid = fig.add_gridspec(2, 3)
    _plot_mask_counts(fig.add_subplot(grid[0, 0]), sets)
    _plot_hist(
        fig.add_subplot(grid[0, 1]),
        sets,
        "rel_size",
        "sqrt(mask area / image area)",
        "Relative mask size",
    )
    _plot_hist(
        fig.add_subplot(grid[0, 2]),
        sets,
        "concavity",
        "1 - mask area / convex hull area",
        "Mask concavity",
    )
    for k, st in enumerate(sets[:2]):
        _plot_heatmap(fig.add_subplot(grid[1, k]), st, fig)
    _plot_resolution(fig.add_subplot(grid[1, len(sets[:2])]), sets)
    if len(sets) == 1:
        _plot_numbers(fig.add_subplot(grid[1, 2]), sets[0])
    fig.suptitle(" vs ".join(_label(st) for st in sets), fontsize=13)
    save(fig, "overview.png")
    return written


def run(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    compare: str | os.PathLike[str] | None = None,
    max_images: int | None = None,
    names: tuple[str | None, str | None] = (None, None),
) -> dict[str, Any]:
    """Compute, plot and write ``stats.json`` for ``path`` (and ``compare``) into ``out``."""
    sets = [compute(path, name=names[0], max_images=max_images)]
    if compare is not None:
        sets.append(compute(compare, name=names[1], max_images=max_images))
        if sets[0].name == sets[1].name:
            sets[0].name, sets[1].name = f"{sets[0].name} (1)", f"{sets[1].name} (2)"
    out = Path(out)
    files = plot(sets, out)
    result = {
        "datasets": [summary(st) for st in sets],
        "definitions": {
            "relative_mask_size": "sqrt(mask area / image area)",
            "concavity": "1 - mask area / convex hull area (pixels)",
            "centre": "centre of mass / (image width, image height)",
        },
        "plots": [f.name for f in files],
    }
    atomic_write(out / "stats.json", V.dumps(result, indent=1))
    return result
