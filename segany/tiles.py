"""Images larger than a tile: tiled embeddings, cached on disk, and prompts answered on the
tiles they fall in, with masks that cross tile borders stitched.

All coordinates here are in the *image frame* of the full-resolution image (pixels,
``(x, y)``, windows and boxes XYXY, window ends exclusive); a tile's own frame is the image
frame shifted by the tile's top-left corner. Map coordinates never appear here (see
:mod:`segany.geo`).

Tiles all have the same size (``tile`` pixels square, or the image's size when it is
smaller): the last row and column are moved back inside the image rather than cut short,
so every tile is seen by the model at the same scale. Neighbouring tiles overlap by at
least ``overlap`` pixels.

(Past 500 lines: the grid, the on-disk tile store and the stitching predictor share one
frame convention and one cache; split, each would re-state it.)
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import transforms as T
from .predictor import ImageEmbedding, Prediction, Predictor, PromptError, image_key
from .rasters import ArraySource, RasterSource, open_raster

DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 256

Window = tuple[int, int, int, int]


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels along an axis of ``n`` pixels, overlapping
    by at least ``overlap`` (the last one ends at ``n``)."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile; got {tile}, {overlap}")
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


@dataclass(frozen=True)
class TileGrid:
    """The tiles of an ``(H, W)`` image: ``windows[r][c]`` is tile ``(r, c)``'s XYXY window
    in the image frame."""

    height: int
    width: int
    tile: int
    overlap: int

    @property
    def xs(self) -> list[int]:
        return tile_starts(self.width, self.tile, self.overlap)

    @property
    def ys(self) -> list[int]:
        return tile_starts(self.height, self.tile, self.overlap)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return len(self.ys), len(self.xs)

    @property
    def tile_size(self) -> tuple[int, int]:
        """``(h, w)`` of every tile."""
        return min(self.tile, self.height), min(self.tile, self.width)

    def window(self, r: int, c: int) -> Window:
        th, tw = self.tile_size
        x0, y0 = self.xs[c], self.ys[r]
        return x0, y0, x0 + tw, y0 + th

    def __iter__(self):
        """Tiles ``(r, c)`` in row-major order."""
        rows, cols = self.shape
        return ((r, c) for r in range(rows) for c in range(cols))

    def centrality(self, r: int, c: int) -> np.ndarray:
        """``(h, w)`` int32: each pixel's distance to the nearest border of tile ``(r, c)``
        that is not an image border (large where the tile meets the image's edge): where
        tiles overlap, the tile with the larger value sees the pixel with more context."""
        x0, y0, x1, y1 = self.window(r, c)
        big = 1 << 30
        xs, ys = np.arange(x0, x1), np.arange(y0, y1)
        dx = np.full(len(xs), big, dtype=np.int64)
        dy = np.full(len(ys), big, dtype=np.int64)
        if x0 > 0:
            dx = np.minimum(dx, xs - x0)
        if x1 < self.width:
            dx = np.minimum(dx, x1 - 1 - xs)
        if y0 > 0:
            dy = np.minimum(dy, ys - y0)
        if y1 < self.height:
            dy = np.minimum(dy, y1 - 1 - ys)
        return np.minimum(dy[:, None], dx[None, :]).astype(np.int32)


class TileEmbeddingStore:
    """Embeddings of one image's tiles in a zarr group on disk (one chunk per tile), so that
    a tile is embedded once, across runs, and memory holds only the tiles in use.

    ``embedding`` is ``(rows, cols, C, h, w)`` float32; ``high_res_<i>`` ``(rows, cols,
    *high_res_shapes[i])`` the model's high-resolution maps (SAM 2), if any; ``done``
    ``(rows, cols)`` is set only after a tile's maps are written, so an interrupted run
    recomputes that tile."""

    def __init__(
        self,
        path: Path,
        *,
        grid_shape: tuple[int, int],
        emb_shape: tuple[int, ...],
        high_res_shapes: tuple[tuple[int, ...], ...] = (),
    ):
        import zarr

        self.path = path
        arrays = {"embedding": emb_shape}
        arrays.update({f"high_res_{i}": s for i, s in enumerate(high_res_shapes)})
        root = zarr.open_group(str(path), mode="a")
        if "done" in root and any(
            name not in root or tuple(root[name].shape) != (*grid_shape, *s)
            for name, s in arrays.items()
        ):
            shutil.rmtree(path)
            root = zarr.open_group(str(path), mode="a")
        if "done" not in root:
            for name, s in arrays.items():
                root.create_array(name, shape=(*grid_shape, *s), chunks=(1, 1, *s), dtype="float32")
            root.create_array("done", shape=grid_shape, chunks=grid_shape, dtype="bool")
        self._emb, self._done = root["embedding"], root["done"]
        self._high_res = [root[f"high_res_{i}"] for i in range(len(high_res_shapes))]

    def get(self, r: int, c: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """Tile ``(r, c)``'s ``(1, C, h, w)`` embedding and high-res maps, if written."""
        if not bool(self._done[r, c]):
            return None
        maps = tuple(torch.from_numpy(np.asarray(a[r, c]))[None] for a in self._high_res)
        return torch.from_numpy(np.asarray(self._emb[r, c]))[None], maps

    def put(
        self, r: int, c: int, embedding: torch.Tensor, high_res: tuple[torch.Tensor, ...] = ()
    ) -> None:
        if len(high_res) != len(self._high_res):
            raise ValueError(f"expected {len(self._high_res)} high-res maps, got {len(high_res)}")
        self._emb[r, c] = embedding[0].float().cpu().numpy()
        for a, t in zip(self._high_res, high_res, strict=True):
            a[r, c] = t[0].float().cpu().numpy()
        self._done[r, c] = True


@dataclass
class TiledPrediction:
    """Masks for one prompt on a tiled image.

    window_masks: ``(K, h, w)`` bool (float logits with ``return_logits``) over ``window``.
    window: XYXY image-frame window covering every tile the masks were stitched from.
    scores: ``(K,)`` predicted IoUs on the tile the prompt fell in (``tile``).
    low_res_logits: ``(K, S/4, S/4)`` logits on ``tile``, usable as the next ``mask_input``
        with prompts falling in the same tile.
    image_size: ``(H, W)`` of the whole image.
    """

    window_masks: np.ndarray
    window: Window
    scores: np.ndarray
    low_res_logits: np.ndarray
    tile: Window
    image_size: tuple[int, int]

    @property
    def masks(self) -> np.ndarray:
        """``(K, H, W)`` at image size, as :class:`~segany.predictor.Prediction` gives
        them (memory: ``K * H * W`` bytes; prefer ``window_masks`` on large images)."""
        h, w = self.image_size
        x0, y0, x1, y1 = self.window
        fill = False if self.window_masks.dtype == bool else -np.inf
        out = np.full((len(self.scores), h, w), fill, dtype=self.window_masks.dtype)
        out[:, y0:y1, x0:x1] = self.window_masks
        return out


class TiledPredictor:
    """Promptable segmentation of an image of any size, tile by tile.

    Args:
        predictor: the :class:`~segany.predictor.Predictor` that embeds and decodes tiles.
        tile: tile side in image pixels (default 1024; each tile is resized to the model's
            input size like any image).
        overlap: minimum overlap of neighbouring tiles in image pixels (default 256).
        cache_dir: folder for the zarr embedding stores (kept across runs, keyed by model,
            image and tiling); default: a temporary folder removed by :meth:`close`.
        memory_tiles: tile embeddings kept in memory (least recently used dropped; MobileSAM's
            are 4 MB each).
        max_tiles: at most this many tiles are stitched for one mask.

    ``set_image`` takes what :func:`segany.rasters.open_raster` takes (a path to a
    (Geo)TIFF is read by window, never whole) or an opened
    :class:`~segany.rasters.RasterSource`; nothing is embedded until a prompt needs it.
    ``predict`` has :meth:`Predictor.predict`'s arguments, in the image frame.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        cache_dir: str | Path | None = None,
        memory_tiles: int = 16,
        max_tiles: int = 16,
    ) -> None:
        tile_starts(tile + 1, tile, overlap)  # validates tile and overlap
        if memory_tiles < 1 or max_tiles < 1:
            raise ValueError("memory_tiles and max_tiles must be at least 1")
        self.predictor = predictor
        self.tile, self.overlap = int(tile), int(overlap)
        self.memory_tiles, self.max_tiles = memory_tiles, max_tiles
        self._tmp = None if cache_dir is not None else tempfile.mkdtemp(prefix="segany-tiles-")
        self.cache_dir = Path(cache_dir if cache_dir is not None else self._tmp)
        self.source: RasterSource | None = None
        self.grid: TileGrid | None = None
        self._store: TileEmbeddingStore | None = None
        self._memory: OrderedDict[tuple[int, int], ImageEmbedding] = OrderedDict()
        #: tiles embedded (not read from the cache) since the image was set
        self.embedded = 0

    # -- image ---------------------------------------------------------------------------
    @property
    def is_image_set(self) -> bool:
        return self.source is not None

    @property
    def original_size(self) -> tuple[int, int]:
        if self.source is None:
            raise RuntimeError("no image set: call set_image() first")
        return self.source.size

    def set_image(self, image: T.ImageLike | RasterSource) -> RasterSource:
        """Open ``image`` for tiled prompting (lazily: no tile is read or embedded yet)."""
        self.reset_image()
        src = open_raster(image)
        self.source = src
        self.grid = TileGrid(
            height=src.height, width=src.width, tile=self.tile, overlap=self.overlap
        )
        th, tw = self.grid.tile_size
        m = self.predictor.model
        c = m.prompt_encoder.embed_dim
        gh, gw = m.prompt_encoder.image_embedding_size
        key = self._key(src)
        self._store = TileEmbeddingStore(
            self.cache_dir / f"{key}.zarr",
            grid_shape=self.grid.shape,
            emb_shape=(c, gh, gw),
            high_res_shapes=m.mask_decoder.high_res_shapes((gh, gw)),
        )
        self._input_size = self.predictor.geometry.input_size(th, tw)
        return src

    def _key(self, src: RasterSource) -> str:
        p = self.predictor
        h = hashlib.sha256(f"{p.model_id}-{p.backend_name}-{p.precision}".encode())
        h.update(f"{self.tile}-{self.overlap}-{src.bands}-{src.scaling}-{src.nodata}".encode())
        if isinstance(src, ArraySource):
            h.update(image_key(src._rgb).encode())
        else:
            path = Path(src.name).resolve()
            st = path.stat()
            h.update(f"{path}-{st.st_size}-{st.st_mtime_ns}".encode())
        return h.hexdigest()[:32]

    def reset_image(self) -> None:
        self.source = self.grid = self._store = None
        self._memory.clear()
        self.embedded = 0

    def close(self) -> None:
        """Forget the image; remove the embedding cache if it is a temporary folder."""
        self.reset_image()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def tile_embedding(self, r: int, c: int) -> ImageEmbedding:
        """Tile ``(r, c)``'s embedding: from memory, the zarr store, or the model."""
        if (r, c) in self._memory:
            self._memory.move_to_end((r, c))
            return self._memory[(r, c)]
        assert self.grid is not None and self._store is not None and self.source is not None
        stored = self._store.get(r, c)
        th, tw = self.grid.tile_size
        if stored is None:
            item = self.predictor.embed(self.source.read(*self.grid.window(r, c)))
            self._store.put(r, c, item.embedding, item.high_res)
            self.embedded += 1
        else:
            item = ImageEmbedding(
                embedding=stored[0],
                original_size=(th, tw),
                input_size=self._input_size,
                high_res=stored[1],
            )
        self._memory[(r, c)] = item
        while len(self._memory) > self.memory_tiles:
            self._memory.popitem(last=False)
        return item

    def embed_all(self, progress: bool = False) -> None:
        """Embed every tile now (e.g. before an interactive session)."""
        from tqdm import tqdm

        assert self.grid is not None, "no image set: call set_image() first"
        for r, c in tqdm(list(self.grid), disable=not progress, unit="tile", desc="embed"):
            self.tile_embedding(r, c)

    # -- prompts -------------------------------------------------------------------------
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> TiledPrediction:
        """One prompt in the image frame; see :meth:`Predictor.predict`. The prompt is
        answered on the tile that holds it (nearest its centre); masks reaching a border
        shared with another tile are continued there and stitched."""
        coords, labels, boxes = self._check(point_coords, point_labels, box)
        grid = self.grid
        assert grid is not None
        r, c = self._primary_tile(coords, labels, boxes)
        x0, y0, x1, y1 = grid.window(r, c)
        pred = self._on_tile(
            r, c, coords, labels, boxes, mask_input, multimask_output, return_logits
        )
        parts = [
            self._stitch(r, c, pred.masks[k], coords, labels, return_logits)
            for k in range(len(pred.scores))
        ]
        window = _union_window([p[0] for p in parts])
        wx0, wy0, wx1, wy1 = window
        dtype = np.float32 if return_logits else bool
        fill = -np.inf if return_logits else False
        out = np.full((len(parts), wy1 - wy0, wx1 - wx0), fill, dtype=dtype)
        for k, (win, m) in enumerate(parts):
            out[k, win[1] - wy0 : win[3] - wy0, win[0] - wx0 : win[2] - wx0] = m
        return TiledPrediction(
            window_masks=out,
            window=window,
            scores=pred.scores,
            low_res_logits=pred.low_res_logits,
            tile=(x0, y0, x1, y1),
            image_size=(grid.height, grid.width),
        )

    def _check(
        self, point_coords, point_labels, box
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self.source is None:
            raise RuntimeError("no image set: call set_image() first")
        h, w = self.source.size
        coords = np.zeros((0, 2))
        labels = np.zeros((0,), dtype=np.int64)
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise PromptError("point_coords and point_labels must be given together")
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels).astype(np.int64)
            if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != coords.shape[:1]:
                raise PromptError(
                    f"point_coords must be (N, 2) and point_labels (N,); got {coords.shape} "
                    f"and {labels.shape}"
                )
            if not np.isfinite(coords).all():
                raise PromptError("point_coords contain NaN or infinity")
            out = (coords[:, 0] < 0) | (coords[:, 0] > w) | (coords[:, 1] < 0) | (coords[:, 1] > h)
            if out.any():
                bad = coords[out][0]
                raise PromptError(f"point ({bad[0]:g}, {bad[1]:g}) lies outside the {w}x{h} image")
        boxes = None
        if box is not None:
            boxes = np.asarray(box, dtype=np.float64).reshape(4)
            if not np.isfinite(boxes).all():
                raise PromptError("box contains NaN or infinity")
        if not len(coords) and boxes is None:
            raise PromptError("give points, a box or both")
        return coords, labels, boxes

    def _primary_tile(
        self, coords: np.ndarray, labels: np.ndarray, box: np.ndarray | None
    ) -> tuple[int, int]:
        """The tile holding the prompt's extent (positive points and box), nearest its
        centre; the nearest tile when no tile holds all of it."""
        assert self.grid is not None
        pos = coords[labels == 1] if (labels == 1).any() else coords
        pts = pos if box is None else np.concatenate([pos, box.reshape(2, 2)])
        lo, hi = pts.min(0), pts.max(0)
        centre = (lo + hi) / 2
        best, best_key = (0, 0), None
        for r, c in self.grid:
            x0, y0, x1, y1 = self.grid.window(r, c)
            holds = lo[0] >= x0 and lo[1] >= y0 and hi[0] <= x1 and hi[1] <= y1
            d = float(np.hypot(centre[0] - (x0 + x1) / 2, centre[1] - (y0 + y1) / 2))
            key = (not holds, d)
            if best_key is None or key < best_key:
                best, best_key = (r, c), key
        return best

    def _on_tile(
        self,
        r: int,
        c: int,
        coords: np.ndarray,
        labels: np.ndarray,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask: bool,
        return_logits: bool,
    ) -> Prediction:
        """Image-frame prompts answered on tile ``(r, c)``: points outside it are left out,
        the box is clipped to it."""
        assert self.grid is not None
        x0, y0, x1, y1 = self.grid.window(r, c)
        inside = (
            (coords[:, 0] >= x0)
            & (coords[:, 0] <= x1)
            & (coords[:, 1] >= y0)
            & (coords[:, 1] <= y1)
        )
        local = coords[inside] - (x0, y0)
        tbox = None
        if box is not None:
            b = box - (x0, y0, x0, y0)
            tbox = np.clip(b, 0, [x1 - x0, y1 - y0, x1 - x0, y1 - y0])
            if tbox[2] <= tbox[0] or tbox[3] <= tbox[1]:
                tbox = None
        if not len(local) and tbox is None:
            raise PromptError(f"no prompt falls in tile {(x0, y0, x1, y1)}")
        self.predictor.set_embedding(self.tile_embedding(r, c))
        return self.predictor.predict(
            point_coords=local if len(local) else None,
            point_labels=labels[inside] if len(local) else None,
            box=tbox,
            mask_input=mask_input,
            multimask_output=multimask,
            return_logits=return_logits,
        )

    def _stitch(
        self,
        r: int,
        c: int,
        mask: np.ndarray,
        coords: np.ndarray,
        labels: np.ndarray,
        return_logits: bool,
    ) -> tuple[Window, np.ndarray]:
        """Continue tile ``(r, c)``'s mask (logits) into the tiles it reaches, breadth
        first: each neighbour is prompted with the point of the mask part it shares that is
        farthest from that part's boundary (plus the caller's points inside it), and its
        candidate agreeing best with the shared part (IoU >= 0.5) is taken. Pixels seen by
        several tiles take the value of the tile they are most central in."""
        import cv2

        grid = self.grid
        assert grid is not None
        thr = self.predictor.model.mask_threshold
        got = {(r, c): mask}
        queue = [(r, c)]
        rows, cols = grid.shape
        while queue and len(got) < self.max_tiles:
            tr, tc = queue.pop(0)
            m = got[(tr, tc)] > thr if return_logits else got[(tr, tc)]
            wt = grid.window(tr, tc)
            for nr in range(max(0, tr - 1), min(rows, tr + 2)):
                for nc in range(max(0, tc - 1), min(cols, tc + 2)):
                    if (nr, nc) in got or len(got) >= self.max_tiles:
                        continue
                    wn = grid.window(nr, nc)
                    ix0, iy0 = max(wt[0], wn[0]), max(wt[1], wn[1])
                    ix1, iy1 = min(wt[2], wn[2]), min(wt[3], wn[3])
                    if ix1 <= ix0 or iy1 <= iy0:
                        continue
                    part = m[iy0 - wt[1] : iy1 - wt[1], ix0 - wt[0] : ix1 - wt[0]]
                    if not _reaches(m, wt, wn) or part.sum() < 4:
                        continue
                    dist = cv2.distanceTransform(np.pad(part, 1).astype(np.uint8), cv2.DIST_L2, 3)[
                        1:-1, 1:-1
                    ]
                    py, px = np.unravel_index(int(np.argmax(dist)), dist.shape)
                    pts = np.concatenate([[[px + ix0 + 0.5, py + iy0 + 0.5]], coords])
                    labs = np.concatenate([[1], labels])
                    pred = self._on_tile(nr, nc, pts, labs, None, None, True, return_logits)
                    cand = pred.masks > thr if return_logits else pred.masks
                    shared = cand[:, iy0 - wn[1] : iy1 - wn[1], ix0 - wn[0] : ix1 - wn[0]]
                    inter = (shared & part).sum((1, 2))
                    union = (shared | part).sum((1, 2))
                    iou = inter / np.maximum(union, 1)
                    k = int(np.argmax(iou))
                    if iou[k] >= 0.5:
                        got[(nr, nc)] = pred.masks[k]
                        queue.append((nr, nc))
        window = _union_window([grid.window(*t) for t in got])
        wx0, wy0, wx1, wy1 = window
        fill = -np.inf if return_logits else False
        out = np.full((wy1 - wy0, wx1 - wx0), fill, dtype=np.float32 if return_logits else bool)
        best = np.full(out.shape, -1, dtype=np.int32)
        for (tr, tc), m in got.items():
            x0, y0, x1, y1 = grid.window(tr, tc)
            sl = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
            cen = grid.centrality(tr, tc)
            take = cen > best[sl]
            out[sl][take] = m[take]
            best[sl][take] = cen[take]
        return window, out


def _reaches(mask: np.ndarray, wt: Window, wn: Window) -> bool:
    """Whether ``mask`` (over window ``wt``) touches a border of ``wt`` on the side of the
    neighbouring window ``wn``, within the rows / columns the two share."""
    ys = slice(max(wt[1], wn[1]) - wt[1], min(wt[3], wn[3]) - wt[1])
    xs = slice(max(wt[0], wn[0]) - wt[0], min(wt[2], wn[2]) - wt[0])
    hit = False
    if wn[0] > wt[0]:
        hit |= bool(mask[ys, -1].any())
    if wn[0] < wt[0]:
        hit |= bool(mask[ys, 0].any())
    if wn[1] > wt[1]:
        hit |= bool(mask[-1, xs].any())
    if wn[1] < wt[1]:
        hit |= bool(mask[0, xs].any())
    return hit


def _union_window(windows: list[Window]) -> Window:
    a = np.asarray(windows)
    return int(a[:, 0].min()), int(a[:, 1].min()), int(a[:, 2].max()), int(a[:, 3].max())
