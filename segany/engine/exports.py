"""The annotator's exports (COCO through the one COCO writer, SA-1B, YOLO and GeoPackage
zips; the videos' tracks as COCO video JSON and DAVIS PNGs through the writers of
``segany track``, :mod:`segany.video.outputs`) and its COCO import. A part of
:class:`~.service.AnnotationService`.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..validate import InputError, check_score, dumps, segmentation_to_rle
from .annotations import _text_prompt
from .images import safe_relpath
from .schemas import MAX_CATEGORY, BadRequest, ImportOut, Unprocessable, UserRef, _clean_category
from .store import Annotation, Image


# -- helpers ---------------------------------------------------------------------------------
def _finite_or_none(value: float | None, default: float) -> float | None:
    """A stored score for export: ``default`` when unset, None when not finite."""
    if value is None:
        return default
    return float(value) if np.isfinite(value) else None


class ExportsMixin:
    """Exports and import of :class:`~.service.AnnotationService` (its state is set up
    there)."""

    # -- export / import ---------------------------------------------------------------------
    def _export_rows(
        self, statuses: list[str]
    ) -> tuple[list[Image], dict[int, list[Annotation]], dict[str, int]]:
        anns = self.store.annotations(statuses=statuses)
        by_image: dict[int, list[Annotation]] = {}
        for a in anns:
            by_image.setdefault(a.image_id, []).append(a)
        images = [im for im in self.store.images() if im.status == "ok" or im.id in by_image]
        # class ids in order of first use (the store's categories table): stable across
        # exports whatever classes are added later
        ids = {name: cid for cid, name in self.store.category_table()}
        for c in sorted({a.category for a in anns} - ids.keys()):  # not registered (old rows)
            ids[c] = max(ids.values(), default=0) + 1
        return images, by_image, ids

    @staticmethod
    def _record(a: Annotation) -> dict[str, Any]:
        h, w = a.segmentation["size"]
        prompt = a.prompt or {}
        return {
            "segmentation": a.segmentation,
            "area": a.area,
            "bbox": a.bbox,
            # a row stored with a non-finite number (by an older segany or by hand) exports
            # it as null rather than failing the export for everyone
            "predicted_iou": _finite_or_none(a.score, 1.0),
            "stability_score": _finite_or_none(a.stability, 1.0),
            "crop_box": [0.0, 0.0, float(w), float(h)],
            "point_coords": prompt.get("points") or [],
        }

    def export_coco(self, include_pending: bool = False) -> dict[str, Any]:
        """COCO instances JSON of the accepted objects (and pending ones if asked), one
        category per label; images without objects are listed too."""
        from ..datasets.coco import CocoWriter

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        images, by_image, cat_ids = self._export_rows(statuses)
        used = {a.category for anns in by_image.values() for a in anns}
        writer = CocoWriter(  # the classes of these objects, with their stable ids
            [
                {"id": i, "name": c, "supercategory": "object"}
                for c, i in cat_ids.items()
                if c in used
            ],
            extra_keys=("attributes",),
        )
        order: list[Annotation] = []
        for im in images:
            anns = by_image.get(im.id, [])
            records = []
            for a in anns:
                rec = self._record(a)
                rec["category_id"] = cat_ids[a.category]
                rec["attributes"] = {"status": a.status, "stage": a.stage, "source": a.source}
                text = _text_prompt(a)
                if text:  # pre-filled by class name: the detector's view of it
                    rec["attributes"]["detector_score"] = text.get("score")
                    rec["attributes"]["phrase"] = text.get("phrase")
                records.append(rec)
            writer.add(records, file_name=im.path, width=im.width, height=im.height, image_id=im.id)
            order.extend(anns)
        data = writer.to_dict()
        data["info"] = {"description": "segany annotate", "model": self.model_name}
        for out, a in zip(data["annotations"], order, strict=True):
            out["id"] = a.id  # the annotator's ids, stable across exports
            out.setdefault("score", None)  # stored non-finite: null
        return data

    def export_sa1b(self, include_pending: bool = False) -> bytes:
        """A zip of SA-1B per-image JSON files (``<image path>.json``)."""
        from ..datasets.sa1b import to_sa1b

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        images, by_image, _ = self._export_rows(statuses)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for im in images:
                anns = by_image.get(im.id, [])
                data = to_sa1b(
                    [self._record(a) for a in anns],
                    image_id=im.id,
                    file_name=im.path,
                    width=im.width,
                    height=im.height,
                )
                for out, a in zip(data["annotations"], anns, strict=True):
                    out["id"] = a.id
                    out["category"] = a.category
                z.writestr(f"{im.path}.json", dumps(data))
        return buf.getvalue()

    def export_gpkg(self, include_pending: bool = False) -> bytes:
        """A zip of one GeoPackage per georeferenced image: its objects as polygons in the
        image's CRS (see :func:`segany.engine.georaster.export_gpkg`)."""
        from . import georaster

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        images, by_image, _ = self._export_rows(statuses)
        rows = [(im.path, by_image.get(im.id, [])) for im in images]
        return georaster.export_gpkg(self.root, rows)

    def export_yolo(self, include_pending: bool = False) -> bytes:
        """A zip in the YOLO-seg layout: ``labels/<image path without suffix>.txt`` (one
        polygon per object, class ids in ``classes.txt``) and ``data.yaml``."""
        from ..datasets.yolo import yolo_lines

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        images, by_image, cat_ids = self._export_rows(statuses)
        cats = list(cat_ids)  # in id order: a class's index never shifts
        cls = {c: i for i, c in enumerate(cats)}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for im in images:
                lines: list[str] = []
                for a in by_image.get(im.id, []):
                    lines += yolo_lines([self._record(a)], class_id=cls[a.category])
                stem = PurePosixPath(im.path).with_suffix("")
                z.writestr(f"labels/{stem}.txt", "\n".join(lines) + ("\n" if lines else ""))
            z.writestr("classes.txt", "\n".join(cats) + ("\n" if cats else ""))
            names = "\n".join(f"  {i}: {json.dumps(c)}" for c, i in cls.items())
            z.writestr("data.yaml", f"path: .\ntrain: images\nval: images\nnames:\n{names}\n")
        return buf.getvalue()

    def _video_results(self, include_pending: bool) -> list[tuple[Any, list[Any], Any]]:
        """Per video with tracks of these statuses: the video row, its tracks and their
        masks as a :class:`~segany.video.tracker.TrackResult` (object ids = the tracks'
        DAVIS values)."""
        from ..video.tracker import TrackResult

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        by_video: dict[int, list[Any]] = {}
        for t in self.video_store.tracks(statuses=statuses):
            by_video.setdefault(t.video_id, []).append(t)
        out = []
        for v in self.video_store.videos():
            tracks = by_video.get(v.id)
            if not tracks:
                continue
            result = TrackResult(list(v.names), (v.height, v.width), [t.object_id for t in tracks])
            obj = {t.id: t.object_id for t in tracks}
            for r in self.video_store.frames(obj):
                if r.frame < v.length:
                    result.masks.setdefault(r.frame, {})[obj[r.track_id]] = r.segmentation
                    result.scores.setdefault(r.frame, {})[obj[r.track_id]] = r.score
            out.append((v, tracks, result))
        return out

    def export_video(self, include_pending: bool = False) -> dict[str, Any]:
        """The accepted tracks (and pending ones if asked) as COCO video JSON in the
        YouTube-VIS layout ``segany track`` writes (:func:`segany.video.outputs.to_video_json`),
        all videos in one file: ``videos`` (with ``file_names`` and ``source``), one
        annotation per track (its id; ``track_id`` = its DAVIS value) with per-frame RLE
        segmentations, areas, boxes and scores (``null`` where absent), categories from the
        label set."""
        from ..video.outputs import to_video_json

        ids = {name: cid for cid, name in self.store.category_table()}
        data: dict[str, Any] = {"videos": [], "annotations": [], "categories": []}
        used: set[str] = set()
        for v, tracks, result in self._video_results(include_pending):
            one = to_video_json(
                result, name=v.path, file_names=list(v.files), source=str(self.root / v.path)
            )
            data["videos"].append({**one["videos"][0], "id": v.id})
            for ann, t in zip(one["annotations"], tracks, strict=True):
                used.add(t.category)
                ann.update(id=t.id, video_id=v.id, category_id=ids.get(t.category, 0))
                ann["attributes"] = {"status": t.status, "category": t.category}
                data["annotations"].append(ann)
        data["categories"] = [
            {"id": i, "name": c, "supercategory": "object"} for c, i in ids.items() if c in used
        ]
        data["info"] = {"description": "segany annotate (videos)", "model": self.model_name}
        return data

    def export_davis(self, include_pending: bool = False) -> bytes:
        """A zip of DAVIS palette PNGs (:func:`segany.video.outputs.write_davis_png`, as
        ``segany track`` writes): ``Annotations/<video>/<frame name>.png`` for every frame
        of every video with tracks, each pixel its track's ``object_id`` (0: background;
        ``<video>`` is a frames folder's path, a video file's without its suffix)."""
        from ..video.outputs import write_davis_png

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for v, _, result in self._video_results(include_pending):
                folder = v.path if v.kind == "frames" else PurePosixPath(v.path).with_suffix("")
                for i, name in enumerate(result.names):
                    png = io.BytesIO()
                    write_davis_png(png, result.label_map(i))
                    z.writestr(f"Annotations/{folder}/{name}.png", png.getvalue())
        return buf.getvalue()

    def import_coco(
        self, data: dict[str, Any], user: UserRef, status: str = "pending"
    ) -> ImportOut:
        """Load a COCO instances JSON for review: images are matched by ``file_name``
        (relative to the images folder), masks (RLE or polygons) become objects with the
        given status (``pending`` by default) and source ``import``."""
        if status not in ("pending", "accepted"):
            raise BadRequest("status must be 'pending' or 'accepted'")
        from .coco_import import label, read_coco

        known = {im.path: im for im in self.store.images()}
        items = []
        skipped = 0
        try:
            coco = read_coco(
                data,
                known,
                self.root,
                clean_category=_clean_category,
                safe_relpath=safe_relpath,
                max_category=MAX_CATEGORY,
            )
            for i, a, category, im in coco.annotations():  # one at a time: see coco_import
                what = f"{label(i, a)}: segmentation"
                enc = segmentation_to_rle(a["segmentation"], im.height, im.width, what=what)
                area = int(mask_utils.area(enc))
                if area == 0:
                    skipped += 1
                    continue
                items.append(
                    {
                        "image_id": im.id,
                        "category": category,
                        "status": status,
                        "stage": im.stage,
                        "source": "import",
                        "segmentation": {
                            "size": [im.height, im.width],
                            "counts": enc["counts"].decode("ascii"),
                        },
                        "bbox": [float(v) for v in mask_utils.toBbox(enc)],
                        "area": area,
                        "score": check_score(a.get("score")),
                        "model_id": None,
                        "user_id": user.id,
                        "clicks": 0,
                        "seconds": None,
                    }
                )
        except (InputError, ValueError) as exc:
            msg = str(exc)  # a value can be long (a 4,000-digit id): kept short
            msg = msg if len(msg) <= 300 else msg[:297] + "..."
            raise Unprocessable(f"COCO import refused: {msg}") from None
        skipped += coco.skipped_annotations
        matched = coco.matched
        skipped_images = coco.skipped_images
        ev = {"kind": "import", "user_id": user.id, "data": {"annotations": len(items)}}
        self.store.add_annotations(items, [ev])
        return ImportOut(
            images=len(matched),
            annotations=len(items),
            skipped_images=skipped_images[:100],
            skipped_annotations=skipped,
        )
