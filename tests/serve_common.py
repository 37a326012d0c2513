"""What the ``segany serve`` tests share: a session on the tiny random model, encoded
frames, a client, CVAT's mask encoding read back, and the reference answer computed with
a plain :class:`~segany.Predictor` (not through the session)."""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from segany.integrations.app import create_app
from segany.integrations.core import ModelSession
from segany.predictor import Predictor

from .conftest import tiny_sam

#: the red rectangle of the test image (XYXY, inclusive): MobileSAM segments it
RECT = (30, 20, 89, 59)


def frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(96, 144, 3), dtype=np.uint8)
    x0, y0, x1, y1 = RECT
    img[y0 : y1 + 1, x0 : x1 + 1] = (200, 40, 40)
    return img


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def b64(img: np.ndarray) -> str:
    return base64.b64encode(png_bytes(img)).decode()


def tiny_session(**kwargs) -> ModelSession:
    return ModelSession(Predictor(tiny_sam()), name="tiny", **kwargs)


def client(session: ModelSession, **kwargs) -> TestClient:
    return TestClient(create_app(session, **kwargs), base_url="http://localhost")


def reference_mask(model, img, *, points=(), labels=(), box=None) -> tuple[np.ndarray, float]:
    """The best mask of a plain Predictor for the prompt (SAM's multimask rule: three
    candidates for one point without a box)."""
    p = Predictor(model)
    p.set_image(img)
    multimask = len(points) == 1 and box is None
    pred = p.predict(
        point_coords=np.asarray(points, float).reshape(-1, 2) if len(points) else None,
        point_labels=np.asarray(labels) if len(points) else None,
        box=np.asarray(box, float) if box is not None else None,
        multimask_output=multimask,
    )
    k = int(np.argmax(pred.scores))
    return pred.masks[k], float(pred.scores[k])


def cvat_decode(answer: dict, height: int, width: int) -> np.ndarray:
    """A CVAT interactor answer back to a full-frame mask the way CVAT's page reads it
    (cvat-ui tools-control.tsx ``runInteractionRequest``: ``mask2Rle(mask.flat())`` with
    ``bounds`` appended, the whole frame when ``bounds`` is absent): the rows of ``mask``
    cover ``bounds`` (inclusive corners)."""
    crop = np.asarray(answer["mask"])
    left, top, right, bottom = answer.get("bounds") or (0, 0, width - 1, height - 1)
    assert crop.shape == (bottom - top + 1, right - left + 1)
    assert set(np.unique(crop).tolist()) <= {0, 1}
    full = np.zeros((height, width), bool)
    full[top : bottom + 1, left : right + 1] = crop > 0
    return full
