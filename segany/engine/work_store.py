"""Several annotators on one database: image leases, review states, assignments and the
request keys of retried writes. Queries beside :mod:`.store` (the tables ``image_work`` and
``request_keys`` are declared there, with the others; schema 4, :mod:`.migrate`).

- ``image_work`` (one row per image, made on first use): the *lease* (the user and the page
  session holding the image, and when it expires), the *review* state (``none`` ->
  ``submitted`` -> ``approved`` / ``returned``) with the submitter, the reviewer and the
  comment, and the *assignee*. A lease is taken with one conditional ``UPDATE`` (free,
  expired, or already ours), so two tabs that ask at once cannot both hold it; review
  transitions are conditional on the state the caller saw, like annotation statuses.
- ``video_work`` (one row per video, made on first use): a video's lease, the same columns
  (:class:`~.store.LeaseColumns`) taken and renewed by the same queries (``kind="video"``);
  a page session holds one lease at a time, on an image or on a video.
- ``request_keys``: the ``Idempotency-Key`` of a write, unique per user, inserted in the
  write's own transaction (:func:`claim_request`): a retried write whose first attempt was
  committed finds its key and is answered with the first result instead of writing twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .store import Image, ImageWork, RequestKey, StoreConflict, VideoWork

if TYPE_CHECKING:
    from .store import Store

#: Review states of an image.
REVIEW_STATES = ("none", "submitted", "approved", "returned")
#: What a page session can lease (one at a time), and the tables that hold the leases.
LEASED: dict[str, type] = {"image": ImageWork, "video": VideoWork}
LEASED_KEYS: dict[type, str] = {ImageWork: "image_id", VideoWork: "video_id"}


def _leased(kind: str) -> type:
    try:
        return LEASED[kind]
    except KeyError:
        raise ValueError(f"nothing called {kind!r} is leased: {sorted(LEASED)}") from None


def _mine(table: type, user_id: int, session: str) -> Any:
    return (table.lease_user_id == user_id) & (table.lease_session == session)


@dataclass(frozen=True)
class Request:
    """A keyed write: who, the key, what and on which target."""

    user_id: int
    key: str
    kind: str
    target: int

    def claim(self, s: Session) -> RequestKey:
        """:func:`claim_request` (the store's writes call this: :mod:`.store` does not
        import this module)."""
        return claim_request(s, self)


class RequestRepeat(StoreConflict):
    """The request's key was committed by an earlier attempt (nothing was written now)."""

    def __init__(self, first: RequestKey) -> None:
        super().__init__(f"request {first.key!r} was already applied")
        self.first = first


def claim_request(s: Session, req: Request | None) -> RequestKey | None:
    """Insert ``req``'s key in the caller's transaction (before its write). Raises
    :class:`RequestRepeat` (after a rollback) when an earlier attempt holds the key."""
    if req is None:
        return None
    row = RequestKey(
        user_id=req.user_id, key=req.key, kind=req.kind, target=req.target, created_at=time.time()
    )
    s.add(row)
    try:
        s.flush()
    except IntegrityError:
        s.rollback()
        first = s.scalars(
            select(RequestKey).where(RequestKey.user_id == req.user_id, RequestKey.key == req.key)
        ).first()
        if first is None:  # pragma: no cover - the unique rule held and the row is gone
            raise
        s.expunge(first)  # its fields stay readable after the caller's rollback
        raise RequestRepeat(first) from None
    return row


class WorkStore:
    """The queries of leases, reviews, assignments and request keys over a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _ensure(self, s: Session, image_id: int, table: type = ImageWork) -> None:
        """Make the target's row of ``table`` (:data:`LEASED`) on first use."""
        column = LEASED_KEYS[table]
        if s.get(table, image_id) is None:
            s.add(table(**{column: image_id}))
            try:
                s.commit()
            except IntegrityError:  # made by a concurrent request
                s.rollback()

    def get(self, target: int, kind: str = "image") -> ImageWork | VideoWork | None:
        """The image's (or video's: ``kind``) work row (``None``: never leased or reviewed)."""
        with self.store.session() as s:
            return s.get(_leased(kind), target)

    def all(self, kind: str = "image") -> dict[int, ImageWork | VideoWork]:
        """Every image's (or video's) work row, by its id."""
        table = _leased(kind)
        column = LEASED_KEYS[table]
        with self.store.session() as s:
            return {getattr(w, column): w for w in s.scalars(select(table))}

    # -- requests ------------------------------------------------------------------------
    def request(self, user_id: int, key: str) -> RequestKey | None:
        with self.store.session() as s:
            q = select(RequestKey).where(RequestKey.user_id == user_id, RequestKey.key == key)
            return s.scalars(q).first()

    # -- leases --------------------------------------------------------------------------
    def take_lease(
        self, target: int, user_id: int, session: str, seconds: float, kind: str = "image"
    ) -> tuple[bool, ImageWork | VideoWork]:
        """Take (or renew) the lease of image (or video: ``kind``) ``target`` for
        ``(user_id, session)`` when it is free, expired or already theirs; the session's
        leases on other images and videos are released (a page annotates one thing at a
        time). Returns ``(held, row)``: ``row`` names the holder when not held."""
        table = _leased(kind)
        key = getattr(table, LEASED_KEYS[table])
        now = time.time()
        with self.store.session() as s:
            self._ensure(s, target, table)
            res = s.execute(
                update(table)
                .where(
                    key == target,
                    (table.lease_expires < now)
                    | table.lease_user_id.is_(None)
                    | _mine(table, user_id, session),
                )
                .values(lease_user_id=user_id, lease_session=session, lease_expires=now + seconds)
            )
            held = res.rowcount == 1
            if held:
                for other in LEASED.values():
                    q = update(other).where(_mine(other, user_id, session))
                    if other is table:
                        q = q.where(key != target)
                    s.execute(q.values(lease_user_id=None, lease_session=None, lease_expires=0.0))
            s.commit()
            return held, s.get(table, target)

    def release_lease(self, target: int, user_id: int, session: str, kind: str = "image") -> bool:
        table = _leased(kind)
        with self.store.session() as s:
            res = s.execute(
                update(table)
                .where(getattr(table, LEASED_KEYS[table]) == target, _mine(table, user_id, session))
                .values(lease_user_id=None, lease_session=None, lease_expires=0.0)
            )
            s.commit()
            return res.rowcount == 1

    # -- review --------------------------------------------------------------------------
    def set_review(
        self,
        image_id: int,
        allowed_from: tuple[str, ...],
        state: str,
        *,
        done: bool,
        **fields: Any,
    ) -> ImageWork:
        """Move the image's review state to ``state`` if it is one of ``allowed_from`` now
        (one conditional ``UPDATE``), and set ``images.done``, in one transaction. Raises
        :class:`StoreConflict` naming the state it has."""
        with self.store.session() as s:
            self._ensure(s, image_id)
            res = s.execute(
                update(ImageWork)
                .where(ImageWork.image_id == image_id, ImageWork.review.in_(allowed_from))
                .values(review=state, review_at=time.time(), **fields)
            )
            if res.rowcount != 1:
                s.rollback()
                now = s.scalar(select(ImageWork.review).where(ImageWork.image_id == image_id))
                raise StoreConflict(f"image {image_id} is {now}")
            s.execute(update(Image).where(Image.id == image_id).values(done=done))
            s.commit()
            return s.get(ImageWork, image_id)

    def assign(self, image_id: int, user_id: int | None) -> ImageWork:
        with self.store.session() as s:
            self._ensure(s, image_id)
            s.execute(
                update(ImageWork).where(ImageWork.image_id == image_id).values(assignee_id=user_id)
            )
            s.commit()
            return s.get(ImageWork, image_id)

    def deal(self, user_ids: list[int]) -> dict[int, int]:
        """Assign the images without an assignee (status ``ok``) to ``user_ids`` in turn, in
        image order; returns ``user id -> images given``."""
        given = dict.fromkeys(user_ids, 0)
        with self.store.session() as s:
            ids = list(s.scalars(select(Image.id).where(Image.status == "ok").order_by(Image.id)))
        work = self.all()
        free = [i for i in ids if i not in work or work[i].assignee_id is None]
        for k, image_id in enumerate(free):
            uid = user_ids[k % len(user_ids)]
            self.assign(image_id, uid)
            given[uid] += 1
        return given


def lease_holder(
    w: ImageWork | VideoWork | None, now: float | None = None
) -> tuple[int, str] | None:
    """``(user id, session)`` holding a live lease on the row's image (or video), else
    ``None``."""
    if w is None or w.lease_user_id is None or w.lease_session is None:
        return None
    if w.lease_expires < (time.time() if now is None else now):
        return None
    return w.lease_user_id, w.lease_session
