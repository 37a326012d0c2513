"""Label Studio's ``/predict`` answered with segany: interactive prompts (smart keypoints and
rectangles, in percent of the image) -> one mask; a task without prompts -> pre-annotation
(segment-everything, or the text detector with the label names as prompts).

Shapes are those of ``label-studio-ml`` (``label_studio_ml/api.py`` ``_predict``: the request
``{"tasks", "label_config", "project", "params": {"context": ...}}``, the answer
``{"results": [prediction per task]}``; a prediction is ``{"result": [region...], "score",
"model_version"}``) and of its SAM example (``label_studio_ml/examples/
segment_anything_model/model.py``: a brush region is ``{"from_name", "to_name",
"original_width", "original_height", "image_rotation", "value": {"format": "rle", "rle",
"brushlabels"}, "score", "type": "brushlabels", "readonly"}``). Polygon regions carry
``value.points`` in percent of the image, as Label Studio stores them.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...engine.schemas import BadRequest, Unprocessable
from . import brush
from .config import Control, LabelConfig

log = logging.getLogger("segany.serve.labelstudio")

#: Most masks a pre-annotated task gets (largest predicted IoU first).
MAX_PREANNOTATIONS = 100
#: Pre-annotation modes: ``auto`` = text prompts when a detector is configured, else
#: segment-everything.
PREANNOTATE_MODES = ("auto", "everything", "text", "off")
#: Polygons smaller than this many pixels are left out (specks of a mask's edge).
MIN_POLYGON_AREA = 16


@dataclass
class Prompt:
    """One interactive request in image pixels."""

    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: list[float] | None = None
    label: str | None = None  # the label the user picked on the smart tool

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    @property
    def negative_only(self) -> bool:
        return self.box is None and bool(self.labels) and not any(self.labels)


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Unprocessable(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _size(item: dict[str, Any], rgb_size: tuple[int, int] | None) -> tuple[int, int]:
    """``(width, height)`` a context region's percentages are multiplied by: the image's
    decoded size when known (percentages are of the image, whatever size Label Studio's page
    shows it at), else the region's ``original_width`` / ``original_height``."""
    if rgb_size is not None:
        return rgb_size[1], rgb_size[0]
    w, h = item.get("original_width"), item.get("original_height")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return w, h
    raise Unprocessable("a context region has no original_width / original_height")


def _first_label(value: dict[str, Any], kind: str) -> str | None:
    for key in (kind, "labels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


def _rotated_box(
    x: float, y: float, bw: float, bh: float, degrees: float, size: tuple[int, int]
) -> list[float]:
    """The box prompt of a Label Studio rectangle in pixels: ``(x, y)`` its top-left corner,
    ``bw`` x ``bh`` its sides, turned ``degrees`` clockwise (on screen, y down) about that
    corner, as Label Studio draws it. SAM takes axis-aligned boxes: a turned rectangle gives
    the box around its four corners, clipped to the ``(width, height)`` image."""
    if degrees % 360 == 0:
        return [x, y, x + bw, y + bh]
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    xs = [x + dx * c - dy * s for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    ys = [y + dx * s + dy * c for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    w, h = size
    return [max(0.0, min(xs)), max(0.0, min(ys)), min(float(w), max(xs)), min(float(h), max(ys))]


def parse_context(context: Any, rgb_size: tuple[int, int] | None = None) -> Prompt:
    """Label Studio's interactive ``context`` -> a :class:`Prompt` in pixels. Keypoints
    (``type: keypointlabels``, ``is_positive`` true/false; x, y in percent) become points,
    the last rectangle (``rectanglelabels``; x, y, width, height in percent) the box (a
    rotated one by the box around its corners, see :func:`_rotated_box`); other region
    types are ignored."""
    if not isinstance(context, dict):
        return Prompt()
    results = context.get("result")
    if results is None:
        return Prompt()
    if not isinstance(results, list):
        raise BadRequest("params.context.result must be a list of regions")
    prompt = Prompt()
    for i, item in enumerate(results):
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise BadRequest(f"params.context.result[{i}] must be a region with a 'value'")
        kind, value = item.get("type"), item["value"]
        if kind not in ("keypointlabels", "rectanglelabels"):
            continue
        w, h = _size(item, rgb_size)
        x = _number(value.get("x"), f"region {i} x") * w / 100.0
        y = _number(value.get("y"), f"region {i} y") * h / 100.0
        prompt.label = _first_label(value, kind) or prompt.label
        if kind == "keypointlabels":
            positive = item.get("is_positive", True)
            prompt.points.append([x, y])
            prompt.labels.append(0 if positive is False or positive == 0 else 1)
        else:
            bw = _number(value.get("width"), f"region {i} width") * w / 100.0
            bh = _number(value.get("height"), f"region {i} height") * h / 100.0
            angle = _number(value.get("rotation", 0) or 0, f"region {i} rotation")
            prompt.box = _rotated_box(x, y, bw, bh, angle, (w, h))
    return prompt


# -- regions -----------------------------------------------------------------------------------
def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_region(mask: np.ndarray, score: float, out: Control, label: str | None) -> dict:
    h, w = mask.shape
    return {
        "id": _region_id(),
        "from_name": out.name,
        "to_name": out.to_name,
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": brush.mask_to_rle(mask),
            "brushlabels": [label] if label else [],
        },
        "score": float(score),
        "type": "brushlabels",
        "readonly": False,
    }


def polygon_regions(mask: np.ndarray, score: float, out: Control, label: str | None) -> list:
    """One polygon region per outer contour of ``mask`` (largest first), points in percent."""
    import cv2

    from ...masks import mask_to_polygons

    h, w = mask.shape
    regions = []
    for poly in mask_to_polygons(mask):
        if cv2.contourArea(poly.astype(np.float32)) < MIN_POLYGON_AREA and regions:
            continue
        pts = [[round(x * 100.0 / w, 4), round(y * 100.0 / h, 4)] for x, y in poly.tolist()]
        regions.append(
            {
                "id": _region_id(),
                "from_name": out.name,
                "to_name": out.to_name,
                "original_width": int(w),
                "original_height": int(h),
                "image_rotation": 0,
                "value": {
                    "points": pts,
                    "closed": True,
                    "polygonlabels": [label] if label else [],
                },
                "score": float(score),
                "type": "polygonlabels",
                "readonly": False,
            }
        )
    return regions


def regions_for(mask: np.ndarray, score: float, out: Control, label: str | None) -> list:
    """The regions of one mask (none when empty); the score (SAM's predicted IoU, which
    can pass 1) is clipped to 0..1 for Label Studio's display."""
    if not mask.any():
        return []
    score = min(1.0, max(0.0, float(score)))
    if out.tag == "PolygonLabels":
        return polygon_regions(mask, score, out, label)
    return [brush_region(mask, score, out, label)]


def prediction(regions: list[dict], version: str) -> dict[str, Any]:
    scores = [r["score"] for r in regions]
    return {
        "result": regions,
        "score": float(np.mean(scores)) if scores else 0.0,
        "model_version": version,
    }


# -- the model ---------------------------------------------------------------------------------
def interactive(
    session: Any, rgb: np.ndarray, prompt: Prompt, out: Control
) -> tuple[list[dict], dict[str, Any]]:
    """One mask for the user's prompts; ``(regions, details)``. Negative keypoints alone
    select nothing: no region (SAM given only background points returns noise)."""
    label = out.label_for(prompt.label)
    if prompt.negative_only:
        return [], {"note": "only negative keypoints: nothing selected"}
    mask, score = session.best_mask(rgb, points=prompt.points, labels=prompt.labels, box=prompt.box)
    return regions_for(mask, score, out, label), {"score": score, "pixels": int(mask.sum())}


def preannotate(
    session: Any,
    rgb: np.ndarray,
    config: LabelConfig,
    out: Control,
    mode: str,
    everything: dict[str, Any] | None = None,
) -> tuple[list[dict], str]:
    """Regions for a whole task; ``(regions, what was run)``. ``everything``: settings of
    the mask generator (:class:`segany.everything.MaskGenerator` keywords; default the
    ``fast`` preset)."""
    if mode == "off":
        return [], "off"
    use_text = mode == "text" or (mode == "auto" and getattr(session, "detector_name", None))
    if use_text:
        queries = sorted({q for q in (*out.labels, *out.aliases) if q})
        if not queries:
            raise Unprocessable("text pre-annotation needs labels in the output control")
        found = session.segment_text(rgb, ", ".join(queries))
        names = found.label_names
        order = np.argsort(-np.asarray(found.scores))[:MAX_PREANNOTATIONS]
        regions: list[dict] = []
        for i in order.tolist():
            regions += regions_for(found.masks[i], float(found.scores[i]), out,
                                   out.label_for(names[i]))  # fmt: skip
        return regions, f"text ({len(queries)} labels)"
    from ...everything import MaskGenerator

    session.embedding(rgb)  # computed once, under the session's thread settings
    kw = {"preset": "fast", "max_masks": MAX_PREANNOTATIONS, **(everything or {})}
    gen = MaskGenerator(session.predictor(), **kw)
    records = gen.generate(rgb)
    records.sort(key=lambda r: -r["predicted_iou"])
    label = out.label_for(None)
    regions = []
    for r in records[:MAX_PREANNOTATIONS]:
        regions += regions_for(r["segmentation"], r["predicted_iou"], out, label)
    return regions, "everything"
