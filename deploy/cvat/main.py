"""CVAT interactor on Nuclio: segany's model behind CVAT's AI tools (docs/cvat.md).

The handler only moves bytes: ``segany.integrations.cvat.handle`` parses CVAT's request
(``image`` base64, ``pos_points``, ``neg_points``, ``obj_bbox``) and answers CVAT's shape
(``mask`` cropped to ``bounds``, ``points``). The model is loaded once per worker, in
``init_context``; ``SEGANY_MODEL`` (catalogue name or checkpoint path, default
``mobile_sam``), ``SEGANY_BACKEND`` (default ``torch``) and ``SEGANY_CACHE_DIR`` (embeddings
on disk; default: segany's cache folder, ``$SEGANY_CACHE/embeddings``) choose it.
"""

import os

from segany.integrations.core import build_session
from segany.integrations.cvat import handle


def init_context(context):
    context.logger.info("segany: loading the model")
    context.user_data.session = build_session(
        os.environ.get("SEGANY_MODEL", "mobile_sam"),
        backend=os.environ.get("SEGANY_BACKEND", "torch"),
        cache_dir=os.environ.get("SEGANY_CACHE_DIR") or None,
    )
    context.logger.info(f"segany: model {context.user_data.session.name} ready")


def handler(context, event):
    status, body = handle(context.user_data.session, event.body)
    if status != 200:
        context.logger.warn(f"segany: {status} {body.decode()}")
    return context.Response(
        body=body,
        headers={},
        content_type="application/json",
        status_code=status,
    )
