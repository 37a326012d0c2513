"""The model routes of the annotator: ``/api/model`` and ``/api/model/retrain``.

Kept apart from :mod:`.loop` (and without postponed annotations) because FastAPI reads the
route functions' annotations at run time.
"""

from pathlib import Path
from typing import Any

from fastapi import Body, HTTPException, Request

from ..engine.schemas import ServiceError
from .loop import RETRAIN_DEFAULTS, LoopError, RetrainJob, model_history, switch_service_model


def add_model_routes(app: Any, service: Any) -> RetrainJob:
    """Add the model routes to the annotator's FastAPI ``app``:

    - ``GET /api/model``: the current model, its id, and the model history;
    - ``POST /api/model`` ``{"checkpoint": PATH, "name": optional}``: switch (admin when
      auth is on);
    - ``POST /api/model/retrain`` ``{"steps": optional, ...recipe overrides}``: retrain on
      the accepted masks in the background, then switch (admin when auth is on);
    - ``GET /api/model/retrain``: that job's state and progress.
    """
    job = RetrainJob()
    allowed = set(RETRAIN_DEFAULTS) | {"steps", "seed", "accumulate"}

    def caller(request: Request, admin: bool) -> Any:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        token = token or request.headers.get("x-segany-token") or None
        try:
            user = service.authenticate(token)
        except ServiceError as exc:
            raise HTTPException(401, str(exc)) from None
        if admin and service.auth and not user.is_admin:
            raise HTTPException(403, "only an admin can change the model")
        return user

    @app.get("/api/model")
    def get_model(request: Request) -> dict[str, Any]:
        caller(request, admin=False)
        return {
            "model": service.model_name,
            "model_id": service.model_id,
            "history": model_history(service.store),
            "retrain": job.status(),
        }

    @app.post("/api/model")
    def post_model(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        user = caller(request, admin=True)
        ckpt = body.get("checkpoint")
        if not isinstance(ckpt, str) or not Path(ckpt).is_file():
            raise HTTPException(422, f"'checkpoint' must be a checkpoint file on the server: "
                                f"{ckpt!r}")  # fmt: skip
        try:
            return switch_service_model(service, ckpt, name=body.get("name"), user_id=user.id)
        except LoopError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/api/model/retrain")
    def get_retrain(request: Request) -> dict[str, Any]:
        caller(request, admin=False)
        return job.status()

    @app.post("/api/model/retrain", status_code=202)
    def post_retrain(
        request: Request,
        body: dict[str, Any] = Body(default={}),  # noqa: B008
    ) -> dict[str, Any]:
        user = caller(request, admin=True)
        bad = sorted(set(body) - allowed)
        if bad:
            raise HTTPException(422, f"unknown retrain options {bad}; allowed: {sorted(allowed)}")
        if not job.start(service, dict(body), user.id):
            raise HTTPException(409, "a retrain is already running")
        return job.status()

    app.state.retrain_job = job
    return job
