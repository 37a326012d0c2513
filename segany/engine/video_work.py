"""Several annotators on videos, with the images' mechanisms: a video's *lease* (one page
session writes on a video at a time: the lease queries of :mod:`.work_store` on the
``video_work`` table, renewed and released like an image's), *keyed writes* on its tracks
(the ``Idempotency-Key`` stored in the write's transaction, :mod:`.work`'s request keys),
and the *object timers* of video objects (the click path's timers of :mod:`.predictions`,
one per annotator and video). A part of :class:`~.service.AnnotationService`.

- Opening a video (``POST /api/videos/{id}/open``) takes its lease for the page session and
  starts the object timer; every write on the video's objects (a new object, a key frame,
  a rename or accept, a delete, a propagation) by another page while the lease is live is
  refused with 409 naming the holder, as for images. Requests without a session take no
  lease and are refused only while a page holds one.
- A keyed write repeated (a retry whose answer was lost) is answered with the first
  attempt's object as it is now (a delete: 204 again) and writes nothing; a propagation
  repeated while its job runs (or after it saved) answers that job.
- Each write on an object adds the annotator's active time since the previous action on the
  video (each pause capped at :data:`~.predictions.IDLE_CAP`) and the clicks on its frames
  to the object's ``seconds`` and ``clicks`` (``/api/stats``, the videos section).
"""

from __future__ import annotations

import time
from typing import Any

from .predictions import video_timer
from .schemas import LeaseOut, TrackOut, UserRef, VideoOpenOut
from .work_store import Request, RequestKey, lease_holder

#: The request-key kinds of the video writes (target: the video id for ``track``, else the
#: track id).
VIDEO_KINDS = ("track", "key-frame", "track-patch", "track-delete", "propagate")


class VideoWorkMixin:
    """Video leases, keyed track writes and video object timers of the service."""

    # -- leases ------------------------------------------------------------------------------
    def open_video(self, video_id: int, user: UserRef) -> VideoOpenOut:
        """Open a video: its lease for the caller's page session (if any), the object timer
        started, an ``open`` event."""
        v = self._video(video_id)
        lock = self.lease_video(video_id, user) if user.session is not None else None
        self._start_timer(user, video_timer(v.id))
        self._events.put(
            {"ts": time.time(), "kind": "open", "user_id": user.id, "data": {"video_id": v.id}}
        )
        return VideoOpenOut(video=self._video_out(v, viewer=user), lock=lock)

    def lease_video(self, video_id: int, user: UserRef) -> LeaseOut:
        """Take or renew the video's lease (as :meth:`~.work.WorkMixin.lease`)."""
        v = self._video(video_id)
        held, w = self._take_lease(v.id, user, "video")
        return LeaseOut(
            video_id=v.id,
            embedding="ready",  # frames are embedded on their first click
            status=v.status,
            error=v.error,
            **self._lease_fields(held, w, user),
        )

    def release_video(self, video_id: int, user: UserRef) -> None:
        self._video(video_id)
        if user.session is not None:
            self.work.release_lease(video_id, user.id, user.session, "video")

    def _video_locked_by(
        self, video_id: int, viewer: UserRef | None, leases: dict[int, Any] | None = None
    ) -> str | None:
        """Who holds the video's lease, when not the viewer's page (``None``: free);
        ``leases``: every video's lease row (read here when not given)."""
        w = self.work.get(video_id, "video") if leases is None else leases.get(video_id)
        holder = lease_holder(w)
        if holder is None or (viewer is not None and holder == (viewer.id, viewer.session)):
            return None
        return self._names().get(holder[0], "?")

    def _check_video_writable(self, video_id: int, user: UserRef) -> None:
        """:class:`Conflict` when another page holds the video's lease."""
        w = self.work.get(video_id, "video")
        if w is not None:
            self._check_lease(w, f"video {video_id}", user)

    # -- keyed writes ------------------------------------------------------------------------
    def _replay_track(self, first: RequestKey, req: Request) -> TrackOut | None:
        """The answer to a repeated keyed track write: the first attempt's track as it is
        now (``None`` for a delete); 409 when it was deleted since."""
        return self._replay_object(
            first, req, "track-delete", "track", self.video_store.track, self._track_out
        )

    # -- object timers -----------------------------------------------------------------------
    def _spent(self, user: UserRef, video_id: int) -> tuple[int, float | None]:
        """The clicks and active seconds since the previous action on the video (the timer
        restarts): what this write adds to its object."""
        return self._take_timer(user, video_timer(video_id))
