"""The annotator's objects: accept a mask, list, edit (category, mask), fix, reject, delete
and restore objects, and the events of the measurements. A part of
:class:`~.service.AnnotationService`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pycocotools import mask as mask_utils

from ..validate import InputError, segmentation_to_rle
from . import edits
from .schemas import (
    RLE,
    AcceptRequest,
    AnnotationList,
    AnnotationOut,
    BadRequest,
    Conflict,
    EventOut,
    EventRequest,
    NotFound,
    Unprocessable,
    UpdateRequest,
    UserRef,
)
from .store import STATUSES, Annotation, StoreConflict
from .work_store import RequestRepeat


def _text_prompt(a: Annotation) -> dict[str, Any]:
    """The text part of an annotation's prompt (pre-filled by class name), else ``{}``."""
    prompt = a.prompt if isinstance(a.prompt, dict) else None
    text = prompt.get("text") if prompt else None
    return text if isinstance(text, dict) else {}


def _rle_dict(rle: RLE | dict[str, Any] | list[Any]) -> dict[str, Any] | list[Any]:
    if isinstance(rle, RLE):
        return {"size": list(rle.size), "counts": rle.counts}
    return rle


def canonical_rle(
    rle: RLE | dict[str, Any] | list[Any], size: tuple[int, int], what: str = "segmentation"
) -> tuple[dict, int, list]:
    """Check a client's segmentation (an RLE, compressed or not, or COCO polygons) against
    the image size ``(H, W)`` with :func:`segany.validate.segmentation_to_rle`; returns the
    compressed COCO RLE (``counts`` as str), its area and its XYWH box. Raises
    :class:`Unprocessable` naming ``what``."""
    h, w = size
    try:
        enc = segmentation_to_rle(_rle_dict(rle), h, w, what=what)
    except InputError as exc:
        raise Unprocessable(str(exc)) from None
    area = int(mask_utils.area(enc))
    bbox = [float(v) for v in mask_utils.toBbox(enc)]
    counts = enc["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [h, w], "counts": counts}, area, bbox


class AnnotationsMixin:
    """Objects of :class:`~.service.AnnotationService` (its state is set up there)."""

    # -- objects -----------------------------------------------------------------------------
    def _ann_out(self, a: Annotation, names: dict[int, str] | None = None) -> AnnotationOut:
        if names is None:
            names = {u.id: u.name for u in self.store.users()}
        text = _text_prompt(a)
        return AnnotationOut(
            id=a.id,
            image_id=a.image_id,
            category=a.category,
            status=a.status,
            stage=a.stage,
            source=a.source,
            segmentation=RLE(size=tuple(a.segmentation["size"]), counts=a.segmentation["counts"]),
            bbox=list(a.bbox),
            area=a.area,
            score=a.score,
            stability=a.stability,
            model_id=a.model_id,
            detector_score=text.get("score"),
            phrase=text.get("phrase"),
            user=names.get(a.user_id) if a.user_id is not None else None,
            clicks=a.clicks,
            seconds=a.seconds,
            created_at=a.created_at,
            updated_at=a.updated_at,
        )

    def _chosen_mask(self, req: Any, owner: Any, size: tuple[int, int]) -> tuple:
        """The mask a request names, as ``(rle, area, bbox, score, prompt)``: a kept
        candidate of ``owner`` (``req.mask_id``; an image id, or ``(video id, frame)``) or
        the client's own ``req.segmentation`` at ``size`` (H, W); exactly one of the two,
        and not empty (422 otherwise)."""
        if (req.segmentation is None) == (req.mask_id is None):
            raise Unprocessable("give exactly one of 'segmentation' and 'mask_id'")
        score, prompt = req.score, None
        if req.mask_id is not None:
            cand = self._candidate(req.mask_id, owner)
            rle, area, bbox = cand.rle, cand.area, cand.bbox
            score = cand.score if score is None else score
            prompt = cand.prompt
        else:
            rle, area, bbox = canonical_rle(req.segmentation, size)
        if area == 0:
            raise Unprocessable("the mask is empty")
        return rle, area, bbox, score, prompt

    def accept(
        self, image_id: int, req: AcceptRequest, user: UserRef, key: str | None = None
    ) -> AnnotationOut:
        """Save a mask as an object with a category. It is committed before this returns.
        ``key`` (``Idempotency-Key``): a repeat of a committed accept with the same key is
        answered with that first object, and nothing is written again."""
        im = self._image(image_id)
        request = self._keyed(user, key, "accept", image_id)
        first = self._first(request)
        if first is not None:
            return self._replay(first, request)
        self._check_writable(image_id, user)
        if im.status == "missing":
            raise NotFound(f"image file {im.path} is gone from the images folder")
        rle, area, bbox, score, prompt = self._chosen_mask(req, image_id, (im.height, im.width))
        reject: dict[int, tuple[str, str]] = {}
        if req.replaces is not None:
            old = self.store.annotation(req.replaces)
            if old is None or old.image_id != image_id:
                raise NotFound(f"no annotation {req.replaces} on image {image_id}")
            if old.status != "pending":
                raise Conflict(f"annotation {req.replaces} is {old.status}, not pending")
            reject[old.id] = ("pending", "rejected")  # checked again in the transaction
        clicks, seconds = self._take_timer(user, image_id)
        item = {
            "image_id": image_id,
            "category": req.category,
            "status": "accepted",
            "stage": im.stage,
            "source": "manual",
            "segmentation": rle,
            "bbox": bbox,
            "area": area,
            "score": score,
            "model_id": self.model_id,
            "user_id": user.id,
            "clicks": clicks,
            "seconds": seconds,
            "prompt": prompt,
            "replaces_id": req.replaces,
        }
        ev = {
            "kind": "accept",
            "user_id": user.id,
            "image_id": image_id,
            "stage": im.stage,
            "annotation_index": 0,
            "data": {"clicks": clicks, "seconds": seconds, "replaces": req.replaces},
        }
        try:
            (ann,) = self.store.add_annotations([item], [ev], set_status=reject, request=request)
        except RequestRepeat as rep:  # a concurrent attempt with the same key won
            return self._replay(rep.first, request)
        except StoreConflict as exc:
            raise Conflict(str(exc)) from None
        return self._ann_out(ann)

    def list_annotations(self, image_id: int, statuses: list[str] | None = None) -> AnnotationList:
        self._image(image_id)
        if statuses is not None:
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise BadRequest(f"unknown status {bad[0]!r}; use one of {list(STATUSES)}")
        names = {u.id: u.name for u in self.store.users()}
        anns = self.store.annotations(
            image_id, statuses=statuses if statuses else ["accepted", "pending"]
        )
        return AnnotationList(
            image_id=image_id, annotations=[self._ann_out(a, names) for a in anns]
        )

    def get_annotation(self, ann_id: int) -> AnnotationOut:
        a = self.store.annotation(ann_id)
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        return self._ann_out(a)

    def update_annotation(
        self, ann_id: int, req: UpdateRequest, user: UserRef, key: str | None = None
    ) -> AnnotationOut:
        """Edit the category, replace the mask, or accept / reject a pending object.
        ``key``: as in :meth:`accept`."""
        request = self._keyed(user, key, "patch", ann_id)
        first = self._first(request)
        if first is not None:
            return self._replay(first, request)
        a = self.store.annotation(ann_id)
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        self._check_writable(a.image_id, user)
        fields: dict[str, Any] = {}
        kind = "edit"
        data: dict[str, Any] = {}
        if req.category is not None and req.category != a.category:
            fields["category"] = req.category
            data["category"] = [a.category, req.category]
        if req.segmentation is not None:
            im = self._image(a.image_id)
            rle, area, bbox = canonical_rle(req.segmentation, (im.height, im.width))
            if area == 0:
                raise Unprocessable("the mask is empty: delete the object instead")
            if rle["counts"] != a.segmentation.get("counts") or rle["size"] != list(
                a.segmentation.get("size", [])
            ):  # the edit history keeps the mask this one replaces
                fields.update(segmentation=rle, area=area, bbox=bbox)
                data.update(area=[a.area, area], previous=a.segmentation)
        if req.status is not None and req.status != a.status:
            fixed_by = self.store.fix_of(ann_id) if a.status == "rejected" else None
            if fixed_by is not None:  # accepting it again would duplicate the object
                raise Conflict(f"annotation {ann_id} was replaced by its fix {fixed_by}")
            fields["status"] = req.status
            if a.status == "pending" and req.status in ("accepted", "rejected"):
                kind = "accept" if req.status == "accepted" else "reject"
                clicks, seconds = self._take_timer(user, a.image_id)
                data.update(clicks=clicks, seconds=seconds)
                if req.status == "accepted":
                    fields.update(seconds=seconds, user_id=user.id, clicks=a.clicks + clicks)
            else:
                kind = "status"
                if a.status == "rejected" and edits.fix_in_trash(self.store, ann_id):
                    data["unfix"] = True  # its fix was deleted (undone): no longer fixed
            data["status"] = [a.status, req.status]
        if not fields:
            return self._ann_out(a)
        ev = {
            "kind": kind,
            "user_id": user.id,
            "image_id": a.image_id,
            "stage": a.stage,
            "data": data,
        }
        expect = a.status if "status" in fields else None
        try:
            a = self.store.update_annotation(
                ann_id, fields, ev, expect_status=expect, request=request
            )
        except RequestRepeat as rep:
            return self._replay(rep.first, request)
        except StoreConflict as exc:
            raise Conflict(str(exc)) from None
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        return self._ann_out(a)

    def delete_annotation(self, ann_id: int, user: UserRef, key: str | None = None) -> None:
        """Delete an object into the trash: :meth:`restore_annotation` puts it back.
        ``key``: a repeat of a committed delete answers as the first did (no 404)."""
        request = self._keyed(user, key, "delete", ann_id)
        first = self._first(request)
        if first is not None:
            self._replay(first, request)
            return
        a = self.store.annotation(ann_id)
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        self._check_writable(a.image_id, user)
        try:
            self._delete(ann_id, a, user, request)
        except RequestRepeat as rep:
            self._replay(rep.first, request)

    def _delete(self, ann_id: int, a: Annotation, user: UserRef, request: Any) -> None:
        gone = edits.trash(
            self.store,
            ann_id,
            {
                "kind": "delete",
                "user_id": user.id,
                "image_id": a.image_id,
                "stage": a.stage,
                "data": {
                    "category": a.category,
                    "status": a.status,
                    "source": a.source,
                    "replaces": a.replaces_id,
                },
            },
            request=request,
        )
        if gone is None:
            raise NotFound(f"no annotation with id {ann_id}")

    def restore_annotation(
        self, ann_id: int, user: UserRef, key: str | None = None
    ) -> AnnotationOut:
        """Undo a delete: the object comes back from the trash as it was, under its id (a
        new id only where an older SQLite database gave the id to another object since:
        the answer's ``id`` says which). ``key``: as in :meth:`accept` (a repeat answers
        with the restored object)."""
        request = self._keyed(user, key, "restore", ann_id)
        first = self._first(request)
        if first is not None:
            return self._replay(first, request)
        entry = edits.trashed(self.store, ann_id)
        if entry is not None:
            self._image(entry.image_id)  # the image must still be known
            self._check_writable(entry.image_id, user)
        row = entry.row if entry is not None else {}
        ev = {
            "kind": "restore",
            "user_id": user.id,
            "image_id": entry.image_id if entry is not None else None,
            "stage": row.get("stage", 1),
            "data": {k: row.get(k) for k in ("category", "status", "source")},
        }
        try:
            a = edits.restore(self.store, ann_id, ev, request=request)
        except KeyError:
            raise NotFound(f"annotation {ann_id} is not deleted (or was restored)") from None
        except RequestRepeat as rep:  # a concurrent attempt with the same key won
            return self._replay(rep.first, request)
        except StoreConflict as exc:
            raise Conflict(str(exc)) from None
        return self._ann_out(a)

    def annotation_history(self, ann_id: int) -> list[EventOut]:
        """The events of an object, oldest first: accept, edits (each mask edit with the
        mask it replaced), status changes, deletes and restores."""
        found = self.store.annotation(ann_id) or edits.trashed(self.store, ann_id)
        if found is None:
            raise NotFound(f"no annotation with id {ann_id}")
        names = {u.id: u.name for u in self.store.users()}
        return [
            EventOut(
                ts=e.ts,
                kind=e.kind,
                user=names.get(e.user_id) if e.user_id is not None else None,
                data=e.data,
            )
            for e in edits.history(self.store, ann_id)
        ]

    def record_event(self, image_id: int, req: EventRequest, user: UserRef) -> None:
        """UI-side actions (undo, redo, candidate chosen...) kept for the measurements."""
        im = self._image(image_id)
        data = req.data or {}
        try:
            text = json.dumps(data, allow_nan=False)
        except ValueError:
            raise Unprocessable("event data must not hold NaN or infinite numbers") from None
        if len(text) > 4096:
            raise Unprocessable("event data is limited to 4 KiB")
        if req.kind == "predict":  # a click the page decoded itself counts as one
            self._count_click(user, image_id)
        self._events.put(
            {
                "ts": time.time(),
                "kind": req.kind,
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
                "data": data,
            }
        )
