"""Zero-shot evaluation protocols over any dataset segany reads.

A dataset is anything :func:`segany.datasets.open_dataset` reads: typically a folder with
``images/`` and ``annotations.json`` (COCO "instances": RLE, compressed or not, or
polygons), also SA-1B files or tars and ``segany label`` outputs. Each runner takes a
:class:`~segany.predictor.Predictor`, embeds every image once and batches the prompts of
an image through :meth:`~segany.predictor.Predictor.predict_batch`; it returns a plain
dict of figures (the content of ``results.json``) whose per-mask details sit under the key
``"per_mask"``.

- :func:`run_points`: simulated clicks (:mod:`segany.eval.clicks`); mIoU after 1..N clicks,
  at one click both "auto" (highest predicted IoU of the three outputs) and "oracle" (best
  of the three against ground truth); later clicks use single output with the previous
  low-res logits fed back as ``mask_input``.
- :func:`run_boxes`: the ground-truth box (optionally jittered), single output.
- :func:`run_proposals`: segment-everything, class-agnostic mask recall (COCOeval).
- :func:`run_instances`: detector boxes -> masks -> mask AP (COCOeval).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import masks as M
from ..datasets import DatasetError, ImageRecord, open_dataset, to_coco
from ..predictor import Predictor
from . import metrics as MT
from .clicks import Click, ClickSampler

#: Click counts reported under ``results["miou"]`` (those within ``max_clicks``).
REPORTED_CLICKS = (1, 2, 3, 5, 9)
#: Prompts decoded per call; the masks are upsampled to image size, which bounds memory.
DEFAULT_BATCH = 16

Progress = Callable[[int], None]


# -- dataset ---------------------------------------------------------------------------------
class CocoDataset:
    """A dataset to evaluate on, read by :func:`segany.datasets.open_dataset` (COCO, SA-1B
    loose or in shards, a ``segany label`` output, the annotator's store) and indexed by
    pycocotools for COCOeval.

    ``source`` is the folder or file (for COCO, images are looked up in ``images/``
    beside the annotations file, or beside it); ``images`` overrides the image folder.
    COCO ground truth keeps the file's areas and boxes (COCO's areas are polygon areas).
    Crowd annotations (``iscrowd`` = 1) are not prompted but stay in the ground truth that
    COCOeval sees.
    """

    def __init__(
        self, source: str | Path, images: str | Path | None = None, *, kind: str = "auto"
    ) -> None:
        from pycocotools.coco import COCO

        ds = open_dataset(source, images=images, kind=kind)
        data = to_coco(ds.images, categories=ds.categories, file_values=True)
        known = {c["id"] for c in data["categories"]}
        used = sorted({a["category_id"] for a in data["annotations"]} - known)
        data["categories"] += [{"id": c, "name": "object"} for c in used]
        self.name = ds.name
        self.path = Path(source)
        self.kind = ds.kind
        self.images: list[ImageRecord] = ds.images
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def __len__(self) -> int:
        return len(self.images)

    def annotations(self, image_id: int, *, crowd: bool = False) -> list[dict[str, Any]]:
        """The annotations of one image, in file order; crowd ones only if ``crowd``."""
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if crowd or not a.get("iscrowd", 0)]

    def select(self, limit: int | None) -> list[ImageRecord]:
        """The first ``limit`` images (all with ``None``)."""
        return self.images if limit is None else self.images[: max(0, limit)]

    def count_masks(self, images: list[ImageRecord]) -> int:
        return sum(len(self.annotations(im.image_id)) for im in images)

    def load(self, image: ImageRecord) -> np.ndarray:
        """The image as RGB; :class:`DatasetError` when it is not the annotated size."""
        return image.load()

    def iter_images(
        self, images: list[ImageRecord]
    ) -> Iterator[tuple[ImageRecord, np.ndarray, list[dict[str, Any]], np.ndarray]]:
        """``(image, rgb, annotations, masks (M, H, W))`` for each image, skipping none (an
        image without annotations gives ``M`` = 0); crowd regions are left out."""
        for im in images:
            anns = self.annotations(im.image_id)
            rgb = self.load(im)
            keep = [i for i, a in enumerate(im.annotations) if not a.iscrowd]
            yield im, rgb, anns, im.masks(keep)


def _area(ann: dict[str, Any], gt: np.ndarray) -> float:
    return float(ann["area"]) if "area" in ann else float(gt.sum())


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _base(
    protocol: str, dataset: CocoDataset, model: str, images: list[ImageRecord]
) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "dataset": dataset.name,
        "dataset_path": str(dataset.path),
        "model": model,
        "images": len(images),
    }


def _timing(result: dict[str, Any], start: float, n_images: int) -> None:
    seconds = time.perf_counter() - start
    result["seconds"] = round(seconds, 2)
    result["seconds_per_image"] = round(seconds / max(1, n_images), 3)


# -- points ----------------------------------------------------------------------------------
def _click_arrays(clicks: list[list[Click]]) -> tuple[np.ndarray, np.ndarray]:
    coords = np.array([[[c.x, c.y] for c in seq] for seq in clicks], dtype=np.float64)
    labels = np.array([[c.label for c in seq] for seq in clicks], dtype=np.int64)
    return coords, labels


def click_image(
    predictor: Predictor,
    gts: np.ndarray,
    *,
    max_clicks: int = 9,
    sampler: ClickSampler | None = None,
    feedback: bool = True,
    batch_size: int = DEFAULT_BATCH,
) -> dict[str, np.ndarray]:
    """Simulate clicks on every ground-truth mask ``gts`` ``(M, H, W)`` of the image set in
    ``predictor``.

    Returns ``iou`` ``(M, max_clicks)`` (column 0: the "auto" mask of the first click),
    ``oracle_iou_1`` ``(M,)``, ``scores_1`` ``(M, 3)`` predicted IoUs of the first click,
    ``ious_1`` ``(M, 3)`` their true IoUs, and ``clicks`` ``(M, max_clicks, 3)`` as
    ``(x, y, label)`` (-1 rows after a mask was matched exactly and needed no more clicks).
    """
    sampler = sampler or ClickSampler()
    m = len(gts)
    iou = np.zeros((m, max_clicks))
    ious_1 = np.zeros((m, 3))
    scores_1 = np.zeros((m, 3))
    clicks_out = np.full((m, max_clicks, 3), -1, dtype=np.int64)
    if m == 0:
        return {
            "iou": iou,
            "oracle_iou_1": np.zeros(0),
            "scores_1": scores_1,
            "ious_1": ious_1,
            "clicks": clicks_out,
        }
    h, w = gts.shape[1:]
    preds = np.zeros((m, h, w), dtype=bool)
    side = predictor.model.prompt_encoder.mask_input_size
    logits = np.zeros((m, 1, *side), dtype=np.float32)
    seqs: list[list[Click]] = [[sampler.first(g)] for g in gts]
    # click 1: three candidates; "auto" keeps the one with the highest predicted IoU
    for sl in _chunks(m, batch_size):
        coords, labels = _click_arrays(seqs[sl])
        out = predictor.predict_batch(
            point_coords=coords, point_labels=labels, multimask_output=True
        )
        cand = MT.batch_iou(out.masks, gts[sl, None])
        best = out.scores.argmax(axis=1)
        rows = np.arange(len(best))
        ious_1[sl] = cand
        scores_1[sl] = out.scores
        iou[sl, 0] = cand[rows, best]
        preds[sl] = out.masks[rows, best]
        logits[sl, 0] = out.low_res_logits[rows, best]
    active = np.arange(m)
    for k in range(1, max_clicks):
        nxt = []
        for i in active:
            c = sampler.next(gts[i], preds[i])
            if c is None:  # matched exactly: nothing left to correct
                iou[i, k:] = iou[i, k - 1]
                continue
            seqs[i].append(c)
            nxt.append(i)
        active = np.asarray(nxt, dtype=np.int64)
        if len(active) == 0:
            break
        for sl in _chunks(len(active), batch_size):
            idx = active[sl]
            coords, labels = _click_arrays([seqs[i] for i in idx])
            out = predictor.predict_batch(
                point_coords=coords,
                point_labels=labels,
                mask_input=logits[idx] if feedback else None,
                multimask_output=False,
            )
            iou[idx, k] = MT.batch_iou(out.masks[:, 0], gts[idx])
            preds[idx] = out.masks[:, 0]
            logits[idx, 0] = out.low_res_logits[:, 0]
    for i, seq in enumerate(seqs):
        for k, c in enumerate(seq):
            clicks_out[i, k] = (c.x, c.y, c.label)
    return {
        "iou": iou,
        "oracle_iou_1": ious_1.max(axis=1),
        "scores_1": scores_1,
        "ious_1": ious_1,
        "clicks": clicks_out,
    }


def run_points(
    predictor: Predictor,
    dataset: CocoDataset,
    *,
    model: str = "model",
    max_clicks: int = 9,
    clicks: str = "center",
    seed: int = 0,
    feedback: bool = True,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Point protocol over the dataset (see the module doc). ``clicks``: ``"center"`` or
    ``"random"`` (seeded by ``seed``). ``progress`` is called with the number of masks done
    after each image."""
    if max_clicks < 1:
        raise ValueError("max_clicks must be at least 1")
    sampler = ClickSampler(clicks, seed)
    images = dataset.select(limit)
    start = time.perf_counter()
    per_mask: list[dict[str, Any]] = []
    all_iou = []
    oracle = []
    areas = []
    for im, rgb, anns, gts in dataset.iter_images(images):
        if len(anns):
            predictor.set_image(rgb)
            r = click_image(
                predictor,
                gts,
                max_clicks=max_clicks,
                sampler=sampler,
                feedback=feedback,
                batch_size=batch_size,
            )
            for j, ann in enumerate(anns):
                area = _area(ann, gts[j])
                areas.append(area)
                all_iou.append(r["iou"][j])
                oracle.append(float(r["oracle_iou_1"][j]))
                per_mask.append(
                    {
                        "image_id": im.image_id,
                        "ann_id": ann.get("id"),
                        "area": area,
                        "iou": [round(float(v), 5) for v in r["iou"][j]],
                        "ious_1": [round(float(v), 5) for v in r["ious_1"][j]],
                        "scores_1": [round(float(v), 5) for v in r["scores_1"][j]],
                        "clicks": [list(map(int, c)) for c in r["clicks"][j] if c[2] >= 0],
                    }
                )
        if progress is not None:
            progress(len(anns))
    ious = np.asarray(all_iou).reshape(-1, max_clicks)
    result = _base("points", dataset, model, images)
    per_click = [MT.miou(ious[:, k]) for k in range(max_clicks)]
    shown = sorted({k for k in REPORTED_CLICKS if k <= max_clicks} | {max_clicks})
    result.update(
        {
            "masks": len(per_mask),
            "clicks": clicks,
            "seed": seed if clicks == "random" else None,
            "feedback": feedback,
            "max_clicks": max_clicks,
            "miou": {str(k): _r(per_click[k - 1]) for k in shown},
            "oracle_miou_1": _r(MT.miou(oracle)),
            "miou_per_click": [_r(v) for v in per_click],
            "miou_by_size_1": _r_sizes(MT.miou_by_size(ious[:, 0].tolist(), areas)),
            "oracle_miou_by_size_1": _r_sizes(MT.miou_by_size(oracle, areas)),
            # clicks to reach 85 / 90 % IoU (capped at max_clicks; meaningless for 1 click)
            "noc85": _r(MT.noc(ious, 0.85)) if max_clicks > 1 else None,
            "noc90": _r(MT.noc(ious, 0.90)) if max_clicks > 1 else None,
        }
    )
    _timing(result, start, len(images))
    result["per_mask"] = per_mask
    return result


# -- boxes -----------------------------------------------------------------------------------
def xywh_to_xyxy(bbox: Any) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x, y, x + w, y + h])


def jitter_boxes(
    boxes: np.ndarray,
    rng: np.random.Generator,
    scale: float,
    max_shift: float = 20.0,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Each coordinate of XYXY ``boxes`` moved by Gaussian noise of standard deviation
    ``scale`` x the box side (width for x, height for y), at most ``max_shift`` pixels (the
    SAM paper's box noise: 10% of the side, up to 20 px); clipped to the image ``(H, W)``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if scale <= 0:
        return b.copy()
    side = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]] * 2, axis=1)
    noise = rng.normal(size=b.shape) * scale * side
    out = b + np.clip(noise, -max_shift, max_shift)
    x0 = np.minimum(out[:, 0], out[:, 2])
    x1 = np.maximum(out[:, 0], out[:, 2])
    y0 = np.minimum(out[:, 1], out[:, 3])
    y1 = np.maximum(out[:, 1], out[:, 3])
    out = np.stack([x0, y0, x1, y1], axis=1)
    if size is not None:
        h, w = size
        for lo, hi, side in ((0, 2, w), (1, 3, h)):
            out[:, [lo, hi]] = out[:, [lo, hi]].clip(0, side)
            thin = out[:, hi] - out[:, lo] < 1  # pushed off the image: keep 1 px inside
            centre = ((out[thin, lo] + out[thin, hi]) / 2).clip(0.5, max(0.5, side - 0.5))
            out[thin, lo], out[thin, hi] = centre - 0.5, centre + 0.5
    return out


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of a mask in pixel-edge coordinates ``(x0, y0, x1 + 1, y1 + 1)``, as a
    COCO ``bbox`` of a mask gives."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def run_boxes(
    predictor: Predictor,
    dataset: CocoDataset,
    *,
    model: str = "model",
    jitter: float = 0.0,
    max_shift: float = 20.0,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Box protocol: each mask's ground-truth box (the annotation's ``bbox``, else the
    mask's extent), optionally jittered, single output."""
    rng = np.random.default_rng(seed)
    images = dataset.select(limit)
    start = time.perf_counter()
    per_mask: list[dict[str, Any]] = []
    ious: list[float] = []
    areas: list[float] = []
    for im, rgb, anns, gts in dataset.iter_images(images):
        if len(anns):
            predictor.set_image(rgb)
            boxes = np.stack(
                [
                    xywh_to_xyxy(a["bbox"]) if "bbox" in a else box_from_mask(g)
                    for a, g in zip(anns, gts)
                ]
            )
            boxes = jitter_boxes(boxes, rng, jitter, max_shift, size=rgb.shape[:2])
            got = np.zeros(len(anns))
            for sl in _chunks(len(anns), batch_size):
                out = predictor.predict_batch(boxes=boxes[sl], multimask_output=False)
                got[sl] = MT.batch_iou(out.masks[:, 0], gts[sl])
            for j, ann in enumerate(anns):
                area = _area(ann, gts[j])
                areas.append(area)
                ious.append(float(got[j]))
                per_mask.append(
                    {
                        "image_id": im.image_id,
                        "ann_id": ann.get("id"),
                        "area": area,
                        "box": [round(float(v), 2) for v in boxes[j]],
                        "iou": round(float(got[j]), 5),
                    }
                )
        if progress is not None:
            progress(len(anns))
    result = _base("boxes", dataset, model, images)
    result.update(
        {
            "masks": len(per_mask),
            "jitter": jitter,
            "max_shift": max_shift if jitter > 0 else None,
            "seed": seed if jitter > 0 else None,
            "miou": _r(MT.miou(ious)),
            "miou_by_size": _r_sizes(MT.miou_by_size(ious, areas)),
            "iou_above_50": _r(MT.fraction_above(ious, 0.5)),
            "iou_above_75": _r(MT.fraction_above(ious, 0.75)),
            "iou_above_90": _r(MT.fraction_above(ious, 0.9)),
        }
    )
    _timing(result, start, len(images))
    result["per_mask"] = per_mask
    return result


# -- COCOeval --------------------------------------------------------------------------------
AR_NAMES = ("ar_10", "ar_100", "ar_1000", "ar_small", "ar_medium", "ar_large")
AP_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def coco_evaluate(
    dataset: CocoDataset,
    results: list[dict[str, Any]],
    image_ids: list[int],
    *,
    iou_type: str = "segm",
    use_cats: bool = True,
    max_dets: tuple[int, int, int] = (1, 10, 100),
) -> tuple[np.ndarray, Any]:
    """COCOeval ``stats`` (12 numbers, fractions; -1 where undefined) and the evaluator."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = dataset.coco.loadRes(results) if results else _empty_results(dataset)
        ev = COCOeval(dataset.coco, dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.params.useCats = int(use_cats)
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev


def _empty_results(dataset: CocoDataset) -> Any:
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {
        "images": list(dataset.coco.dataset["images"]),
        "categories": list(dataset.coco.dataset["categories"]),
        "annotations": [],
    }
    dt.createIndex()
    return dt


def _pct(v: float) -> float | None:
    return None if v < 0 else _r(v * 100.0)


# -- proposals -------------------------------------------------------------------------------
def run_proposals(
    predictor: Predictor,
    dataset: CocoDataset,
    *,
    model: str = "model",
    preset: str = "reference",
    overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
    generator: Any = None,
) -> dict[str, Any]:
    """Segment everything in each image; class-agnostic mask recall with COCOeval (segm,
    ``useCats`` = 0, maxDets 10/100/1000, score = predicted IoU), plus the mean over ground
    truth masks of the best proposal's IoU ("best-proposal mIoU").

    The proposals come from a :class:`~segany.everything.MaskGenerator` over ``predictor``
    with ``preset`` and ``overrides``, or from ``generator``: any object whose
    ``generate(rgb)`` returns records with ``segmentation`` (COCO RLE) and
    ``predicted_iou`` (the preset is then reported as ``"custom"``)."""
    if generator is None:
        from ..everything import MaskGenerator

        gen = MaskGenerator(predictor, preset=preset, output_mode="coco_rle", **(overrides or {}))
    else:
        gen, preset = generator, "custom"
    images = dataset.select(limit)
    start = time.perf_counter()
    dets: list[dict[str, Any]] = []
    best: list[float] = []
    areas: list[float] = []
    per_image = []
    for im, rgb, anns, gts in dataset.iter_images(images):
        records = gen.generate(rgb)
        for rec in records:
            dets.append(
                {
                    "image_id": im.image_id,
                    "category_id": 1,
                    "segmentation": rec["segmentation"],
                    "score": float(rec["predicted_iou"]),
                }
            )
        if len(anns):
            gt_rles = M.masks_to_coco_rle(gts)
            mat = M.mask_iou_matrix(gt_rles, [r["segmentation"] for r in records])
            top = mat.max(axis=1) if mat.shape[1] else np.zeros(len(anns))
            best.extend(float(v) for v in top)
            areas.extend(_area(a, g) for a, g in zip(anns, gts))
        per_image.append({"image_id": im.image_id, "proposals": len(records), "masks": len(anns)})
        if progress is not None:
            progress(1)
    seconds_gen = time.perf_counter() - start
    stats, ev = coco_evaluate(
        dataset, dets, [im.image_id for im in images], use_cats=False, max_dets=(10, 100, 1000)
    )
    result = _base("proposals", dataset, model, images)
    result.update(
        {
            "masks": dataset.count_masks(images),
            "proposals": len(dets),
            "preset": preset,
            "settings": _settings_dict(getattr(gen, "settings", None)),
            **{name: _pct(float(v)) for name, v in zip(AR_NAMES, stats[6:12])},
            "best_proposal_miou": _r(MT.miou(best)),
            "best_proposal_miou_by_size": _r_sizes(MT.miou_by_size(best, areas)),
            "recall_vs_iou": _recall_curve(ev),
            "generate_seconds": round(seconds_gen, 2),
        }
    )
    _timing(result, start, len(images))
    result["per_image"] = per_image
    return result


def _settings_dict(settings: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else {}


def _recall_curve(ev: Any) -> dict[str, list[float]]:
    """Recall (percent) at each IoU threshold 0.50:0.95, all areas, the largest maxDets."""
    rec = ev.eval["recall"][:, :, 0, -1]  # (T, K, A, M) -> (T, K)
    vals = [float(np.mean(r[r > -1])) * 100 if (r > -1).any() else float("nan") for r in rec]
    return {
        "iou": [round(float(t), 2) for t in ev.params.iouThrs],
        "recall": [_r(v) for v in vals],
    }


# -- instances from detector boxes -----------------------------------------------------------
def load_detections(
    source: str | Path, dataset: CocoDataset, *, score_thresh: float = 0.0
) -> list[dict[str, Any]]:
    """COCO results JSON (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``) -> the
    detections on images of ``dataset`` with ``score`` >= ``score_thresh``. ``"gt"`` makes
    detections from the ground-truth boxes (score 1; an upper bound for the box source)."""
    if str(source) == "gt":
        return [
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": list(a["bbox"]),
                "score": 1.0,
            }
            for im in dataset.images
            for a in dataset.annotations(im.image_id)
        ]
    path = Path(source)
    try:
        dets = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read detections {path}: {exc}") from exc
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list):
        raise DatasetError(f"{path}: expected a COCO results list of detections")
    known = {im.image_id for im in dataset.images}
    out = []
    for d in dets:
        try:
            if d["image_id"] in known and float(d.get("score", 1.0)) >= score_thresh:
                out.append(
                    {
                        "image_id": d["image_id"],
                        "category_id": d["category_id"],
                        "bbox": [float(v) for v in d["bbox"]],
                        "score": float(d.get("score", 1.0)),
                    }
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: malformed detection {d!r}: {exc}") from exc
    return out


def run_instances(
    predictor: Predictor,
    dataset: CocoDataset,
    detections: list[dict[str, Any]],
    *,
    model: str = "model",
    boxes_source: str = "",
    limit: int | None = None,
    max_per_image: int = 100,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Instance segmentation from detector boxes: each box (the ``max_per_image`` highest
    scores of an image) prompts one mask (single output) that keeps the box's category and
    score; mask AP with COCOeval (segm), and the boxes' own AP (bbox) beside it."""
    images = dataset.select(limit)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    used: list[dict[str, Any]] = []
    for im in images:
        dets = sorted(by_image.get(im.image_id, []), key=lambda d: -d["score"])[:max_per_image]
        if dets:
            rgb = dataset.load(im)
            predictor.set_image(rgb)
            h, w = rgb.shape[:2]
            boxes = np.stack([xywh_to_xyxy(d["bbox"]) for d in dets])
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
            ok = (boxes[:, 2] > boxes[:, 0]) | (boxes[:, 3] > boxes[:, 1])
            dets = [d for d, k in zip(dets, ok) if k]
            boxes = boxes[ok]
            for sl in _chunks(len(dets), batch_size):
                out = predictor.predict_batch(boxes=boxes[sl], multimask_output=False)
                rles = M.masks_to_coco_rle(out.masks[:, 0])
                for d, rle in zip(dets[sl], rles):
                    results.append(
                        {
                            "image_id": im.image_id,
                            "category_id": d["category_id"],
                            "segmentation": rle,
                            "score": d["score"],
                        }
                    )
            used.extend(dets)
        if progress is not None:
            progress(1)
    ids = [im.image_id for im in images]
    seg_stats, _ = coco_evaluate(dataset, results, ids, iou_type="segm")
    box_stats, _ = coco_evaluate(dataset, [dict(d) for d in used], ids, iou_type="bbox")
    result = _base("instances", dataset, model, images)
    result.update(
        {
            "masks": dataset.count_masks(images),
            "detections": len(results),
            "boxes": boxes_source,
            **{f"mask_{n}": _pct(float(v)) for n, v in zip(AP_NAMES, seg_stats[:6])},
            **{f"box_{n}": _pct(float(v)) for n, v in zip(AP_NAMES, box_stats[:6])},
        }
    )
    _timing(result, start, len(images))
    return result


# -- rounding --------------------------------------------------------------------------------
def _r(v: float | None, nd: int = 2) -> float | None:
    if v is None or not np.isfinite(v):
        return None
    return round(float(v), nd)


def _r_sizes(d: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {k: {"miou": _r(v["miou"]), "masks": int(v["masks"])} for k, v in d.items()}
