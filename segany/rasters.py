"""Images of any size, read by window: BigTIFF / tiled / pyramidal TIFF through tifffile
(as a zarr array, so nothing but the window is decoded), GeoTIFF and other GDAL rasters
through rasterio, and in-memory arrays.

Every source answers ``read(x0, y0, x1, y1)`` with ``(y1 - y0, x1 - x0, 3)`` uint8 RGB in
the *image frame* (pixels of the full-resolution image, ``(x, y)``, XYXY windows, end
exclusive). Band selection, scaling of 16-bit / float imagery to 8 bits and nodata are
decided once when the source is opened, so every window of a scene is scaled alike.

The pixel limit of :data:`segany.transforms.MAX_PIXELS` guards decoding a whole image into
memory (the annotator's uploads); windowed sources refuse only above ``max_pixels`` given
by the caller (``--max-pixels``), which defaults to no limit here because nothing of that
size is ever held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import transforms as T

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".svs")


@dataclass(frozen=True)
class Scaling:
    """Linear scaling of raw band values to 0..255: ``(v - low) / (high - low)`` clipped,
    one ``(low, high)`` pair per output band (image frame values, not map units)."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """``(h, w, B)`` raw values -> ``(h, w, B)`` uint8."""
        lo = np.asarray(self.low, dtype=np.float32)
        hi = np.asarray(self.high, dtype=np.float32)
        out = (raw.astype(np.float32) - lo) * (255.0 / np.maximum(hi - lo, 1e-12))
        return (np.clip(out, 0, 255) + 0.5).astype(np.uint8)


class RasterSource:
    """A large image read by window. Subclasses implement :meth:`_read_raw`.

    Attributes:
        height, width: full-resolution size in pixels.
        transform: the affine pixel -> map transform (``rasterio.Affine``) or ``None``.
        crs: the map coordinate reference system (``rasterio.crs.CRS``) or ``None``.
        nodata: the raw value meaning "no data", or ``None``.
        name: what to call the source in messages.
    """

    height: int
    width: int
    transform: Any = None
    crs: Any = None
    nodata: float | None = None
    name: str = "<array>"
    bands: tuple[int, ...] = ()
    scaling: Scaling | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.height, self.width

    @property
    def is_georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    def _read_raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(h, w, B)`` raw values of the selected bands."""
        raise NotImplementedError

    def _check_window(self, x0: int, y0: int, x1: int, y1: int) -> None:
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise ValueError(
                f"window ({x0}, {y0}, {x1}, {y1}) is not inside the "
                f"{self.width}x{self.height} image {self.name}"
            )

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB ``(y1 - y0, x1 - x0, 3)`` uint8 of the window (nodata pixels black)."""
        self._check_window(x0, y0, x1, y1)
        raw = self._read_raw(x0, y0, x1, y1)
        if self.scaling is not None:
            rgb = self.scaling.apply(raw)
        else:
            rgb = T.array_to_rgb(raw if raw.shape[-1] != 2 else raw[..., 0])
        if rgb.ndim == 3 and rgb.shape[2] == 2:
            rgb = rgb[..., :1]
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        elif rgb.shape[-1] > 3:
            rgb = rgb[..., :3]
        if self.nodata is not None:
            rgb[self._nodata(raw)] = 0
        return np.ascontiguousarray(rgb)

    def overview(self, max_side: int = 1024) -> np.ndarray:
        """Raw selected bands ``(h, w, B)``, every ``n``-th pixel so that the longest side
        is about ``max_side``, read one strip at a time."""
        step = max(1, int(np.ceil(max(self.height, self.width) / max_side)))
        rows = max(step, (4096 // step) * step)
        strips = [
            self._read_raw(0, y, self.width, min(self.height, y + rows))[::step, ::step]
            for y in range(0, self.height, rows)
        ]
        return np.concatenate(strips, axis=0)

    def valid(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """``(h, w)`` bool: pixels holding data (all ``True`` without a nodata value)."""
        self._check_window(x0, y0, x1, y1)
        if self.nodata is None:
            return np.ones((y1 - y0, x1 - x0), dtype=bool)
        return ~self._nodata(self._read_raw(x0, y0, x1, y1))

    def _nodata(self, raw: np.ndarray) -> np.ndarray:
        nd = self.nodata
        is_nd = np.isnan(raw) if nd is not None and np.isnan(nd) else raw == nd
        return is_nd.all(axis=-1)

    def close(self) -> None:
        pass

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArraySource(RasterSource):
    """An image already in memory: ``(H, W)``, ``(H, W, C)`` array (see
    :func:`segany.transforms.array_to_rgb`), or a path / PIL image loaded whole."""

    def __init__(self, image: T.ImageLike, *, max_pixels: int = T.MAX_PIXELS) -> None:
        self.name = str(image) if isinstance(image, (str, Path)) else "<array>"
        self._rgb = T.load_image(image, max_pixels=max_pixels)
        self.height, self.width = self._rgb.shape[:2]
        self.bands = (1, 2, 3)

    def _read_raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1]


class TiffSource(RasterSource):
    """A (Big)TIFF, tiled or striped, pyramidal or not, through tifffile's zarr view of its
    full-resolution level: a window decodes only the tiles or strips it touches."""

    def __init__(
        self,
        path: str | Path,
        *,
        bands: tuple[int, ...] | None = None,
        scale: tuple[float, float] | None = None,
    ) -> None:
        import tifffile
        import zarr

        self.name = str(path)
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            self._array = zarr.open(series.aszarr(level=0), mode="r")
        except (tifffile.TiffFileError, OSError, ValueError, KeyError) as exc:
            raise T.ImageError(f"cannot read TIFF {path}: {exc}") from exc
        axes = series.axes
        shape = self._array.shape
        if axes.endswith(("YXS", "YXC", "SYX", "CYX")):
            lead = len(shape) - 3
        elif axes.endswith("YX"):
            lead = len(shape) - 2
        else:
            raise T.ImageError(f"TIFF {path}: unsupported axes {axes!r}")
        self._lead = (0,) * lead
        self._planar = axes.endswith("SYX") or axes.endswith("CYX")
        if self._planar:
            n, self.height, self.width = shape[-3:]
        elif axes.endswith("YX"):
            (self.height, self.width), n = shape[-2:], 1
        else:
            self.height, self.width, n = shape[-3:]
        self.bands = _pick_bands(bands, n, self.name)
        self.scaling = _scaling(self, scale, np.dtype(self._array.dtype))

    def _read_raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        idx = [b - 1 for b in self.bands]
        a = self._array
        if self._planar:
            raw = np.stack([a[(*self._lead, b, slice(y0, y1), slice(x0, x1))] for b in idx], -1)
        elif a.ndim - len(self._lead) == 2:
            raw = np.asarray(a[(*self._lead, slice(y0, y1), slice(x0, x1))])[..., None]
        else:
            raw = np.asarray(a[(*self._lead, slice(y0, y1), slice(x0, x1))])[..., idx]
        return raw

    def close(self) -> None:
        self._tif.close()


class RasterioSource(RasterSource):
    """A GeoTIFF (or any raster GDAL reads) through rasterio, with its transform, CRS and
    nodata; windows are read with ``Window`` so only their blocks are decoded."""

    def __init__(
        self,
        path: str | Path,
        *,
        bands: tuple[int, ...] | None = None,
        scale: tuple[float, float] | None = None,
        nodata: float | None = None,
    ) -> None:
        import rasterio
        from rasterio.errors import RasterioIOError

        self.name = str(path)
        try:
            self._ds = rasterio.open(path)
        except RasterioIOError as exc:
            raise T.ImageError(f"cannot read raster {path}: {exc}") from exc
        ds = self._ds
        self.height, self.width = ds.height, ds.width
        self.crs = ds.crs
        self.transform = ds.transform if ds.crs is not None else None
        self.nodata = nodata if nodata is not None else ds.nodata
        self.bands = _pick_bands(bands, ds.count, self.name)
        self.scaling = _scaling(self, scale, np.dtype(ds.dtypes[self.bands[0] - 1]))

    def _read_raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        from rasterio.windows import Window

        raw = self._ds.read(list(self.bands), window=Window(x0, y0, x1 - x0, y1 - y0))
        return np.moveaxis(raw, 0, -1)

    def overview(self, max_side: int = 1024) -> np.ndarray:
        """Raw selected bands decimated so the longest side is about ``max_side`` (GDAL
        uses the file's overviews when it has them)."""
        f = max(1, int(np.ceil(max(self.height, self.width) / max_side)))
        shape = (len(self.bands), max(1, self.height // f), max(1, self.width // f))
        return np.moveaxis(self._ds.read(list(self.bands), out_shape=shape), 0, -1)

    def close(self) -> None:
        self._ds.close()


def _pick_bands(bands: tuple[int, ...] | None, count: int, name: str) -> tuple[int, ...]:
    """1-based band numbers: the given ones, else 1,2,3 (or 1 for fewer than 3 bands)."""
    if bands is None:
        return (1, 2, 3) if count >= 3 else (1,)
    bands = tuple(int(b) for b in bands)
    if len(bands) not in (1, 3):
        raise T.ImageError(f"give 1 or 3 bands, got {len(bands)}: {bands}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise T.ImageError(f"{name} has bands 1..{count}; no band {bad[0]}")
    return bands


def _scaling(
    src: RasterSource, scale: tuple[float, float] | None, dtype: np.dtype
) -> Scaling | None:
    """8-bit data is used as is; other types are scaled by ``scale = (low, high)`` when
    given, else per band from the 2nd to the 98th percentile of a decimated read (nodata
    left out), so every window of the scene is scaled alike."""
    n = len(src.bands)
    if scale is not None:
        low, high = float(scale[0]), float(scale[1])
        if not high > low:
            raise T.ImageError(f"scale needs low < high, got {scale}")
        return Scaling((low,) * n, (high,) * n)
    if dtype == np.uint8:
        return None
    sample = src.overview()
    flat = sample.reshape(-1, n).astype(np.float64)
    if src.nodata is not None:
        flat = flat[~src._nodata(flat)]
    flat = flat[np.isfinite(flat).all(axis=1)]
    if not len(flat):
        return Scaling((0.0,) * n, (1.0,) * n)
    lo = np.percentile(flat, 2, axis=0)
    hi = np.percentile(flat, 98, axis=0)
    hi = np.where(hi > lo, hi, lo + 1)
    return Scaling(tuple(lo.tolist()), tuple(hi.tolist()))


def open_raster(
    src: T.ImageLike | RasterSource,
    *,
    bands: tuple[int, ...] | None = None,
    scale: tuple[float, float] | None = None,
    nodata: float | None = None,
    max_pixels: int | None = None,
) -> RasterSource:
    """Open ``src`` for windowed reading.

    TIFF files with a CRS, and other files GDAL reads, go through rasterio (transform, CRS,
    nodata kept); other TIFFs through tifffile; everything else (PNG, JPEG, arrays, PIL)
    is loaded whole under the pixel limit ``max_pixels`` (default
    :data:`segany.transforms.MAX_PIXELS`). ``bands`` are 1-based (1 or 3 of them);
    ``scale`` maps raw values ``low..high`` to 0..255 (default: 8-bit as is, other types
    from their 2-98 percentiles). ``max_pixels``, when given, also refuses windowed images
    above it.
    """
    if isinstance(src, RasterSource):
        return src
    if isinstance(src, (str, Path)) and Path(src).suffix.lower() in TIFF_SUFFIXES:
        path = Path(src)
        if not path.is_file():
            raise T.ImageError(f"no such image file: {path}")
        out: RasterSource = _open_tiff(path, bands=bands, scale=scale, nodata=nodata)
        if max_pixels is not None:
            T.check_pixel_limit(out.width, out.height, max_pixels, str(path))
        return out
    if bands is not None or scale is not None:
        raise T.ImageError("band selection and scaling are for TIFF / GeoTIFF files")
    return ArraySource(src, max_pixels=T.MAX_PIXELS if max_pixels is None else max_pixels)


def _open_tiff(
    path: Path,
    *,
    bands: tuple[int, ...] | None,
    scale: tuple[float, float] | None,
    nodata: float | None,
) -> RasterSource:
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                geo = ds.crs is not None
    except RasterioIOError:
        geo = False
    if geo:
        return RasterioSource(path, bands=bands, scale=scale, nodata=nodata)
    src = TiffSource(path, bands=bands, scale=scale)
    if nodata is not None:
        src.nodata = nodata
    return src
