"""Several annotators on one database: image leases, review states, assignments and the
request keys of retried writes. Queries beside :mod:`.store` (the tables ``image_work`` and
``request_keys`` are declared there, with the others; schema 4, :mod:`.migrate`).

- ``image_work`` (one row per image, made on first use): the *lease* (the user and the page
  session holding the image, and when it expires), the *review* state (``none`` ->
  ``submitted`` -> ``approved`` / ``returned``) with the submitter, the reviewer and the
  comment, and the *assignee*. A lease is taken with one conditional ``UPDATE`` (free,
  expired, or already ours), so two tabs that ask at once cannot both hold it; review
  transitions are conditional on the state the caller saw, like annotation statuses.
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

from .store import Image, ImageWork, RequestKey, StoreConflict

if TYPE_CHECKING:
    from .store import Store

#: Review states of an image.
REVIEW_STATES = ("none", "submitted", "approved", "returned")


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

    def _ensure(self, s: Session, image_id: int) -> None:
        if s.get(ImageWork, image_id) is None:
            s.add(ImageWork(image_id=image_id))
            try:
                s.commit()
            except IntegrityError:  # made by a concurrent request
                s.rollback()

    def get(self, image_id: int) -> ImageWork | None:
        with self.store.session() as s:
            return s.get(ImageWork, image_id)

    def all(self) -> dict[int, ImageWork]:
        with self.store.session() as s:
            return {w.image_id: w for w in s.scalars(select(ImageWork))}

    # -- requests ------------------------------------------------------------------------
    def request(self, user_id: int, key: str) -> RequestKey | None:
        with self.store.session() as s:
            q = select(RequestKey).where(RequestKey.user_id == user_id, RequestKey.key == key)
            return s.scalars(q).first()

    # -- leases --------------------------------------------------------------------------
    def take_lease(
        self, image_id: int, user_id: int, session: str, seconds: float
    ) -> tuple[bool, ImageWork]:
        """Take (or renew) the lease of ``image_id`` for ``(user_id, session)`` when it is
        free, expired or already theirs; the session's leases on other images are released.
        Returns ``(held, row)``: ``row`` names the holder when not held."""
        now = time.time()
        with self.store.session() as s:
            self._ensure(s, image_id)
            mine = (ImageWork.lease_user_id == user_id) & (ImageWork.lease_session == session)
            res = s.execute(
                update(ImageWork)
                .where(
                    ImageWork.image_id == image_id,
                    (ImageWork.lease_expires < now) | ImageWork.lease_user_id.is_(None) | mine,
                )
                .values(lease_user_id=user_id, lease_session=session, lease_expires=now + seconds)
            )
            held = res.rowcount == 1
            if held:
                s.execute(
                    update(ImageWork)
                    .where(mine, ImageWork.image_id != image_id)
                    .values(lease_user_id=None, lease_session=None, lease_expires=0.0)
                )
            s.commit()
            return held, s.get(ImageWork, image_id)

    def release_lease(self, image_id: int, user_id: int, session: str) -> bool:
        with self.store.session() as s:
            res = s.execute(
                update(ImageWork)
                .where(
                    ImageWork.image_id == image_id,
                    ImageWork.lease_user_id == user_id,
                    ImageWork.lease_session == session,
                )
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


def lease_holder(w: ImageWork | None, now: float | None = None) -> tuple[int, str] | None:
    """``(user id, session)`` holding a live lease on the row's image, else ``None``."""
    if w is None or w.lease_user_id is None or w.lease_session is None:
        return None
    if w.lease_expires < (time.time() if now is None else now):
        return None
    return w.lease_user_id, w.lease_session
