"""The annotator's TIFF and GeoTIFF images.

A TIFF is read through :mod:`segany.rasters` when the ``geo`` extra is installed (bands 1-3,
16-bit and float bands scaled to 0..255 from their 2-98 percentiles, nodata black), so the
model and the annotator see what ``segany segment`` sees; the browser cannot show TIFF, so
the page gets a PNG of those pixels. Accepted masks of georeferenced images export as
polygons in each image's CRS (:func:`export_gpkg`: a zip with one GeoPackage per image,
attributes ``id``, ``category``, ``status``, ``score``, ``area`` in map units squared and
``pixels``), through the one vector writer, :func:`segany.geo.write_features`.
"""

from __future__ import annotations

import importlib.util
import io
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .. import transforms as T
from ..rasters import TIFF_SUFFIXES


def geo_extra() -> bool:
    """Whether the ``geo`` extra (rasterio, tifffile, shapely, pyogrio) is installed."""
    return all(importlib.util.find_spec(m) for m in ("rasterio", "tifffile", "pyogrio"))


def is_raster(path: str | Path) -> bool:
    """A TIFF this module reads (else :func:`segany.transforms.load_image` does)."""
    return Path(path).suffix.lower() in TIFF_SUFFIXES and geo_extra()


def read_rgb(path: str | Path, *, max_pixels: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a TIFF / GeoTIFF, under the pixel limit; unreadable
    files raise :class:`~segany.transforms.ImageError`."""
    from ..rasters import open_raster

    try:
        with open_raster(Path(path), max_pixels=max_pixels) as src:
            return src.read(0, 0, src.width, src.height)
    except T.ImageError:
        raise
    except (OSError, ValueError) as exc:
        raise T.ImageError(f"{Path(path).name}: {exc}") from None


def size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a TIFF / GeoTIFF from its header."""
    from ..rasters import open_raster

    with open_raster(Path(path)) as src:
        return src.width, src.height


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB image (what the page shows for a TIFF)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def georeference(path: str | Path) -> tuple[Any, Any] | None:
    """``(affine transform, CRS)`` of a georeferenced raster, else None."""
    if not is_raster(path):
        return None
    import rasterio

    try:
        with rasterio.open(path) as ds:
            return (ds.transform, ds.crs) if ds.crs is not None else None
    except rasterio.errors.RasterioIOError:
        return None


FIELDS = {
    "id": "int64",
    "category": "object",
    "status": "object",
    "score": "float64",
    "area": "float64",
    "pixels": "int64",
}


def export_gpkg(root: Path, images: Iterable[tuple[str, list[Any]]]) -> bytes:
    """A zip of ``<image path without suffix>.gpkg`` files, one per georeferenced image
    that has objects: ``images`` are ``(path relative to root, annotations)`` with the
    store's :class:`~segany.engine.store.Annotation` rows."""
    from .. import validate as V
    from ..geo import mask_polygon, write_features

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, tempfile.TemporaryDirectory() as t:
        for rel, anns in images:
            ref = georeference(root / rel) if anns else None
            if ref is None:
                continue
            transform, crs = ref
            rows = []
            for a in anns:
                h, w = a.segmentation["size"]
                mask = V.segmentation_to_mask(a.segmentation, h, w)
                geom = mask_polygon(mask, transform)
                score = a.score if a.score is not None and np.isfinite(a.score) else np.nan
                attrs = {"id": a.id, "category": a.category, "status": a.status}
                attrs.update(score=score, area=float(geom.area), pixels=int(mask.sum()))
                rows.append((attrs, geom))
            name = str(PurePosixPath(rel).with_suffix(".gpkg"))
            out = write_features(Path(t) / Path(name).name, rows, FIELDS, crs=crs)
            z.write(out, name)
    return buf.getvalue()
