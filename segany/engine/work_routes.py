"""The routes of several annotators (:mod:`.work`) and of background pre-fills
(:mod:`.prefill_jobs`). Added to the app by :func:`.server.create_app`.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' annotations, and
# ``who`` (the caller dependency, given by create_app) is a local name.
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from .schemas import (
    AssignRequest,
    ImageOut,
    LeaseOut,
    PrefillJobOut,
    PrefillRequest,
    QueueOut,
    ReviewRequest,
)


def add_work_routes(app: FastAPI, service: Any, who: Any) -> None:
    """Leases (of images and videos), the queue, review, assignment and pre-fill jobs."""

    @app.post("/api/images/{image_id}/lease", response_model=LeaseOut)
    def lease(image_id: int, u: who) -> LeaseOut:
        """Take or renew the image's lease for the page session (``X-Segany-Session``);
        ``held`` false names who holds it. Also the embedding's and the image's status."""
        return service.lease(image_id, u)

    @app.delete("/api/images/{image_id}/lease", status_code=204)
    def release(image_id: int, u: who) -> Response:
        service.release(image_id, u)
        return Response(status_code=204)

    @app.post("/api/videos/{video_id}/lease", response_model=LeaseOut)
    def lease_video(video_id: int, u: who) -> LeaseOut:
        """Take or renew the video's lease for the page session (as an image's)."""
        return service.lease_video(video_id, u)

    @app.delete("/api/videos/{video_id}/lease", status_code=204)
    def release_video(video_id: int, u: who) -> Response:
        service.release_video(video_id, u)
        return Response(status_code=204)

    @app.get("/api/queue", response_model=QueueOut)
    def queue(u: who, after: int | None = None) -> QueueOut:
        return service.queue(u, after)

    @app.post("/api/images/{image_id}/review", response_model=ImageOut)
    def review(image_id: int, req: ReviewRequest, u: who) -> ImageOut:
        return service.review(image_id, req, u)

    @app.post("/api/images/{image_id}/assign", response_model=ImageOut)
    def assign(image_id: int, req: AssignRequest, u: who) -> ImageOut:
        return service.assign(image_id, req, u)

    @app.post("/api/images/{image_id}/prefill-jobs", response_model=PrefillJobOut, status_code=202)
    def start_prefill(image_id: int, u: who, req: PrefillRequest | None = None) -> PrefillJobOut:
        return service.start_prefill(image_id, req or PrefillRequest(), u)

    @app.get("/api/prefill-jobs/{job_id}", response_model=PrefillJobOut)
    def prefill_job(job_id: str, u: who) -> PrefillJobOut:
        return service.prefill_job(job_id, u)

    @app.post("/api/prefill-jobs/{job_id}/cancel", response_model=PrefillJobOut)
    def cancel_prefill(job_id: str, u: who) -> PrefillJobOut:
        return service.cancel_prefill(job_id, u)
