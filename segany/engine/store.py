"""Storage of the data engine through SQLAlchemy: a SQLite file by default, PostgreSQL by URL.

Tables: ``images`` (files registered from the images folder), ``annotations`` (one object:
COCO RLE segmentation, category, status, stage and source, the model that produced it, the
clicks and seconds it took), ``events`` (clicks and actions with timestamps, for the
measurements), ``users`` (annotators and the SHA-256 of their tokens), ``categories`` (the
label set), ``trash`` (deleted objects, restorable with their id: queries in :mod:`.edits`),
``image_work`` (leases, review states, assignees), ``video_work`` (video leases) and
``request_keys`` (the keys of retried writes; queried in :mod:`.work_store`), ``videos``,
``tracks`` and ``track_frames`` (videos and the objects followed through them, one mask per
frame; queried in :mod:`.video_store`) and ``segany_meta`` (schema version; :mod:`.migrate`
brings older databases up to date).

Concurrent writers: changes of an annotation's status are conditional (``UPDATE ... WHERE
status = <the status the caller saw>``), so two requests that both saw a pending object
cannot both turn it into something else; and a fix records the pending object it replaces
in ``annotations.replaces_id``, which is unique, so the database itself refuses a second
fix of the same object (SQLite and PostgreSQL alike). Losers get :class:`StoreConflict`.

Every query and write of the annotator is here (about 790 lines with the ``categories``,
``trash``, ``image_work``, ``request_keys`` and video tables), but for the undo support
(delete to the trash, restore, an object's edit history) in :mod:`.edits`, the leases,
reviews and request keys in :mod:`.work_store` and the videos' in :mod:`.video_store`:
one file shows the schema, the transactions and the rules that make concurrent requests
safe. The writes that take a ``request`` store its key through ``request.claim(session)``
(:class:`.work_store.Request`), so this module imports none of those.

Every write commits before the function returns, so an acknowledged write survives a
``kill -9`` of the server (SQLite runs in WAL mode with ``synchronous=FULL``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    mapped_column,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from .migrate import SchemaTooNew, category_key, upgrade

#: 2: ``users.token_trusted``, ``annotations.replaces_id`` (unique). 3: ``categories``.
#: 4: ``image_work`` and ``request_keys`` (queries in :mod:`.work_store`). 5: ``trash``
#: (:mod:`.edits`; new SQLite databases also give each annotation id once: AUTOINCREMENT).
#: 6: ``videos``, ``tracks`` and ``track_frames`` (queries in :mod:`.video_store`).
#: 7: ``video_work`` (video leases), ``tracks.clicks`` / ``tracks.seconds``, the indexes of
#: ``request_keys.created_at`` and ``trash.deleted_at`` (their purge: :mod:`.purge`).
SCHEMA_VERSION = 7

#: Annotation statuses: ``accepted`` objects are the dataset; ``pending`` ones wait for review
#: (stage-2 pre-fill, imports); ``rejected`` pre-fills are kept for the measurements.
STATUSES = ("accepted", "pending", "rejected")
#: Where an annotation came from.
SOURCES = ("manual", "prefill", "import")
#: User names (the API and ``--add-user`` alike): letters, digits, ``_ . @ -``, 1-64 long.
USER_NAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"


class StoreError(RuntimeError):
    """The database cannot be opened or has an incompatible schema."""


class StoreConflict(RuntimeError):
    """A write lost a race: the row changed (or a unique rule holds) since the caller read
    it. Nothing was written."""


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    __tablename__ = "segany_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The token was issued by the operator (``--add-user``, the first start with auth) or by
    #: an admin on a server with auth on. Tokens of older databases are not: anyone could
    #: mint them while auth was off, so a server with auth on refuses them.
    token_trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Category(Base):
    """One row per class, in order of first use: the id is the class's COCO category id
    (and its position the YOLO class index) in every export, so ids never shift when a new
    class appears. ``name`` is the spelling first used; later spellings with the same
    :func:`category_key` are stored as this name."""

    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Image(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: POSIX path relative to the images folder; never absolute, never with ``..``.
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    width: Mapped[int] = mapped_column(Integer, default=0)
    height: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    mtime: Mapped[float] = mapped_column(Float, default=0.0)
    #: ``ok``, ``error`` (unreadable, too large: see ``error``) or ``missing`` (file gone).
    status: Mapped[str] = mapped_column(String(16), default="ok")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    #: Embedding-cache key (model-independent part: hash of the decoded pixels).
    content_key: Mapped[str | None] = mapped_column(String(80), default=None)
    #: 1: manual (model-assisted) annotation; 2: semi-automatic (pre-filled masks).
    stage: Mapped[int] = mapped_column(Integer, default=1)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Annotation(Base):
    __tablename__ = "annotations"
    # AUTOINCREMENT (new SQLite databases): an id is never given to a second object, so a
    # deleted object can be restored under its own id (:mod:`.edits`)
    __table_args__ = (
        Index("ux_annotations_replaces_id", "replaces_id", unique=True),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    category: Mapped[str] = mapped_column(String(128), default="object")
    status: Mapped[str] = mapped_column(String(16), default="accepted", index=True)
    stage: Mapped[int] = mapped_column(Integer, default=1)
    source: Mapped[str] = mapped_column(String(16), default="manual")
    #: COCO RLE ``{"size": [H, W], "counts": str}``.
    segmentation: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: XYWH in image pixels.
    bbox: Mapped[list[Any]] = mapped_column(JSON)
    area: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float, default=None)
    stability: Mapped[float | None] = mapped_column(Float, default=None)
    model_id: Mapped[str | None] = mapped_column(String(64), default=None)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), default=None
    )
    #: Prompts spent on this object and seconds from the start of the object to its accept.
    clicks: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
    #: The prompt that produced the mask: ``{"points", "labels", "box"}`` (or None).
    prompt: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: The pending object this one fixes (at most one fix per object: a unique index).
    replaces_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotations.id", ondelete="SET NULL"), default=None
    )
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class Trash(Base):
    """A deleted annotation: its whole row as JSON (``row``), so that an undo can put it back
    with the same id (:func:`.edits.restore`). The row leaves the trash when restored."""

    __tablename__ = "trash"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(Integer, index=True)
    image_id: Mapped[int] = mapped_column(Integer, index=True)
    replaces_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    row: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_id: Mapped[int | None] = mapped_column(Integer, default=None)
    deleted_at: Mapped[float] = mapped_column(Float, default=time.time, index=True)


class LeaseColumns:
    """The lease of a page session on what it annotates (an image or a video): who holds
    it, from which tab, until when (one lease system for both: :mod:`.work_store`)."""

    lease_user_id: Mapped[int | None] = mapped_column(Integer, default=None)
    lease_session: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires: Mapped[float] = mapped_column(Float, default=0.0)


class ImageWork(LeaseColumns, Base):
    """An image's lease, review state and assignee (queries: :mod:`.work_store`)."""

    __tablename__ = "image_work"
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    assignee_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), default=None
    )
    review: Mapped[str] = mapped_column(String(16), default="none")
    submitted_by: Mapped[int | None] = mapped_column(Integer, default=None)
    reviewer_id: Mapped[int | None] = mapped_column(Integer, default=None)
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    review_at: Mapped[float | None] = mapped_column(Float, default=None)


class VideoWork(LeaseColumns, Base):
    """A video's lease (queries: :mod:`.work_store`; schema 7)."""

    __tablename__ = "video_work"
    video_id: Mapped[int] = mapped_column(
        ForeignKey("videos.id", ondelete="CASCADE"), primary_key=True
    )


class RequestKey(Base):
    """The ``Idempotency-Key`` of a committed write (:func:`.work_store.claim_request`)."""

    __tablename__ = "request_keys"
    __table_args__ = (UniqueConstraint("user_id", "key", name="ux_request_keys_user_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(64))
    #: ``accept`` (target: the image id), ``patch``, ``delete`` or ``restore`` (the annotation
    #: id); for videos (:mod:`.video_keys`) ``track`` (the video id), ``key-frame``,
    #: ``track-patch``, ``track-delete`` or ``propagate`` (the track id)
    kind: Mapped[str] = mapped_column(String(16))
    target: Mapped[int] = mapped_column(Integer)
    #: the annotation the first attempt created or changed (for the video kinds: the track)
    annotation_id: Mapped[int | None] = mapped_column(Integer, default=None)
    #: (indexed: keys older than :data:`.purge.REQUEST_KEY_SECONDS` are purged)
    created_at: Mapped[float] = mapped_column(Float, default=time.time, index=True)


class Video(Base):
    """A video of the images folder: a video file, or a folder of frames (registered by
    ``POST /api/videos`` or ``--video``); its frames are read lazily (queries:
    :mod:`.video_store`)."""

    __tablename__ = "videos"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: POSIX path relative to the images folder (a file, or a folder of frames)
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    kind: Mapped[str] = mapped_column(String(8), default="file")  # ``file`` or ``frames``
    width: Mapped[int] = mapped_column(Integer, default=0)
    height: Mapped[int] = mapped_column(Integer, default=0)
    length: Mapped[int] = mapped_column(Integer, default=0)
    fps: Mapped[float | None] = mapped_column(Float, default=None)
    #: the frames' names (``00017`` for ``00017.jpg``) and file names (for the COCO video JSON)
    names: Mapped[list[Any]] = mapped_column(JSON, default=list)
    files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    mtime: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(16), default="ok")  # ok, error, missing
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Track(Base):
    """One object followed through a video: ``object_id`` is its pixel value in the DAVIS
    PNGs (1-255, unique in the video); ``pending`` until the annotator accepts it."""

    __tablename__ = "tracks"
    __table_args__ = (
        UniqueConstraint("video_id", "object_id", name="ux_tracks_video_object"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"), index=True)
    object_id: Mapped[int] = mapped_column(Integer)
    category: Mapped[str] = mapped_column(String(128), default="object")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    model_id: Mapped[str | None] = mapped_column(String(64), default=None)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), default=None
    )
    #: prompts on the video's frames and active seconds (pauses capped at ``IDLE_CAP``)
    #: spent on this object, summed over its writes (schema 7)
    clicks: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class TrackFrame(Base):
    """A track's mask on one frame: set by the annotator (``key``: the tracker starts from
    it and never overwrites it) or propagated (an empty mask: the object is absent)."""

    __tablename__ = "track_frames"
    track_id: Mapped[int] = mapped_column(
        ForeignKey("tracks.id", ondelete="CASCADE"), primary_key=True
    )
    frame: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[bool] = mapped_column(Boolean, default=False)
    #: COCO RLE ``{"size": [H, W], "counts": str}``
    segmentation: Mapped[dict[str, Any]] = mapped_column(JSON)
    area: Mapped[int] = mapped_column(Integer, default=0)
    bbox: Mapped[list[Any]] = mapped_column(JSON)
    score: Mapped[float | None] = mapped_column(Float, default=None)
    #: the prompt of a key frame (``{"points", "labels", "box"}``), else None
    prompt: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[int | None] = mapped_column(Integer, default=None)
    image_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    annotation_id: Mapped[int | None] = mapped_column(Integer, default=None)
    stage: Mapped[int] = mapped_column(Integer, default=1)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


@dataclass(frozen=True)
class ImageCounts:
    accepted: int = 0
    pending: int = 0
    rejected: int = 0


def default_db(images_dir: str | Path) -> str:
    """The SQLite file used when no ``--db`` is given: ``IMAGES_DIR/.segany/annotations.db``
    (hidden folders are not scanned for images)."""
    return str(Path(images_dir).expanduser().resolve() / ".segany" / "annotations.db")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(24)


def normalize_url(url: str | Path) -> str:
    """A database URL: a plain path means a SQLite file; ``postgresql://`` and
    ``postgres://`` use the psycopg (3) driver."""
    text = str(url)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    if text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://") :]
    if text.startswith("postgresql://"):
        text = "postgresql+psycopg://" + text[len("postgresql://") :]
    return text


def redact(url: str) -> str:
    """The URL with its password hidden, for logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


class Store:
    """Opens (and creates) the schema and answers the queries the service needs."""

    def __init__(self, url: str | Path, *, echo: bool = False, busy_timeout: float = 30.0) -> None:
        self.url = normalize_url(url)
        try:
            parsed: URL = make_url(self.url)
        except Exception as exc:
            raise StoreError(f"not a database URL: {url!r} ({exc})") from None
        self.dialect = parsed.get_backend_name()
        #: Largest id a lookup can match (INTEGER is 64-bit in SQLite, 32-bit in PostgreSQL);
        #: larger ids are not found instead of overflowing the driver.
        self.max_id = 2**63 - 1 if self.dialect == "sqlite" else 2**31 - 1
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout}
            db = parsed.database
            if not db or db == ":memory:":
                kwargs["poolclass"] = StaticPool
            else:
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
        try:
            self.engine: Engine = create_engine(self.url, **kwargs)
        except Exception as exc:
            raise StoreError(f"cannot open database {redact(self.url)}: {exc}") from None
        if self.dialect == "sqlite":
            ms = int(busy_timeout * 1000)
            event.listen(self.engine, "connect", lambda c, r: _sqlite_pragmas(c, r, ms))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._create()

    def _create(self) -> None:
        try:
            with self.session() as s:
                fresh = not self.engine.dialect.has_table(s.connection(), "segany_meta")
            Base.metadata.create_all(self.engine)  # new tables; upgrade fills them
            if not fresh:
                upgrade(self.engine, SCHEMA_VERSION)
            with self.session() as s:
                row = s.get(Meta, "schema_version")
                if row is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                    s.commit()
        except SchemaTooNew as exc:
            raise StoreError(str(exc)) from None
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open database {redact(self.url)}: {exc}") from None

    def close(self) -> None:
        self.engine.dispose()

    def check(self) -> None:
        """Read the schema version and one image row (``/api/health``); raises the
        driver's error when the database cannot be read."""
        with self.session() as s:
            if s.get(Meta, "schema_version") is None:
                raise StoreError("the database has no schema version")
            s.execute(select(Image.id).limit(1)).all()

    def _id_ok(self, value: Any) -> bool:
        return isinstance(value, int) and 0 < value <= self.max_id

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # -- images ------------------------------------------------------------------------------
    def sync_images(self, found: dict[str, dict[str, Any]]) -> dict[str, int]:
        """Register files found in the images folder (``path -> fields``): new ones are
        added, changed ones (size or mtime) updated, vanished ones marked ``missing``."""
        added = updated = missing = 0
        with self.session() as s:
            known = {im.path: im for im in s.scalars(select(Image))}
            for path, fields in found.items():
                im = known.get(path)
                if im is None:
                    s.add(Image(path=path, **fields))
                    added += 1
                elif (
                    im.size_bytes != fields["size_bytes"]
                    or abs(im.mtime - fields["mtime"]) > 1e-6
                    or im.status == "missing"
                ):
                    for k, v in fields.items():
                        setattr(im, k, v)
                    im.content_key = None
                    updated += 1
            for path, im in known.items():
                if path not in found and im.status != "missing":
                    im.status, im.error = "missing", "file no longer in the images folder"
                    missing += 1
            s.commit()
        return {"added": added, "updated": updated, "missing": missing, "total": len(found)}

    def images(self) -> list[Image]:
        with self.session() as s:
            return list(s.scalars(select(Image).order_by(Image.id)))

    def image(self, image_id: int) -> Image | None:
        if not self._id_ok(image_id):
            return None
        with self.session() as s:
            return s.get(Image, image_id)

    def image_by_path(self, path: str) -> Image | None:
        with self.session() as s:
            return s.scalars(select(Image).where(Image.path == path)).first()

    def update_image(self, image_id: int, **fields: Any) -> Image | None:
        if not self._id_ok(image_id):
            return None
        with self.session() as s:
            im = s.get(Image, image_id)
            if im is None:
                return None
            for k, v in fields.items():
                setattr(im, k, v)
            s.commit()
            return im

    def counts(self) -> dict[int, ImageCounts]:
        """Per image id: numbers of accepted, pending and rejected annotations."""
        out: dict[int, dict[str, int]] = {}
        with self.session() as s:
            rows = s.execute(
                select(Annotation.image_id, Annotation.status, func.count()).group_by(
                    Annotation.image_id, Annotation.status
                )
            )
            for image_id, status, n in rows:
                out.setdefault(image_id, {})[status] = n
        return {k: ImageCounts(**v) for k, v in out.items()}

    # -- annotations -------------------------------------------------------------------------
    def add_annotations(
        self,
        items: Iterable[dict[str, Any]],
        events: Iterable[dict[str, Any]] = (),
        set_status: dict[int, tuple[str, str]] | None = None,
        *,
        request: Any = None,
    ) -> list[Annotation]:
        """Insert annotations (and events referring to them by position: an event's
        ``annotation_index`` is replaced by the new id), and change the status of other
        annotations (``id -> (status it must have now, new status)``), in one transaction.

        Raises :class:`StoreConflict` (and writes nothing) when one of those annotations is
        gone or no longer has the expected status, or when an item's ``replaces_id`` is
        already taken by another fix. ``request`` (:class:`.work_store.Request`): its key is
        stored in the same transaction (a repeat raises ``RequestRepeat``)."""
        now = time.time()
        # the classes first, in their own short transactions (SQLite has one writer)
        items = [{**it, "category": self.category_name(it.get("category") or "object")}
                 for it in items]  # fmt: skip
        with self.session() as s:
            key = request.claim(s) if request is not None else None
            for ann_id, (was, status) in (set_status or {}).items():
                res = s.execute(
                    update(Annotation)
                    .where(Annotation.id == ann_id, Annotation.status == was)
                    .values(status=status, updated_at=now)
                )
                if res.rowcount != 1:
                    s.rollback()
                    now_status = s.scalar(select(Annotation.status).where(Annotation.id == ann_id))
                    raise StoreConflict(
                        f"annotation {ann_id} is "
                        + (f"{now_status}, not {was}" if now_status else "gone")
                        + " (changed by another request)"
                    )
            anns = [Annotation(created_at=now, updated_at=now, **it) for it in items]
            s.add_all(anns)
            try:
                s.flush()
            except IntegrityError:
                s.rollback()
                raise StoreConflict(
                    "the pending object was already fixed by another request"
                ) from None
            for ev in events:
                ev = dict(ev)
                idx = ev.pop("annotation_index", None)
                if idx is not None:
                    ev["annotation_id"] = anns[idx].id
                s.add(Event(ts=ev.pop("ts", now), **ev))
            if key is not None and anns:
                key.annotation_id = anns[0].id
            s.commit()
            return anns

    def category_name(self, name: str) -> str:
        """The stored spelling of ``name``'s class, registering it (with the next id) if it
        is new. Safe against a concurrent registration of the same class."""
        key = category_key(name)
        for _ in range(2):
            with self.session() as s:
                got = s.scalar(select(Category.name).where(Category.key == key))
                if got is not None:
                    return got
                s.add(Category(key=key, name=" ".join(name.split())))
                try:
                    s.commit()
                    return " ".join(name.split())
                except IntegrityError:  # registered by another request meanwhile
                    s.rollback()
        raise StoreError(f"category {name!r} could not be registered")

    def category_table(self) -> list[tuple[int, str]]:
        """Every registered class as ``(id, name)``, in order of first use."""
        with self.session() as s:
            return [(r.id, r.name) for r in s.scalars(select(Category).order_by(Category.id))]

    def categories(self, statuses: Iterable[str] = ("accepted",)) -> list[str]:
        """The distinct categories of the annotations with these statuses, sorted."""
        with self.session() as s:
            q = select(Annotation.category).where(Annotation.status.in_(list(statuses)))
            return sorted(set(s.scalars(q.distinct())))

    def fix_of(self, ann_id: int) -> int | None:
        """The id of the annotation that replaced ``ann_id`` (a fix of a pending object)."""
        if not self._id_ok(ann_id):
            return None
        with self.session() as s:
            return s.scalar(select(Annotation.id).where(Annotation.replaces_id == ann_id))

    def annotation(self, ann_id: int) -> Annotation | None:
        if not self._id_ok(ann_id):
            return None
        with self.session() as s:
            return s.get(Annotation, ann_id)

    def annotations(
        self,
        image_id: int | None = None,
        statuses: Iterable[str] | None = None,
        source: str | None = None,
        *,
        light: bool = False,
    ) -> list[Annotation]:
        """Annotations by image, status and source; ``light`` leaves out the masks and
        prompts (for counting)."""
        with self.session() as s:
            q = select(Annotation)
            if light:
                q = q.options(defer(Annotation.segmentation), defer(Annotation.prompt))
            if image_id is not None:
                q = q.where(Annotation.image_id == image_id)
            if statuses is not None:
                q = q.where(Annotation.status.in_(list(statuses)))
            if source is not None:
                q = q.where(Annotation.source == source)
            return list(s.scalars(q.order_by(Annotation.image_id, Annotation.id)))

    def update_annotation(
        self,
        ann_id: int,
        fields: dict[str, Any],
        ev: dict[str, Any] | None = None,
        *,
        expect_status: str | None = None,
        request: Any = None,
    ) -> Annotation | None:
        """Change fields of an annotation (one ``UPDATE``, so a concurrent delete makes it
        match nothing instead of failing). ``None``: the annotation is gone. With
        ``expect_status``, the update applies only while the annotation still has that
        status; otherwise :class:`StoreConflict`. ``request``: as in :meth:`add_annotations`."""
        if not self._id_ok(ann_id):
            return None
        now = time.time()
        if "category" in fields:
            fields = {**fields, "category": self.category_name(fields["category"])}
        with self.session() as s:
            key = request.claim(s) if request is not None else None
            if key is not None:
                key.annotation_id = ann_id
            q = update(Annotation).where(Annotation.id == ann_id)
            if expect_status is not None:
                q = q.where(Annotation.status == expect_status)
            res = s.execute(q.values(**fields, updated_at=now))
            if res.rowcount != 1:
                s.rollback()
                status = s.scalar(select(Annotation.status).where(Annotation.id == ann_id))
                if status is None:
                    return None
                raise StoreConflict(
                    f"annotation {ann_id} is {status}, not {expect_status} "
                    "(changed by another request)"
                )
            if ev is not None:
                s.add(Event(ts=ev.pop("ts", now), annotation_id=ann_id, **ev))
            s.commit()
            return s.get(Annotation, ann_id)

    def delete_annotations(
        self, ids: Iterable[int], ev: dict[str, Any] | None = None, *, request: Any = None
    ) -> list[Annotation]:
        ids = [i for i in ids if self._id_ok(i)]
        with self.session() as s:
            key = request.claim(s) if request is not None else None
            gone = list(s.scalars(select(Annotation).where(Annotation.id.in_(ids))))
            if gone:
                s.execute(delete(Annotation).where(Annotation.id.in_([a.id for a in gone])))
                if ev is not None:
                    now = time.time()
                    for a in gone:
                        s.add(Event(ts=now, annotation_id=a.id, **ev))
            if gone or key is not None:
                s.commit()
            return gone

    # -- events ------------------------------------------------------------------------------
    def add_events(self, events: Iterable[dict[str, Any]]) -> None:
        rows = [Event(**ev) for ev in events]
        if not rows:
            return
        with self.session() as s:
            s.add_all(rows)
            s.commit()

    def events(self, kinds: Iterable[str] | None = None) -> list[Event]:
        with self.session() as s:
            q = select(Event)
            if kinds is not None:
                q = q.where(Event.kind.in_(list(kinds)))
            return list(s.scalars(q.order_by(Event.ts)))

    # -- users -------------------------------------------------------------------------------
    def users(self) -> list[User]:
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    def user_by_name(self, name: str) -> User | None:
        with self.session() as s:
            return s.scalars(select(User).where(User.name == name)).first()

    def user_by_token(self, token: str) -> User | None:
        with self.session() as s:
            return s.scalars(select(User).where(User.token_hash == hash_token(token))).first()

    def ensure_user(self, name: str, *, is_admin: bool = False) -> User:
        """The user called ``name``, created (without a token) if absent."""
        with self.session() as s:
            u = s.scalars(select(User).where(User.name == name)).first()
            if u is None:
                u = User(name=name, is_admin=is_admin, token_hash=None)
                s.add(u)
                s.commit()
            return u

    def issue_token(self, name: str, *, is_admin: bool = False) -> tuple[User, str]:
        """Create the user (or keep it) and give it a new token; the old token stops working.
        Only the token's SHA-256 is stored. Callers are the operator or an admin with auth
        on: the token is trusted (``User.token_trusted``). Raises :class:`ValueError` for a
        name outside :data:`USER_NAME_PATTERN`."""
        if not isinstance(name, str) or not re.fullmatch(USER_NAME_PATTERN, name):
            raise ValueError(
                f"invalid user name {str(name)[:80]!r}: use 1-64 letters, digits, '_', '.', "
                "'@' or '-'"
            )
        token = new_token()
        with self.session() as s:
            u = s.scalars(select(User).where(User.name == name)).first()
            if u is None:
                u = User(name=name, is_admin=is_admin)
                s.add(u)
            elif is_admin:
                u.is_admin = True
            u.token_hash = hash_token(token)
            u.token_trusted = True
            s.commit()
            return u, token

    def admin_token_issued(self) -> bool:
        """Whether some admin holds a trusted token (see ``User.token_trusted``)."""
        with self.session() as s:
            q = select(User.id).where(
                User.is_admin.is_(True), User.token_hash.is_not(None), User.token_trusted.is_(True)
            )
            return s.execute(q.limit(1)).first() is not None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, busy_ms: int = 30000) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
    except Exception:  # e.g. in-memory databases keep their own journal mode
        pass
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    cur.close()
