"""The annotator's web server: FastAPI routes over :class:`~.service.AnnotationService`.

Routes are thin: they parse, authenticate and call one service method; :mod:`.errors`
maps failures to statuses and :mod:`.guards` checks Host, Origin and body sizes first.
The browser UI is served from ``web/`` (no external assets). The API is described at
``/docs`` (OpenAPI).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..train.routes import add_model_routes
from . import errors, guards, labels
from .labels import LabelOut, LabelRequest
from .service import (
    AcceptRequest,
    AnnotationList,
    AnnotationOut,
    AnnotationService,
    BadRequest,
    ConfigOut,
    DoneRequest,
    EventOut,
    EventRequest,
    ImageList,
    ImageOut,
    ImportOut,
    NewUserRequest,
    OpenOut,
    PredictOut,
    PredictRequest,
    PrefillOut,
    PrefillRequest,
    RescanOut,
    TokenOut,
    Unauthorized,
    UpdateRequest,
    UserOut,
    UserRef,
)
from .stats import StatsOut
from .store import default_db
from .video_routes import add_video_routes
from .webdecoder_routes import ISOLATED, ISOLATED_PREFIXES, add_web_decoder_routes
from .work import check_token
from .work_routes import add_work_routes

__all__ = ["build_service", "create_app", "default_db", "is_local", "serve"]

WEB = Path(__file__).resolve().parent / "web"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
log = logging.getLogger("segany.engine")


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-segany-token") or None


def _user(request: Request) -> UserRef:
    """The caller (FastAPI dependency): from the token, or the local user when auth is off;
    with the page session of ``X-Segany-Session`` (a tab: image leases, :mod:`.work`)."""
    u = request.app.state.service.authenticate(_token(request))
    session = check_token(request.headers.get("x-segany-session"), "X-Segany-Session")
    return dataclasses.replace(u, session=session) if session else u


def _optional_user(request: Request) -> UserRef | None:
    try:
        return request.app.state.service.authenticate(_token(request))
    except Unauthorized:
        return None


Who = Annotated[UserRef, Depends(_user)]
MaybeWho = Annotated[UserRef | None, Depends(_optional_user)]
#: A write's ``Idempotency-Key`` (:mod:`.work`): a retry with the same key is not applied twice.
Key = Annotated[str | None, Header(alias="Idempotency-Key")]


def create_app(
    service: AnnotationService,
    *,
    max_body: int = guards.IMPORT_BODY,
    small_body: int = guards.SMALL_BODY,
    hosts: Sequence[str] | None = guards.LOCAL_NAMES,
    origins: Sequence[str] = (),
    isolation: bool = True,
) -> FastAPI:
    """The FastAPI app for one service (one images folder, one model, one database).

    ``max_body`` limits the COCO import's body, ``small_body`` every other route's (at most
    ``max_body``). ``hosts``: the ``Host`` names answered (:func:`.guards.served_hosts`;
    ``None``: any); cross-origin state-changing requests are refused unless their
    ``Origin`` is a name in ``origins`` (``--allow-host``). ``isolation``: the pages and
    their scripts are sent with COOP / COEP headers, so the page is cross-origin isolated
    and the browser decoder may use WebAssembly threads (:mod:`.webdecoder`).
    """
    app = FastAPI(
        title="segany annotate",
        description="Data engine stages 1-2: interactive annotation with SAM in the loop.",
        version="0.1.0",
        default_response_class=errors.SafeJSONResponse,
    )
    app.state.service = service

    errors.install(app)

    # -- pages -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/stats", include_in_schema=False)
    def stats_page() -> FileResponse:
        return FileResponse(WEB / "stats.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(WEB / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    add_web_decoder_routes(app, service, Who)

    # -- API ---------------------------------------------------------------------------------
    @app.get("/api/health")
    def health() -> JSONResponse:
        """200 ``{"ok": true}`` when the database can be read; 503 with the reason if not."""
        try:
            service.store.check()
        except Exception as exc:  # the reason is the answer; details go to the log
            reason = errors.db_reason(exc)
            log.error("health check: database unavailable (%s): %s", reason, exc)
            return errors.SafeJSONResponse(
                {"ok": False, "detail": f"database unavailable: {reason}"}, status_code=503
            )
        return errors.SafeJSONResponse({"ok": True})

    @app.get("/api/config", response_model=ConfigOut)
    def config(u: MaybeWho) -> ConfigOut:
        cfg = service.config(u)
        if u is None:
            cfg.categories = []
        return cfg

    @app.get("/api/me", response_model=UserOut)
    def me(u: Who) -> UserOut:
        return UserOut(id=u.id, name=u.name, is_admin=u.is_admin)

    @app.get("/api/images", response_model=ImageList)
    def images(u: Who) -> ImageList:
        return service.list_images(u)

    @app.post("/api/rescan", response_model=RescanOut)
    def rescan(u: Who) -> RescanOut:
        return service.rescan()

    @app.get("/api/images/{image_id}", response_model=ImageOut)
    def image(image_id: int, u: Who) -> ImageOut:
        return service.get_image(image_id, u)

    @app.get("/api/images/{image_id}/file")
    def image_file(image_id: int, u: Who) -> Response:
        shown, media_type = service.display_image(image_id)
        if isinstance(shown, bytes):  # a TIFF's pixels as PNG
            return Response(shown, media_type=media_type)
        return FileResponse(shown)

    @app.post("/api/images/{image_id}/open", response_model=OpenOut)
    def open_image(image_id: int, u: Who) -> OpenOut:
        return service.open_image(image_id, u)

    @app.post("/api/images/{image_id}/done", response_model=ImageOut)
    def done(image_id: int, req: DoneRequest, u: Who) -> ImageOut:
        return service.set_done(image_id, req, u)

    @app.post("/api/images/{image_id}/predict", response_model=PredictOut)
    def predict(image_id: int, req: PredictRequest, u: Who) -> PredictOut:
        return service.predict(image_id, req, u)

    @app.get("/api/images/{image_id}/annotations", response_model=AnnotationList)
    def annotations(
        image_id: int,
        u: Who,
        status: Annotated[
            str | None, Query(description="comma-separated: accepted,pending,rejected")
        ] = None,
    ) -> AnnotationList:
        statuses = [s for s in status.split(",") if s] if status else None
        return service.list_annotations(image_id, statuses)

    @app.post("/api/images/{image_id}/annotations", response_model=AnnotationOut, status_code=201)
    def accept(image_id: int, req: AcceptRequest, u: Who, key: Key = None) -> AnnotationOut:
        return service.accept(image_id, req, u, key)

    @app.post("/api/images/{image_id}/prefill", response_model=PrefillOut)
    def prefill(image_id: int, u: Who, req: PrefillRequest | None = None) -> PrefillOut:
        return service.prefill(image_id, req or PrefillRequest(), u)

    @app.post("/api/images/{image_id}/events", status_code=204)
    def event(image_id: int, req: EventRequest, u: Who) -> Response:
        service.record_event(image_id, req, u)
        return Response(status_code=204)

    @app.get("/api/annotations/{ann_id}", response_model=AnnotationOut)
    def get_annotation(ann_id: int, u: Who) -> AnnotationOut:
        return service.get_annotation(ann_id)

    @app.patch("/api/annotations/{ann_id}", response_model=AnnotationOut)
    def update_annotation(
        ann_id: int, req: UpdateRequest, u: Who, key: Key = None
    ) -> AnnotationOut:
        return service.update_annotation(ann_id, req, u, key)

    @app.delete("/api/annotations/{ann_id}", status_code=204)
    def delete_annotation(ann_id: int, u: Who, key: Key = None) -> Response:
        """Delete an object (into the trash: ``POST .../restore`` undoes it)."""
        service.delete_annotation(ann_id, u, key)
        return Response(status_code=204)

    @app.post("/api/annotations/{ann_id}/restore", response_model=AnnotationOut)
    def restore_annotation(ann_id: int, u: Who, key: Key = None) -> AnnotationOut:
        """Undo a delete: the object as it was, under its id (see the answer's ``id``)."""
        return service.restore_annotation(ann_id, u, key)

    @app.get("/api/annotations/{ann_id}/history", response_model=list[EventOut])
    def annotation_history(ann_id: int, u: Who) -> list[EventOut]:
        """An object's events, oldest first; mask edits hold the mask they replaced."""
        return service.annotation_history(ann_id)

    @app.get("/api/labels", response_model=list[LabelOut])
    def label_set(u: Who) -> list[LabelOut]:
        """The project's label set: id, name, colour, hotkey (:mod:`.labels`)."""
        return labels.label_set(service.store)

    @app.post("/api/labels", response_model=LabelOut, status_code=201)
    def add_label(req: LabelRequest, u: Who) -> LabelOut:
        """Add a label (an existing one in another spelling answers as itself)."""
        return labels.add_label(service.store, req.name)

    @app.get("/api/stats", response_model=StatsOut)
    def stats(u: Who) -> StatsOut:
        return service.stats()

    @app.get("/api/export/coco")
    def export_coco(u: Who, include_pending: bool = False) -> JSONResponse:
        return errors.SafeJSONResponse(
            service.export_coco(include_pending),
            headers={"Content-Disposition": 'attachment; filename="annotations_coco.json"'},
        )

    @app.get("/api/export/sa1b")
    def export_sa1b(u: Who, include_pending: bool = False) -> Response:
        return Response(
            service.export_sa1b(include_pending),
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="annotations_sa1b.zip"'},
        )

    @app.get("/api/export/gpkg")
    def export_gpkg(u: Who, include_pending: bool = False) -> Response:
        return Response(
            service.export_gpkg(include_pending),
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="annotations_gpkg.zip"'},
        )

    @app.get("/api/export/yolo")
    def export_yolo(u: Who, include_pending: bool = False) -> Response:
        return Response(
            service.export_yolo(include_pending),
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="annotations_yolo.zip"'},
        )

    @app.post(
        "/api/import/coco",
        response_model=ImportOut,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
                "description": "a COCO instances JSON",
            }
        },
    )
    async def import_coco(request: Request, u: Who, status: str = "pending") -> ImportOut:
        # Streamed to a temporary file (in memory up to 1 MiB), then read as text whose
        # annotations are decoded one at a time: never the body's bytes, its text and all of
        # its objects at once.
        with tempfile.SpooledTemporaryFile(max_size=2**20) as f:
            async for chunk in request.stream():
                f.write(chunk)
            f.seek(0)
            data = await run_in_threadpool(_load_json, f)
        return await run_in_threadpool(service.import_coco, data, u, status=status)

    @app.get("/api/users", response_model=list[UserOut])
    def users(u: Who) -> list[UserOut]:
        return service.users()

    @app.post("/api/users", response_model=TokenOut, status_code=201)
    def new_user(req: NewUserRequest, u: Who) -> TokenOut:
        return service.create_user(req, u)

    add_work_routes(app, service, Who)  # leases, queue, review, pre-fill jobs
    add_video_routes(app, service, Who, Key)  # videos, tracks, propagation, leases, exports
    add_model_routes(app, service)  # /api/model, /api/model/retrain (docs/training.md)
    app.add_middleware(
        guards.BodyLimit,
        default=min(small_body, max_body),
        limits={"/api/import/coco": max_body},
    )
    if isolation:
        app.add_middleware(guards.Isolation, paths=ISOLATED, prefixes=ISOLATED_PREFIXES)
    # outermost: runs first
    app.add_middleware(guards.HostOriginGuard, hosts=hosts, origins=origins)
    return app


def _load_json(f: Any) -> Any:
    """The parsed COCO JSON of a binary file (:func:`.coco_import.parse_coco`: the
    annotations are decoded one at a time later); 400 (:class:`BadRequest`) when it is not
    JSON. NaN and infinities parse as floats here and are refused by the service with the
    annotation they are in."""
    from .coco_import import parse_coco

    try:
        return parse_coco(f)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {str(exc)[:200]}") from None


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS


def build_service(
    images_dir: str | Path,
    *,
    db: str | None = None,
    model: str = "mobile_sam",
    backend: str = "auto",
    auth: bool | None = None,
    host: str = "127.0.0.1",
    cache_dir: str | Path | None = None,
    prefetch: bool = True,
    max_pixels: int | None = None,
    memory_items: int = 16,
    detector: str | None = None,
    web_decoder: bool = False,
    web_dtype: str = "float16",
    labels: Sequence[str] = (),
    lease_seconds: float = 60.0,
) -> AnnotationService:
    """Open the database, load the model and register the images. ``detector`` (name, hub
    id or folder) enables stage-2 pre-fills by class names; it is loaded on first use.
    ``labels``: the label set's names, registered in this order (:mod:`.labels`)."""
    from ..loader import load_predictor
    from ..weights import cache_dir as segany_cache
    from .service import DEFAULT_MAX_PIXELS
    from .store import Store

    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"images folder not found: {images_dir}")
    store = Store(db or default_db(root))
    from .labels import register

    register(store, list(labels))
    predictor = load_predictor(model, backend=backend)
    svc = AnnotationService(
        store,
        root,
        predictor,
        model_name=Path(model).name if Path(str(model)).suffix else str(model),
        cache_dir=cache_dir if cache_dir is not None else segany_cache() / "embeddings",
        memory_items=memory_items,
        auth=(not is_local(host)) if auth is None else auth,
        prefetch=prefetch,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
        detector=detector,
        web_decoder=web_decoder,
        web_dtype=web_dtype,
        lease_seconds=lease_seconds,
    )
    svc.rescan()
    return svc


def serve(
    service: AnnotationService,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    allow_hosts: Sequence[str] = (),
    isolation: bool = True,
) -> None:
    """Run the server until interrupted (uvicorn, one process: the model is shared by all
    request threads). The server answers to the localhost names, ``host`` and
    ``allow_hosts`` (see :func:`.guards.served_hosts`)."""
    import uvicorn

    hosts = guards.served_hosts(host, allow_hosts)
    if hosts is None:
        print(
            "segany annotate: note: the Host header is not checked (bound to every interface "
            "without --allow-host, or --allow-host '*')",
            file=sys.stderr,
        )
    app = create_app(service, hosts=hosts, origins=allow_hosts, isolation=isolation)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        service.close()
        print("segany annotate: stopped", file=sys.stderr)
