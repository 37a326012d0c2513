"""The annotator's actions, one method each, with typed requests and responses.

:class:`AnnotationService` holds the store, the model and the embedding cache; the web
server (:mod:`.server`) only maps HTTP onto these methods and :class:`ServiceError` onto
4xx responses. Everything here can be used (and is tested) without HTTP.

Measurements (the paper's): each annotator has, per image, an *object timer* that starts
when the image is opened (or the previous object on it was accepted or rejected) and
counts the prompts sent (one click, or one box drag, is one prompt). Accepting a mask
stores the timer's clicks and seconds on the annotation and starts the next object's timer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import threading
import time
import uuid
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import masks as M
from ..files import find_images
from ..fingerprint import model_fingerprint
from ..predictor import (
    EmbeddingCache,
    ImageEmbedding,
    Predictor,
    PromptError,
    image_key,
)
from ..transforms import ImageError, load_image
from ..validate import InputError, check_score, dumps, segmentation_to_rle
from . import stats as S
from .store import (
    SOURCES,
    STATUSES,
    USER_NAME_PATTERN,
    Annotation,
    Image,
    Store,
    StoreConflict,
    User,
)

log = logging.getLogger("segany.engine")

#: Files with these suffixes (case-insensitive) are registered from the images folder.
#: The annotator refuses images above this many pixels by default (about 8k x 6k): every
#: click returns masks at full resolution.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_POINTS = 100
MAX_CATEGORY = 128
#: Longest ``classes`` text of a pre-fill request.
MAX_CLASSES_TEXT = 4096


# -- errors ----------------------------------------------------------------------------------
class ServiceError(Exception):
    """An error the client caused or must know about; ``status`` is the HTTP status."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Unprocessable(ServiceError):
    status = 422


# -- requests and responses ------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Model):
    # NaN and infinities (JSON's NaN / Infinity, and 1e400) are refused in every number
    # field of a request: they are no coordinate or score, and one stored would break every
    # export. (Answers write them as null: errors.SafeJSONResponse.)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RLE(_Request):
    """COCO run-length encoding: ``size`` is ``[height, width]``; ``counts`` the compressed
    string (or the uncompressed list of run lengths)."""

    size: tuple[int, int]
    counts: str | list[int]


class ImageOut(_Model):
    id: int
    path: str
    width: int
    height: int
    status: str
    error: str | None = None
    stage: int
    done: bool
    accepted: int = 0
    pending: int = 0


class ImageList(_Model):
    images: list[ImageOut]
    total: int
    done: int
    annotated: int
    categories: list[str]


class RescanOut(_Model):
    added: int
    updated: int
    missing: int
    total: int


class OpenOut(_Model):
    image: ImageOut
    embedding: Literal["ready", "computing"]
    prev_id: int | None
    next_id: int | None


class PredictRequest(_Request):
    points: list[tuple[float, float]] = Field(default_factory=list, max_length=MAX_POINTS)
    labels: list[int] = Field(default_factory=list, max_length=MAX_POINTS)
    box: tuple[float, float, float, float] | None = None
    mask_input_id: str | None = Field(default=None, max_length=64)
    multimask: bool = True


class MaskOut(_Model):
    index: int
    segmentation: RLE
    score: float
    area: int
    bbox: list[float]
    #: Pass as ``mask_input_id`` to refine this mask, or as ``mask_id`` to accept it.
    mask_input_id: str


class PredictOut(_Model):
    image_id: int
    width: int
    height: int
    masks: list[MaskOut]
    best: int
    ms: float


Category = Annotated[str, Field(min_length=1, max_length=MAX_CATEGORY)]


def _clean_category(v: str | None) -> str | None:
    if v is None:
        return None
    v = " ".join(v.split())
    if not v:
        raise ValueError("category must not be empty")
    return v


def _clean_classes(v: str | None) -> str | None:
    """``"dog . cat"`` -> the class names joined by ``" . "`` (blank: ``None``, i.e. no
    classes; only separators: an error); each name must fit a category."""
    if v is None or not v.strip():
        return None
    from ..text.pipeline import parse_queries

    names = parse_queries(v)
    long = [n for n in names if len(n) > MAX_CATEGORY]
    if long:
        raise ValueError(f"class name longer than {MAX_CATEGORY} characters: {long[0][:40]!r}...")
    return " . ".join(names)


class AcceptRequest(_Request):
    """A new object: either the ``segmentation`` (COCO RLE at image size) or the
    ``mask_id`` of a candidate returned by predict."""

    segmentation: RLE | None = None
    mask_id: str | None = Field(default=None, max_length=64)
    category: Category = "object"
    #: A pending (pre-filled) object that this one fixes; it is marked rejected.
    replaces: int | None = None
    score: float | None = None

    _cat = field_validator("category")(_clean_category)


class UpdateRequest(_Request):
    category: Category | None = None
    status: Literal["accepted", "pending", "rejected"] | None = None
    segmentation: RLE | None = None

    _cat = field_validator("category")(_clean_category)


class AnnotationOut(_Model):
    id: int
    image_id: int
    category: str
    status: str
    stage: int
    source: str
    segmentation: RLE
    bbox: list[float]
    area: int
    score: float | None = None
    stability: float | None = None
    model_id: str | None = None
    #: Pre-filled by class name: the detector's confidence and phrase (``score`` stays
    #: SAM's predicted IoU).
    detector_score: float | None = None
    phrase: str | None = None
    user: str | None = None
    clicks: int = 0
    seconds: float | None = None
    created_at: float
    updated_at: float


class AnnotationList(_Model):
    image_id: int
    annotations: list[AnnotationOut]


class PrefillRequest(_Request):
    """Stage 2: segment everything and keep the confident masks as pending objects.

    With ``classes`` (``"dog . cat"``), the server's text detector finds those classes
    instead and SAM segments each box: every mask becomes a pending object whose category
    is its class; ``box_threshold`` / ``text_threshold`` (default: the detector's) and
    ``max_masks`` apply, and ``pred_iou_thresh``, ``stability_score_thresh``,
    ``points_per_side``, ``min_area`` and ``category`` do not.
    """

    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.92, ge=0.0, le=1.0)
    points_per_side: int = Field(16, ge=2, le=64)
    min_area: int = Field(100, ge=0)
    max_masks: int = Field(100, ge=1, le=1000)
    #: Skip masks overlapping an existing accepted object by more than this IoU.
    overlap_iou: float = Field(0.5, ge=0.0, le=1.0)
    category: Category = "object"
    #: Replace the pending pre-filled objects of an earlier run on this image.
    replace: bool = True
    #: Class names separated by " . " (needs a server started with --detector).
    classes: str | None = Field(default=None, max_length=MAX_CLASSES_TEXT)
    box_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    text_threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    _cat = field_validator("category")(_clean_category)
    _classes = field_validator("classes")(_clean_classes)


class PrefillOut(_Model):
    image_id: int
    created: int
    skipped_overlap: int
    removed_pending: int
    seconds: float
    settings: dict[str, Any]
    annotations: list[AnnotationOut]


class EventRequest(_Request):
    kind: Literal["undo", "redo", "select", "clear", "next", "prev", "note"]
    data: dict[str, Any] | None = None


class DoneRequest(_Request):
    done: bool = True


class UserOut(_Model):
    id: int
    name: str
    is_admin: bool


class TokenOut(_Model):
    user: UserOut
    token: str


class NewUserRequest(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=USER_NAME_PATTERN)
    is_admin: bool = False


class ImportOut(_Model):
    images: int
    annotations: int
    skipped_images: list[str]
    skipped_annotations: int


class ConfigOut(_Model):
    auth: bool
    model: str
    model_id: str
    images_dir: str
    stages: list[int]
    prefill_defaults: PrefillRequest
    categories: list[str]
    user: str | None = None
    #: The text detector for pre-filling by class names (``None``: not configured).
    detector: str | None = None


@dataclass(frozen=True)
class UserRef:
    id: int
    name: str
    is_admin: bool = False


# -- helpers ---------------------------------------------------------------------------------
def _finite_or_none(value: float | None, default: float) -> float | None:
    """A stored score for export: ``default`` when unset, None when not finite."""
    if value is None:
        return default
    return float(value) if np.isfinite(value) else None


def _text_prompt(a: Annotation) -> dict[str, Any]:
    """The text part of an annotation's prompt (pre-filled by class name), else ``{}``."""
    prompt = a.prompt if isinstance(a.prompt, dict) else None
    text = prompt.get("text") if prompt else None
    return text if isinstance(text, dict) else {}


def _rle_dict(rle: RLE | dict[str, Any] | list[Any]) -> dict[str, Any] | list[Any]:
    if isinstance(rle, RLE):
        return {"size": list(rle.size), "counts": rle.counts}
    return rle


def canonical_rle(
    rle: RLE | dict[str, Any] | list[Any], size: tuple[int, int], what: str = "segmentation"
) -> tuple[dict, int, list]:
    """Check a client's segmentation (an RLE, compressed or not, or COCO polygons) against
    the image size ``(H, W)`` with :func:`segany.validate.segmentation_to_rle`; returns the
    compressed COCO RLE (``counts`` as str), its area and its XYWH box. Raises
    :class:`Unprocessable` naming ``what``."""
    h, w = size
    try:
        enc = segmentation_to_rle(_rle_dict(rle), h, w, what=what)
    except InputError as exc:
        raise Unprocessable(str(exc)) from None
    area = int(mask_utils.area(enc))
    bbox = [float(v) for v in mask_utils.toBbox(enc)]
    counts = enc["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [h, w], "counts": counts}, area, bbox


def safe_relpath(root: Path, rel: str) -> Path:
    """``root / rel`` if ``rel`` is a relative path that stays inside ``root`` (after
    resolving symlinks); raises :class:`BadRequest` otherwise."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise BadRequest(f"invalid file name {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or rel.startswith("~"):
        raise BadRequest(f"file name {rel!r} must be relative to the images folder, without '..'")
    full = (root / Path(*p.parts)).resolve()
    if not full.is_relative_to(root):
        raise BadRequest(f"file name {rel!r} points outside the images folder")
    return full


@dataclass
class _Timer:
    start: float
    clicks: int = 0


@dataclass
class _Candidate:
    image_id: int
    logits: np.ndarray  # (S/4, S/4) float16 (128 KiB at S = 1024)
    rle: dict[str, Any]
    score: float
    area: int
    bbox: list[float]
    prompt: dict[str, Any] = field(default_factory=dict)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads in this thread (torch's OpenMP thread count
    is per thread), then restore the previous count."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _LRU:
    """A small thread-safe LRU map."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._d:
                return None
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class _LockedCache(EmbeddingCache):
    """:class:`EmbeddingCache` safe to share between request threads."""

    def __init__(self, directory: str | Path | None, *, max_items: int) -> None:
        super().__init__(directory, max_items=max_items)
        self._lock = threading.RLock()

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            return super().get(key)

    def put(self, key: str, item: ImageEmbedding) -> None:
        with self._lock:
            super().put(key, item)

    def in_memory(self, key: str) -> bool:
        with self._lock:
            return key in self._memory


class _EventWriter:
    """Writes click events to the store from a background thread, in batches, so that the
    click path does not wait for a commit. (Accepts and deletes are written synchronously
    with their annotation.)"""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="segany-events", daemon=True)
        self._thread.start()

    def put(self, ev: dict[str, Any]) -> None:
        self._q.put(ev)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = []
            item = self._q.get()
            if item is None:
                stop = True
            else:
                batch.append(item)
            while True:
                try:
                    item = self._q.get(timeout=0.2 if batch else 0)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                if len(batch) >= 200:
                    break
            try:
                self.store.add_events(batch)
            except Exception:  # events are measurements; never take the server down
                log.exception("could not write %d events", len(batch))

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)


# -- the service -----------------------------------------------------------------------------
def _backend_name(predictor: Any) -> str:
    """The name of a predictor's non-torch backend (``onnx``, ``onnx-int8``...)."""
    return str(getattr(predictor, "backend_name", None) or "onnx")


class AnnotationService:
    """The data engine behind the annotator.

    Args:
        store: the database.
        images_dir: the folder whose images are annotated (relative paths are kept).
        predictor: a :class:`Predictor` whose model (and model id) is used; its embedding
            cache is replaced by a thread-safe one over ``cache_dir``.
        model_name: shown to the user and stored with each annotation.
        cache_dir: embeddings on disk (``None``: memory only).
        memory_items: embeddings kept in memory.
        auth: whether every API call needs a token.
        prefetch: embed the next image of the queue in a background thread.
        model_concurrency: prompts decoded at the same time (default: one per CPU core).
        decode_threads: torch threads of one prompt's decode (default 1: with several
            annotators, one thread per decode and one decode per core beats one decode on
            every core, whose threads wait for each other when the CPU is busy).
        embed_threads: torch threads of the image encoder (default: every core).
        detector: the text detector of stage-2 pre-fills by class names: a catalogue name,
            hub id or folder (loaded on first use, once), or a ready detector object (see
            :class:`segany.text.Detector`). ``None``: pre-fill by class names is refused.
    """

    def __init__(
        self,
        store: Store,
        images_dir: str | Path,
        predictor: Predictor,
        *,
        model_name: str = "model",
        cache_dir: str | Path | None = None,
        memory_items: int = 16,
        auth: bool = False,
        prefetch: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        model_concurrency: int | None = None,
        decode_threads: int = 1,
        embed_threads: int | None = None,
        candidates_kept: int = 512,
        generator_factory: Callable[..., Any] | None = None,
        detector: str | os.PathLike[str] | Any | None = None,
    ) -> None:
        self.store = store
        self.root = Path(images_dir).expanduser().resolve()
        if not self.root.is_dir():
            raise ValueError(f"images folder not found: {images_dir}")
        self.model = predictor.model
        self.model_id = predictor.model_id
        self._backend = getattr(predictor, "backend", None)
        #: the predictor backend's name (``torch``, ``onnx``, ``onnx-int8``)
        self.backend_name = "torch" if self._backend is None else _backend_name(predictor)
        self._key_prefix = self._embedding_prefix(self.model_id)
        self.model_name = model_name
        self._switch_lock = threading.Lock()
        self.cache = _LockedCache(cache_dir, max_items=memory_items)
        self.auth = auth
        self.max_pixels = max_pixels
        self.prefetch_enabled = prefetch
        self._tls = threading.local()
        from ..runtime import available_cpus, default_threads

        cpus = available_cpus()
        self.model_concurrency = max(1, model_concurrency or cpus)
        self.decode_threads = max(1, decode_threads)
        self.embed_threads = max(1, embed_threads or default_threads())
        self._decode = threading.Semaphore(self.model_concurrency)
        self._candidates = _LRU(candidates_kept)
        self._timers: dict[tuple[int, int], _Timer] = {}
        self._timers_lock = threading.Lock()
        self._image_locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._keys: dict[int, str] = {}
        self._prefetch_q: queue.Queue[int | None] = queue.Queue()
        self._prefetch_pending: set[int] = set()
        self._prefill_lock = threading.Lock()
        self._generator_factory = generator_factory
        self._detector_lock = threading.Lock()
        self._detector: Any = None
        self._detector_source: str | None = None
        self.detector_name: str | None = None
        if isinstance(detector, (str, os.PathLike)):
            self._detector_source = os.fspath(detector)
            path = Path(self._detector_source).expanduser()
            self.detector_name = path.name if path.is_dir() else self._detector_source
        elif detector is not None:
            self._detector = detector
            self.detector_name = str(getattr(detector, "name", type(detector).__name__))
        self._events = _EventWriter(store)
        self._closed = False
        self._prefetcher = None
        if prefetch:
            self._prefetcher = threading.Thread(
                target=self._prefetch_loop, name="segany-prefetch", daemon=True
            )
            self._prefetcher.start()
        self.local_user = self._ref(store.ensure_user("local"))

    def _embedding_prefix(self, model_id: str) -> str:
        tag = "" if self._backend is None else f"-{self.backend_name}"
        return f"{model_id}{tag}"

    def switch_model(self, predictor: Predictor, *, name: str) -> dict[str, Any]:
        """Answer with ``predictor``'s model (and backend) from now on, shown as ``name``.

        Requests already running finish with the old model; every later prediction,
        pre-fill and accepted object uses (and records) the new model id. Embeddings stay
        valid when the image encoder is unchanged (a decoder fine-tune: same
        :func:`~segany.fingerprint.model_fingerprint` of ``image_encoder``), so nothing is
        re-embedded then. Returns ``model``, ``model_id``, ``backend``, ``previous_model``,
        ``previous_model_id`` and ``embeddings_kept``."""
        same_encoder = model_fingerprint(self.model.image_encoder) == model_fingerprint(
            predictor.model.image_encoder
        )
        with self._switch_lock:
            old_name, old_id = self.model_name, self.model_id
            self.model = predictor.model
            self.model_id = predictor.model_id
            self._backend = getattr(predictor, "backend", None)
            self.backend_name = "torch" if self._backend is None else _backend_name(predictor)
            self.model_name = name
            if not same_encoder:  # embeddings of the old encoder must not be reused
                self._key_prefix = self._embedding_prefix(self.model_id)
                self._keys = {}
            self._tls = threading.local()  # each request thread builds a new predictor
        return {
            "model": name,
            "model_id": self.model_id,
            "backend": self.backend_name,
            "previous_model": old_name,
            "previous_model_id": old_id,
            "embeddings_kept": same_encoder,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._prefetch_q.put(None)
        if self._prefetcher is not None:
            self._prefetcher.join(timeout=30)
        self._events.close()

    # -- users -------------------------------------------------------------------------------
    @staticmethod
    def _ref(u: User) -> UserRef:
        return UserRef(id=u.id, name=u.name, is_admin=bool(u.is_admin))

    def authenticate(self, token: str | None) -> UserRef:
        """The user of ``token``; with auth off, requests without a token are the ``local``
        user. With auth on, tokens not issued by the operator or an admin under auth (those
        of older databases, see ``User.token_trusted``) are refused. Raises
        :class:`Unauthorized`."""
        if token:
            u = self.store.user_by_token(token)
            if u is None:
                raise Unauthorized("unknown or revoked token")
            if self.auth and not u.token_trusted:
                raise Unauthorized(
                    f"the token of {u.name!r} was issued before this server required tokens "
                    "and is not valid with auth on: get a new one from an admin "
                    f"(segany annotate DIR --add-user {u.name})"
                )
            return self._ref(u)
        if self.auth:
            raise Unauthorized(
                "this server needs a token: send 'Authorization: Bearer TOKEN' "
                "(create one with: segany annotate DIR --add-user NAME)"
            )
        return self.local_user

    def create_user(self, req: NewUserRequest, by: UserRef) -> TokenOut:
        """A new user (or a new token for one): only on a server with auth on, by an admin.
        With auth off every caller is anonymous, so nobody may mint tokens (a token minted
        then would be anyone's)."""
        if not self.auth:
            raise Forbidden(
                "users can only be created on a server started with --auth, by an admin "
                "(or with: segany annotate DIR --add-user NAME)"
            )
        if not by.is_admin:
            raise Forbidden("only an admin can create users")
        u, token = self.store.issue_token(req.name, is_admin=req.is_admin)
        return TokenOut(user=UserOut(id=u.id, name=u.name, is_admin=u.is_admin), token=token)

    def ensure_admin_token(self) -> str | None:
        """With auth on and no admin holding a trusted token: a new token for ``admin``
        (returned, to be printed once); otherwise ``None``."""
        if not self.auth or self.store.admin_token_issued():
            return None
        _, token = self.store.issue_token("admin", is_admin=True)
        return token

    def users(self) -> list[UserOut]:
        return [UserOut(id=u.id, name=u.name, is_admin=u.is_admin) for u in self.store.users()]

    def config(self, user: UserRef | None = None) -> ConfigOut:
        cats = self.store.categories()
        return ConfigOut(
            auth=self.auth,
            model=self.model_name,
            model_id=self.model_id,
            images_dir=self.root.name,
            stages=[1, 2],
            prefill_defaults=PrefillRequest(),
            categories=cats,
            user=user.name if user else None,
            detector=self.detector_name,
        )

    # -- images ------------------------------------------------------------------------------
    def rescan(self) -> RescanOut:
        """Register the images of the folder (new ones added, changed ones updated, vanished
        ones marked missing). Files that are not images are ignored; unreadable or too
        large images are listed with status ``error`` and the reason."""
        found: dict[str, dict[str, Any]] = {}
        for full in find_images(self.root):  # the one discovery rule (segany.files)
            try:
                real = full.resolve()
            except OSError:
                continue
            if not real.is_relative_to(self.root) or not real.is_file():
                continue  # a symlink leading out of the folder is never served
            found[full.relative_to(self.root).as_posix()] = self._probe(real)
        out = self.store.sync_images(found)
        return RescanOut(**out)

    def _probe(self, path: Path) -> dict[str, Any]:
        from PIL import Image as PILImage

        st = path.stat()
        fields: dict[str, Any] = {
            "size_bytes": int(st.st_size),
            "mtime": float(st.st_mtime),
            "width": 0,
            "height": 0,
            "status": "ok",
            "error": None,
        }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with PILImage.open(path) as img:
                    w, h = img.size
                    try:
                        orient = img.getexif().get(0x0112, 1)
                    except Exception:
                        orient = 1
            if orient in (5, 6, 7, 8):
                w, h = h, w
            fields["width"], fields["height"] = int(w), int(h)
            if w * h > self.max_pixels:
                fields["status"] = "error"
                fields["error"] = (
                    f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the limit of "
                    f"{self.max_pixels / 1e6:.0f} MP (--max-pixels)"
                )
        except Exception as exc:
            fields["status"] = "error"
            reason = str(exc).replace(str(path), path.name)
            fields["error"] = f"not a readable image: {type(exc).__name__}: {reason}"
        return fields

    def _image_out(self, im: Image, counts: Any = None) -> ImageOut:
        return ImageOut(
            id=im.id,
            path=im.path,
            width=im.width,
            height=im.height,
            status=im.status,
            error=im.error,
            stage=im.stage,
            done=im.done,
            accepted=getattr(counts, "accepted", 0),
            pending=getattr(counts, "pending", 0),
        )

    def list_images(self) -> ImageList:
        counts = self.store.counts()
        images = [self._image_out(im, counts.get(im.id)) for im in self.store.images()]
        cats = self.store.categories()
        return ImageList(
            images=images,
            total=len(images),
            done=sum(1 for i in images if i.done),
            annotated=sum(1 for i in images if i.accepted > 0),
            categories=cats,
        )

    def _image(self, image_id: int, *, usable: bool = False) -> Image:
        im = self.store.image(image_id)
        if im is None:
            raise NotFound(f"no image with id {image_id}")
        if usable and im.status != "ok":
            raise Unprocessable(f"image {im.path} cannot be annotated: {im.error}")
        return im

    def get_image(self, image_id: int) -> ImageOut:
        im = self._image(image_id)
        return self._image_out(im, self.store.counts().get(image_id))

    def image_file(self, image_id: int) -> Path:
        """The image's file on disk (checked to lie inside the images folder)."""
        im = self._image(image_id)
        if im.status == "missing":
            raise NotFound(f"image file {im.path} is gone from the images folder")
        path = safe_relpath(self.root, im.path)
        if not path.is_file():
            raise NotFound(f"image file {im.path} is gone from the images folder")
        return path

    def open_image(self, image_id: int, user: UserRef) -> OpenOut:
        """The annotator starts on an image: its embedding is computed in the background
        (if not cached), the next image of the queue is embedded after it, and the object
        timer starts."""
        im = self._image(image_id)
        ids = [i.id for i in self.store.images() if i.status == "ok"]
        prev_id = next_id = None
        all_ids = [i.id for i in self.store.images()]
        if image_id in all_ids:
            k = all_ids.index(image_id)
            prev_id = all_ids[k - 1] if k > 0 else None
            next_id = all_ids[k + 1] if k + 1 < len(all_ids) else None
        ready = True
        if im.status == "ok":
            ready = self.embedding_ready(im)
            if not ready:
                self.prefetch(im.id)
            later = [i for i in ids if i > image_id]
            if later:
                self.prefetch(later[0])
        with self._timers_lock:
            self._timers[(user.id, image_id)] = _Timer(start=time.time())
        self._events.put(
            {
                "ts": time.time(),
                "kind": "open",
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
            }
        )
        return OpenOut(
            image=self._image_out(im, self.store.counts().get(image_id)),
            embedding="ready" if ready else "computing",
            prev_id=prev_id,
            next_id=next_id,
        )

    def set_done(self, image_id: int, req: DoneRequest, user: UserRef) -> ImageOut:
        self._image(image_id)
        im = self.store.update_image(image_id, done=req.done)
        self._events.put(
            {
                "ts": time.time(),
                "kind": "done" if req.done else "undone",
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
            }
        )
        return self._image_out(im, self.store.counts().get(image_id))

    # -- embeddings --------------------------------------------------------------------------
    def _image_lock(self, image_id: int) -> threading.Lock:
        with self._locks_lock:
            lock = self._image_locks.get(image_id)
            if lock is None:
                lock = self._image_locks[image_id] = threading.Lock()
            return lock

    def _cache_key(self, content_key: str) -> str:
        return f"{self._key_prefix}-{content_key}"

    def embedding_ready(self, im: Image) -> bool:
        key = self._keys.get(im.id)
        if key is None and im.content_key:
            key = self._cache_key(im.content_key)
        return key is not None and self.cache.in_memory(key)

    def embedding(self, im: Image) -> ImageEmbedding:
        """The image's embedding, from memory, from disk, or computed now (once: concurrent
        callers for the same image wait for the first)."""
        key = self._keys.get(im.id)
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        with self._image_lock(im.id):
            for k in (self._keys.get(im.id), im.content_key and self._cache_key(im.content_key)):
                if k:
                    hit = self.cache.get(k)
                    if hit is not None:
                        self._keys[im.id] = k
                        return hit
            path = safe_relpath(self.root, im.path)
            try:
                rgb = load_image(path, max_pixels=self.max_pixels)
            except ImageError as exc:
                self.store.update_image(im.id, status="error", error=str(exc))
                raise Unprocessable(f"image {im.path} cannot be read: {exc}") from None
            content = image_key(rgb)
            key = self._cache_key(content)
            item = self.cache.get(key)
            if item is None:
                t0 = time.perf_counter()
                with torch_threads(self.embed_threads):
                    item = self._predictor().embed(rgb)
                self.cache.put(key, item)
                log.info("embedded %s in %.2fs", im.path, time.perf_counter() - t0)
            self._keys[im.id] = key
            if im.content_key != content:
                self.store.update_image(im.id, content_key=content)
            return item

    def prefetch(self, image_id: int) -> None:
        """Embed an image in the background thread (no-op when prefetch is off)."""
        if not self.prefetch_enabled or self._closed:
            return
        with self._locks_lock:
            if image_id in self._prefetch_pending:
                return
            self._prefetch_pending.add(image_id)
        self._prefetch_q.put(image_id)

    def _prefetch_loop(self) -> None:
        while True:
            image_id = self._prefetch_q.get()
            if image_id is None:
                return
            try:
                im = self.store.image(image_id)
                if im is not None and im.status == "ok" and not self.embedding_ready(im):
                    self.embedding(im)
            except Exception as exc:  # reported when the image is used
                log.warning("prefetch of image %s failed: %s", image_id, exc)
            finally:
                with self._locks_lock:
                    self._prefetch_pending.discard(image_id)

    def wait_prefetch(self, timeout: float = 60.0) -> None:
        """Block until the background embedding queue is empty (tests, benchmarks)."""
        end = time.time() + timeout
        while time.time() < end:
            with self._locks_lock:
                if not self._prefetch_pending:
                    return
            time.sleep(0.02)

    def _predictor(self) -> Predictor:
        p = getattr(self._tls, "predictor", None)
        if p is None:
            torch.set_num_threads(self.decode_threads)  # per thread (OpenMP), see __init__
            p = self._new_predictor()
            self._tls.predictor = p
        return p

    def _new_predictor(self) -> Predictor:
        if self._backend is None:
            return Predictor(self.model, cache=self.cache, model_id=self.model_id)
        return Predictor(
            self.model, cache=self.cache, model_id=self.model_id, backend=self._backend
        )

    # -- the click path ----------------------------------------------------------------------
    def predict(self, image_id: int, req: PredictRequest, user: UserRef) -> PredictOut:
        """Masks for the current clicks (and box, and the previous mask as ``mask_input``):
        three candidates with ``multimask``, else one; COCO RLE at image size."""
        t0 = time.perf_counter()
        im = self._image(image_id, usable=True)
        if len(req.points) != len(req.labels):
            raise Unprocessable(
                f"points ({len(req.points)}) and labels ({len(req.labels)}) differ in length"
            )
        if any(lab not in (0, 1) for lab in req.labels):
            raise Unprocessable("labels must be 1 (object) or 0 (background)")
        if not req.points and req.box is None:
            raise Unprocessable("give at least one point or a box")
        mask_input = None
        if req.mask_input_id is not None:
            cand = self._candidates.get(req.mask_input_id)
            if cand is None:
                raise NotFound(f"mask_input_id {req.mask_input_id!r} is unknown or expired")
            if cand.image_id != image_id:
                raise Unprocessable(
                    f"mask_input_id {req.mask_input_id!r} belongs to image {cand.image_id}"
                )
            mask_input = cand.logits[None].astype(np.float32)
        emb = self.embedding(im)
        p = self._predictor()
        if not (p.is_image_set and p.state is emb):
            p.set_embedding(emb)  # per thread, once per image (decoder context)
        coords = np.asarray(req.points, dtype=np.float64).reshape(-1, 2) if req.points else None
        labels = np.asarray(req.labels, dtype=np.int64) if req.points else None
        box = np.asarray(req.box, dtype=np.float64) if req.box is not None else None
        try:
            with self._decode:
                pred = p.predict(
                    point_coords=coords,
                    point_labels=labels,
                    box=box,
                    mask_input=mask_input,
                    multimask_output=req.multimask,
                )
        except PromptError as exc:
            raise Unprocessable(str(exc)) from None
        rles = M.masks_to_coco_rle(pred.masks)
        prompt = {
            "points": [list(map(float, pt)) for pt in req.points],
            "labels": list(req.labels),
            "box": list(req.box) if req.box is not None else None,
        }
        base = uuid.uuid4().hex[:16]
        outs = []
        for k, rle in enumerate(rles):
            enc = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            area = int(mask_utils.area(enc))
            bbox = [float(v) for v in mask_utils.toBbox(enc)]
            mid = f"{base}-{k}"
            score = float(pred.scores[k])
            self._candidates.put(
                mid,
                _Candidate(
                    image_id=image_id,
                    logits=np.asarray(pred.low_res_logits[k], dtype=np.float16),
                    rle=rle,
                    score=score,
                    area=area,
                    bbox=bbox,
                    prompt=prompt,
                ),
            )
            outs.append(
                MaskOut(
                    index=k,
                    segmentation=RLE(size=tuple(rle["size"]), counts=rle["counts"]),
                    score=round(score, 5),
                    area=area,
                    bbox=bbox,
                    mask_input_id=mid,
                )
            )
        with self._timers_lock:
            t = self._timers.setdefault((user.id, image_id), _Timer(start=time.time()))
            t.clicks += 1
        ms = (time.perf_counter() - t0) * 1e3
        self._events.put(
            {
                "ts": time.time(),
                "kind": "predict",
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
                "data": {
                    "points": len(req.points),
                    "box": req.box is not None,
                    "refine": mask_input is not None,
                    "ms": round(ms, 2),
                },
            }
        )
        return PredictOut(
            image_id=image_id,
            width=im.width,
            height=im.height,
            masks=outs,
            best=int(np.argmax(pred.scores)),
            ms=round(ms, 2),
        )

    def _take_timer(self, user: UserRef, image_id: int) -> tuple[int, float | None]:
        now = time.time()
        with self._timers_lock:
            t = self._timers.pop((user.id, image_id), None)
            self._timers[(user.id, image_id)] = _Timer(start=now)
        if t is None:
            return 0, None
        return t.clicks, round(now - t.start, 3)

    # -- objects -----------------------------------------------------------------------------
    def _ann_out(self, a: Annotation, names: dict[int, str] | None = None) -> AnnotationOut:
        if names is None:
            names = {u.id: u.name for u in self.store.users()}
        text = _text_prompt(a)
        return AnnotationOut(
            id=a.id,
            image_id=a.image_id,
            category=a.category,
            status=a.status,
            stage=a.stage,
            source=a.source,
            segmentation=RLE(size=tuple(a.segmentation["size"]), counts=a.segmentation["counts"]),
            bbox=list(a.bbox),
            area=a.area,
            score=a.score,
            stability=a.stability,
            model_id=a.model_id,
            detector_score=text.get("score"),
            phrase=text.get("phrase"),
            user=names.get(a.user_id) if a.user_id is not None else None,
            clicks=a.clicks,
            seconds=a.seconds,
            created_at=a.created_at,
            updated_at=a.updated_at,
        )

    def accept(self, image_id: int, req: AcceptRequest, user: UserRef) -> AnnotationOut:
        """Save a mask as an object with a category. It is committed before this returns."""
        im = self._image(image_id)
        if im.status == "missing":
            raise NotFound(f"image file {im.path} is gone from the images folder")
        if (req.segmentation is None) == (req.mask_id is None):
            raise Unprocessable("give exactly one of 'segmentation' and 'mask_id'")
        score = req.score
        prompt = None
        if req.mask_id is not None:
            cand = self._candidates.get(req.mask_id)
            if cand is None:
                raise NotFound(f"mask_id {req.mask_id!r} is unknown or expired")
            if cand.image_id != image_id:
                raise Unprocessable(f"mask_id {req.mask_id!r} belongs to image {cand.image_id}")
            rle, area, bbox = cand.rle, cand.area, cand.bbox
            score = cand.score if score is None else score
            prompt = cand.prompt
        else:
            rle, area, bbox = canonical_rle(req.segmentation, (im.height, im.width))
        if area == 0:
            raise Unprocessable("the mask is empty")
        reject: dict[int, tuple[str, str]] = {}
        if req.replaces is not None:
            old = self.store.annotation(req.replaces)
            if old is None or old.image_id != image_id:
                raise NotFound(f"no annotation {req.replaces} on image {image_id}")
            if old.status != "pending":
                raise Conflict(f"annotation {req.replaces} is {old.status}, not pending")
            reject[old.id] = ("pending", "rejected")  # checked again in the transaction
        clicks, seconds = self._take_timer(user, image_id)
        item = {
            "image_id": image_id,
            "category": req.category,
            "status": "accepted",
            "stage": im.stage,
            "source": "manual",
            "segmentation": rle,
            "bbox": bbox,
            "area": area,
            "score": score,
            "model_id": self.model_id,
            "user_id": user.id,
            "clicks": clicks,
            "seconds": seconds,
            "prompt": prompt,
            "replaces_id": req.replaces,
        }
        ev = {
            "kind": "accept",
            "user_id": user.id,
            "image_id": image_id,
            "stage": im.stage,
            "annotation_index": 0,
            "data": {"clicks": clicks, "seconds": seconds, "replaces": req.replaces},
        }
        try:
            (ann,) = self.store.add_annotations([item], [ev], set_status=reject)
        except StoreConflict as exc:
            raise Conflict(str(exc)) from None
        return self._ann_out(ann)

    def list_annotations(self, image_id: int, statuses: list[str] | None = None) -> AnnotationList:
        self._image(image_id)
        if statuses is not None:
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise BadRequest(f"unknown status {bad[0]!r}; use one of {list(STATUSES)}")
        names = {u.id: u.name for u in self.store.users()}
        anns = self.store.annotations(
            image_id, statuses=statuses if statuses else ["accepted", "pending"]
        )
        return AnnotationList(
            image_id=image_id, annotations=[self._ann_out(a, names) for a in anns]
        )

    def get_annotation(self, ann_id: int) -> AnnotationOut:
        a = self.store.annotation(ann_id)
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        return self._ann_out(a)

    def update_annotation(self, ann_id: int, req: UpdateRequest, user: UserRef) -> AnnotationOut:
        """Edit the category, replace the mask, or accept / reject a pending object."""
        a = self.store.annotation(ann_id)
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        fields: dict[str, Any] = {}
        kind = "edit"
        data: dict[str, Any] = {}
        if req.category is not None and req.category != a.category:
            fields["category"] = req.category
            data["category"] = [a.category, req.category]
        if req.segmentation is not None:
            im = self._image(a.image_id)
            rle, area, bbox = canonical_rle(req.segmentation, (im.height, im.width))
            if area == 0:
                raise Unprocessable("the mask is empty")
            fields.update(segmentation=rle, area=area, bbox=bbox)
        if req.status is not None and req.status != a.status:
            fields["status"] = req.status
            if a.status == "pending" and req.status in ("accepted", "rejected"):
                kind = "accept" if req.status == "accepted" else "reject"
                clicks, seconds = self._take_timer(user, a.image_id)
                data.update(clicks=clicks, seconds=seconds)
                if req.status == "accepted":
                    fields.update(seconds=seconds, user_id=user.id, clicks=a.clicks + clicks)
            else:
                kind = "status"
            data["status"] = [a.status, req.status]
        if not fields:
            return self._ann_out(a)
        ev = {
            "kind": kind,
            "user_id": user.id,
            "image_id": a.image_id,
            "stage": a.stage,
            "data": data,
        }
        expect = a.status if "status" in fields else None
        try:
            a = self.store.update_annotation(ann_id, fields, ev, expect_status=expect)
        except StoreConflict as exc:
            raise Conflict(str(exc)) from None
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        return self._ann_out(a)

    def delete_annotation(self, ann_id: int, user: UserRef) -> None:
        a = self.store.annotation(ann_id)
        if a is None:
            raise NotFound(f"no annotation with id {ann_id}")
        self.store.delete_annotations(
            [ann_id],
            {
                "kind": "delete",
                "user_id": user.id,
                "image_id": a.image_id,
                "stage": a.stage,
                "data": {"category": a.category, "status": a.status},
            },
        )

    def record_event(self, image_id: int, req: EventRequest, user: UserRef) -> None:
        """UI-side actions (undo, redo, candidate chosen...) kept for the measurements."""
        im = self._image(image_id)
        data = req.data or {}
        try:
            text = json.dumps(data, allow_nan=False)
        except ValueError:
            raise Unprocessable("event data must not hold NaN or infinite numbers") from None
        if len(text) > 4096:
            raise Unprocessable("event data is limited to 4 KiB")
        self._events.put(
            {
                "ts": time.time(),
                "kind": req.kind,
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
                "data": data,
            }
        )

    # -- stage 2 -----------------------------------------------------------------------------
    def _generator(self, req: PrefillRequest) -> Any:
        if self._generator_factory is not None:
            return self._generator_factory(req)
        from ..everything import MaskGenerator

        return MaskGenerator(
            self._new_predictor(),
            preset="fast",
            output_mode="coco_rle",
            points_per_side=max(2, req.points_per_side // 2),
            refine_points_per_side=req.points_per_side,
            pred_iou_thresh=req.pred_iou_thresh,
            stability_score_thresh=req.stability_score_thresh,
            min_mask_region_area=req.min_area,
            max_masks=req.max_masks,
            max_mask_region_fraction=0.95,
        )

    def text_detector(self) -> Any:
        """The text detector for pre-fills by class names, loaded on first use (once).
        Raises :class:`Conflict` when none is configured or it cannot be loaded (missing
        weights: the message says what to download and where)."""
        if self._detector is not None:
            return self._detector
        if self._detector_source is None:
            raise Conflict(
                "pre-filling by class names needs a text detector, and this server has "
                "none: start it with `segany annotate IMAGES_DIR --detector NAME|FOLDER` "
                "(e.g. --detector grounding-dino-tiny; see docs/text.md)"
            )
        with self._detector_lock:
            if self._detector is None:
                from ..text import DetectorError, load_detector

                try:
                    self._detector = load_detector(self._detector_source)
                except DetectorError as exc:
                    raise Conflict(f"the text detector cannot be loaded: {exc}") from None
                self.detector_name = str(getattr(self._detector, "name", self.detector_name))
                log.info("text detector %s loaded", self.detector_name)
            return self._detector

    def _class_labeler(self, req: PrefillRequest, detector: Any) -> Any:
        from ..text import TextSegmenter, parse_queries
        from .label import ClassLabeler

        assert req.classes is not None
        segmenter = TextSegmenter(
            self._new_predictor(),
            detector,
            box_threshold=req.box_threshold,
            text_threshold=req.text_threshold,
            max_detections=req.max_masks,
        )
        return ClassLabeler(segmenter, parse_queries(req.classes))

    def _prefill_model_id(self) -> str:
        """``<SAM model id>+<detector name>`` (the store keeps 64 characters)."""
        return f"{self.model_id}+{self.detector_name}"[:64]

    def prefill(self, image_id: int, req: PrefillRequest, user: UserRef) -> PrefillOut:
        """Stage 2 on one image: segment everything with the given thresholds and add the
        masks as *pending* objects (skipping those that overlap accepted objects). The
        image counts as stage 2 from now on.

        With ``req.classes``, the text detector finds those classes and SAM segments each
        box instead; every mask becomes a pending object with its class as category, SAM's
        predicted IoU as ``score`` and the detector's score and phrase kept in its prompt.
        """
        t0 = time.perf_counter()
        im = self._image(image_id, usable=True)
        detector = self.text_detector() if req.classes else None  # fails before any work
        emb = self.embedding(im)  # cached: the generator reuses it
        del emb
        path = safe_relpath(self.root, im.path)
        try:
            rgb = load_image(path, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise Unprocessable(f"image {im.path} cannot be read: {exc}") from None
        with self._prefill_lock:
            gen = self._generator(req) if detector is None else self._class_labeler(req, detector)
            with self._decode, torch_threads(self.embed_threads):
                records = gen.generate(rgb)
        h, w = rgb.shape[:2]
        removed = 0
        if req.replace:
            old = self.store.annotations(image_id, statuses=["pending"], source="prefill")
            removed = len(self.store.delete_annotations([a.id for a in old]))
        accepted = self.store.annotations(image_id, statuses=["accepted", "pending"])
        rles = []
        for r in records:
            seg = r["segmentation"]
            if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
                rles.append({"size": list(seg["size"]), "counts": seg["counts"]})
            else:
                from ..datasets import to_coco_rle

                rles.append(to_coco_rle(seg))
        skipped = 0
        keep = list(range(len(records)))
        if accepted and rles:
            iou = M.mask_iou_matrix(rles, [a.segmentation for a in accepted])
            keep = [i for i in keep if iou[i].max() <= req.overlap_iou]
            skipped = len(records) - len(keep)
        items = []
        model_id = self.model_id if detector is None else self._prefill_model_id()
        for i in keep:
            r = records[i]
            enc = {"size": [h, w], "counts": rles[i]["counts"].encode("ascii")}
            area = int(mask_utils.area(enc))
            if area == 0:
                continue  # a box SAM found nothing in: not an object
            prompt: dict[str, Any] = {
                "points": [list(map(float, p)) for p in r.get("point_coords", [])],
                "labels": [1] * len(r.get("point_coords", [])),
                "box": [float(v) for v in r["box"]] if "box" in r else None,
            }
            if detector is not None:
                prompt["text"] = {
                    "class": r["label"],
                    "phrase": r.get("phrase"),
                    "score": float(r["score"]),
                    "detector": self.detector_name,
                }
            items.append(
                {
                    "image_id": image_id,
                    "category": req.category if detector is None else r["label"],
                    "status": "pending",
                    "stage": 2,
                    "source": "prefill",
                    "segmentation": rles[i],
                    "bbox": [float(v) for v in mask_utils.toBbox(enc)],
                    "area": area,
                    "score": float(r.get("predicted_iou", 0.0)),
                    "stability": float(r.get("stability_score", 0.0)),
                    "model_id": model_id,
                    "user_id": None,
                    "clicks": 0,
                    "seconds": None,
                    "prompt": prompt,
                }
            )
        settings = req.model_dump()
        if detector is not None:
            settings["detector"] = self.detector_name
        ev = {
            "kind": "prefill",
            "user_id": user.id,
            "image_id": image_id,
            "stage": 2,
            "data": {**settings, "created": len(items), "skipped_overlap": skipped},
        }
        anns = self.store.add_annotations(items, [ev])
        self.store.update_image(image_id, stage=2)
        names = {u.id: u.name for u in self.store.users()}
        return PrefillOut(
            image_id=image_id,
            created=len(anns),
            skipped_overlap=skipped,
            removed_pending=removed,
            seconds=round(time.perf_counter() - t0, 3),
            settings=settings,
            annotations=[self._ann_out(a, names) for a in anns],
        )

    # -- measurements ------------------------------------------------------------------------
    def stats(self) -> S.StatsOut:
        return S.compute(self.store)

    # -- export / import ---------------------------------------------------------------------
    def _export_rows(
        self, statuses: list[str]
    ) -> tuple[list[Image], dict[int, list[Annotation]], list[str]]:
        anns = self.store.annotations(statuses=statuses)
        by_image: dict[int, list[Annotation]] = {}
        for a in anns:
            by_image.setdefault(a.image_id, []).append(a)
        images = [im for im in self.store.images() if im.status == "ok" or im.id in by_image]
        cats = sorted({a.category for a in anns})
        return images, by_image, cats

    @staticmethod
    def _record(a: Annotation) -> dict[str, Any]:
        h, w = a.segmentation["size"]
        prompt = a.prompt or {}
        return {
            "segmentation": a.segmentation,
            "area": a.area,
            "bbox": a.bbox,
            # a row stored with a non-finite number (by an older segany or by hand) exports
            # it as null rather than failing the export for everyone
            "predicted_iou": _finite_or_none(a.score, 1.0),
            "stability_score": _finite_or_none(a.stability, 1.0),
            "crop_box": [0.0, 0.0, float(w), float(h)],
            "point_coords": prompt.get("points") or [],
        }

    def export_coco(self, include_pending: bool = False) -> dict[str, Any]:
        """COCO instances JSON of the accepted objects (and pending ones if asked), one
        category per label; images without objects are listed too."""
        from ..datasets.coco import CocoWriter

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        images, by_image, cats = self._export_rows(statuses)
        cat_ids = {c: i + 1 for i, c in enumerate(cats)}
        writer = CocoWriter(
            [{"id": i, "name": c, "supercategory": "object"} for c, i in cat_ids.items()],
            extra_keys=("attributes",),
        )
        order: list[Annotation] = []
        for im in images:
            anns = by_image.get(im.id, [])
            records = []
            for a in anns:
                rec = self._record(a)
                rec["category_id"] = cat_ids[a.category]
                rec["attributes"] = {"status": a.status, "stage": a.stage, "source": a.source}
                text = _text_prompt(a)
                if text:  # pre-filled by class name: the detector's view of it
                    rec["attributes"]["detector_score"] = text.get("score")
                    rec["attributes"]["phrase"] = text.get("phrase")
                records.append(rec)
            writer.add(records, file_name=im.path, width=im.width, height=im.height, image_id=im.id)
            order.extend(anns)
        data = writer.to_dict()
        data["info"] = {"description": "segany annotate", "model": self.model_name}
        for out, a in zip(data["annotations"], order, strict=True):
            out["id"] = a.id  # the annotator's ids, stable across exports
            out.setdefault("score", None)  # stored non-finite: null
        return data

    def export_sa1b(self, include_pending: bool = False) -> bytes:
        """A zip of SA-1B per-image JSON files (``<image path>.json``)."""
        from ..datasets.sa1b import to_sa1b

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        images, by_image, _ = self._export_rows(statuses)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for im in images:
                anns = by_image.get(im.id, [])
                data = to_sa1b(
                    [self._record(a) for a in anns],
                    image_id=im.id,
                    file_name=im.path,
                    width=im.width,
                    height=im.height,
                )
                for out, a in zip(data["annotations"], anns, strict=True):
                    out["id"] = a.id
                    out["category"] = a.category
                z.writestr(f"{im.path}.json", dumps(data))
        return buf.getvalue()

    def export_yolo(self, include_pending: bool = False) -> bytes:
        """A zip in the YOLO-seg layout: ``labels/<image path without suffix>.txt`` (one
        polygon per object, class ids in ``classes.txt``) and ``data.yaml``."""
        from ..datasets.yolo import yolo_lines

        statuses = ["accepted", "pending"] if include_pending else ["accepted"]
        images, by_image, cats = self._export_rows(statuses)
        cls = {c: i for i, c in enumerate(cats)}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for im in images:
                lines: list[str] = []
                for a in by_image.get(im.id, []):
                    lines += yolo_lines([self._record(a)], class_id=cls[a.category])
                stem = PurePosixPath(im.path).with_suffix("")
                z.writestr(f"labels/{stem}.txt", "\n".join(lines) + ("\n" if lines else ""))
            z.writestr("classes.txt", "\n".join(cats) + ("\n" if cats else ""))
            names = "\n".join(f"  {i}: {json.dumps(c)}" for c, i in cls.items())
            z.writestr("data.yaml", f"path: .\ntrain: images\nval: images\nnames:\n{names}\n")
        return buf.getvalue()

    def import_coco(
        self, data: dict[str, Any], user: UserRef, status: str = "pending"
    ) -> ImportOut:
        """Load a COCO instances JSON for review: images are matched by ``file_name``
        (relative to the images folder), masks (RLE or polygons) become objects with the
        given status (``pending`` by default) and source ``import``."""
        if status not in ("pending", "accepted"):
            raise BadRequest("status must be 'pending' or 'accepted'")
        from .coco_import import label, read_coco

        known = {im.path: im for im in self.store.images()}
        items = []
        skipped = 0
        try:
            coco = read_coco(
                data,
                known,
                self.root,
                clean_category=_clean_category,
                safe_relpath=safe_relpath,
                max_category=MAX_CATEGORY,
            )
            for i, a, category, im in coco.annotations():  # one at a time: see coco_import
                what = f"{label(i, a)}: segmentation"
                enc = segmentation_to_rle(a["segmentation"], im.height, im.width, what=what)
                area = int(mask_utils.area(enc))
                if area == 0:
                    skipped += 1
                    continue
                items.append(
                    {
                        "image_id": im.id,
                        "category": category,
                        "status": status,
                        "stage": im.stage,
                        "source": "import",
                        "segmentation": {
                            "size": [im.height, im.width],
                            "counts": enc["counts"].decode("ascii"),
                        },
                        "bbox": [float(v) for v in mask_utils.toBbox(enc)],
                        "area": area,
                        "score": check_score(a.get("score")),
                        "model_id": None,
                        "user_id": user.id,
                        "clicks": 0,
                        "seconds": None,
                    }
                )
        except (InputError, ValueError) as exc:
            msg = str(exc)  # a value can be long (a 4,000-digit id): kept short
            msg = msg if len(msg) <= 300 else msg[:297] + "..."
            raise Unprocessable(f"COCO import refused: {msg}") from None
        skipped += coco.skipped_annotations
        matched = coco.matched
        skipped_images = coco.skipped_images
        ev = {"kind": "import", "user_id": user.id, "data": {"annotations": len(items)}}
        self.store.add_annotations(items, [ev])
        return ImportOut(
            images=len(matched),
            annotations=len(items),
            skipped_images=skipped_images[:100],
            skipped_annotations=skipped,
        )


__all__ = [
    "SOURCES",
    "STATUSES",
    "AcceptRequest",
    "AnnotationOut",
    "AnnotationService",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PredictOut",
    "PredictRequest",
    "PrefillOut",
    "PrefillRequest",
    "ServiceError",
    "Unauthorized",
    "Unprocessable",
    "UpdateRequest",
    "UserRef",
]
