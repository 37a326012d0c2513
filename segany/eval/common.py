"""What every evaluation protocol shares: the dataset it reads (:class:`CocoDataset`, any
dataset :func:`segany.datasets.open_dataset` reads, indexed by pycocotools), the header and
timing of a result dict, batching and rounding.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import DatasetError, ImageRecord, open_dataset, to_coco

__all__ = ["DEFAULT_BATCH", "CocoDataset", "DatasetError", "Progress"]

#: Prompts decoded per call; the masks are upsampled to image size, which bounds memory.
DEFAULT_BATCH = 16

Progress = Callable[[int], None]


# -- dataset ---------------------------------------------------------------------------------
class CocoDataset:
    """A dataset to evaluate on, read by :func:`segany.datasets.open_dataset` (COCO, SA-1B
    loose or in shards, a ``segany label`` output, the annotator's store) and indexed by
    pycocotools for COCOeval.

    ``source`` is the folder or file (for COCO, images are looked up in ``images/``
    beside the annotations file, or beside it); ``images`` overrides the image folder.
    COCO ground truth keeps the file's areas and boxes (COCO's areas are polygon areas).
    Crowd annotations (``iscrowd`` = 1) are not prompted but stay in the ground truth that
    COCOeval sees.
    """

    def __init__(
        self, source: str | Path, images: str | Path | None = None, *, kind: str = "auto"
    ) -> None:
        from pycocotools.coco import COCO

        ds = open_dataset(source, images=images, kind=kind)
        data = to_coco(ds.images, categories=ds.categories, file_values=True)
        known = {c["id"] for c in data["categories"]}
        used = sorted({a["category_id"] for a in data["annotations"]} - known)
        data["categories"] += [{"id": c, "name": "object"} for c in used]
        ids = [a["id"] for a in data["annotations"]]
        if len(set(ids)) != len(ids):
            # ids unique per image only (a video's track ids on every frame, SA-1B's per-image
            # indices): pycocotools keys annotations by id, so COCOeval would read another
            # image's ground truth for a repeated one; number them over the dataset
            for k, a in enumerate(data["annotations"], start=1):
                a["id"] = k
        self.name = ds.name
        self.path = Path(source)
        self.kind = ds.kind
        self.images: list[ImageRecord] = ds.images
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def __len__(self) -> int:
        return len(self.images)

    def annotations(self, image_id: int, *, crowd: bool = False) -> list[dict[str, Any]]:
        """The annotations of one image, in file order; crowd ones only if ``crowd``."""
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if crowd or not a.get("iscrowd", 0)]

    def select(self, limit: int | None) -> list[ImageRecord]:
        """The first ``limit`` images (all with ``None``)."""
        return self.images if limit is None else self.images[: max(0, limit)]

    def count_masks(self, images: list[ImageRecord]) -> int:
        return sum(len(self.annotations(im.image_id)) for im in images)

    def load(self, image: ImageRecord) -> np.ndarray:
        """The image as RGB; :class:`DatasetError` when it is not the annotated size."""
        return image.load()

    def iter_images(
        self, images: list[ImageRecord]
    ) -> Iterator[tuple[ImageRecord, np.ndarray, list[dict[str, Any]], np.ndarray]]:
        """``(image, rgb, annotations, masks (M, H, W))`` for each image, skipping none (an
        image without annotations gives ``M`` = 0); crowd regions are left out."""
        for im in images:
            anns = self.annotations(im.image_id)
            rgb = self.load(im)
            keep = [i for i, a in enumerate(im.annotations) if not a.iscrowd]
            yield im, rgb, anns, im.masks(keep)


def gt_area(ann: dict[str, Any], gt: np.ndarray) -> float:
    return float(ann["area"]) if "area" in ann else float(gt.sum())


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def result_header(
    protocol: str, dataset: CocoDataset, model: str, images: list[ImageRecord]
) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "dataset": dataset.name,
        "dataset_path": str(dataset.path),
        "model": model,
        "images": len(images),
    }


def add_timing(result: dict[str, Any], start: float, n_images: int) -> None:
    seconds = time.perf_counter() - start
    result["seconds"] = round(seconds, 2)
    result["seconds_per_image"] = round(seconds / max(1, n_images), 3)


# -- rounding --------------------------------------------------------------------------------
def rounded(v: float | None, nd: int = 2) -> float | None:
    if v is None or not np.isfinite(v):
        return None
    return round(float(v), nd)


def rounded_sizes(d: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {k: {"miou": rounded(v["miou"]), "masks": int(v["masks"])} for k, v in d.items()}
