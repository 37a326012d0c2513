"""Undo support of the annotator in the database: a deleted object goes to the ``trash``
table (its whole row) and an undo restores it under the same id; an object's edit history
is the list of its events (each mask edit keeps the mask it replaced).

These are store queries (each one transaction, committed before it returns) kept out of
:mod:`.store`, which is long already; they use only its public session and tables.

Ids: new SQLite databases give each annotation id once (``AUTOINCREMENT``), PostgreSQL's
sequences never give one twice, so the id of a deleted object stays free and the restore
keeps it. Only in an SQLite database created by an older segany can a newer object have
taken the id; the object is then restored under a new id, and the answer says so (its
``id`` differs from the one asked for).
"""

from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from .store import Annotation, Event, Store, StoreConflict, Trash
from .work_store import Request, claim_request

#: The columns of an annotation kept in the trash (every column: a restore is exact).
COLUMNS = tuple(c.name for c in Annotation.__table__.columns)


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a column's value (a non-finite float, possible in rows written by
    older versions, becomes None: PostgreSQL's JSON refuses NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _ok_id(store: Store, value: Any) -> bool:
    return isinstance(value, int) and 0 < value <= store.max_id


def trash(
    store: Store,
    ann_id: int,
    ev: dict[str, Any] | None = None,
    *,
    request: Request | None = None,
) -> Annotation | None:
    """Delete an annotation into the trash (and record ``ev`` for it), in one transaction.
    Returns the deleted row, or None when there is no such annotation. ``request``: its
    ``Idempotency-Key`` is stored in the same transaction (a repeat raises
    :class:`~.work_store.RequestRepeat`)."""
    if not _ok_id(store, ann_id):
        return None
    now = time.time()
    with store.session() as s:
        key = claim_request(s, request)
        if key is not None:
            key.annotation_id = ann_id
        a = s.get(Annotation, ann_id, with_for_update=True)  # PostgreSQL: no edit meanwhile
        if a is None:
            return None
        row = {c: _plain(getattr(a, c)) for c in COLUMNS}
        s.add(
            Trash(
                annotation_id=a.id,
                image_id=a.image_id,
                replaces_id=a.replaces_id,
                row=row,
                user_id=(ev or {}).get("user_id"),
                deleted_at=now,
            )
        )
        res = s.execute(delete(Annotation).where(Annotation.id == ann_id))
        if res.rowcount != 1:  # deleted by a concurrent request meanwhile
            s.rollback()
            return None
        if ev is not None:
            s.add(Event(ts=now, annotation_id=a.id, **ev))
        s.commit()
        return a


def trashed(store: Store, ann_id: int) -> Trash | None:
    """The latest trash entry of annotation ``ann_id`` (None: not in the trash)."""
    if not _ok_id(store, ann_id):
        return None
    with store.session() as s:
        q = select(Trash).where(Trash.annotation_id == ann_id).order_by(Trash.id.desc())
        return s.scalars(q.limit(1)).first()


def fix_in_trash(store: Store, ann_id: int) -> int | None:
    """The id of a deleted (trashed) fix of the pending object ``ann_id``, if any."""
    if not _ok_id(store, ann_id):
        return None
    with store.session() as s:
        q = select(Trash.annotation_id).where(Trash.replaces_id == ann_id)
        return s.scalars(q.order_by(Trash.id.desc()).limit(1)).first()


def restore(
    store: Store, ann_id: int, ev: dict[str, Any], *, request: Request | None = None
) -> Annotation:
    """Put the latest trashed row of ``ann_id`` back (same id when free) and record ``ev``
    (its ``data`` gets ``replaces``: the pending object the restored fix replaces, if it
    still can; and ``restored_as`` when the id changed). Raises :class:`KeyError` when the
    object is not in the trash and :class:`StoreConflict` when it exists already or a
    concurrent request restored it. ``request``: as in :func:`trash` (the key names the
    restored object)."""
    if not _ok_id(store, ann_id):
        raise KeyError(ann_id)
    now = time.time()
    with store.session() as s:
        key = claim_request(s, request)
        entry = s.scalars(
            select(Trash).where(Trash.annotation_id == ann_id).order_by(Trash.id.desc()).limit(1)
        ).first()
        if entry is None:
            if s.get(Annotation, ann_id) is not None:
                raise StoreConflict(f"annotation {ann_id} exists: there is nothing to restore")
            raise KeyError(ann_id)
        row = {k: v for k, v in entry.row.items() if k in COLUMNS}
        same_id = s.get(Annotation, ann_id) is None
        if not same_id:
            row.pop("id", None)
        rep = row.get("replaces_id")
        if rep is not None:  # the fix replaces its pending object only if it still can
            old = s.get(Annotation, rep)
            taken = s.scalar(select(Annotation.id).where(Annotation.replaces_id == rep))
            if old is None or old.status != "rejected" or taken is not None:
                row["replaces_id"] = None
        a = Annotation(**{**row, "updated_at": now})
        s.add(a)
        try:
            s.flush()
        except IntegrityError:
            s.rollback()
            raise StoreConflict(
                f"annotation {ann_id} was restored by another request meanwhile"
            ) from None
        if s.execute(delete(Trash).where(Trash.id == entry.id)).rowcount != 1:
            s.rollback()
            raise StoreConflict(f"annotation {ann_id} was restored by another request meanwhile")
        if key is not None:
            key.annotation_id = a.id
        data = dict(ev.get("data") or {})
        data["replaces"] = a.replaces_id
        if a.id != ann_id:
            data["restored_as"] = a.id
        s.add(Event(ts=now, annotation_id=a.id, **{**ev, "data": data}))
        s.commit()
        return a


def history(store: Store, ann_id: int) -> list[Event]:
    """The events of one annotation, oldest first (accept, edits, status changes, deletes,
    restores); each mask edit holds the mask it replaced in ``data["previous"]``."""
    if not _ok_id(store, ann_id):
        return []
    with store.session() as s:
        q = select(Event).where(Event.annotation_id == ann_id).order_by(Event.ts, Event.id)
        return list(s.scalars(q))
