"""The annotator's videos and the objects followed through them: queries beside
:mod:`.store` (the tables ``videos``, ``tracks`` and ``track_frames`` are declared there,
with the others; schema 6, :mod:`.migrate`).

- ``videos``: one row per video of the images folder (a video file found by the rescan,
  or a folder of frames registered by path), with its size, frame count and frame names;
- ``tracks``: one object followed through one video (``object_id``: its pixel value in the
  DAVIS PNGs, 1-255, unique in the video), its category and status (``pending`` until
  accepted);
- ``track_frames``: the track's mask on each frame, either a *key frame* (set by the
  annotator: the tracker starts there and never overwrites it) or propagated.

Every write commits before the function returns, as in :mod:`.store`. The writes that take
a ``request`` (:class:`.work_store.Request`) store its ``Idempotency-Key`` in their own
transaction (``request.claim(session)``; the track's id as the key's result), and those that
take ``spent`` (``(clicks, seconds)`` of the object timer) add it to the track's ``clicks``
and ``seconds`` in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from .store import Event, StoreConflict, Track, TrackFrame, Video

if TYPE_CHECKING:
    from .store import Store

#: Track statuses: ``pending`` while it is being made, ``accepted`` when the annotator
#: accepts it (the exports take the accepted ones).
TRACK_STATUSES = ("pending", "accepted")
#: DAVIS PNGs hold object ids 1-255.
MAX_OBJECTS = 255

#: ``(clicks, seconds)`` of an object timer (seconds ``None``: no timer was running)
Spent = tuple[int, float | None]


def _claim(s: Any, request: Any, track_id: int) -> None:
    if request is not None:
        request.claim(s).annotation_id = track_id


def _spend(s: Any, track_id: int, spent: Spent | None) -> None:
    """Add an object timer's clicks and seconds to the track (in the caller's transaction)."""
    if spent is None or (spent[0] == 0 and spent[1] is None):
        return
    clicks, seconds = spent
    values: dict[str, Any] = {"clicks": Track.clicks + clicks}
    if seconds is not None:
        values["seconds"] = func.coalesce(Track.seconds, 0.0) + seconds
    q = update(Track).where(Track.id == track_id).values(**values)
    s.execute(q.execution_options(synchronize_session=False))


class VideoStore:
    """Queries on the video tables of a :class:`~.store.Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- videos ------------------------------------------------------------------------------
    def videos(self) -> list[Video]:
        with self.store.session() as s:
            return list(s.scalars(select(Video).order_by(Video.id)))

    def video(self, video_id: int) -> Video | None:
        if not self.store._id_ok(video_id):
            return None
        with self.store.session() as s:
            return s.get(Video, video_id)

    def by_path(self, path: str) -> Video | None:
        with self.store.session() as s:
            return s.scalars(select(Video).where(Video.path == path)).first()

    def save_video(self, path: str, fields: dict[str, Any]) -> tuple[Video, bool]:
        """Register the video at ``path`` or update its row; ``(video, created)``."""
        with self.store.session() as s:
            v = s.scalars(select(Video).where(Video.path == path)).first()
            created = v is None
            if v is None:
                v = Video(path=path)
                s.add(v)
            for k, val in fields.items():
                setattr(v, k, val)
            try:
                s.commit()
            except IntegrityError:  # registered by another request meanwhile
                s.rollback()
                return self.save_video(path, fields)
            return v, created

    # -- tracks ------------------------------------------------------------------------------
    def tracks(self, video_id: int | None = None, statuses: Iterable[str] | None = None):
        with self.store.session() as s:
            q = select(Track)
            if video_id is not None:
                q = q.where(Track.video_id == video_id)
            if statuses is not None:
                q = q.where(Track.status.in_(list(statuses)))
            return list(s.scalars(q.order_by(Track.video_id, Track.object_id)))

    def track(self, track_id: int) -> Track | None:
        if not self.store._id_ok(track_id):
            return None
        with self.store.session() as s:
            return s.get(Track, track_id)

    def frame_counts(self, track_ids: Iterable[int]) -> dict[int, tuple[list[int], int]]:
        """Per track: its key frames (sorted) and the number of frames with a mask row."""
        ids = list(track_ids)
        out: dict[int, tuple[list[int], int]] = {i: ([], 0) for i in ids}
        if not ids:
            return out
        with self.store.session() as s:
            rows = s.execute(
                select(TrackFrame.track_id, func.count())
                .where(TrackFrame.track_id.in_(ids))
                .group_by(TrackFrame.track_id)
            )
            for tid, n in rows:
                out[tid] = (out[tid][0], int(n))
            keys = s.execute(
                select(TrackFrame.track_id, TrackFrame.frame)
                .where(TrackFrame.track_id.in_(ids), TrackFrame.key.is_(True))
                .order_by(TrackFrame.frame)
            )
            for tid, f in keys:
                out[tid][0].append(int(f))
        return out

    def add_track(
        self,
        video_id: int,
        fields: dict[str, Any],
        first: dict[str, Any],
        *,
        request: Any = None,
    ) -> Track:
        """A new track with the next free object id and its first key frame (``first``:
        a :class:`~.store.TrackFrame`'s fields), in one transaction. Raises
        :class:`StoreConflict` when the video holds :data:`MAX_OBJECTS` tracks, and
        ``RequestRepeat`` when ``request``'s key was committed before."""
        fields = {**fields, "category": self.store.category_name(fields["category"])}
        now = time.time()
        for _ in range(3):
            with self.store.session() as s:
                key = request.claim(s) if request is not None else None
                used = set(s.scalars(select(Track.object_id).where(Track.video_id == video_id)))
                free = next((i for i in range(1, MAX_OBJECTS + 1) if i not in used), None)
                if free is None:
                    raise StoreConflict(
                        f"the video holds {MAX_OBJECTS} objects already (DAVIS PNG values)"
                    )
                t = Track(
                    video_id=video_id, object_id=free, created_at=now, updated_at=now, **fields
                )
                s.add(t)
                try:
                    s.flush()
                except IntegrityError:  # another request took this object id: try the next
                    s.rollback()
                    continue
                s.add(TrackFrame(track_id=t.id, key=True, **first))
                if key is not None:
                    key.annotation_id = t.id
                s.commit()
                return t
        raise StoreConflict("could not give the track an object id: retry")

    def update_track(
        self,
        track_id: int,
        fields: dict[str, Any],
        *,
        request: Any = None,
        spent: Spent | None = None,
    ) -> Track | None:
        """Change the track's fields (``None``: it is gone)."""
        if "category" in fields:
            fields = {**fields, "category": self.store.category_name(fields["category"])}
        with self.store.session() as s:
            _claim(s, request, track_id)
            res = s.execute(
                update(Track).where(Track.id == track_id).values(**fields, updated_at=time.time())
            )
            if res.rowcount != 1:
                s.rollback()
                return None
            _spend(s, track_id, spent)
            s.commit()
            return s.get(Track, track_id)

    def delete_track(
        self, track_id: int, ev: dict[str, Any] | None = None, *, request: Any = None
    ) -> bool:
        """Delete the track and its masks (and record ``ev`` for it, with ``data``'s
        ``object_id`` and ``status``), in one transaction; false when it is gone."""
        with self.store.session() as s:
            _claim(s, request, track_id)
            t = s.get(Track, track_id)
            if t is None:
                s.rollback()
                return False
            data = {"video_id": t.video_id, "object_id": t.object_id, "status": t.status}
            s.execute(delete(TrackFrame).where(TrackFrame.track_id == track_id))
            res = s.execute(delete(Track).where(Track.id == track_id))
            if res.rowcount != 1:
                s.rollback()
                return False
            if ev is not None:
                s.add(Event(ts=time.time(), **{**ev, "data": {**(ev.get("data") or {}), **data}}))
            s.commit()
            return True

    def add_time(self, track_id: int, spent: Spent) -> None:
        """Add an object timer's clicks and seconds to the track (a propagation's start)."""
        with self.store.session() as s:
            _spend(s, track_id, spent)
            s.commit()

    # -- frames ------------------------------------------------------------------------------
    def set_key(
        self,
        track_id: int,
        frame: int,
        fields: dict[str, Any],
        *,
        request: Any = None,
        spent: Spent | None = None,
    ) -> bool:
        """Make ``frame`` a key frame of the track with this mask (replacing its row);
        false when the track is gone."""
        with self.store.session() as s:
            _claim(s, request, track_id)
            if s.get(Track, track_id) is None:
                s.rollback()
                return False
            s.execute(
                delete(TrackFrame).where(TrackFrame.track_id == track_id, TrackFrame.frame == frame)
            )
            s.add(TrackFrame(track_id=track_id, frame=frame, key=True, **fields))
            s.execute(update(Track).where(Track.id == track_id).values(updated_at=time.time()))
            _spend(s, track_id, spent)
            s.commit()
            return True

    def frames(
        self, track_ids: Iterable[int], frame: int | None = None, *, keys_only: bool = False
    ) -> list[TrackFrame]:
        """The mask rows of these tracks (on one ``frame``, or all), by track and frame."""
        ids = list(track_ids)
        if not ids:
            return []
        with self.store.session() as s:
            q = select(TrackFrame).where(TrackFrame.track_id.in_(ids))
            if frame is not None:
                q = q.where(TrackFrame.frame == frame)
            if keys_only:
                q = q.where(TrackFrame.key.is_(True))
            return list(s.scalars(q.order_by(TrackFrame.track_id, TrackFrame.frame)))

    def save_propagated(
        self,
        track_id: int,
        first: int,
        last: int,
        rows: dict[int, dict[str, Any]],
        *,
        request: Any = None,
    ) -> int:
        """Replace the track's propagated masks on frames ``first..last`` by ``rows``
        (frame -> fields), in one transaction; key frames (also those set while the
        propagation ran) are kept. Returns the rows written; ``-1``: the track is gone.
        ``request``: the propagation's key, stored with its masks."""
        with self.store.session() as s:
            _claim(s, request, track_id)
            if s.get(Track, track_id) is None:
                return -1
            keys = set(
                s.scalars(
                    select(TrackFrame.frame).where(
                        TrackFrame.track_id == track_id, TrackFrame.key.is_(True)
                    )
                )
            )
            s.execute(
                delete(TrackFrame).where(
                    TrackFrame.track_id == track_id,
                    TrackFrame.key.is_(False),
                    TrackFrame.frame >= first,
                    TrackFrame.frame <= last,
                )
            )
            n = 0
            for f, fields in rows.items():
                if f in keys or not first <= f <= last:
                    continue
                s.add(TrackFrame(track_id=track_id, frame=f, key=False, **fields))
                n += 1
            s.execute(update(Track).where(Track.id == track_id).values(updated_at=time.time()))
            s.commit()
            return n
