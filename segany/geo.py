"""Georeferenced inputs and outputs: prompts in map coordinates, label rasters (GeoTIFF)
and polygons (GeoJSON / GeoPackage) through rasterio, shapely and pyogrio.

Frames: the *image frame* of :mod:`segany.tiles` (pixels, ``(x, y)`` from the top-left
corner of the full-resolution raster; pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``), and
*map coordinates* in a CRS. The source's affine ``transform`` maps the image frame to its
own CRS; points in any other CRS are reprojected first. Rasters without a CRS are written
with the identity transform (map units = pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_path
from .rasters import RasterSource
from .tiled_everything import TiledSegmentation

VECTOR_DRIVERS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG"}


class GeoError(ValueError):
    """A CRS, a map point or a georeferenced output that cannot be used."""


def map_to_pixels(points: Sequence[Sequence[float]], crs: Any, source: RasterSource) -> np.ndarray:
    """Map coordinates ``(N, 2)`` ``(x, y)`` in ``crs`` (e.g. ``"EPSG:4326"``: x is the
    longitude) -> image-frame pixels ``(N, 2)`` ``(x, y)`` of ``source``."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform

    if not source.is_georeferenced:
        raise GeoError(f"{source.name} has no CRS: give points in image pixels")
    try:
        crs = CRS.from_user_input(crs)
    except (CRSError, ValueError) as exc:
        raise GeoError(f"unknown CRS {crs!r}: {exc}") from None
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    xs, ys = transform(crs, source.crs, pts[:, 0].tolist(), pts[:, 1].tolist())
    inv = ~source.transform
    cols, rows = inv @ (np.asarray(xs), np.asarray(ys))
    out = np.stack([cols, rows], axis=1).astype(np.float64).reshape(-1, 2)
    if not np.isfinite(out).all():
        raise GeoError(f"points {pts.tolist()} in {crs} do not project into {source.crs}")
    return out


def _profile(source: RasterSource, dtype: str, nodata: float | None) -> dict[str, Any]:
    from rasterio.transform import Affine

    h, w = source.size
    return {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": 1,
        "dtype": dtype,
        "crs": source.crs,
        "transform": source.transform if source.is_georeferenced else Affine.identity(),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def write_mask_geotiff(
    path: str | Path,
    mask: np.ndarray,
    window: tuple[int, int, int, int],
    source: RasterSource,
) -> Path:
    """One mask as a uint8 GeoTIFF (255 inside, 0 outside) over the whole ``source`` with
    its transform and CRS. ``mask`` is ``(y1 - y0, x1 - x0)`` bool over the image-frame
    XYXY ``window``; the rest of the raster is 0."""
    import rasterio
    from rasterio.windows import Window

    path = Path(path)
    x0, y0, x1, y1 = window
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **_profile(source, "uint8", None)) as dst:
            dst.write(mask.astype(np.uint8) * 255, 1, window=Window(x0, y0, x1 - x0, y1 - y0))
    return path


def write_label_geotiff(path: str | Path, seg: TiledSegmentation, source: RasterSource) -> Path:
    """The object ids of ``seg`` as a uint32 GeoTIFF (0 = no object) with ``source``'s
    transform and CRS, written block by block (memory: one block)."""
    import rasterio
    from rasterio.windows import Window

    path = Path(path)
    h, w = seg.size
    if (h, w) != source.size:
        raise GeoError(f"segmentation is {w}x{h}, the raster {source.width}x{source.height}")
    step = 1024
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **_profile(source, "uint32", 0)) as dst:
            for y in range(0, h, step):
                for x in range(0, w, step):
                    x1, y1 = min(w, x + step), min(h, y + step)
                    dst.write(seg.labels((x, y, x1, y1)), 1, window=Window(x, y, x1 - x, y1 - y))
    return path


def mask_polygon(mask: np.ndarray, transform: Any):
    """The exact pixel outline of a ``(H, W)`` bool mask as one shapely geometry, its
    pixel ``(x, y)`` corners mapped by the affine ``transform``."""
    from rasterio.features import shapes
    from shapely.geometry import shape
    from shapely.ops import unary_union

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    return unary_union([shape(g) for g, _ in shapes(m, mask=m.astype(bool), transform=transform)])


def object_polygons(seg: TiledSegmentation, source: RasterSource):
    """Yield ``(object dict, shapely geometry in map coordinates)`` per object: the exact
    pixel outlines of its label pixels, read over its bounding box only."""
    from rasterio.transform import Affine

    base = source.transform if source.is_georeferenced else Affine.identity()
    for obj in seg.objects:
        bx, by, bw, bh = obj["bbox"]
        mask = seg.labels((bx, by, bx + bw, by + bh)) == obj["id"]
        yield obj, mask_polygon(mask, base @ Affine.translation(bx, by))


def write_features(
    path: str | Path,
    rows: Sequence[tuple[dict[str, Any], Any]],
    fields: dict[str, str],
    *,
    crs: Any = None,
    driver: str | None = None,
) -> Path:
    """``rows`` of ``(attributes, shapely geometry)`` as MultiPolygons with the attributes
    ``fields`` (name -> numpy dtype) in ``crs`` (``None``: none), as GeoJSON or GeoPackage
    (from the suffix unless ``driver`` is given); written atomically."""
    import pyogrio.raw
    import shapely

    path = Path(path)
    driver = driver or VECTOR_DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise GeoError(f"cannot tell the vector format of {path}: use .geojson or .gpkg")
    geoms = [shapely.to_wkb(shapely.geometry.MultiPolygon(_polygons(g))) for _, g in rows]
    data = [np.asarray([a[name] for a, _ in rows], dtype) for name, dtype in fields.items()]
    with atomic_path(path) as tmp:
        pyogrio.raw.write(
            str(tmp),
            geometry=np.asarray(geoms, dtype=object),
            field_data=data,
            fields=list(fields),
            crs=crs.to_wkt() if hasattr(crs, "to_wkt") else crs,
            driver=driver,
            geometry_type="MultiPolygon",
            layer=path.stem if driver == "GPKG" else None,
        )
    return path


def write_vectors(
    path: str | Path, seg: TiledSegmentation, source: RasterSource, *, driver: str | None = None
) -> Path:
    """Polygons of ``seg``'s objects with ``id``, ``score``, ``area`` (map units squared;
    pixels without a CRS) and ``pixels``, in ``source``'s CRS, as GeoJSON or GeoPackage
    (from the suffix unless ``driver`` is given)."""
    rows = [
        ({"id": o["id"], "score": o["score"], "area": float(g.area), "pixels": o["area"]}, g)
        for o, g in object_polygons(seg, source)
    ]
    fields = {"id": "int64", "score": "float64", "area": "float64", "pixels": "int64"}
    crs = source.crs if source.is_georeferenced else None
    return write_features(path, rows, fields, crs=crs, driver=driver)


def _polygons(geom) -> list:
    return list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
