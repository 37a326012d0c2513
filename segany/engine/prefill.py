"""The annotator's stage 2: pre-fill an image with pending objects from the automatic mask
generator, or from a text detector's boxes by class names. A part of
:class:`~.service.AnnotationService`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pycocotools import mask as mask_utils

from .. import masks as M
from ..runtime import torch_threads
from ..transforms import ImageError
from .images import safe_relpath
from .schemas import Conflict, PrefillOut, PrefillRequest, Unprocessable, UserRef

log = logging.getLogger("segany.engine")


class PrefillMixin:
    """Pre-fills of :class:`~.service.AnnotationService` (its state is set up there)."""

    # -- stage 2 -----------------------------------------------------------------------------
    def _generator(self, req: PrefillRequest) -> Any:
        if self._generator_factory is not None:
            return self._generator_factory(req)
        from ..everything import MaskGenerator

        return MaskGenerator(
            self._new_predictor(),
            preset="fast",
            output_mode="coco_rle",
            points_per_side=max(2, req.points_per_side // 2),
            refine_points_per_side=req.points_per_side,
            pred_iou_thresh=req.pred_iou_thresh,
            stability_score_thresh=req.stability_score_thresh,
            min_mask_region_area=req.min_area,
            max_masks=req.max_masks,
            max_mask_region_fraction=0.95,
        )

    def text_detector(self) -> Any:
        """The text detector for pre-fills by class names, loaded on first use (once).
        Raises :class:`Conflict` when none is configured or it cannot be loaded (missing
        weights: the message says what to download and where)."""
        if self._detector is not None:
            return self._detector
        if self._detector_source is None:
            raise Conflict(
                "pre-filling by class names needs a text detector, and this server has "
                "none: start it with `segany annotate IMAGES_DIR --detector NAME|FOLDER` "
                "(e.g. --detector grounding-dino-tiny; see docs/text.md)"
            )
        with self._detector_lock:
            if self._detector is None:
                from ..text import DetectorError, load_detector

                try:
                    self._detector = load_detector(self._detector_source)
                except DetectorError as exc:
                    raise Conflict(f"the text detector cannot be loaded: {exc}") from None
                self.detector_name = str(getattr(self._detector, "name", self.detector_name))
                log.info("text detector %s loaded", self.detector_name)
            return self._detector

    def _class_labeler(self, req: PrefillRequest, detector: Any) -> Any:
        from ..text import TextSegmenter, parse_queries
        from .label_workers import ClassLabeler

        assert req.classes is not None
        segmenter = TextSegmenter(
            self._new_predictor(),
            detector,
            box_threshold=req.box_threshold,
            text_threshold=req.text_threshold,
            max_detections=req.max_masks,
        )
        return ClassLabeler(segmenter, parse_queries(req.classes))

    def _prefill_model_id(self) -> str:
        """``<SAM model id>+<detector name>`` (the store keeps 64 characters)."""
        return f"{self.model_id}+{self.detector_name}"[:64]

    def prefill(self, image_id: int, req: PrefillRequest, user: UserRef) -> PrefillOut:
        """Stage 2 on one image: segment everything with the given thresholds and add the
        masks as *pending* objects (skipping those that overlap accepted objects). The
        image counts as stage 2 from now on.

        With ``req.classes``, the text detector finds those classes and SAM segments each
        box instead; every mask becomes a pending object with its class as category, SAM's
        predicted IoU as ``score`` and the detector's score and phrase kept in its prompt.
        """
        t0 = time.perf_counter()
        rgb, detector = self._prefill_prepare(image_id, req, user)
        records = self._prefill_generate(rgb, req, detector)
        return self._prefill_save(image_id, req, user, rgb.shape[:2], detector, records, t0)

    def _prefill_prepare(
        self, image_id: int, req: PrefillRequest, user: UserRef
    ) -> tuple[Any, Any]:
        """The checks before any work (the image, its lock, the detector) and the pixels;
        returns ``(rgb, detector or None)``."""
        im = self._image(image_id, usable=True)
        self._check_writable(image_id, user)
        detector = self.text_detector() if req.classes else None  # fails before any work
        emb = self.embedding(im)  # cached: the generator reuses it
        del emb
        path = safe_relpath(self.root, im.path)
        try:
            rgb = self.read_rgb(path)
        except ImageError as exc:
            raise Unprocessable(f"image {im.path} cannot be read: {exc}") from None
        return rgb, detector

    def _prefill_generate(
        self,
        rgb: Any,
        req: PrefillRequest,
        detector: Any,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """The generator's (or the class labeler's) records; ``progress(done, planned)``
        after each batch of points (segment-everything only; it may raise to stop)."""
        with self._prefill_lock:
            if detector is not None:
                gen = self._class_labeler(req, detector)
                with self._decode, torch_threads(self.embed_threads):
                    return gen.generate(rgb)
            gen = self._generator(req)
            with self._decode, torch_threads(self.embed_threads):
                if progress is None:
                    return gen.generate(rgb)
                return gen.generate(rgb, progress=progress)

    def _prefill_save(
        self,
        image_id: int,
        req: PrefillRequest,
        user: UserRef,
        size: tuple[int, int],
        detector: Any,
        records: list[dict[str, Any]],
        t0: float,
    ) -> PrefillOut:
        """Store the records as pending objects (replacing an earlier run's)."""
        h, w = size
        removed = 0
        if req.replace:
            old = self.store.annotations(image_id, statuses=["pending"], source="prefill")
            removed = len(self.store.delete_annotations([a.id for a in old]))
        accepted = self.store.annotations(image_id, statuses=["accepted", "pending"])
        rles = []
        for r in records:
            seg = r["segmentation"]
            if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
                rles.append({"size": list(seg["size"]), "counts": seg["counts"]})
            else:
                from ..datasets import to_coco_rle

                rles.append(to_coco_rle(seg))
        skipped = 0
        keep = list(range(len(records)))
        if accepted and rles:
            iou = M.mask_iou_matrix(rles, [a.segmentation for a in accepted])
            keep = [i for i in keep if iou[i].max() <= req.overlap_iou]
            skipped = len(records) - len(keep)
        items = []
        model_id = self.model_id if detector is None else self._prefill_model_id()
        for i in keep:
            r = records[i]
            enc = {"size": [h, w], "counts": rles[i]["counts"].encode("ascii")}
            area = int(mask_utils.area(enc))
            if area == 0:
                continue  # a box SAM found nothing in: not an object
            prompt: dict[str, Any] = {
                "points": [list(map(float, p)) for p in r.get("point_coords", [])],
                "labels": [1] * len(r.get("point_coords", [])),
                "box": [float(v) for v in r["box"]] if "box" in r else None,
            }
            if detector is not None:
                prompt["text"] = {
                    "class": r["label"],
                    "phrase": r.get("phrase"),
                    "score": float(r["score"]),
                    "detector": self.detector_name,
                }
            items.append(
                {
                    "image_id": image_id,
                    "category": req.category if detector is None else r["label"],
                    "status": "pending",
                    "stage": 2,
                    "source": "prefill",
                    "segmentation": rles[i],
                    "bbox": [float(v) for v in mask_utils.toBbox(enc)],
                    "area": area,
                    "score": float(r.get("predicted_iou", 0.0)),
                    "stability": float(r.get("stability_score", 0.0)),
                    "model_id": model_id,
                    "user_id": None,
                    "clicks": 0,
                    "seconds": None,
                    "prompt": prompt,
                }
            )
        settings = req.model_dump()
        if detector is not None:
            settings["detector"] = self.detector_name
        ev = {
            "kind": "prefill",
            "user_id": user.id,
            "image_id": image_id,
            "stage": 2,
            "data": {**settings, "created": len(items), "skipped_overlap": skipped},
        }
        anns = self.store.add_annotations(items, [ev])
        self.store.update_image(image_id, stage=2)
        names = {u.id: u.name for u in self.store.users()}
        return PrefillOut(
            image_id=image_id,
            created=len(anns),
            skipped_overlap=skipped,
            removed_pending=removed,
            seconds=round(time.perf_counter() - t0, 3),
            settings=settings,
            annotations=[self._ann_out(a, names) for a in anns],
        )
