"""Several annotators: image leases (one page writes on an image at a time), the per-user
queue, review (submit, approve, return with a comment), assignments, and the keys that make
retried writes safe. A part of :class:`~.service.AnnotationService`; the tables are in
:mod:`.work_store`.

A page session (one browser tab: ``X-Segany-Session``) takes an image's *lease* when it
opens the image and renews it while it stays (``lease_seconds``, default 60 s; the page
renews every third of that). Writes on the image (accept, edit, delete, restore, pre-fill,
done) by anyone else while the lease is live are refused with 409 naming the holder; an
expired lease is taken by the next page that asks. Requests without a session (scripts, the API)
take no lease and are refused only while a page holds one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from .schemas import (
    AnnotationOut,
    AssignRequest,
    BadRequest,
    Conflict,
    Forbidden,
    ImageOut,
    LeaseOut,
    NotFound,
    QueueOut,
    ReviewRequest,
    Unprocessable,
    UserRef,
)
from .store import Image, StoreConflict
from .work_store import ImageWork, Request, RequestKey, lease_holder

#: ``Idempotency-Key`` and ``X-Segany-Session`` values: 8-64 letters, digits, ``-``, ``_``.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")


def check_token(value: str | None, what: str) -> str | None:
    """``value`` if it is a valid key / session id (or ``None``); :class:`BadRequest`
    otherwise."""
    if value is None:
        return None
    if not TOKEN_PATTERN.fullmatch(value):
        raise BadRequest(f"{what} must be 8-64 letters, digits, '-' or '_' (got {value[:80]!r})")
    return value


class WorkMixin:
    """Leases, queue, review and request keys of :class:`~.service.AnnotationService`."""

    # -- helpers -----------------------------------------------------------------------------
    def _names(self) -> dict[int, str]:
        return {u.id: u.name for u in self.store.users()}

    def _work_fields(
        self, w: ImageWork | None, names: dict[int, str], viewer: UserRef | None = None
    ) -> dict[str, Any]:
        """The review, assignee and lock fields of an :class:`ImageOut`."""
        if w is None:
            return {}
        holder = lease_holder(w)
        locked_by = None
        if holder is not None and (viewer is None or holder != (viewer.id, viewer.session)):
            locked_by = names.get(holder[0], "?")
        return {
            "review": w.review,
            "submitted_by": names.get(w.submitted_by) if w.submitted_by else None,
            "reviewer": names.get(w.reviewer_id) if w.reviewer_id else None,
            "comment": w.comment,
            "assignee": names.get(w.assignee_id) if w.assignee_id else None,
            "locked_by": locked_by,
        }

    def _check_writable(self, image_id: int, user: UserRef) -> None:
        """:class:`Conflict` when another page holds the image's lease, or the image is
        approved."""
        w = self.work.get(image_id)
        if w is None:
            return
        self._check_lease(w, f"image {image_id}", user)
        if w.review == "approved":
            raise Conflict(
                f"image {image_id} is approved: a reviewer must return it before it changes"
            )

    def _check_lease(self, w: Any, what: str, user: UserRef) -> None:
        """:class:`Conflict` naming the holder when another page holds the lease of ``w``
        (an image's or a video's work row); ``what`` names the image or video."""
        holder = lease_holder(w)
        if holder is not None and holder != (user.id, user.session):
            names = self._names()
            who = names.get(holder[0], "?")
            where = "in another tab" if holder[0] == user.id else f"by {who}"
            left = max(0.0, w.lease_expires - time.time())
            raise Conflict(
                f"{what} is locked {where}: it is being annotated there (the lock "
                f"ends when that page leaves it, or {left:.0f} s after it stops "
                "answering); nothing was saved"
            )

    # -- request keys ------------------------------------------------------------------------
    def _keyed(self, user: UserRef, key: str | None, kind: str, target: int) -> Request | None:
        key = check_token(key, "Idempotency-Key")
        if key is None:
            return None
        self.purger.maybe()  # old keys and trash go, at most once per PURGE_EVERY
        return Request(user.id, key, kind, target)

    @staticmethod
    def _same_request(first: RequestKey | Request, req: Request) -> None:
        """:class:`Unprocessable` when the key was used (stored, or by a running job) for
        another kind or target."""
        if first.kind != req.kind or first.target != req.target:
            raise Unprocessable(
                f"Idempotency-Key {req.key!r} was used for another request "
                f"({first.kind} on {first.target}): use a new key for each write"
            )

    def _replay(self, first: RequestKey, req: Request) -> AnnotationOut | None:
        """The answer to a repeated keyed write: the first attempt's annotation as it is now
        (``None`` for a delete)."""
        return self._replay_object(
            first, req, "delete", "annotation", self.store.annotation, self._ann_out
        )

    def _replay_object(
        self,
        first: RequestKey,
        req: Request,
        delete_kind: str,
        noun: str,
        find: Callable[[int], Any],
        out: Callable[[Any], Any],
    ) -> Any:
        """A repeated keyed write of ``req`` (first applied as ``first``): ``None`` when it
        was a ``delete_kind``, else ``out`` of the object (``find`` by id) as it is now;
        409 when that ``noun`` has been deleted since."""
        self._same_request(first, req)
        if req.kind == delete_kind:
            return None
        obj = find(first.annotation_id) if first.annotation_id else None
        if obj is None:
            raise Conflict(
                f"this request was applied already ({noun} {first.annotation_id}), and that "
                f"{noun} has since been deleted"
            )
        return out(obj)

    def _first(self, req: Request | None) -> RequestKey | None:
        return None if req is None else self.work.request(req.user_id, req.key)

    # -- leases ------------------------------------------------------------------------------
    def lease(self, image_id: int, user: UserRef) -> LeaseOut:
        """Take or renew the image's lease for the caller's page session (without one:
        only report who holds it)."""
        im = self._image(image_id)
        held, w = self._take_lease(image_id, user, "image")
        return LeaseOut(
            image_id=image_id,
            embedding="ready" if im.status == "ok" and self.embedding_ready(im) else "computing",
            status=im.status,
            error=im.error,
            **self._lease_fields(held, w, user),
        )

    def _take_lease(self, target: int, user: UserRef, kind: str) -> tuple[bool, Any]:
        """Take or renew the lease of an image or a video (``kind``) for the caller's page
        session; without one only read it. ``(held, work row or None)``."""
        if user.session is not None:
            return self.work.take_lease(target, user.id, user.session, self.lease_seconds, kind)
        w = self.work.get(target, kind)
        return False, w

    def _lease_fields(self, held: bool, w: Any, user: UserRef) -> dict[str, Any]:
        """``held``, ``by`` (who holds it when the caller does not) and ``expires_in`` of a
        :class:`LeaseOut`."""
        holder = lease_holder(w)
        by = None
        if not held and holder is not None:
            by = self._names().get(holder[0], "?")
            if holder[0] == user.id:
                by += " (another tab)"
        expires = round(max(0.0, w.lease_expires - time.time()), 1) if w else 0.0
        return {"held": held, "by": by, "expires_in": expires}

    def release(self, image_id: int, user: UserRef) -> None:
        self._image(image_id)
        if user.session is not None:
            self.work.release_lease(image_id, user.id, user.session)

    # -- queue -------------------------------------------------------------------------------
    def queue(self, user: UserRef, after: int | None = None) -> QueueOut:
        """The caller's next images: those returned to them by a reviewer first, then the
        images after ``after`` (wrapping around) that are readable, not done, not in review
        (nor returned to someone else), not locked by another page and not assigned to
        someone else."""
        images = self.store.images()
        work = self.work.all()
        now = time.time()

        def free(im: Image) -> bool:
            w = work.get(im.id)
            if im.status != "ok" or im.done:
                return False
            if w is None:
                return True
            holder = lease_holder(w, now)
            if holder is not None and holder != (user.id, user.session):
                return False
            if w.assignee_id not in (None, user.id):
                return False
            # a returned image goes back to its annotator only
            return w.review == "none" or (w.review == "returned" and w.submitted_by == user.id)

        returned = [
            im.id
            for im in images
            if free(im) and (w := work.get(im.id)) is not None and w.review == "returned"
        ]
        rest = [im.id for im in images if free(im) and im.id not in returned]
        if after is not None:
            rest = [i for i in rest if i > after] + [i for i in rest if i < after]
        order = [i for i in returned + rest if i != after]
        return QueueOut(
            next_id=order[0] if order else None, remaining=len(order), returned=returned
        )

    # -- review ------------------------------------------------------------------------------
    def submit(self, image_id: int, done: bool, user: UserRef) -> ImageWork:
        """Mark done (review state ``submitted``) or not done (``none``)."""
        try:
            if done:
                return self.work.set_review(
                    image_id,
                    ("none", "returned", "submitted"),
                    "submitted",
                    done=True,
                    submitted_by=user.id,
                )
            return self.work.set_review(
                image_id, ("none", "returned", "submitted"), "none", done=False
            )
        except StoreConflict as exc:
            raise Conflict(f"{exc}: a reviewer must return it before it changes") from None

    def review(self, image_id: int, req: ReviewRequest, user: UserRef) -> ImageOut:
        """A reviewer approves a submitted image, or returns it (submitted or approved) to
        its annotator with a comment. Illegal transitions are 409; with auth on, nobody
        reviews their own submission. The same decision again by the same reviewer (a
        retry) changes nothing and answers the image. The reviewer's page lets go of the
        image's lease."""
        self._image(image_id)
        w = self.work.get(image_id)
        state = w.review if w else "none"
        comment = " ".join((req.comment or "").split()) or None
        if req.action == "return" and comment is None:
            raise Unprocessable("returning an image needs a comment saying what to change")
        allowed = ("submitted",) if req.action == "approve" else ("submitted", "approved")
        new = "approved" if req.action == "approve" else "returned"
        if state == new and w is not None and w.reviewer_id == user.id and w.comment == comment:
            return self.get_image(image_id)  # a repeat (a retry whose answer was lost)
        if state not in allowed:
            raise Conflict(
                f"image {image_id} is {state}: only a submitted image can be "
                + ("approved" if req.action == "approve" else "returned")
            )
        if self.auth and w is not None and w.submitted_by == user.id:
            raise Conflict(f"you submitted image {image_id}: another annotator reviews it")
        try:
            self.work.set_review(
                image_id,
                allowed,
                new,
                done=new == "approved",
                reviewer_id=user.id,
                comment=comment,
            )
        except StoreConflict as exc:
            raise Conflict(f"{exc} now (changed by another request)") from None
        if user.session is not None:  # the reviewer is done with it: free for its annotator
            self.work.release_lease(image_id, user.id, user.session)
        self._events.put(
            {
                "ts": time.time(),
                "kind": new,
                "user_id": user.id,
                "image_id": image_id,
                "data": {"comment": comment} if comment else None,
            }
        )
        return self.get_image(image_id)

    # -- assignments -------------------------------------------------------------------------
    def assign(self, image_id: int, req: AssignRequest, by: UserRef) -> ImageOut:
        """Give the image to one annotator (their queue only), or to everyone (``None``).
        With auth on, admins only."""
        if self.auth and not by.is_admin:
            raise Forbidden("only an admin can assign images")
        self._image(image_id)
        uid = None
        if req.user is not None:
            u = self.store.user_by_name(req.user)
            if u is None:
                raise NotFound(f"no user {req.user[:64]!r}")
            uid = u.id
        self.work.assign(image_id, uid)
        return self.get_image(image_id)
