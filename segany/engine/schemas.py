"""The annotator's API: its errors (each with its HTTP status) and its typed requests and
responses (pydantic), used by :mod:`.service` and :mod:`.server`. One module (a little over
500 lines with the video types) so that the whole API surface reads in one place.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .store import USER_NAME_PATTERN

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
    #: ``none``, ``submitted`` (marked done), ``approved`` or ``returned`` (with a comment)
    review: str = "none"
    submitted_by: str | None = None
    reviewer: str | None = None
    comment: str | None = None
    assignee: str | None = None
    #: who holds the image's lease (another page is working on it), if anyone
    locked_by: str | None = None


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
    #: the videos registered (video files found, folders of frames registered before)
    videos: int = 0


class LeaseOut(_Model):
    """The image's (or video's) lease as seen by the caller's page session: ``held`` (the
    page may write), or ``by`` whom it is held (the page is read-only until it expires);
    and the embedding and image status, so the page's status line stays current (a video:
    its status; its frames are embedded on their first click)."""

    image_id: int | None = None
    video_id: int | None = None
    held: bool
    by: str | None = None
    expires_in: float = 0.0
    embedding: Literal["ready", "computing"] = "computing"
    status: str = "ok"
    error: str | None = None


class OpenOut(_Model):
    image: ImageOut
    embedding: Literal["ready", "computing"]
    prev_id: int | None
    #: the caller's queue: returned to them first, then images not done, not in review, not
    #: locked by another page and not assigned to someone else
    next_id: int | None
    #: with a page session (``X-Segany-Session``): the lease taken on open
    lock: LeaseOut | None = None


class QueueOut(_Model):
    next_id: int | None
    remaining: int
    returned: list[int]


class ReviewRequest(_Request):
    action: Literal["approve", "return"]
    comment: str | None = Field(default=None, max_length=2000)


class AssignRequest(_Request):
    #: a user name, or ``None`` to unassign
    user: str | None = Field(default=None, max_length=64)


class PredictRequest(_Request):
    points: list[tuple[float, float]] = Field(default_factory=list, max_length=MAX_POINTS)
    labels: list[int] = Field(default_factory=list, max_length=MAX_POINTS)
    box: tuple[float, float, float, float] | None = None
    mask_input_id: str | None = Field(default=None, max_length=64)
    multimask: bool = True
    #: HQ-SAM models only: the HQ output's mask alone (the reference predictor's
    #: ``hq_token_only``; default as there: the HQ mask added to SAM's)
    hq_token_only: bool = False


class MaskOut(_Model):
    index: int
    segmentation: RLE
    score: float
    area: int
    bbox: list[float]
    #: Pass as ``mask_input_id`` to refine this mask, or as ``mask_id`` to accept it.
    mask_input_id: str


class PredictOut(_Model):
    #: the image prompted, or the ``video_id`` and ``frame`` of a video frame
    image_id: int | None = None
    video_id: int | None = None
    frame: int | None = None
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
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in v):
        raise ValueError("category must not hold control characters")
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


class PrefillJobOut(_Model):
    """A pre-fill running in the background: ``state`` is ``running`` (``points_done`` of
    ``points_planned`` prompts decoded so far; 0 of 0 while a text detector runs), then
    ``saving``, ``done`` (``result``), ``cancelled`` (nothing saved) or ``failed``
    (``error``)."""

    id: str
    image_id: int
    state: Literal["running", "saving", "done", "cancelled", "failed"]
    points_done: int = 0
    points_planned: int = 0
    seconds: float = 0.0
    error: str | None = None
    result: PrefillOut | None = None


# -- videos (:mod:`.video`, :mod:`.video_jobs`) -------------------------------------------
class VideoOut(_Model):
    id: int
    path: str
    #: ``file`` (a video file) or ``frames`` (a folder of frames)
    kind: str
    width: int
    height: int
    #: the number of frames
    length: int
    fps: float | None = None
    status: str
    error: str | None = None
    #: the frames' names (``00017`` for ``00017.jpg``), in order
    names: list[str] = Field(default_factory=list)
    tracks: int = 0
    accepted: int = 0
    #: who holds the video's lease when it is not the caller's page (``None``: free)
    locked_by: str | None = None


class VideoOpenOut(_Model):
    video: VideoOut
    #: with a page session (``X-Segany-Session``): the lease taken on open
    lock: LeaseOut | None = None


class VideoList(_Model):
    videos: list[VideoOut]


class VideoRequest(_Request):
    """A video file or a folder of frames, relative to the images folder."""

    path: str = Field(min_length=1, max_length=1024)


class MaskChoice(_Request):
    """A mask on a frame: the ``mask_id`` of a candidate of the frame's predict, or a
    ``segmentation`` (COCO RLE at video size, e.g. brushed)."""

    segmentation: RLE | None = None
    mask_id: str | None = Field(default=None, max_length=64)
    score: float | None = None


class TrackRequest(MaskChoice):
    """A new object on ``frame`` (its first key frame)."""

    frame: int = Field(ge=0)
    category: Category = "object"

    _cat = field_validator("category")(_clean_category)


class TrackUpdate(_Request):
    category: Category | None = None
    status: Literal["pending", "accepted"] | None = None

    _cat = field_validator("category")(_clean_category)


class TrackOut(_Model):
    id: int
    video_id: int
    #: the object's pixel value in the DAVIS PNGs (1-255, unique in the video)
    object_id: int
    category: str
    status: str
    #: the frames the annotator set the mask on (the tracker starts from these)
    key_frames: list[int]
    #: frames with a mask (key or propagated; empty masks count: the object is absent)
    frames: int
    model_id: str | None = None
    user: str | None = None
    #: prompts and active seconds spent on the object (pauses capped at ``IDLE_CAP``)
    clicks: int = 0
    seconds: float | None = None
    updated_at: float


class FrameMask(_Model):
    track_id: int
    object_id: int
    category: str
    status: str
    key: bool
    segmentation: RLE
    area: int
    bbox: list[float]
    score: float | None = None


class FrameMasks(_Model):
    video_id: int
    frame: int
    masks: list[FrameMask]


class PropagateRequest(_Request):
    """Propagate from this key frame (default: the track's first): forward to the end,
    and from the first key frame also back to frame 0. Frames before ``start`` keep their
    masks: a correction on a later frame is carried forward from there."""

    start: int | None = Field(default=None, ge=0)


class PropagationJobOut(_Model):
    """A propagation running in the background: ``state`` is ``running``
    (``frames_done`` of ``frames_planned``), then ``saving``, ``done`` (``frames_saved``),
    ``cancelled`` (nothing saved) or ``failed`` (``error``)."""

    id: str
    video_id: int
    track_id: int
    start: int
    state: Literal["running", "saving", "done", "cancelled", "failed"]
    frames_done: int = 0
    frames_planned: int = 0
    frames_saved: int = 0
    seconds: float = 0.0
    error: str | None = None


class EventRequest(_Request):
    kind: Literal["undo", "redo", "select", "clear", "next", "prev", "note", "predict"]
    data: dict[str, Any] | None = None


class EventOut(_Model):
    """One event of an object's history (``GET /api/annotations/{id}/history``)."""

    ts: float
    kind: str
    user: str | None = None
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
    #: The browser decoder: ``available`` (or the ``reason`` why not), the onnxruntime-web
    #: ``runtime`` folder and ``version``, the ``graphs``' URLs, the payload ``dtype``.
    web_decoder: dict[str, Any] | None = None
    #: an image lease lasts this long unless the page renews it
    lease_seconds: float = 60.0


@dataclass(frozen=True)
class UserRef:
    id: int
    name: str
    is_admin: bool = False
    #: the page session (a browser tab, ``X-Segany-Session``) of the request, if any
    session: str | None = None
