"""The purge of the annotator's tables that would otherwise only grow (issue #24): the
``Idempotency-Key`` of every keyed write (``request_keys``) and the deleted objects kept for
undo (``trash``). Rows older than their retention are deleted when the service starts and
then at most once every :data:`PURGE_EVERY` seconds, on a keyed write
(:meth:`Purger.maybe`). The retentions are here, and only here:

- a request key is needed while its write may still be retried: a page retries a write
  until the server answers, so a key matters for as long as a page may stay offline with
  the write queued. After :data:`REQUEST_KEY_SECONDS` (24 h) it is purged: a write kept
  offline longer than that and whose first attempt was saved would be saved twice;
- a trash entry is needed while an undo may restore the object: the page's undo history
  lasts while the image stays open, and the API restores any time. After
  :data:`TRASH_SECONDS` (7 days) the deleted object is gone for good (a restore is then
  404 "not deleted"), and a rejected pre-fill whose fix was deleted that long ago is no
  longer recognised as un-fixed when it is set back to pending.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import delete
from sqlalchemy.exc import SQLAlchemyError

from .store import RequestKey, Store, Trash

log = logging.getLogger("segany.engine")

#: Seconds a write's ``Idempotency-Key`` is kept (a retry after that is a new write).
REQUEST_KEY_SECONDS = 24 * 3600.0
#: Seconds a deleted object stays restorable in the trash.
TRASH_SECONDS = 7 * 24 * 3600.0
#: Seconds between two purges while the server runs.
PURGE_EVERY = 3600.0


def purge(store: Store, now: float | None = None) -> dict[str, int]:
    """Delete the request keys older than :data:`REQUEST_KEY_SECONDS` and the trash
    entries older than :data:`TRASH_SECONDS` (at ``now``, default the time), in one
    transaction; the numbers of rows deleted per table."""
    now = time.time() if now is None else now
    with store.session() as s:
        keys = s.execute(
            delete(RequestKey).where(RequestKey.created_at < now - REQUEST_KEY_SECONDS)
        ).rowcount
        trash = s.execute(delete(Trash).where(Trash.deleted_at < now - TRASH_SECONDS)).rowcount
        s.commit()
    return {"request_keys": int(keys or 0), "trash": int(trash or 0)}


class Purger:
    """:func:`purge` now, then at most once every ``every`` seconds (:meth:`maybe`)."""

    def __init__(self, store: Store, every: float = PURGE_EVERY) -> None:
        self.store = store
        self.every = float(every)
        self._lock = threading.Lock()
        self._last = float("-inf")

    def run(self, now: float | None = None) -> dict[str, int]:
        """Purge now (the clock of the last purge restarts)."""
        now = time.time() if now is None else now
        with self._lock:
            self._last = now
        gone = purge(self.store, now)
        if any(gone.values()):
            log.info("purged %(request_keys)d request keys and %(trash)d trash entries", gone)
        return gone

    def maybe(self, now: float | None = None) -> dict[str, int] | None:
        """Purge when the last purge is ``every`` seconds old (``None``: not yet). A purge
        that fails is logged: the write that called it goes on."""
        now = time.time() if now is None else now
        with self._lock:
            if now - self._last < self.every:
                return None
            self._last = now
        try:
            return self.run(now)
        except SQLAlchemyError:
            log.warning("the purge of old request keys and trash failed", exc_info=True)
            return None
