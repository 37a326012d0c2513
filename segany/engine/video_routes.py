"""The routes of videos, their frames and tracks (:mod:`.video`), propagation jobs
(:mod:`.video_jobs`) and the video exports. Added to the app by :func:`.server.create_app`.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' annotations, and
# ``who`` (the caller dependency) and ``key`` (the ``Idempotency-Key`` header), given by
# create_app, are local names.
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

from .errors import SafeJSONResponse
from .schemas import (
    FrameMasks,
    MaskChoice,
    PredictOut,
    PredictRequest,
    PropagateRequest,
    PropagationJobOut,
    TrackOut,
    TrackRequest,
    TrackUpdate,
    VideoList,
    VideoOpenOut,
    VideoOut,
    VideoRequest,
)


def add_video_routes(app: FastAPI, service: Any, who: Any, key: Any) -> None:
    """Videos (and opening one: its lease, :mod:`.video_work`), frames, clicks on frames,
    tracks, propagation jobs, video exports. Every write on tracks honours
    ``Idempotency-Key``. (The leases' routes are in :mod:`.work_routes`.)"""

    @app.get("/api/videos", response_model=VideoList)
    def videos(u: who) -> VideoList:
        return service.list_videos(u)

    @app.post("/api/videos", response_model=VideoOut, status_code=201)
    def register_video(req: VideoRequest, u: who) -> VideoOut:
        """Register a folder of frames (or a video file) by its path in the images folder
        (video files are also found by the rescan)."""
        return service.register_video(req)

    @app.get("/api/videos/{video_id}", response_model=VideoOut)
    def video(video_id: int, u: who) -> VideoOut:
        return service.get_video(video_id, u)

    @app.post("/api/videos/{video_id}/open", response_model=VideoOpenOut)
    def open_video(video_id: int, u: who) -> VideoOpenOut:
        """The video, its lease for the page session (``lock``), the object timer started."""
        return service.open_video(video_id, u)

    @app.get("/api/videos/{video_id}/frames/{frame}")
    def frame_image(video_id: int, frame: int, u: who) -> Response:
        """The frame as the page shows it (its file, or JPEG)."""
        shown, media_type = service.frame_image(video_id, frame)
        if isinstance(shown, bytes):
            return Response(shown, media_type=media_type)
        return FileResponse(shown)

    @app.post("/api/videos/{video_id}/frames/{frame}/predict", response_model=PredictOut)
    def predict_frame(video_id: int, frame: int, req: PredictRequest, u: who) -> PredictOut:
        """The click API of ``/api/images/{id}/predict`` on one frame."""
        return service.predict_frame(video_id, frame, req, u)

    @app.get("/api/videos/{video_id}/frames/{frame}/masks", response_model=FrameMasks)
    def frame_masks(video_id: int, frame: int, u: who) -> FrameMasks:
        """Every track's mask on the frame (``key``: set by the annotator)."""
        return service.frame_masks(video_id, frame)

    @app.get("/api/videos/{video_id}/tracks", response_model=list[TrackOut])
    def tracks(video_id: int, u: who) -> list[TrackOut]:
        return service.list_tracks(video_id)

    @app.post("/api/videos/{video_id}/tracks", response_model=TrackOut, status_code=201)
    def create_track(video_id: int, req: TrackRequest, u: who, k: key = None) -> TrackOut:
        """A new object with its mask on ``frame`` (a candidate's ``mask_id`` or an RLE)."""
        return service.create_track(video_id, req, u, k)

    @app.get("/api/tracks/{track_id}", response_model=TrackOut)
    def track(track_id: int, u: who) -> TrackOut:
        return service.get_track(track_id)

    @app.patch("/api/tracks/{track_id}", response_model=TrackOut)
    def update_track(track_id: int, req: TrackUpdate, u: who, k: key = None) -> TrackOut:
        """Rename, or accept (``{"status": "accepted"}``)."""
        return service.update_track(track_id, req, u, k)

    @app.delete("/api/tracks/{track_id}", status_code=204)
    def delete_track(track_id: int, u: who, k: key = None) -> Response:
        service.delete_track(track_id, u, k)
        return Response(status_code=204)

    @app.put("/api/tracks/{track_id}/frames/{frame}", response_model=TrackOut)
    def set_key_frame(
        track_id: int, frame: int, req: MaskChoice, u: who, k: key = None
    ) -> TrackOut:
        """Set (correct) the object's mask on a frame: a key frame."""
        return service.set_key_frame(track_id, frame, req, u, k)

    @app.post("/api/tracks/{track_id}/propagate", response_model=PropagationJobOut, status_code=202)
    def propagate(
        track_id: int, u: who, req: PropagateRequest | None = None, k: key = None
    ) -> PropagationJobOut:
        """Follow the object from a key frame (default: its first) in the background."""
        return service.start_propagation(track_id, req or PropagateRequest(), u, k)

    @app.get("/api/propagation-jobs/{job_id}", response_model=PropagationJobOut)
    def propagation_job(job_id: str, u: who) -> PropagationJobOut:
        return service.propagation_job(job_id, u)

    @app.post("/api/propagation-jobs/{job_id}/cancel", response_model=PropagationJobOut)
    def cancel_propagation(job_id: str, u: who) -> PropagationJobOut:
        return service.cancel_propagation(job_id, u)

    @app.get("/api/export/video")
    def export_video(u: who, include_pending: bool = False) -> Response:
        return SafeJSONResponse(
            service.export_video(include_pending),
            headers={"Content-Disposition": 'attachment; filename="videos_coco.json"'},
        )

    @app.get("/api/export/davis")
    def export_davis(u: who, include_pending: bool = False) -> Response:
        return Response(
            service.export_davis(include_pending),
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="videos_davis.zip"'},
        )
