"""The annotator's store (:mod:`segany.engine.store`, read-only through its public queries)
as a :class:`~.records.Dataset`: the objects with the given statuses (accepted ones by
default) of the images registered from the annotated folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .records import (
    DEFAULT_CATEGORIES,
    Dataset,
    DatasetError,
    ImageFile,
    ImageRecord,
    parse_annotations,
)


def read_store(
    db: str | os.PathLike[str],
    images: str | os.PathLike[str],
    *,
    statuses: Sequence[str] = ("accepted",),
) -> Dataset:
    """The store at ``db`` (a path or database URL) of the folder ``images``; images whose
    status is not ``ok`` or without objects are left out. Categories are the store's labels
    (ids 1..K in their order of first use)."""
    from ..engine.store import Store, StoreError

    root = Path(images).expanduser().resolve()
    try:
        store = Store(db)
    except (StoreError, OSError) as exc:
        raise DatasetError(f"cannot open the store {db}: {exc}") from None
    try:
        anns = store.annotations(statuses=list(statuses))
        rows = store.images()
    finally:
        store.close()
    cats: dict[str, int] = {}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        cid = cats.setdefault(a.category, len(cats) + 1)
        by_image.setdefault(a.image_id, []).append(
            {
                "id": a.id,
                "segmentation": a.segmentation,
                "bbox": a.bbox,
                "category_id": cid,
                "label": a.category,
                "predicted_iou": a.score,
                "stability_score": a.stability,
            }
        )
    out = []
    where = f"store {db}"
    for im in rows:
        if im.status != "ok" or im.id not in by_image:
            continue
        masks = parse_annotations(by_image[im.id], im.height, im.width, where=where, image=im.path)
        out.append(
            ImageRecord(
                key=im.path,
                image_id=im.id,
                height=im.height,
                width=im.width,
                file_name=im.path,
                source=ImageFile(path=root / im.path),
                annotations=masks,
            )
        )
    categories = [{"id": i, "name": c, "supercategory": "object"} for c, i in cats.items()]
    return Dataset(
        name=root.name,
        kind="store",
        source=os.fspath(db),
        read=out,
        categories=categories or DEFAULT_CATEGORIES,
    )
