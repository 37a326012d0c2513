"""The annotator's videos: a video file of the images folder (found by the rescan) or a
folder of frames (registered by path), frames read lazily (:func:`segany.videos.open_video`),
clicks on a frame (the image click path on the frame's embedding), and the objects
followed through the video (*tracks*): a track starts from the mask the annotator chose on
one frame (a *key frame*); propagation (:mod:`.video_jobs`) fills the other frames; a
correction on any frame is another key frame, from which propagation runs again. A part of
:class:`~.service.AnnotationService`.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..files import find_images
from ..predictor import ImageEmbedding, image_key
from ..runtime import torch_threads
from ..videos import VIDEO_SUFFIXES, VideoError, VideoSource, open_video
from .images import safe_relpath
from .predictions import video_timer
from .schemas import (
    RLE,
    Conflict,
    FrameMask,
    FrameMasks,
    MaskChoice,
    NotFound,
    PredictOut,
    PredictRequest,
    TrackOut,
    TrackRequest,
    TrackUpdate,
    Unprocessable,
    UserRef,
    VideoList,
    VideoOut,
    VideoRequest,
)
from .store import StoreConflict, Track, Video
from .work_store import RequestRepeat

#: Video files the rescan registers (a GIF stays an image in the annotator).
VIDEO_FILE_SUFFIXES = tuple(s for s in VIDEO_SUFFIXES if s != ".gif")
#: Frame files the browser shows as they are (others are sent as JPEG).
_SHOWN = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class VideoMixin:
    """Videos, frames and tracks of :class:`~.service.AnnotationService` (its state is set
    up there: ``video_store``, ``_video_sources``, ``_frame_keys``)."""

    # -- registration ------------------------------------------------------------------------
    def _frame_folders(self) -> list[str]:
        """The registered folders of frames (their images are not listed as images)."""
        return [v.path for v in self.video_store.videos() if v.kind == "frames"]

    def _probe_video(self, path: Path, kind: str) -> dict[str, Any]:
        st = path.stat()
        fields: dict[str, Any] = {"kind": kind, "status": "ok", "error": None}
        fields.update(size_bytes=int(st.st_size), mtime=float(st.st_mtime))
        try:
            src = open_video(path)
            try:
                files = getattr(src, "files", None)
                out = [f.name for f in files or () if not f.resolve().is_relative_to(self.root)]
                if out:  # as for images: a symlink leading out of the folder is never read
                    raise VideoError(f"frame {out[0]} points outside the images folder")
                h, w = src.size
                fields.update(
                    width=int(w),
                    height=int(h),
                    length=len(src),
                    fps=src.fps,
                    names=list(src.names),
                    files=[f.name for f in files] if files else [f"{n}.png" for n in src.names],
                )
            finally:
                getattr(src, "close", lambda: None)()
            if w * h > self.max_pixels:
                fields["status"] = "error"
                fields["error"] = (
                    f"frames too large: {w}x{h} exceeds the limit of "
                    f"{self.max_pixels / 1e6:.0f} MP (--max-pixels)"
                )
        except (VideoError, OSError, IndexError) as exc:
            fields.update(status="error", length=0, names=[], files=[])
            fields["error"] = str(exc).replace(str(path), path.name)
        return fields

    def _rescan_videos(self) -> int:
        """Register the video files of the folder (probed when new or changed), check the
        registered folders of frames, mark vanished videos missing; the number of videos."""
        known = {v.path: v for v in self.video_store.videos()}
        seen: set[str] = set()
        for full in find_images(self.root, suffixes=VIDEO_FILE_SUFFIXES):
            try:
                real = full.resolve()
            except OSError:
                continue
            if not real.is_relative_to(self.root) or not real.is_file():
                continue
            rel = full.relative_to(self.root).as_posix()
            seen.add(rel)
            v, st = known.get(rel), real.stat()
            if v is not None and v.status != "missing" and v.size_bytes == st.st_size:
                if abs(v.mtime - st.st_mtime) < 1e-6:
                    continue
            self.video_store.save_video(rel, self._probe_video(real, "file"))
        for rel, v in known.items():
            folder = self.root / rel
            if v.kind == "frames" and folder.is_dir():
                self.video_store.save_video(rel, self._probe_video(folder, "frames"))
            elif rel not in seen and v.status != "missing":
                fields = {"status": "missing", "error": "no longer in the images folder"}
                self.video_store.save_video(rel, fields)
        self._video_sources.clear()
        return len(seen) + sum(1 for v in known.values() if v.kind == "frames")

    def register_video(self, req: VideoRequest) -> VideoOut:
        """Register a folder of frames (or a video file) inside the images folder; 422
        when it cannot be read (nothing is registered then)."""
        rel = req.path.strip().rstrip("/")
        full = safe_relpath(self.root, rel)
        if full == self.root:
            raise Unprocessable("give a folder of frames inside the images folder, not itself")
        if full.is_dir():
            kind = "frames"
        elif full.is_file() and full.suffix.lower() in VIDEO_FILE_SUFFIXES:
            kind = "file"
        elif full.is_file():
            raise Unprocessable(f"{rel} is not a video ({', '.join(VIDEO_FILE_SUFFIXES)})")
        else:
            raise NotFound(f"no video file or folder {rel!r} in the images folder")
        fields = self._probe_video(full, kind)
        if fields["status"] != "ok":
            raise Unprocessable(f"{rel}: {fields['error']}")
        rel = full.relative_to(self.root).as_posix()
        v, _ = self.video_store.save_video(rel, fields)
        self._video_sources.clear()
        if kind == "frames":
            self.rescan()  # its frames leave the image list
        return self._video_out(v)

    # -- videos and frames -------------------------------------------------------------------
    def _video_out(
        self,
        v: Video,
        tracks: list[Track] | None = None,
        viewer: UserRef | None = None,
        leases: dict[int, Any] | None = None,
    ) -> VideoOut:
        if tracks is None:
            tracks = self.video_store.tracks(v.id)
        return VideoOut(
            id=v.id,
            path=v.path,
            kind=v.kind,
            width=v.width,
            height=v.height,
            length=v.length,
            fps=v.fps,
            status=v.status,
            error=v.error,
            names=list(v.names or []),
            tracks=len(tracks),
            accepted=sum(1 for t in tracks if t.status == "accepted"),
            locked_by=self._video_locked_by(v.id, viewer, leases),
        )

    def list_videos(self, viewer: UserRef | None = None) -> VideoList:
        tracks: dict[int, list[Track]] = {}
        for t in self.video_store.tracks():
            tracks.setdefault(t.video_id, []).append(t)
        leases = self.work.all("video")
        return VideoList(
            videos=[
                self._video_out(v, tracks.get(v.id, []), viewer, leases)
                for v in self.video_store.videos()
            ]
        )

    def get_video(self, video_id: int, viewer: UserRef | None = None) -> VideoOut:
        return self._video_out(self._video(video_id), viewer=viewer)

    def _video(self, video_id: int, *, usable: bool = False) -> Video:
        v = self.video_store.video(video_id)
        if v is None:
            raise NotFound(f"no video with id {video_id}")
        if usable and v.status != "ok":
            raise Unprocessable(f"video {v.path} cannot be annotated: {v.error}")
        return v

    @staticmethod
    def _check_frame(v: Video, frame: int) -> None:
        if not 0 <= frame < v.length:
            raise NotFound(f"video {v.id} has frames 0 to {v.length - 1}, not frame {frame}")

    def _source(self, v: Video) -> tuple[VideoSource, Any]:
        """The video's reader (a few kept open, each with its lock: readers decode in
        order)."""
        import threading

        got = self._video_sources.get(v.id)
        if got is None:
            try:
                src = open_video(safe_relpath(self.root, v.path))
            except VideoError as exc:
                raise Unprocessable(f"video {v.path} cannot be read: {exc}") from None
            got = (src, threading.Lock())
            self._video_sources.put(v.id, got)
        return got

    def frame_rgb(self, v: Video, frame: int) -> np.ndarray:
        self._check_frame(v, frame)
        src, lock = self._source(v)
        try:
            with lock:
                return src.frame(frame)
        except (VideoError, IndexError, StopIteration) as exc:
            raise Unprocessable(f"video {v.path}: frame {frame} cannot be read: {exc}") from None

    def frame_image(self, video_id: int, frame: int) -> tuple[Path | bytes, str | None]:
        """What the page shows of a frame: the frame's file, or JPEG bytes (frames of a
        video file, and frame files browsers do not show)."""
        from PIL import Image as PILImage

        v = self._video(video_id, usable=True)
        self._check_frame(v, frame)
        if v.kind == "frames":
            path = safe_relpath(self.root, f"{v.path}/{v.files[frame]}")
            if path.suffix.lower() in _SHOWN and path.is_file():
                return path, None
        buf = io.BytesIO()
        PILImage.fromarray(self.frame_rgb(v, frame)).save(buf, format="JPEG", quality=92)
        return buf.getvalue(), "image/jpeg"

    def frame_embedding(self, v: Video, frame: int) -> ImageEmbedding:
        """The frame's embedding: from the embedding cache (the same keys as images and as
        the trackers' predictor), or computed now (once: concurrent callers wait)."""
        content = self._frame_keys.get((v.id, frame))
        if content is not None:
            hit = self.cache.get(self._cache_key(content))
            if hit is not None:
                return hit
        with self._image_lock(("video", v.id, frame)):
            rgb = self.frame_rgb(v, frame)
            content = image_key(rgb)
            key = self._cache_key(content)
            item = self.cache.get(key)
            if item is None:
                with torch_threads(self.embed_threads):
                    item = self._predictor().embed(rgb)
                self.cache.put(key, item)
            self._frame_keys.put((v.id, frame), content)
            return item

    def predict_frame(
        self, video_id: int, frame: int, req: PredictRequest, user: UserRef
    ) -> PredictOut:
        """The click path of :meth:`predict` on one frame of a video (candidates kept for
        the frame: their ``mask_input_id`` refines, their ``mask_id`` sets a key frame)."""
        t0 = time.perf_counter()
        v = self._video(video_id, usable=True)
        self._check_frame(v, frame)
        self._check_prompt(req)
        owner = (v.id, frame)
        mask_input = self._mask_input(req, owner)
        self._count_click(user, video_timer(v.id))
        outs, best = self._decode_prompt(self.frame_embedding(v, frame), req, mask_input, owner)
        ms = round((time.perf_counter() - t0) * 1e3, 2)
        return PredictOut(
            video_id=v.id, frame=frame, width=v.width, height=v.height, masks=outs, best=best, ms=ms
        )

    # -- tracks ------------------------------------------------------------------------------
    def _track(self, track_id: int) -> Track:
        t = self.video_store.track(track_id)
        if t is None:
            raise NotFound(f"no track with id {track_id}")
        return t

    def _track_out(self, t: Track, counts: Any = None, names: Any = None) -> TrackOut:
        if counts is None:
            counts = self.video_store.frame_counts([t.id])
        if names is None:
            names = {u.id: u.name for u in self.store.users()}
        keys, n = counts.get(t.id, ([], 0))
        return TrackOut(
            id=t.id,
            video_id=t.video_id,
            object_id=t.object_id,
            category=t.category,
            status=t.status,
            key_frames=keys,
            frames=n,
            model_id=t.model_id,
            user=names.get(t.user_id) if t.user_id is not None else None,
            clicks=int(t.clicks or 0),
            seconds=t.seconds,
            updated_at=t.updated_at,
        )

    def list_tracks(self, video_id: int) -> list[TrackOut]:
        self._video(video_id)
        tracks = self.video_store.tracks(video_id)
        counts = self.video_store.frame_counts([t.id for t in tracks])
        names = {u.id: u.name for u in self.store.users()}
        return [self._track_out(t, counts, names) for t in tracks]

    def get_track(self, track_id: int) -> TrackOut:
        return self._track_out(self._track(track_id))

    def _mask_fields(self, v: Video, frame: int, req: MaskChoice) -> dict[str, Any]:
        """A key frame's row from a candidate of that frame or a client's RLE."""
        rle, area, bbox, score, prompt = self._chosen_mask(req, (v.id, frame), (v.height, v.width))
        return {"segmentation": rle, "area": area, "bbox": bbox, "score": score, "prompt": prompt}

    def create_track(
        self, video_id: int, req: TrackRequest, user: UserRef, key: str | None = None
    ) -> TrackOut:
        """A new object of the video, with its mask on ``req.frame`` (its first key frame).
        ``key`` (``Idempotency-Key``): a repeat answers the first attempt's object."""
        v = self._video(video_id, usable=True)
        request = self._keyed(user, key, "track", v.id)
        if (first := self._first(request)) is not None:
            return self._replay_track(first, request)
        self._check_video_writable(v.id, user)
        self._check_frame(v, req.frame)
        start = {"frame": req.frame, **self._mask_fields(v, req.frame, req)}
        clicks, seconds = self._spent(user, v.id)
        fields = {"category": req.category, "status": "pending", "model_id": self.model_id}
        fields.update(user_id=user.id, clicks=clicks, seconds=seconds)
        try:
            t = self.video_store.add_track(v.id, fields, start, request=request)
        except RequestRepeat as rep:  # a concurrent attempt with the same key won
            return self._replay_track(rep.first, request)
        except StoreConflict as exc:
            raise Conflict(str(exc)) from None
        return self._track_out(t)

    def set_key_frame(
        self, track_id: int, frame: int, req: MaskChoice, user: UserRef, key: str | None = None
    ) -> TrackOut:
        """Set (correct) the track's mask on ``frame``: a key frame, kept by every later
        propagation; propagate from it to carry the correction forward. ``key``: as in
        :meth:`create_track`."""
        request = self._keyed(user, key, "key-frame", track_id)
        if (first := self._first(request)) is not None:
            return self._replay_track(first, request)
        t = self._track(track_id)
        v = self._video(t.video_id, usable=True)
        self._check_video_writable(v.id, user)
        self._check_frame(v, frame)
        fields = self._mask_fields(v, frame, req)
        try:
            saved = self.video_store.set_key(
                t.id, frame, fields, request=request, spent=self._spent(user, v.id)
            )
        except RequestRepeat as rep:
            return self._replay_track(rep.first, request)
        if not saved:
            raise NotFound(f"no track with id {track_id}")
        return self._track_out(self._track(track_id))

    def update_track(
        self, track_id: int, req: TrackUpdate, user: UserRef, key: str | None = None
    ) -> TrackOut:
        """Rename the track, or accept it (``status``: ``accepted``; ``pending`` again).
        ``key``: as in :meth:`create_track`."""
        request = self._keyed(user, key, "track-patch", track_id)
        if (first := self._first(request)) is not None:
            return self._replay_track(first, request)
        t = self._track(track_id)
        self._check_video_writable(t.video_id, user)
        fields: dict[str, Any] = {}
        if req.category is not None and req.category != t.category:
            fields["category"] = req.category
        if req.status is not None and req.status != t.status:
            if req.status == "accepted" and not self.video_store.frames([t.id]):
                raise Unprocessable(f"track {t.id} has no masks to accept")
            fields["status"] = req.status
        if not fields:
            return self._track_out(t)
        try:
            t = self.video_store.update_track(
                t.id, fields, request=request, spent=self._spent(user, t.video_id)
            )
        except RequestRepeat as rep:
            return self._replay_track(rep.first, request)
        if t is None:
            raise NotFound(f"no track with id {track_id}")
        return self._track_out(t)

    def delete_track(self, track_id: int, user: UserRef, key: str | None = None) -> None:
        """Delete the object and its masks (a ``track_delete`` event keeps it counted as
        proposed). ``key``: a repeat of a committed delete answers as the first did."""
        request = self._keyed(user, key, "track-delete", track_id)
        if (first := self._first(request)) is not None:
            self._replay_track(first, request)
            return
        t = self._track(track_id)
        self._check_video_writable(t.video_id, user)
        ev = {"kind": "track_delete", "user_id": user.id, "data": {"track_id": t.id}}
        try:
            gone = self.video_store.delete_track(t.id, ev, request=request)
        except RequestRepeat as rep:
            self._replay_track(rep.first, request)
            return
        if not gone:
            raise NotFound(f"no track with id {track_id}")

    def frame_masks(self, video_id: int, frame: int) -> FrameMasks:
        """Every track's mask on one frame (key or propagated)."""
        v = self._video(video_id)
        self._check_frame(v, frame)
        tracks = {t.id: t for t in self.video_store.tracks(v.id)}
        masks = []
        for r in self.video_store.frames(tracks, frame):
            t = tracks[r.track_id]
            seg = r.segmentation
            masks.append(
                FrameMask(
                    track_id=t.id,
                    object_id=t.object_id,
                    category=t.category,
                    status=t.status,
                    key=bool(r.key),
                    segmentation=RLE(size=tuple(seg["size"]), counts=seg["counts"]),
                    area=r.area,
                    bbox=list(r.bbox),
                    score=r.score,
                )
            )
        return FrameMasks(video_id=v.id, frame=frame, masks=masks)
