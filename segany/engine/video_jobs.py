"""Propagation in the background: a job per request that follows one track through its
video with the tracker of the model (:func:`segany.video.sam2_tracker.tracker_for`: SAM
2's memory tracker for SAM 2 models, the propagation tracker for SAM 1 / MobileSAM), its
progress (frames done of frames planned) polled by the page, and a cancel. A part of
:class:`~.service.AnnotationService`; the pattern of :mod:`.prefill_jobs`.

From the track's first key frame the tracker runs over the whole video (forward to the
end, backward to frame 0) with every key frame as a prompt. From a later key frame (a
correction) it runs from that frame to the end only, with the key frames from there on:
the frames before it keep their masks, and the correction carries forward. Key frames are
never overwritten. Frames are read one at a time by the job's own reader (memory does not
grow with the video), each embedded once (the annotator's embedding cache, shared with the
clicks). Nothing is saved before the tracker has finished: a cancel while the job is
``running`` stops it at the next frame and nothing is written.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pycocotools import mask as mask_utils

from .. import masks as M
from ..runtime import torch_threads
from ..videos import FrameRange, VideoError, open_video
from .images import safe_relpath
from .prefill_jobs import JOB_ID, KEEP_FINISHED
from .schemas import (
    Conflict,
    NotFound,
    PropagateRequest,
    PropagationJobOut,
    ServiceError,
    Unprocessable,
    UserRef,
)
from .work_store import RequestKey, RequestRepeat

log = logging.getLogger("segany.engine")


class PropagationCancelled(Exception):
    """Raised by a job's progress callback to stop the tracker."""


@dataclass
class _Job:
    id: str
    video_id: int
    track_id: int
    user_id: int
    start: int
    frames_planned: int
    #: the ``Idempotency-Key`` of the request that started it (stored with its masks)
    request: Any = None
    state: str = "running"
    frames_done: int = 0
    frames_saved: int = 0
    t0: float = field(default_factory=time.perf_counter)
    t1: float | None = None
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def out(self) -> PropagationJobOut:
        with self.lock:
            end = self.t1 if self.t1 is not None else time.perf_counter()
            return PropagationJobOut(
                id=self.id,
                video_id=self.video_id,
                track_id=self.track_id,
                start=self.start,
                state=self.state,
                frames_done=self.frames_done,
                frames_planned=self.frames_planned,
                frames_saved=self.frames_saved,
                seconds=round(end - self.t0, 3),
                error=self.error,
            )


class VideoJobsMixin:
    """Background propagations of :class:`~.service.AnnotationService`."""

    def start_propagation(
        self, track_id: int, req: PropagateRequest, user: UserRef, key: str | None = None
    ) -> PropagationJobOut:
        """Check the request now (404 unknown track or frame, 422 not a key frame, 409 the
        video locked by another page), then run the tracker in a thread; one job per track
        at a time (409 naming it). ``key`` (``Idempotency-Key``): a repeat answers the job
        the first attempt started while it is known, or, once its masks are saved (the key
        is stored with them), a finished job; a repeat after a restart that lost the job
        before it saved starts it again (nothing was saved)."""
        request = self._keyed(user, key, "propagate", track_id)
        if request is not None:
            with self._jobs_lock:
                for j in self._video_jobs.values():
                    if j.request is not None and j.request.key == request.key:
                        if j.request.user_id == user.id:
                            self._same_request(j.request, request)
                            return j.out()
            if (first := self._first(request)) is not None:
                self._same_request(first, request)
                return self._saved_job(first, user)
        t = self._track(track_id)
        v = self._video(t.video_id, usable=True)
        self._check_video_writable(v.id, user)
        keys = {r.frame: r.segmentation for r in self.video_store.frames([t.id], keys_only=True)}
        if not keys:
            raise Unprocessable(f"track {t.id} has no key frame: set its mask on a frame first")
        start = min(keys) if req.start is None else req.start
        self._check_frame(v, start)
        if start not in keys:
            raise Unprocessable(
                f"frame {start} is not a key frame of track {t.id} (key frames: "
                f"{sorted(keys)}): set the object's mask there first"
            )
        planned = v.length if start == min(keys) else v.length - start
        with self._jobs_lock:
            for j in self._video_jobs.values():
                if j.track_id == t.id and j.state in ("running", "saving"):
                    raise Conflict(f"track {t.id} is being propagated (job {j.id})")
            job = _Job(secrets.token_hex(8), v.id, t.id, user.id, start, planned, request)
            self._keep_job(job)
        self.video_store.add_time(t.id, self._spent(user, v.id))
        first = job.out()  # as started ("running"), whatever its thread does first
        threading.Thread(
            target=self._run_propagation,
            args=(job, v.path, t.object_id, keys),
            name=f"segany-propagate-{job.id}",
            daemon=True,
        ).start()
        return first

    def _run_propagation(self, job: _Job, path: str, obj: int, keys: dict[int, Any]) -> None:
        from ..video.sam2_tracker import tracker_for
        from ..video.tracker import ObjectPrompt

        def progress(n: int) -> None:
            with job.lock:
                job.frames_done += n
            if job.cancel.is_set():
                raise PropagationCancelled

        source = None
        try:
            source = open_video(safe_relpath(self.root, path))  # the job's own reader
            full = job.start == min(keys)
            view = source if full else FrameRange(source, job.start)
            offset = 0 if full else job.start
            prompts = {
                f - offset: {obj: ObjectPrompt(mask=M.rle_to_mask(rle))}
                for f, rle in keys.items()
                if f >= offset
            }
            # (outside the model's decode slots: a long propagation must not hold one, or a
            # one-core server's clicks would wait for all of it)
            with torch_threads(self.embed_threads):
                result = tracker_for(self._new_predictor()).track(view, prompts, progress=progress)
            with job.lock:
                if job.cancel.is_set():
                    raise PropagationCancelled
                job.state = "saving"
            rows = {}
            h, w = result.size
            for i in range(len(view)):
                rle = result.masks.get(i, {}).get(obj)
                if rle is None:
                    continue
                enc = {"size": [h, w], "counts": rle["counts"].encode("ascii")}
                rows[i + offset] = {
                    "segmentation": {"size": [h, w], "counts": rle["counts"]},
                    "area": int(mask_utils.area(enc)),
                    "bbox": [float(b) for b in mask_utils.toBbox(enc)],
                    "score": result.scores.get(i, {}).get(obj),
                }
            try:
                n = self.video_store.save_propagated(
                    job.track_id, offset, len(source) - 1, rows, request=job.request
                )
            except RequestRepeat:  # pragma: no cover - one job per key is running
                n = 0
            if n < 0:
                raise NotFound(f"track {job.track_id} was deleted while it was propagated")
            with job.lock:
                job.state, job.frames_saved = "done", n
        except PropagationCancelled:
            with job.lock:
                job.state = "cancelled"
        except ServiceError as exc:
            with job.lock:
                job.state, job.error = "failed", exc.message
        except VideoError as exc:
            with job.lock:
                job.state, job.error = "failed", f"the video cannot be read: {exc}"
        except Exception as exc:  # reported to the page; the details go to the log
            log.exception("propagation job %s failed", job.id)
            with job.lock:
                job.state, job.error = "failed", f"the propagation failed: {type(exc).__name__}"
        finally:
            getattr(source, "close", lambda: None)()
            with job.lock:
                job.t1 = time.perf_counter()

    def _keep_job(self, job: _Job) -> None:
        """Register ``job`` (the caller holds ``_jobs_lock``); the oldest finished ones go."""
        self._video_jobs[job.id] = job
        done = [k for k, j in self._video_jobs.items() if j.state not in ("running", "saving")]
        for k in done[: max(0, len(done) - KEEP_FINISHED)]:
            del self._video_jobs[k]

    def _saved_job(self, first: RequestKey, user: UserRef) -> PropagationJobOut:
        """A finished job standing for a keyed propagation whose masks were saved and whose
        job is no longer known (restart, or dropped after :data:`KEEP_FINISHED` others):
        ``frames_saved`` counts the track's propagated frames as they are now."""
        t = self.video_store.track(first.target)
        if t is None:
            raise Conflict(
                f"this propagation was saved already (track {first.target}), and that track "
                "has since been deleted"
            )
        keys, n = self.video_store.frame_counts([t.id])[t.id]
        job = _Job(secrets.token_hex(8), t.video_id, t.id, user.id, min(keys, default=0), n)
        job.state, job.frames_done, job.frames_saved = "done", n, n - len(keys)
        job.t1 = job.t0
        with self._jobs_lock:
            self._keep_job(job)
        return job.out()

    def _video_job(self, job_id: str, user: UserRef) -> _Job:
        job = self._video_jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None or (self.auth and job.user_id != user.id and not user.is_admin):
            raise NotFound(f"no propagation job {job_id[:40]!r}")
        return job

    def propagation_job(self, job_id: str, user: UserRef) -> PropagationJobOut:
        return self._video_job(job_id, user).out()

    def cancel_propagation(self, job_id: str, user: UserRef) -> PropagationJobOut:
        """Stop a running job (nothing saved); a job already saving or finished is left
        alone (the answer's ``state`` says what happened)."""
        job = self._video_job(job_id, user)
        with job.lock:
            if job.state == "running":
                job.cancel.set()
        return job.out()
