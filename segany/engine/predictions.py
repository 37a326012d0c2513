"""The annotator's click path: prompts -> masks (candidates kept for accept), and the
object timers behind the paper's measurements. A part of
:class:`~.service.AnnotationService`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .. import masks as M
from ..models import SamHQ
from ..predictor import PromptError
from .schemas import RLE, MaskOut, NotFound, PredictOut, PredictRequest, Unprocessable, UserRef


def clock() -> float:
    """The annotation timers' clock (wall time; tests replace it)."""
    return time.time()


def video_timer(video_id: int) -> tuple[str, int]:
    """The object timers' key of a video (an image's is its id)."""
    return ("video", video_id)


#: A pause between two actions of an annotator on an image longer than this counts as this
#: much (idle time, e.g. a coffee break with the image open, is not annotation time).
IDLE_CAP = 60.0


@dataclass
class _Timer:
    """An object's annotation time on one image: ``active`` seconds so far, each pause
    between actions capped at :data:`IDLE_CAP`; ``clicks`` prompts sent."""

    start: float
    clicks: int = 0
    last: float = -1.0
    active: float = 0.0

    def __post_init__(self) -> None:
        if self.last < 0:
            self.last = self.start

    def tick(self, now: float) -> float:
        """Add the time since the last action (capped) and return the active seconds."""
        self.active += min(max(0.0, now - self.last), IDLE_CAP)
        self.last = now
        return self.active


@dataclass
class _Candidate:
    image_id: Any  # the image id, or ``(video id, frame)`` for a video frame
    logits: np.ndarray  # (S/4, S/4) float16 (128 KiB at S = 1024)
    rle: dict[str, Any]
    score: float
    area: int
    bbox: list[float]
    prompt: dict[str, Any] = field(default_factory=dict)


class _LRU:
    """A small thread-safe LRU map."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


class PredictionsMixin:
    """Predictions of :class:`~.service.AnnotationService` (its state is set up there)."""

    # -- the click path ----------------------------------------------------------------------
    def predict(self, image_id: int, req: PredictRequest, user: UserRef) -> PredictOut:
        """Masks for the current clicks (and box, and the previous mask as ``mask_input``):
        three candidates with ``multimask``, else one (HQ-SAM: always one); COCO RLE at
        image size."""
        t0 = time.perf_counter()
        im = self._image(image_id, usable=True)
        self._check_prompt(req)
        mask_input = self._mask_input(req, image_id)
        outs, best = self._decode_prompt(self.embedding(im), req, mask_input, image_id)
        self._count_click(user, image_id)
        ms = (time.perf_counter() - t0) * 1e3
        self._events.put(
            {
                "ts": time.time(),
                "kind": "predict",
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
                "data": {
                    "points": len(req.points),
                    "box": req.box is not None,
                    "refine": mask_input is not None,
                    "ms": round(ms, 2),
                },
            }
        )
        return PredictOut(
            image_id=image_id,
            width=im.width,
            height=im.height,
            masks=outs,
            best=best,
            ms=round(ms, 2),
        )

    def _check_prompt(self, req: PredictRequest) -> None:
        if len(req.points) != len(req.labels):
            raise Unprocessable(
                f"points ({len(req.points)}) and labels ({len(req.labels)}) differ in length"
            )
        if any(lab not in (0, 1) for lab in req.labels):
            raise Unprocessable("labels must be 1 (object) or 0 (background)")
        if not req.points and req.box is None:
            raise Unprocessable("give at least one point or a box")
        if req.hq_token_only and not isinstance(self.model, SamHQ):
            raise Unprocessable("hq_token_only is for HQ-SAM models (sam_hq_vit_*)")

    def _candidate(self, mask_id: str, owner: Any, what: str = "mask_id") -> _Candidate:
        """A kept candidate of ``owner`` (an image id, or ``(video id, frame)``)."""
        cand = self._candidates.get(mask_id)
        if cand is None:
            raise NotFound(f"{what} {mask_id!r} is unknown or expired")
        if cand.image_id != owner:
            where = (
                f"frame {cand.image_id[1]} of video {cand.image_id[0]}"
                if isinstance(cand.image_id, tuple)
                else f"image {cand.image_id}"
            )
            raise Unprocessable(f"{what} {mask_id!r} belongs to {where}")
        return cand

    def _mask_input(self, req: PredictRequest, owner: Any) -> np.ndarray | None:
        if req.mask_input_id is None:
            return None
        cand = self._candidate(req.mask_input_id, owner, "mask_input_id")
        return cand.logits[None].astype(np.float32)

    def _decode_prompt(
        self, emb: Any, req: PredictRequest, mask_input: np.ndarray | None, owner: Any
    ) -> tuple[list[MaskOut], int]:
        """Decode a checked prompt on an embedding; the candidates are kept for ``owner``
        (an image id, or ``(video id, frame)``). Returns the masks and the best index."""
        p = self._predictor()
        if not (p.is_image_set and p.state is emb):
            p.set_embedding(emb)  # per thread, once per image (decoder context)
        p.hq_token_only = req.hq_token_only  # the predictor is this thread's
        coords = np.asarray(req.points, dtype=np.float64).reshape(-1, 2) if req.points else None
        labels = np.asarray(req.labels, dtype=np.int64) if req.points else None
        box = np.asarray(req.box, dtype=np.float64) if req.box is not None else None
        try:
            with self._decode.decode():
                pred = p.predict(
                    point_coords=coords,
                    point_labels=labels,
                    box=box,
                    mask_input=mask_input,
                    multimask_output=req.multimask,
                )
        except PromptError as exc:
            raise Unprocessable(str(exc)) from None
        rles = M.masks_to_coco_rle(pred.masks)
        prompt = {
            "points": [list(map(float, pt)) for pt in req.points],
            "labels": list(req.labels),
            "box": list(req.box) if req.box is not None else None,
        }
        base = uuid.uuid4().hex[:16]
        outs = []
        for k, rle in enumerate(rles):
            enc = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            area = int(mask_utils.area(enc))
            bbox = [float(v) for v in mask_utils.toBbox(enc)]
            mid = f"{base}-{k}"
            score = float(pred.scores[k])
            self._candidates.put(
                mid,
                _Candidate(
                    image_id=owner,
                    logits=np.asarray(pred.low_res_logits[k], dtype=np.float16),
                    rle=rle,
                    score=score,
                    area=area,
                    bbox=bbox,
                    prompt=prompt,
                ),
            )
            outs.append(
                MaskOut(
                    index=k,
                    segmentation=RLE(size=tuple(rle["size"]), counts=rle["counts"]),
                    score=round(score, 5),
                    area=area,
                    bbox=bbox,
                    mask_input_id=mid,
                )
            )
        return outs, int(np.argmax(pred.scores))

    def _start_timer(self, user: UserRef, owner: Any) -> None:
        """Start the next object's timer on ``owner`` (an image id; for a video
        :func:`video_timer`), as when it is opened."""
        with self._timers_lock:
            self._timers[(user.id, owner)] = _Timer(start=clock())

    def _count_click(self, user: UserRef, image_id: Any) -> None:
        """One prompt of the object in progress (decoded here, or in the page)."""
        with self._timers_lock:
            now = clock()
            t = self._timers.setdefault((user.id, image_id), _Timer(start=now))
            t.tick(now)
            t.clicks += 1

    def _take_timer(self, user: UserRef, image_id: Any) -> tuple[int, float | None]:
        now = clock()
        with self._timers_lock:
            t = self._timers.pop((user.id, image_id), None)
            self._timers[(user.id, image_id)] = _Timer(start=now)
        if t is None:
            return 0, None
        return t.clicks, round(t.tick(now), 3)
