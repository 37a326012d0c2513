"""Text prompts in the style of Grounded-SAM: detector boxes -> batched box prompts -> masks.

>>> from segany.text import TextSegmenter
>>> seg = TextSegmenter.load()                   # MobileSAM + Grounding DINO tiny
>>> result = seg.segment("photo.jpg", "dog . person")
>>> result.phrases, result.scores, result.ious   # one entry per mask

Labeling a set of images with class names is one call that returns COCO JSON with those
categories: :func:`label_with_classes`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .. import masks as M
from .. import transforms as T
from ..datasets.coco import CocoWriter
from ..datasets.records import rle_bbox
from ..predictor import Predictor
from .detectors import DEFAULT_DETECTOR, Detections, Detector, clip_boxes, load_detector

#: Class-wise NMS: a box is dropped when a higher-scoring box of the same class overlaps it
#: with an IoU above this.
NMS_THRESHOLD = 0.5
#: At most this many boxes per image go on to SAM (highest detector scores first).
MAX_DETECTIONS = 100
#: Boxes smaller than this (pixels, either side) after clipping are dropped.
MIN_BOX_SIDE = 1.0
#: Boxes decoded by SAM at once.
BOXES_PER_BATCH = 16

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]


def parse_queries(text: str | Sequence[str]) -> list[str]:
    """``"dog . person"`` (Grounded-SAM's separator; commas work too) or a list of names ->
    class names, stripped, duplicates (ignoring case) removed, order kept."""
    parts = re.split(r"[.,]", text) if isinstance(text, str) else list(text)
    out: list[str] = []
    seen: set[str] = set()
    for p in parts:
        name = " ".join(str(p).split())
        if name and name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    if not out:
        raise ValueError(f"no class names in {text!r}: separate them with ' . '")
    return out


@dataclass(frozen=True)
class TextSegmentation:
    """Masks found for text queries in one image, ordered by detector score.

    masks: ``(N, H, W)`` bool at image size.
    boxes: ``(N, 4)`` the detector's boxes (XYXY image pixels) that prompted SAM.
    scores: ``(N,)`` detector confidence; ious: ``(N,)`` SAM's predicted IoU;
    stability: ``(N,)`` stability score on the decoder's low-res logits.
    labels: ``(N,)`` index into ``queries``; phrases: the detector's phrase per mask.
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    ious: np.ndarray
    stability: np.ndarray
    labels: np.ndarray
    phrases: list[str]
    queries: list[str]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def label_names(self) -> list[str]:
        return [self.queries[i] for i in self.labels.tolist()]

    def records(
        self, output_mode: OutputMode = "binary_mask", *, first_category_id: int = 1
    ) -> list[dict[str, Any]]:
        """One dict per mask in the shape of the mask generator's records (``segmentation``,
        ``area``, ``bbox`` XYWH of the mask by :func:`segany.datasets.rle_bbox`,
        ``predicted_iou``, ``stability_score``) plus
        ``category_id`` (query index + ``first_category_id``), ``label``, ``phrase``,
        ``score`` (detector) and ``box`` (detector box, XYXY); every writer in
        :mod:`segany.datasets` takes them."""
        n = len(self)
        if n == 0:
            return []
        m = torch.from_numpy(self.masks)
        if output_mode == "coco_rle":
            segs: list[Any] = M.masks_to_coco_rle(m)
        elif output_mode == "uncompressed_rle":
            segs = M.masks_to_rle(m)
        elif output_mode == "binary_mask":
            segs = list(self.masks)
        else:
            raise ValueError(f"unknown output_mode {output_mode!r}")
        bboxes = [list(rle_bbox(r)) for r in M.masks_to_coco_rle(m)]
        areas = m.sum((-1, -2)).tolist()
        names = self.label_names
        return [
            {
                "segmentation": segs[i],
                "area": int(areas[i]),
                "bbox": bboxes[i],
                "predicted_iou": float(self.ious[i]),
                "stability_score": float(self.stability[i]),
                "score": float(self.scores[i]),
                "category_id": int(self.labels[i]) + first_category_id,
                "label": names[i],
                "phrase": self.phrases[i],
                "box": [float(v) for v in self.boxes[i]],
            }
            for i in range(n)
        ]

    def add_to(self, writer: CocoWriter, *, file_name: str, image_id: int | None = None) -> int:
        """Add this image and its masks to a COCO writer made by :func:`coco_writer`."""
        h, w = self.image_size
        return writer.add(
            self.records("coco_rle"), file_name=file_name, width=w, height=h, image_id=image_id
        )

    def summary(self) -> list[dict[str, Any]]:
        """JSON-ready description of every mask (no pixels)."""
        return [
            {k: v for k, v in r.items() if k != "segmentation"} for r in self.records("binary_mask")
        ]


class TextSegmenter:
    """Find what text names, then segment it: detector -> class-wise NMS -> SAM box prompts.

    Args:
        predictor: a SAM :class:`~segany.Predictor`.
        detector: anything with the :class:`~segany.text.Detector` interface.
        box_threshold / text_threshold: ``None`` uses the detector's defaults (Grounding
            DINO: 0.3 / 0.25 as in Grounded-SAM; OWLv2: 0.1 / none).
        nms_threshold: class-wise NMS IoU (``1.0`` turns NMS off).
        max_detections: keep at most this many boxes per image (``None``: all).
        multimask_output: ask SAM for three masks per box and keep the best by predicted
            IoU (default: one mask per box, as SAM does for box prompts).
    """

    def __init__(
        self,
        predictor: Predictor,
        detector: Detector,
        *,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        nms_threshold: float = NMS_THRESHOLD,
        max_detections: int | None = MAX_DETECTIONS,
        multimask_output: bool = False,
        boxes_per_batch: int = BOXES_PER_BATCH,
    ) -> None:
        if not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must lie in [0, 1], got {nms_threshold}")
        if max_detections is not None and max_detections < 0:
            raise ValueError(f"max_detections must be >= 0, got {max_detections}")
        self.predictor = predictor
        self.detector = detector
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.multimask_output = multimask_output
        self.boxes_per_batch = max(1, int(boxes_per_batch))

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        detector: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> TextSegmenter:
        """SAM weights by catalogue name or path (default MobileSAM) and a detector by name,
        hub id or folder (default :data:`DEFAULT_DETECTOR`; see
        :func:`~segany.text.load_detector`)."""
        from ..loader import load_predictor
        from ..weights import DEFAULT_WEIGHTS

        det = load_detector(detector or DEFAULT_DETECTOR, device=device)
        pred = load_predictor(model or DEFAULT_WEIGHTS, device=device, cache_dir=cache_dir)
        return cls(pred, det, **kwargs)

    # -- steps -------------------------------------------------------------------------------
    def detect(self, image: T.ImageLike, text: str | Sequence[str]) -> Detections:
        """Detector boxes after clipping, class-wise NMS and the ``max_detections`` cap,
        ordered by decreasing score."""
        rgb = T.load_image(image)
        return self._detect(rgb, parse_queries(text))

    def _detect(self, rgb: np.ndarray, queries: list[str]) -> Detections:
        det = self.detector.detect(
            rgb, queries, box_threshold=self.box_threshold, text_threshold=self.text_threshold
        )
        if len(det) == 0:
            return Detections.empty(queries)
        boxes = clip_boxes(det.boxes, rgb.shape[:2])
        det = Detections(boxes, det.scores, det.labels, det.phrases, queries)
        ok = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & (
            (boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE
        )
        det = det.take(np.flatnonzero(ok))
        keep = class_nms(det, self.nms_threshold)
        if self.max_detections is not None:
            keep = keep[: self.max_detections]
        return det.take(keep)

    def segment(self, image: T.ImageLike, text: str | Sequence[str]) -> TextSegmentation:
        """Detect what ``text`` names (``"dog . person"`` or a list of names) and segment
        each box with SAM."""
        rgb = T.load_image(image)
        queries = parse_queries(text)
        return self.segment_boxes(rgb, self._detect(rgb, queries))

    def segment_boxes(self, image: T.ImageLike, det: Detections) -> TextSegmentation:
        """SAM masks for given detections (image-frame XYXY boxes), in their order."""
        rgb = T.load_image(image)
        h, w = rgb.shape[:2]
        n = len(det)
        if n == 0:
            z = np.zeros(0, np.float64)
            return TextSegmentation(
                masks=np.zeros((0, h, w), bool),
                boxes=np.zeros((0, 4), np.float64),
                scores=z,
                ious=z,
                stability=z,
                labels=np.zeros(0, np.int64),
                phrases=[],
                queries=list(det.queries),
                image_size=(h, w),
            )
        self.predictor.set_image(rgb)
        thr = float(self.predictor.model.mask_threshold)
        masks, ious, stab = [], [], []
        for start in range(0, n, self.boxes_per_batch):
            chunk = det.boxes[start : start + self.boxes_per_batch]
            pred = self.predictor.predict_batch(boxes=chunk, multimask_output=self.multimask_output)
            best = pred.scores.argmax(-1)  # (B,) index 0 when single mask
            rows = np.arange(len(chunk))
            masks.append(pred.masks[rows, best])
            ious.append(pred.scores[rows, best])
            low = torch.from_numpy(pred.low_res_logits[rows, best])
            s = M.stability_score(low, thr, 1.0)
            stab.append(torch.nan_to_num(s, nan=0.0).numpy())
        return TextSegmentation(
            masks=np.concatenate(masks).astype(bool),
            boxes=det.boxes.copy(),
            scores=det.scores.copy(),
            ious=np.concatenate(ious).astype(np.float64),
            stability=np.concatenate(stab).astype(np.float64),
            labels=det.labels.copy(),
            phrases=list(det.phrases),
            queries=list(det.queries),
            image_size=(h, w),
        )


def class_nms(det: Detections, iou_threshold: float) -> np.ndarray:
    """Indices kept by NMS within each class (label), by decreasing score."""
    if len(det) == 0:
        return np.zeros(0, np.int64)
    keep = M.batched_nms(
        torch.as_tensor(det.boxes, dtype=torch.float32),
        torch.as_tensor(det.scores, dtype=torch.float32),
        torch.as_tensor(det.labels, dtype=torch.int64),
        iou_threshold,
    )
    return keep.numpy().astype(np.int64)


def categories_for(classes: Sequence[str]) -> list[dict[str, Any]]:
    """COCO categories, ids from 1 in the order of ``classes``."""
    return [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(classes)]


def coco_writer(classes: str | Sequence[str]) -> CocoWriter:
    """A COCO writer whose categories are ``classes``; annotations also keep the mask's
    ``predicted_iou`` and the detector's ``phrase`` (``score`` is the detector's)."""
    return CocoWriter(
        categories_for(parse_queries(classes)), extra_keys=("predicted_iou", "phrase")
    )


def label_with_classes(
    images: Iterable[T.ImageLike],
    classes: str | Sequence[str],
    *,
    segmenter: TextSegmenter | None = None,
    model: str | os.PathLike[str] | None = None,
    detector: str | os.PathLike[str] = DEFAULT_DETECTOR,
    file_names: Sequence[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    skip_unreadable: bool = False,
    progress: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Label images with class names: COCO "instances" JSON (a dict) whose categories are
    ``classes`` (ids 1..K in their order), one annotation per mask with its category,
    ``score`` = detector confidence, ``predicted_iou``, ``stability_score`` and ``phrase``.

    images: paths, PIL images or arrays. ``file_names`` names them in the JSON (default:
    the path relative to ``root``, else the file name; ``image_<i>.png`` for arrays).
    segmenter: a ready :class:`TextSegmenter`; else one is loaded from ``model``,
    ``detector`` and ``settings`` (thresholds, NMS...).
    skip_unreadable: leave out images that cannot be read (listed in ``info.skipped``)
    instead of raising :class:`~segany.ImageError`.
    """
    queries = parse_queries(classes)
    seg = segmenter or TextSegmenter.load(model, detector, **settings)
    writer = coco_writer(queries)
    skipped: list[dict[str, str]] = []
    items = list(images)
    if file_names is not None and len(file_names) != len(items):
        raise ValueError(f"{len(file_names)} file names for {len(items)} images")
    if progress:
        from tqdm import tqdm

        items_iter: Iterable[Any] = tqdm(items, unit="img", desc="label")
    else:
        items_iter = items
    for i, item in enumerate(items_iter):
        name = file_names[i] if file_names is not None else _file_name(item, i, root)
        try:
            rgb = T.load_image(item)
        except T.ImageError as exc:
            if not skip_unreadable:
                raise
            skipped.append({"file_name": name, "error": str(exc)})
            continue
        seg.segment(rgb, queries).add_to(writer, file_name=name)
    out = writer.to_dict()
    out["info"] = {
        "description": "segany text labels",
        "classes": queries,
        "detector": getattr(seg.detector, "name", type(seg.detector).__name__),
        "box_threshold": seg.box_threshold
        if seg.box_threshold is not None
        else getattr(seg.detector, "default_box_threshold", None),
        "text_threshold": seg.text_threshold
        if seg.text_threshold is not None
        else getattr(seg.detector, "default_text_threshold", None),
        "nms_threshold": seg.nms_threshold,
        "skipped": skipped,
    }
    return out


def _file_name(item: Any, i: int, root: str | os.PathLike[str] | None) -> str:
    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        if root is not None:
            try:
                return p.resolve().relative_to(Path(root).resolve()).as_posix()
            except ValueError:
                pass
        return p.name
    return f"image_{i}.png"
