"""Label Studio's brush masks: its run-length format, read and written with numpy.

Label Studio stores a ``brushlabels`` region as ``value.rle``: a list of bytes holding a
bit stream in the layout of thi.ng's ``rle-pack`` (what its front end decodes), over the
mask's RGBA pixels in row-major order (``H * W * 4`` values, the mask in every channel;
Label Studio's converter reads the alpha one):

- header: 32 bits value count, 5 bits ``word size - 1``, four times 4 bits
  ``run-length field width - 1``;
- then chunks: 1 bit kind (1 = a run of one value, 0 = literal values), 2 bits choosing one
  of the four widths, that many bits ``count - 1``, then the value (runs) or ``count``
  values (literals), each ``word size`` bits; the stream is padded to a byte with zeros.

The encoder writes runs only (a mask repeated over four channels has no run shorter than
four values), 8-bit words, widths 4, 8, 12 and 16 bits; the decoder reads any stream of this
layout (literal chunks and other widths, as Label Studio's own brush writes). Tested against
Label Studio's decoder (``label_studio_sdk.converter.brush.decode_rle``) in its own venv by
``tests/integrations/test_labelstudio_real.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Run-length field widths (bits) of the encoder; runs longer than ``2**16`` are split.
WIDTHS = (4, 8, 12, 16)
WORD = 8


class BrushError(ValueError):
    """A brush RLE that cannot be decoded (truncated, or not of the mask's size)."""


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start positions and values of the runs of equal values of a 1-D array."""
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, flat.dtype)
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    return starts, flat[starts]


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The big-endian bits of each ``values[i]`` in ``widths[i]`` bits, concatenated."""
    values = values.astype(np.int64)
    total = int(widths.sum())
    owner = np.repeat(np.arange(len(values)), widths)
    ends = np.cumsum(widths)
    pos = np.arange(total) - np.repeat(ends - widths, widths)  # bit index inside its field
    shift = widths[owner] - 1 - pos
    return ((values[owner] >> shift) & 1).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A 2-D mask (bool or numbers; non-zero = inside) -> Label Studio's brush ``rle``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a brush mask must be 2-D, got shape {mask.shape}")
    flat = (mask.reshape(-1) != 0).astype(np.uint8) * 255
    n_values = flat.size * 4
    starts, vals = _runs(flat)
    lengths = np.diff(np.r_[starts, flat.size]) * 4  # in RGBA values
    # split runs longer than the widest field holds
    cap = 1 << WIDTHS[-1]
    pieces = -(-lengths // cap)
    vals = np.repeat(vals, pieces)
    piece_len = np.full(int(pieces.sum()), cap, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    piece_len[last] = lengths - (pieces - 1) * cap
    counts = piece_len - 1
    widths = np.asarray(WIDTHS)
    choice = np.searchsorted((1 << widths) - 1, counts)  # the narrowest field that holds it
    n = len(counts)
    fields = np.stack([np.ones(n, np.int64), choice, counts, vals.astype(np.int64)], axis=1)
    fwidths = np.stack(
        [np.ones(n, np.int64), np.full(n, 2), widths[choice], np.full(n, WORD)], axis=1
    )
    header_vals = np.array([n_values, WORD - 1, *(w - 1 for w in WIDTHS)], dtype=np.int64)
    header_w = np.array([32, 5, 4, 4, 4, 4], dtype=np.int64)
    bits = np.concatenate(
        [_bits(header_vals, header_w), _bits(fields.reshape(-1), fwidths.reshape(-1))]
    )
    return np.packbits(bits).tolist()  # packbits pads the last byte with zeros


class _Reader:
    def __init__(self, data: Sequence[int]) -> None:
        raw = np.asarray(data, dtype=np.int64)
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise BrushError("a brush rle holds bytes (0..255)")
        self.bits = np.unpackbits(raw.astype(np.uint8))
        self.i = 0

    def read(self, n: int) -> int:
        end = self.i + n
        if end > self.bits.size:
            raise BrushError("the brush rle ends early")
        chunk = self.bits[self.i : end]
        self.i = end
        return int(chunk.dot(1 << np.arange(n - 1, -1, -1, dtype=np.int64))) if n else 0

    def read_many(self, count: int, n: int) -> np.ndarray:
        end = self.i + count * n
        if end > self.bits.size:
            raise BrushError("the brush rle ends early")
        chunk = self.bits[self.i : end].reshape(count, n).astype(np.int64)
        self.i = end
        return chunk.dot(1 << np.arange(n - 1, -1, -1, dtype=np.int64))


def decode_rle(rle: Sequence[int]) -> np.ndarray:
    """Label Studio's brush ``rle`` -> its flat values (``H * W * 4`` for an image mask)."""
    r = _Reader(rle)
    num = r.read(32)
    word = r.read(5) + 1
    sizes = [r.read(4) + 1 for _ in range(4)]
    if num > 4 * 2**28:
        raise BrushError(f"a brush rle of {num} values is beyond any image size")
    out = np.zeros(num, dtype=np.uint32 if word > 16 else np.uint16 if word > 8 else np.uint8)
    i = 0
    while i < num:
        repeat = r.read(1)
        j = min(num, i + 1 + r.read(sizes[r.read(2)]))
        if repeat:
            out[i:j] = r.read(word)
        else:
            out[i:j] = r.read_many(j - i, word)
        i = j
    return out


def rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio's brush ``rle`` of an ``height x width`` image -> a bool mask (the alpha
    channel, non-zero = inside)."""
    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise BrushError(
            f"the brush rle holds {flat.size} values, not {height}x{width}x4 = "
            f"{height * width * 4}: it is not a mask of this image"
        )
    return flat.reshape(height, width, 4)[:, :, 3] != 0
