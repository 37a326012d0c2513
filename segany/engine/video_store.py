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

Every write commits before the function returns, as in :mod:`.store`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from .store import StoreConflict, Track, TrackFrame, Video

if TYPE_CHECKING:
    from .store import Store

#: Track statuses: ``pending`` while it is being made, ``accepted`` when the annotator
#: accepts it (the exports take the accepted ones).
TRACK_STATUSES = ("pending", "accepted")
#: DAVIS PNGs hold object ids 1-255.
MAX_OBJECTS = 255


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

    def add_track(self, video_id: int, fields: dict[str, Any], first: dict[str, Any]) -> Track:
        """A new track with the next free object id and its first key frame (``first``:
        a :class:`~.store.TrackFrame`'s fields), in one transaction. Raises
        :class:`StoreConflict` when the video holds :data:`MAX_OBJECTS` tracks."""
        fields = {**fields, "category": self.store.category_name(fields["category"])}
        now = time.time()
        for _ in range(3):
            with self.store.session() as s:
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
                s.commit()
                return t
        raise StoreConflict("could not give the track an object id: retry")

    def update_track(self, track_id: int, fields: dict[str, Any]) -> Track | None:
        if "category" in fields:
            fields = {**fields, "category": self.store.category_name(fields["category"])}
        with self.store.session() as s:
            res = s.execute(
                update(Track).where(Track.id == track_id).values(**fields, updated_at=time.time())
            )
            if res.rowcount != 1:
                return None
            s.commit()
            return s.get(Track, track_id)

    def delete_track(self, track_id: int) -> bool:
        with self.store.session() as s:
            s.execute(delete(TrackFrame).where(TrackFrame.track_id == track_id))
            res = s.execute(delete(Track).where(Track.id == track_id))
            s.commit()
            return res.rowcount == 1

    # -- frames ------------------------------------------------------------------------------
    def set_key(self, track_id: int, frame: int, fields: dict[str, Any]) -> None:
        """Make ``frame`` a key frame of the track with this mask (replacing its row)."""
        with self.store.session() as s:
            s.execute(
                delete(TrackFrame).where(TrackFrame.track_id == track_id, TrackFrame.frame == frame)
            )
            s.add(TrackFrame(track_id=track_id, frame=frame, key=True, **fields))
            s.execute(update(Track).where(Track.id == track_id).values(updated_at=time.time()))
            s.commit()

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
        self, track_id: int, first: int, last: int, rows: dict[int, dict[str, Any]]
    ) -> int:
        """Replace the track's propagated masks on frames ``first..last`` by ``rows``
        (frame -> fields), in one transaction; key frames (also those set while the
        propagation ran) are kept. Returns the rows written; ``-1``: the track is gone."""
        with self.store.session() as s:
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
