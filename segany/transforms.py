"""All image geometry and normalisation, in one place.

Frames:
- *image frame*: pixels of the original image as the user sees it (after EXIF rotation),
  ``(x, y)``, size ``(H, W)``.
- *model frame*: pixels of the image resized so its longest side is ``S`` (1024), before
  the bottom/right zero padding to ``S x S``; size ``input_size = (h, w)``.
- *low-res frame*: the decoder's ``S/4 x S/4`` logit grid covering the padded input.

That is SAM 1's geometry (:class:`LongestSideGeometry`). SAM 2 resizes the whole image to
the ``S x S`` square without keeping its aspect ratio and without padding, normalises in
0-1 units, and maps the low-res logits straight back to the image size
(:class:`SquareGeometry`); there the model frame is the square itself. A model names its
geometry (``model.input_geometry``); :func:`geometry_of` returns it, so callers never choose.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = str | Path | Image.Image | np.ndarray | bytes

#: Images above this many pixels are refused (about 16k x 16k); override per call.
MAX_PIXELS = 268_435_456


class ImageError(ValueError):
    """An image that cannot be read or converted to RGB."""


def _pil_to_array(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        return array_to_rgb(arr.astype(np.uint16) if mode != "I" else arr)
    if mode == "F":
        return array_to_rgb(np.asarray(img))
    if mode in ("RGB",):
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("1", "L", "P", "LA", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "La"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    raise ImageError(f"unsupported image mode {mode!r}")


def array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Convert an image array to ``(H, W, 3)`` uint8 RGB.

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` and ``(H, W, 4)`` (alpha dropped) of
    uint8, uint16 (scaled by 255/65535), other integer types in ``[0, 255]`` and floats in
    ``[0, 1]``.
    """
    if not isinstance(arr, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[..., :3] if arr.shape[2] != 1 else arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ImageError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"empty image of shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif arr.dtype == np.bool_:
        raise ImageError("boolean arrays are masks, not images")
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise ImageError(
                f"integer image of dtype {arr.dtype} has values outside 0..255; "
                "pass uint8, uint16 or floats in [0, 1]"
            )
        out = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("float image contains NaN or infinity")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageError("float images must hold values in [0, 1]")
        out = (arr * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageError(f"unsupported image dtype {arr.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out)


def load_image(src: ImageLike, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Load a path, bytes, PIL image or array as ``(H, W, 3)`` uint8 RGB.

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped) and 16-bit
    images are converted. Raises :class:`ImageError` with the reason otherwise.
    """
    if isinstance(src, np.ndarray):
        arr = array_to_rgb(src)
    elif isinstance(src, Image.Image):
        _check_size(src.size, max_pixels, "image")
        arr = _pil_to_array(src)
    elif isinstance(src, (str, Path, bytes)):
        name = "<bytes>" if isinstance(src, bytes) else str(src)
        if not isinstance(src, bytes) and not Path(src).is_file():
            raise ImageError(f"no such image file: {name}")
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
                _check_size(img.size, max_pixels, name)
                img.load()
                arr = _pil_to_array(img)
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise ImageError(f"cannot read image {name}: {exc}") from exc
        except OSError as exc:
            raise ImageError(f"cannot read image {name} (truncated or corrupt): {exc}") from exc
    else:
        raise ImageError(f"cannot use {type(src).__name__} as an image")
    _check_size((arr.shape[1], arr.shape[0]), max_pixels, "image")
    return arr


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    check_pixel_limit(size[0], size[1], max_pixels, name)


def check_pixel_limit(width: int, height: int, max_pixels: int, name: str) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (a decompression-bomb guard),
    saying how to raise the limit."""
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels}; downscale it or raise the limit (--max-pixels N on the command "
            "line, max_pixels=N in Python)"
        )


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size ``(h', w')`` of an ``(h, w)`` image resized so its longest side is ``long_side``
    (at least one pixel on each side, however thin the image)."""
    scale = long_side / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize ``(H, W, 3)`` uint8 so its longest side is ``long_side`` (PIL bilinear with
    antialiasing, as the released models were trained)."""
    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_tensor(x: torch.Tensor, long_side: int) -> torch.Tensor:
    """Resize a ``(B, C, H, W)`` float tensor so its longest side is ``long_side``
    (bilinear, antialiased; close to but not bit-equal with :func:`resize_image`)."""
    h, w = preprocess_shape(x.shape[-2], x.shape[-1], long_side)
    return F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)


def normalize_and_pad(
    x: torch.Tensor, *, img_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
) -> torch.Tensor:
    """Resized ``(B, 3, h, w)`` float pixels (0-255) -> normalised and zero-padded at the
    bottom/right to ``(B, 3, S, S)``."""
    h, w = x.shape[-2:]
    if h > img_size or w > img_size:
        raise ValueError(f"input {h}x{w} is larger than the model input {img_size}")
    x = (x - pixel_mean) / pixel_std
    return F.pad(x, (0, img_size - w, 0, img_size - h))


def to_model_input(
    image: np.ndarray, *, img_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 image -> normalised, padded ``(1, 3, S, S)`` tensor and ``input_size``.

    The same values as :func:`normalize_and_pad`, written in one pass into a channels-last
    tensor (the layout of the pixels and of the encoder's convolutions on the CPU)."""
    resized = resize_image(image, img_size)
    h, w = resized.shape[:2]
    if h > img_size or w > img_size:  # pragma: no cover - resize_image guarantees it
        raise ValueError(f"input {h}x{w} is larger than the model input {img_size}")
    x = torch.empty(1, img_size, img_size, 3, device=pixel_mean.device)
    # Rows of w * 3 interleaved values, with the per-channel constants repeated along
    # them: the element-wise kernels then vectorise along the rows (broadcasting over a
    # last axis of size 3 does not), same operations in the same order per value.
    rows = x[0, :h].view(h, img_size * 3)
    rows[:, : w * 3].copy_(torch.from_numpy(resized).view(h, w * 3))
    rows[:, : w * 3].sub_(pixel_mean.reshape(3).repeat(w)).div_(pixel_std.reshape(3).repeat(w))
    rows[:, w * 3 :].zero_()
    x[0, h:].zero_()
    return x.permute(0, 3, 1, 2), (h, w)


def coords_to_model(
    coords: torch.Tensor | np.ndarray, original_size: tuple[int, int], long_side: int
) -> torch.Tensor:
    """``(..., 2)`` image-frame ``(x, y)`` -> model frame (float32 tensor)."""
    h, w = original_size
    nh, nw = preprocess_shape(h, w, long_side)
    c = torch.as_tensor(coords, dtype=torch.float32)
    return c * c.new_tensor([nw / w, nh / h])


def boxes_to_model(
    boxes: torch.Tensor | np.ndarray, original_size: tuple[int, int], long_side: int
) -> torch.Tensor:
    """``(..., 4)`` image-frame XYXY -> model frame."""
    b = torch.as_tensor(boxes, dtype=torch.float32)
    return coords_to_model(b.reshape(*b.shape[:-1], 2, 2), original_size, long_side).reshape(
        b.shape
    )


def image_tokens(
    input_size: tuple[int, int], img_size: int, grid: tuple[int, int]
) -> tuple[int, int]:
    """Rows and columns of the ``grid`` of image tokens (patches of ``img_size / grid``
    pixels) that the image of ``input_size`` (resized, before padding) covers, plus two of
    margin: every low-res logit cell (4 per token side) that :func:`masks_to_image` reads for
    the image's pixels lies under them. Capped at the grid."""
    patch = img_size // grid[0]
    return (min(grid[0], input_size[0] // patch + 2), min(grid[1], input_size[1] // patch + 2))


def _linear_taps(n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``(2, n_out)`` and weights of 1-D bilinear resizing exactly as
    ``F.interpolate(..., align_corners=False)`` computes them on the CPU (float32 source
    position ``scale * (i + 0.5) - 0.5`` clamped at 0; right neighbour clamped)."""
    f32 = np.float32
    src = f32(scale) * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    frac = np.clip(src - i0.astype(f32), f32(0), f32(1))
    i1 = np.minimum(i0 + 1, n_in - 1)
    return np.stack([i0, i1]), np.stack([f32(1) - frac, frac]).astype(np.float64)


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_low: int, factor: float, n_kept: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_low)`` float32 matrix of: upsample ``n_low`` samples by ``factor``, keep
    the first ``n_kept``, resize those to ``n_out`` (two bilinear steps composed)."""
    mid_idx, mid_w = _linear_taps(n_kept, n_out, np.float32(n_kept) / np.float32(n_out))
    low_idx, low_w = _linear_taps(n_low, int(n_low * factor), 1.0 / factor)
    m = np.zeros((n_out, n_low))
    rows = np.broadcast_to(np.arange(n_out), (2, 2, n_out))
    np.add.at(m, (rows, low_idx[:, mid_idx]), low_w[:, mid_idx] * mid_w[None])
    return torch.from_numpy(m.astype(np.float32))


@functools.lru_cache(maxsize=64)
def _banded_resize(
    n_low: int, factor: float, n_kept: int, n_out: int, tile: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_resize_matrix` cut into tiles of ``tile`` output rows, each reading a window
    of ``cw`` consecutive input rows (every row of the matrix has at most 4 non-zeros):
    window starts as a gather index ``(tiles, cw)`` and weights ``(tiles, tile, cw)``, so
    that ``(weights @ x[idx]).flatten(0, 1)[:n_out]`` equals ``matrix @ x``."""
    m = _resize_matrix(n_low, factor, n_kept, n_out)
    tiles = -(-n_out // tile)
    spans = []
    for t in range(tiles):
        cols = (m[t * tile : (t + 1) * tile] != 0).any(0).nonzero().flatten()
        spans.append((int(cols.min()), int(cols.max()) + 1))
    cw = max(hi - lo for lo, hi in spans)
    starts = torch.tensor([min(lo, n_low - cw) for lo, _ in spans])
    idx = starts[:, None] + torch.arange(cw)
    w = torch.zeros(tiles, tile, cw)
    for t in range(tiles):
        block = m[t * tile : (t + 1) * tile]
        w[t, : block.shape[0]] = block[:, idx[t]]
        # the window holds every non-zero of its rows
        assert torch.equal(w[t, : block.shape[0]].sum(1), block.sum(1))
    return idx, w


def masks_to_image(
    low_res: torch.Tensor,
    *,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    img_size: int,
) -> torch.Tensor:
    """Low-res logits ``(B, K, S/4, S/4)`` -> logits at image size ``(B, K, H, W)``:
    upsample to the padded input, drop the padding, resize to the original image.

    The padding is dropped *before* upsampling: only the low-res rows and columns that the
    kept pixels read from (plus one for the bilinear neighbour) are upsampled, with the
    same exact scale, so the result equals upsample-then-crop while doing less work. When
    the image is smaller than the model input, the two resizings are applied at once as
    the matrices they compose to, ``R_y @ logits @ R_x^T`` (the same function up to float
    rounding), so the ``S x S`` intermediate is never built; both matrices are banded and
    are applied by tiles of output rows over the few input rows each tile reads.
    """
    side_h, side_w = low_res.shape[-2:]
    h, w = input_size
    big_h, big_w = original_size
    factor = img_size / side_w
    # Composed as two small matrix products when that is cheaper than building the
    # intermediate (always the case when the image is smaller than the model input).
    if big_h * big_w < h * w and side_w * (side_w + big_w) * big_h < 400 * (h * w + big_h * big_w):
        dev, dt = low_res.device, low_res.dtype
        iy, wy = _banded_resize(side_h, factor, h, big_h)
        ix, wx = _banded_resize(side_w, factor, w, big_w)
        # Both as products on the left (gathered rows): x on the transposed low-res map.
        rows, cols = int(iy[-1, -1]) + 1, int(ix[-1, -1]) + 1  # the cells any pixel reads
        lt = low_res[..., :rows, :cols].transpose(-1, -2).contiguous()  # (..., cols, rows)
        zt = (wx.to(dev, dt) @ lt[..., ix.to(dev), :]).flatten(-3, -2)[..., :big_w, :]
        z = zt.transpose(-1, -2).contiguous()  # (..., rows, W)
        out = (wy.to(dev, dt) @ z[..., iy.to(dev), :]).flatten(-3, -2)
        return out if out.shape[-2] == big_h else out[..., :big_h, :]
    rows = min(side_h, math.ceil(h / factor) + 1)
    cols = min(side_w, math.ceil(w / factor) + 1)
    x = low_res[..., :rows, :cols]
    x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    x = x[..., :h, :w]
    if (h, w) == tuple(original_size):
        return x
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class LongestSideGeometry:
    """SAM 1: longest side resized to ``img_size``, zero padding at the bottom/right,
    normalisation in 0-255 units (the functions above, bound to one input size)."""

    img_size: int

    def to_model_input(
        self, image: np.ndarray, *, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        return to_model_input(
            image, img_size=self.img_size, pixel_mean=pixel_mean, pixel_std=pixel_std
        )

    def coords_to_model(
        self, coords: torch.Tensor | np.ndarray, original_size: tuple[int, int]
    ) -> torch.Tensor:
        return coords_to_model(coords, original_size, self.img_size)

    def boxes_to_model(
        self, boxes: torch.Tensor | np.ndarray, original_size: tuple[int, int]
    ) -> torch.Tensor:
        return boxes_to_model(boxes, original_size, self.img_size)

    def masks_to_image(
        self,
        low_res: torch.Tensor,
        *,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        return masks_to_image(
            low_res, input_size=input_size, original_size=original_size, img_size=self.img_size
        )

    def image_tokens(self, input_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        return image_tokens(input_size, self.img_size, grid)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """The resized image's ``(h, w)`` inside the padded model input."""
        return preprocess_shape(original_size[0], original_size[1], self.img_size)


@dataclass(frozen=True)
class SquareGeometry:
    """SAM 2: the whole image resized to ``img_size x img_size`` (bilinear with
    antialiasing on 0-1 floats, aspect ratio not kept, no padding), normalised in 0-1
    units; the model frame is that square, ``input_size = (S, S)``."""

    img_size: int

    def to_model_input(
        self, image: np.ndarray, *, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB uint8 ``(H, W, 3)`` -> ``(1, 3, S, S)`` normalised and ``(S, S)``."""
        s = self.img_size
        if not image.flags.writeable:
            image = image.copy()
        x = torch.from_numpy(np.ascontiguousarray(image)).to(pixel_mean.device)
        x = x.permute(2, 0, 1).unsqueeze(0).float().div(255)
        x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - pixel_mean) / pixel_std, (s, s)

    def coords_to_model(
        self, coords: torch.Tensor | np.ndarray, original_size: tuple[int, int]
    ) -> torch.Tensor:
        """``(..., 2)`` image-frame ``(x, y)`` -> the square's pixels (float32)."""
        h, w = original_size
        c = torch.as_tensor(coords, dtype=torch.float32).clone()
        c[..., 0] = c[..., 0] / w
        c[..., 1] = c[..., 1] / h
        return c * self.img_size

    def boxes_to_model(
        self, boxes: torch.Tensor | np.ndarray, original_size: tuple[int, int]
    ) -> torch.Tensor:
        """``(..., 4)`` image-frame XYXY -> the square's pixels."""
        b = torch.as_tensor(boxes, dtype=torch.float32)
        corners = self.coords_to_model(b.reshape(*b.shape[:-1], 2, 2), original_size)
        return corners.reshape(b.shape)

    def masks_to_image(
        self,
        low_res: torch.Tensor,
        *,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Low-res logits ``(B, K, S/4, S/4)`` -> ``(B, K, H, W)`` in one bilinear resize."""
        return F.interpolate(low_res, original_size, mode="bilinear", align_corners=False)

    def image_tokens(self, input_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        """Every token lies under the image."""
        return (int(grid[0]), int(grid[1]))

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """Every image fills the square: ``(S, S)``."""
        return (self.img_size, self.img_size)


Geometry = LongestSideGeometry | SquareGeometry


def geometry_of(model: torch.nn.Module) -> Geometry:
    """The geometry a model was trained with (``model.input_geometry``)."""
    kind = getattr(model, "input_geometry", "longest_side")
    if kind == "longest_side":
        return LongestSideGeometry(img_size=int(model.img_size))
    if kind == "square":
        return SquareGeometry(img_size=int(model.img_size))
    raise ValueError(f"unknown input geometry {kind!r}")


def video_frame_to_model_input(
    frame: np.ndarray, img_size: int, *, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
) -> torch.Tensor:
    """SAM 2 video: an RGB uint8 frame ``(H, W, 3)`` -> ``(1, 3, S, S)`` normalised. The
    video predictor resizes frames to the square with PIL's bicubic filter on the 8-bit
    image (its image predictor uses the bilinear resize of :class:`SquareGeometry`)."""
    small = Image.fromarray(np.ascontiguousarray(frame)).resize((img_size, img_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(small) / 255.0).float().permute(2, 0, 1).unsqueeze(0)
    x = x.to(pixel_mean.device)
    return (x - pixel_mean) / pixel_std
