"""Pre-fills in the background: a job per request, its progress (points decoded of points
planned, from :class:`segany.everything.MaskGenerator`'s ``progress`` callback) polled by
the page, and a cancel. A part of :class:`~.service.AnnotationService`.

Nothing is saved before the generator has finished: a cancel while the job is ``running``
stops the generator at its next batch and the job ends ``cancelled`` with nothing written
(the pending objects of an earlier run are kept). Once the job is ``saving`` the cancel is
too late and the answer says so (``state`` ``saving`` or ``done``, with what was saved).
A pre-fill by class names reports no points (0 of 0) and stops after the detector.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .schemas import (
    Conflict,
    NotFound,
    PrefillJobOut,
    PrefillOut,
    PrefillRequest,
    ServiceError,
    UserRef,
)

log = logging.getLogger("segany.engine")

#: Finished jobs kept for their pages to read (each holds its result: up to 1000 masks).
KEEP_FINISHED = 16
JOB_ID = re.compile(r"[0-9a-f]{16}")


class PrefillCancelled(Exception):
    """Raised by a job's progress callback to stop the generator."""


@dataclass
class _Job:
    id: str
    image_id: int
    user_id: int
    state: str = "running"
    points_done: int = 0
    points_planned: int = 0
    t0: float = field(default_factory=time.perf_counter)
    t1: float | None = None
    error: str | None = None
    result: PrefillOut | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def out(self) -> PrefillJobOut:
        with self.lock:
            end = self.t1 if self.t1 is not None else time.perf_counter()
            return PrefillJobOut(
                id=self.id,
                image_id=self.image_id,
                state=self.state,
                points_done=self.points_done,
                points_planned=self.points_planned,
                seconds=round(end - self.t0, 3),
                error=self.error,
                result=self.result,
            )


class PrefillJobsMixin:
    """Background pre-fills of :class:`~.service.AnnotationService`."""

    def start_prefill(self, image_id: int, req: PrefillRequest, user: UserRef) -> PrefillJobOut:
        """Check the request now (404 / 409 / 422 as the blocking pre-fill), then run it in
        a thread; one job per image at a time (409 naming the running one)."""
        with self._jobs_lock:
            for j in self._jobs.values():
                if j.image_id == image_id and j.state in ("running", "saving"):
                    raise Conflict(f"a pre-fill is running on image {image_id} (job {j.id})")
            rgb, detector = self._prefill_prepare(image_id, req, user)
            job = _Job(id=secrets.token_hex(8), image_id=image_id, user_id=user.id)
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if j.state not in ("running", "saving")]
            for k in finished[: max(0, len(finished) - KEEP_FINISHED)]:
                del self._jobs[k]
        first = job.out()  # the job as started ("running"), whatever its thread does first
        threading.Thread(
            target=self._run_job,
            args=(job, rgb, detector, req, user),
            name=f"segany-prefill-{job.id}",
            daemon=True,
        ).start()
        return first

    def _run_job(self, job: _Job, rgb: Any, detector: Any, req: PrefillRequest, user: UserRef):
        def progress(done: int, planned: int) -> None:
            with job.lock:
                job.points_done, job.points_planned = done, planned
            if job.cancel.is_set():
                raise PrefillCancelled

        try:
            records = self._prefill_generate(rgb, req, detector, progress)
            with job.lock:
                if job.cancel.is_set():
                    raise PrefillCancelled
                job.state = "saving"
            out = self._prefill_save(
                job.image_id, req, user, rgb.shape[:2], detector, records, job.t0
            )
            with job.lock:
                job.state, job.result = "done", out
        except PrefillCancelled:
            with job.lock:
                job.state = "cancelled"
        except ServiceError as exc:
            with job.lock:
                job.state, job.error = "failed", exc.message
        except Exception as exc:  # reported to the page; the details go to the log
            log.exception("pre-fill job %s failed", job.id)
            with job.lock:
                job.state, job.error = "failed", f"the pre-fill failed: {type(exc).__name__}"
        finally:
            with job.lock:
                job.t1 = time.perf_counter()

    def _job(self, job_id: str, user: UserRef) -> _Job:
        job = self._jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None or (self.auth and job.user_id != user.id and not user.is_admin):
            raise NotFound(f"no pre-fill job {job_id[:40]!r}")
        return job

    def prefill_job(self, job_id: str, user: UserRef) -> PrefillJobOut:
        return self._job(job_id, user).out()

    def cancel_prefill(self, job_id: str, user: UserRef) -> PrefillJobOut:
        """Stop a running job (nothing saved). A job already saving or finished is left
        alone: the answer's ``state`` says what happened."""
        job = self._job(job_id, user)
        with job.lock:
            if job.state == "running":
                job.cancel.set()
        return job.out()
