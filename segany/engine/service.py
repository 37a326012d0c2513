"""The annotator's actions, one method each, with typed requests and responses.

:class:`AnnotationService` holds the store, the model and the embedding cache; the web
server (:mod:`.server`) only maps HTTP onto these methods and :class:`ServiceError` onto
4xx responses. Everything here can be used (and is tested) without HTTP.

Measurements (the paper's): each annotator has, per image, an *object timer* that starts
when the image is opened (or the previous object on it was accepted or rejected) and
counts the prompts sent (one click, or one box drag, is one prompt). Accepting a mask
stores the timer's clicks and seconds on the annotation and starts the next object's timer.

The class is assembled from one module per responsibility (each a mixin of its methods;
the state is set up in :meth:`AnnotationService.__init__` here): :mod:`.schemas` (errors,
requests and responses), :mod:`.images` (the folder, the queue, embeddings),
:mod:`.predictions` (the click path and the object timers), :mod:`.annotations` (accept,
fix, reject, events), :mod:`.prefill` (stage 2) and :mod:`.prefill_jobs` (in the
background, with progress and cancel), :mod:`.work` (leases, queues, review, retried
writes), :mod:`.exports` (COCO, SA-1B and YOLO out, COCO in; the videos' COCO video
JSON and DAVIS PNGs), :mod:`.video` (videos, frames, clicks on frames, tracks) and
:mod:`.video_jobs` (propagation in the background) and :mod:`.video_work` (video leases,
keyed track writes, video object timers); :mod:`.purge` drops old request keys and trash
at start and then hourly, on keyed writes. Users, configuration, the model switch
and the measurements are here.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fingerprint import state_fingerprint
from ..predictor import LockedEmbeddingCache, Predictor
from ..runtime import DecodeSlots, torch_threads
from . import stats as S
from .annotations import AnnotationsMixin, canonical_rle
from .exports import ExportsMixin
from .images import ImagesMixin, safe_relpath
from .predictions import _LRU, PredictionsMixin, _Timer
from .prefill import PrefillMixin
from .prefill_jobs import PrefillJobsMixin
from .purge import Purger
from .schemas import (
    DEFAULT_MAX_PIXELS,
    MAX_CATEGORY,
    MAX_CLASSES_TEXT,
    MAX_POINTS,
    RLE,
    AcceptRequest,
    AnnotationList,
    AnnotationOut,
    BadRequest,
    ConfigOut,
    Conflict,
    DoneRequest,
    EventOut,
    EventRequest,
    Forbidden,
    ImageList,
    ImageOut,
    ImportOut,
    MaskOut,
    NewUserRequest,
    NotFound,
    OpenOut,
    PredictOut,
    PredictRequest,
    PrefillOut,
    PrefillRequest,
    RescanOut,
    ServiceError,
    TokenOut,
    Unauthorized,
    Unprocessable,
    UpdateRequest,
    UserOut,
    UserRef,
)
from .store import SOURCES, STATUSES, Store, User
from .video import VideoMixin
from .video_jobs import VideoJobsMixin
from .video_store import VideoStore
from .video_work import VideoWorkMixin
from .webdecoder import WebDecoderMixin
from .work import WorkMixin
from .work_store import WorkStore

log = logging.getLogger("segany.engine")


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


class AnnotationService(
    ImagesMixin,
    PredictionsMixin,
    AnnotationsMixin,
    PrefillMixin,
    PrefillJobsMixin,
    ExportsMixin,
    WebDecoderMixin,
    WorkMixin,
    VideoMixin,
    VideoJobsMixin,
    VideoWorkMixin,
):
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
        decode_threads: torch threads of one prompt's decode (default 1: one thread per
            decode and one decode per core measured best with several annotators; ``None``:
            the cores the other decodes leave free, see :class:`~segany.runtime.DecodeSlots`).
        embed_threads: torch threads of the image encoder (default: every core).
        detector: the text detector of stage-2 pre-fills by class names: a catalogue name,
            hub id or folder (loaded on first use, once), or a ready detector object (see
            :class:`segany.text.Detector`). ``None``: pre-fill by class names is refused.
        web_decoder: let the page decode clicks itself (onnxruntime-web, docs/annotate.md);
            off: every click is decoded on the server.
        web_dtype: the embedding payload's default dtype (``float16``: half the bytes;
            masks within the golden tolerances, measured in docs/annotate.md).
        lease_seconds: how long an image stays locked to the page that opened it unless
            the page renews the lease (:mod:`.work`).
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
        decode_threads: int | None = 1,
        embed_threads: int | None = None,
        candidates_kept: int = 512,
        generator_factory: Callable[..., Any] | None = None,
        detector: str | os.PathLike[str] | Any | None = None,
        web_decoder: bool = False,
        web_dtype: str = "float16",
        lease_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.work = WorkStore(store)
        self.purger = Purger(store)  # old request keys and trash entries (purge.py)
        self.purger.run()
        self.lease_seconds = float(lease_seconds)
        self._jobs: dict[str, Any] = {}
        self._jobs_lock = threading.Lock()
        self.video_store = VideoStore(store)
        self._video_jobs: dict[str, Any] = {}  # propagations (video_jobs.py)
        self._video_sources = _LRU(4)  # open video readers (video.py)
        self._frame_keys = _LRU(65536)  # (video, frame) -> the frame's pixel hash
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
        self.cache = LockedEmbeddingCache(cache_dir, max_items=memory_items)
        self.auth = auth
        self.max_pixels = max_pixels
        self.prefetch_enabled = prefetch
        self._tls = threading.local()
        from ..runtime import available_cpus, default_threads

        cpus = available_cpus()
        self.embed_threads = max(1, embed_threads or default_threads())
        self._decode = DecodeSlots(model_concurrency or cpus, decode_threads, self.embed_threads)
        self.model_concurrency = self._decode.concurrency
        self._candidates = _LRU(candidates_kept)
        self._timers: dict[tuple[int, Any], _Timer] = {}  # (user, image id or video_timer)
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
        self.web_decoder = web_decoder
        self.web_dtype = web_dtype
        self._web_decoders: dict[str, Any] = {}
        self._web_lock = threading.Lock()
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
        valid when the weights behind them are unchanged (a decoder fine-tune of SAM 1 or
        SAM 2: same :func:`~segany.fingerprint.state_fingerprint` of the model's
        ``feature_state()``; not after an HQ-SAM fine-tune, whose HQ features come from
        trained modules), so nothing is re-embedded then. Returns ``model``, ``model_id``,
        ``backend``, ``previous_model``, ``previous_model_id`` and ``embeddings_kept``."""
        same_encoder = state_fingerprint(self.model.feature_state()) == state_fingerprint(
            predictor.model.feature_state()
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
            web_decoder=self.web_decoder_info(),
            lease_seconds=self.lease_seconds,
        )

    # -- measurements ------------------------------------------------------------------------
    def stats(self) -> S.StatsOut:
        return S.compute(self.store)


__all__ = [
    "AcceptRequest",
    "AnnotationList",
    "AnnotationOut",
    "AnnotationService",
    "BadRequest",
    "ConfigOut",
    "Conflict",
    "DEFAULT_MAX_PIXELS",
    "DoneRequest",
    "EventOut",
    "EventRequest",
    "Forbidden",
    "ImageList",
    "ImageOut",
    "ImportOut",
    "MAX_CATEGORY",
    "MAX_CLASSES_TEXT",
    "MAX_POINTS",
    "MaskOut",
    "NewUserRequest",
    "NotFound",
    "OpenOut",
    "PredictOut",
    "PredictRequest",
    "PrefillOut",
    "PrefillRequest",
    "RLE",
    "RescanOut",
    "SOURCES",
    "STATUSES",
    "ServiceError",
    "TokenOut",
    "Unauthorized",
    "Unprocessable",
    "UpdateRequest",
    "UserOut",
    "UserRef",
    "canonical_rle",
    "safe_relpath",
    "torch_threads",
]
