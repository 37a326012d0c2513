"""Training data: a dataset of :mod:`segany.datasets` (COCO, SA-1B loose or in shards, a
``segany label`` output, the annotator's store, tracked videos) kept for training (crowd
regions and masks below ``min_area`` left out), split into train and validation by image,
and the ground truth mapped into the decoder's low-res frame.

A training image is a :class:`segany.datasets.ImageRecord` (its masks as compressed RLE,
decoded only when a batch needs them; its image loaded from a file or a tar member).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..datasets import Dataset, DatasetError, ImageFile, ImageRecord, open_dataset, to_coco
from ..files import find_images

#: The names training code uses for the dataset layer's types.
DataError = DatasetError
TrainImage = ImageRecord
TrainData = Dataset


def for_training(data: Dataset, *, min_area: int = 1) -> Dataset:
    """``data`` without crowd regions and masks of fewer than ``max(1, min_area)`` pixels
    (images left without masks stay, with none)."""
    keep = max(1, min_area)
    images = [
        dataclasses.replace(
            im, annotations=tuple(a for a in im.annotations if not a.iscrowd and a.area >= keep)
        )
        for im in data.images
    ]
    return Dataset(name=data.name, kind=data.kind, source=data.source, read=images,
                   categories=data.categories)  # fmt: skip


def open_source(
    source: str | Path,
    *,
    images: str | Path | None = None,
    kind: str = "auto",
    min_area: int = 1,
) -> Dataset:
    """Open ``source`` with :func:`segany.datasets.open_dataset` (``kind``: one of
    :data:`segany.datasets.KINDS`; ``images``: the image folder) and keep it
    :func:`for_training`. Raises :class:`DataError` when no usable mask is left."""
    data = for_training(open_dataset(source, images=images, kind=kind), min_area=min_area)
    if data.num_masks == 0:
        raise DataError(f"{source} holds no usable masks")
    return data


# -- split -----------------------------------------------------------------------------------
def split_by_image(
    images: Sequence[TrainImage], val_fraction: float, seed: int
) -> tuple[list[TrainImage], list[TrainImage]]:
    """``(train, val)``: a seeded permutation of the images (ordered by key, so the split
    does not depend on the source's order) cut at ``round(val_fraction * n)``; only images
    with masks take part. Both lists keep key order."""
    if not 0 <= val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    usable = sorted((im for im in images if im.num_masks), key=lambda im: im.key)
    n_val = int(round(val_fraction * len(usable)))
    if usable and n_val >= len(usable):
        n_val = len(usable) - 1
    order = np.random.default_rng(seed).permutation(len(usable))
    val_idx = set(order[:n_val].tolist())
    train = [im for i, im in enumerate(usable) if i not in val_idx]
    val = [im for i, im in enumerate(usable) if i in val_idx]
    return train, val


# -- low-res ground truth --------------------------------------------------------------------
def lowres_targets(
    masks: np.ndarray, input_size: tuple[int, int], img_size: int, grid: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth ``(M, H, W)`` at image size -> ``(M, grid, grid)`` in the decoder's
    low-res frame, and the ``(grid, grid)`` mask of cells over the image (not padding).

    Each cell takes the value of the image pixel under its centre: cell ``i`` covers model
    pixels ``[s i, s (i + 1))`` (``s = img_size / grid``); its centre ``s (i + 1/2)`` maps to
    image row ``floor(centre * H / h)`` (``(h, w)`` = ``input_size``). This is where the
    bilinear upsampling of the logits is exact, so the low-res loss matches the masks the
    predictor returns."""
    m, H, W = masks.shape
    h, w = input_size
    stride = img_size / grid
    centres = stride * (np.arange(grid) + 0.5)
    rows = np.minimum((centres[centres < h] * H / h).astype(np.int64), H - 1)
    cols = np.minimum((centres[centres < w] * W / w).astype(np.int64), W - 1)
    out = np.zeros((m, grid, grid), dtype=bool)
    out[:, : len(rows), : len(cols)] = masks[:, rows][:, :, cols]
    valid = np.zeros((grid, grid), dtype=bool)
    valid[: len(rows), : len(cols)] = True
    return out, valid


def image_source(source: str | Path, images: str | Path | None = None) -> Dataset:
    """Images without masks (e.g. for replay): the images of a dataset file, or every image
    file under a folder (:func:`segany.files.find_images`)."""
    from PIL import Image

    path = Path(source).expanduser()
    if path.is_file() or (path / "annotations.json").is_file():
        data = open_dataset(path, images=images)
        bare = [dataclasses.replace(im, annotations=()) for im in data.images]
        return Dataset(name=data.name, kind="images", source=data.source, read=bare)
    if not path.is_dir():
        raise DataError(f"no images at {source}")
    out = []
    for f in find_images(path):
        try:
            with Image.open(f) as im:
                w, h = im.size
        except OSError:
            continue
        rel = f.relative_to(os.path.abspath(path)).as_posix()
        out.append(ImageRecord(key=rel, image_id=len(out) + 1, height=h, width=w,
                               file_name=rel, source=ImageFile(path=f)))  # fmt: skip
    if not out:
        raise DataError(f"no images under {source}")
    return Dataset(name=path.name, kind="images", source=path, read=out)


__all__ = [
    "DataError",
    "TrainData",
    "TrainImage",
    "for_training",
    "image_source",
    "lowres_targets",
    "open_source",
    "split_by_image",
    "to_coco",
]
