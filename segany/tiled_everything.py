"""Segment everything in an image of any size, tile by tile, with one set of object ids.

Each tile (see :class:`segany.tiles.TileGrid`) goes through an unchanged
:class:`segany.everything.MaskGenerator`; its masks are painted
into one label raster on disk (zarr, uint32 ids, image frame), smallest first (a mask
over several objects keeps only the pixels left free). Where a tile overlaps tiles
already done, a mask is the same object as an existing one when they agree on the shared
pixels (IoU >= ``match_iou`` there): the two are merged, so an object seen whole by two
tiles comes out once and an object cut by a tile border comes out whole. Ids merged after
being written are recorded as aliases (union-find) and resolved when reading, so a tile
only ever writes its own window. After each tile the raster and a small ``state.json`` are
on disk; an interrupted run resumes from the next tile (the window of the tile that was
being written is restored first). Memory holds one tile's masks, whatever the image size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import validate as V
from .everything import MaskGenerator
from .files import atomic_write
from .rasters import RasterSource, open_raster
from .tiles import DEFAULT_OVERLAP, DEFAULT_TILE, TileGrid, tile_starts

STATE_VERSION = 1


class _Ids:
    """Union-find over object ids (0 = background, never merged)."""

    def __init__(self, parent: dict[int, int] | None = None) -> None:
        self.parent = dict(parent or {})

    def find(self, i: int) -> int:
        root = i
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while i != root:  # path compression
            self.parent[i], i = root, self.parent.get(i, i)
        return root

    def union(self, ids: list[int]) -> int:
        """Merge ``ids`` into the smallest; returns it."""
        roots = sorted({self.find(i) for i in ids})
        for r in roots[1:]:
            self.parent[r] = roots[0]
        return roots[0]

    def resolve(self, raw: np.ndarray) -> np.ndarray:
        """Raw ids -> root ids, same shape."""
        u, inv = np.unique(raw, return_inverse=True)
        return np.asarray([self.find(int(i)) for i in u], dtype=raw.dtype)[inv].reshape(raw.shape)


@dataclass
class TiledSegmentation:
    """The result of :meth:`TiledMaskGenerator.generate`, on disk in ``directory``.

    objects: one dict per object: ``id`` (1..N), ``score`` (best predicted IoU among its
        parts), ``area`` (pixels), ``bbox`` (XYWH, image frame).
    size: ``(H, W)`` of the image; transform / crs: the source's georeferencing (or None).
    """

    directory: Path
    size: tuple[int, int]
    objects: list[dict]
    transform: object = None
    crs: object = None

    def labels(self, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """uint32 object ids ``(y1 - y0, x1 - x0)`` of an XYXY image-frame window (the
        whole image by default: ``H * W * 4`` bytes)."""
        import zarr

        h, w = self.size
        x0, y0, x1, y1 = window if window is not None else (0, 0, w, h)
        raw = np.asarray(
            zarr.open_array(str(self.directory / "labels.zarr"), mode="r")[y0:y1, x0:x1]
        )
        lut = np.load(self.directory / "lut.npy", mmap_mode="r")
        return np.asarray(lut[raw], dtype=np.uint32)


class TiledMaskGenerator:
    """Segment everything in an image of any size.

    Args:
        generator: the :class:`~segany.everything.MaskGenerator` run on each tile.
        tile: tile side in image pixels (default 1024); overlap: minimum overlap of
            neighbouring tiles (default 256; objects up to about this size seen whole by
            two tiles are matched most reliably).
        match_iou: masks agreeing with an existing object at least this much on the pixels
            they share with earlier tiles are merged into it.
        min_new_fraction: a mask whose pixels are mostly (more than 1 - this) taken by
            other objects is left out (a union of objects already there).
    """

    def __init__(
        self,
        generator: MaskGenerator,
        *,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        match_iou: float = 0.5,
        min_new_fraction: float = 0.5,
    ) -> None:
        tile_starts(tile + 1, tile, overlap)  # validates tile and overlap
        if not 0 < match_iou <= 1 or not 0 <= min_new_fraction <= 1:
            raise ValueError("match_iou must be in (0, 1] and min_new_fraction in [0, 1]")
        self.generator = generator
        self.tile, self.overlap = int(tile), int(overlap)
        self.match_iou, self.min_new_fraction = match_iou, min_new_fraction

    def generate(
        self,
        image: object,
        out_dir: str | Path,
        *,
        progress: bool = True,
        resume: bool = True,
    ) -> TiledSegmentation:
        """Segment ``image`` (anything :func:`segany.rasters.open_raster` opens, or a
        :class:`~segany.rasters.RasterSource`) into ``out_dir`` (created; resumed when it
        holds an unfinished run of the same image and settings, unless ``resume=False``)."""
        import zarr
        from tqdm import tqdm

        src = image if isinstance(image, RasterSource) else open_raster(image)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        grid = TileGrid(height=src.height, width=src.width, tile=self.tile, overlap=self.overlap)
        signature = {
            "version": STATE_VERSION,
            "image": src.name,
            "size": [src.height, src.width],
            "tile": self.tile,
            "overlap": self.overlap,
            "match_iou": self.match_iou,
            "settings": V.json_safe(vars(self.generator.settings)),
        }
        state = self._load_state(out, signature) if resume else None
        if state is None:
            state = {**signature, "done": [], "next_id": 1, "parent": {}, "score": {}}
            chunk = min(1024, max(grid.tile_size))
            zarr.create_array(
                str(out / "labels.zarr"),
                shape=(src.height, src.width),
                chunks=(chunk, chunk),
                dtype="uint32",
                fill_value=0,
                overwrite=True,
            )
            self._save_state(out, state)
        labels = zarr.open_array(str(out / "labels.zarr"), mode="r+")
        ids = _Ids({int(k): v for k, v in state["parent"].items()})
        scores = {int(k): v for k, v in state["score"].items()}
        done = [tuple(t) for t in state["done"]]
        for undo in out.glob("undo-*.npy"):  # a tile interrupted while being written
            r, c = (int(v) for v in undo.stem.split("-")[1:])
            if (r, c) not in done:
                x0, y0, x1, y1 = grid.window(r, c)
                labels[y0:y1, x0:x1] = np.load(undo)
            undo.unlink()
        todo = [t for t in grid if t not in done]
        bar = tqdm(todo, disable=not progress, unit="tile", desc="everything (tiled)")
        for r, c in bar:
            win = grid.window(r, c)
            x0, y0, x1, y1 = win
            seen = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            for d in done:
                dx0, dy0, dx1, dy1 = grid.window(*d)
                sx0, sy0, sx1, sy1 = max(x0, dx0), max(y0, dy0), min(x1, dx1), min(y1, dy1)
                if sx1 > sx0 and sy1 > sy0:
                    seen[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = True
            raw = np.asarray(labels[y0:y1, x0:x1])
            new = self._tile(src, win, raw, seen, ids, scores, state)
            np.save(out / f"undo-{r}-{c}.npy", raw)
            labels[y0:y1, x0:x1] = new
            done.append((r, c))
            state.update(
                done=[list(t) for t in done],
                parent={str(k): v for k, v in ids.parent.items()},
                score={str(k): v for k, v in scores.items()},
            )
            self._save_state(out, state)
            (out / f"undo-{r}-{c}.npy").unlink()
            bar.set_postfix(objects=state["next_id"] - 1)
        bar.close()
        return self._finish(out, src, grid, labels, ids, scores)

    # -- one tile --------------------------------------------------------------------------
    def _tile(
        self,
        src: RasterSource,
        win: tuple[int, int, int, int],
        raw: np.ndarray,
        seen: np.ndarray,
        ids: _Ids,
        scores: dict[int, float],
        state: dict,
    ) -> np.ndarray:
        """Paint tile ``win``'s masks into ``raw`` (its window of raw ids); returns it."""
        found, _ = self.generator.generate_masks(src.read(*win))
        masks = found.masks.numpy()
        valid = src.valid(*win)
        # smallest first: a mask covering several objects (or the background) then finds
        # their pixels taken and keeps only what is left, instead of swallowing them
        order = np.argsort(masks.sum((1, 2)), kind="stable")
        cur = ids.resolve(raw) if raw.any() else raw.copy()
        out = raw.copy()
        for k in order:
            m = masks[k] & valid
            area = int(m.sum())
            if area == 0:
                continue
            score = float(found.iou[k])
            target = self._match(m, cur, seen, ids)
            if target is not None:
                paint = m & ((cur == 0) | (cur == target))
            else:
                paint = m & (cur == 0)
                if paint.sum() < self.min_new_fraction * area:
                    continue
                target = state["next_id"]
                state["next_id"] += 1
            cur[paint] = target
            out[paint] = target
            scores[target] = max(scores.get(target, 0.0), round(score, 6))
        return out

    def _match(self, m: np.ndarray, cur: np.ndarray, seen: np.ndarray, ids: _Ids) -> int | None:
        """The existing object ``m`` is (merging several that it joins), or None."""
        shared = m & seen
        n = int(shared.sum())
        if n == 0:
            return None
        cand, inter = np.unique(cur[shared], return_counts=True)
        hits = []
        for j, i in zip(cand.tolist(), inter.tolist()):
            if j == 0:
                continue
            other = int(((cur == j) & seen).sum())
            if i / (n + other - i) >= self.match_iou:
                hits.append(j)
        if not hits:
            return None
        root = ids.union(hits)
        if len(hits) > 1:
            cur[np.isin(cur, hits)] = root
        return root

    # -- state -----------------------------------------------------------------------------
    @staticmethod
    def _load_state(out: Path, signature: dict) -> dict | None:
        path = out / "state.json"
        if not path.is_file() or not (out / "labels.zarr").exists():
            return None
        state = json.loads(path.read_text())
        if {k: state.get(k) for k in signature} != json.loads(V.dumps(signature)):
            return None  # another image or other settings: start again
        return state

    @staticmethod
    def _save_state(out: Path, state: dict) -> None:
        # not fsynced: the zarr tiles it describes are not either, so after a power loss an
        # older state (tiles redone) is the consistent one
        atomic_write(out / "state.json", V.dumps(state), durable=False)

    def _finish(
        self,
        out: Path,
        src: RasterSource,
        grid: TileGrid,
        labels,
        ids: _Ids,
        scores: dict[int, float],
    ) -> TiledSegmentation:
        """Number the surviving objects 1..N (by first appearance), measure them chunk by
        chunk and write ``lut.npy`` (raw id -> final id) and ``objects.json``."""
        n_raw = max([0, *scores.keys()]) + 1
        roots = np.asarray([ids.find(i) for i in range(n_raw)], dtype=np.int64)
        area = np.zeros(n_raw, np.int64)
        big = np.iinfo(np.int64).max
        x0s, y0s = np.full(n_raw, big), np.full(n_raw, big)
        x1s, y1s = np.full(n_raw, -1), np.full(n_raw, -1)
        step = labels.chunks[0]
        for y in range(0, src.height, step):
            for x in range(0, src.width, step):
                block = roots[np.asarray(labels[y : y + step, x : x + step])]
                yy, xx = np.nonzero(block)
                b = block[yy, xx]
                np.add.at(area, b, 1)
                np.minimum.at(x0s, b, xx + x)
                np.minimum.at(y0s, b, yy + y)
                np.maximum.at(x1s, b, xx + x)
                np.maximum.at(y1s, b, yy + y)
        best: dict[int, float] = {}
        for i, v in scores.items():
            r = int(roots[i])
            best[r] = max(best.get(r, 0.0), v)
        alive = np.nonzero(area)[0]
        final = np.zeros(n_raw, np.uint32)
        final[alive] = np.arange(1, len(alive) + 1, dtype=np.uint32)
        np.save(out / "lut.npy", final[roots].astype(np.uint32))
        objects = [
            {
                "id": int(final[i]),
                "score": best.get(int(i), 0.0),
                "area": int(area[i]),
                "bbox": [
                    int(x0s[i]),
                    int(y0s[i]),
                    int(x1s[i] - x0s[i] + 1),
                    int(y1s[i] - y0s[i] + 1),
                ],
            }
            for i in alive
        ]
        (out / "objects.json").write_text(V.dumps(objects))
        return TiledSegmentation(
            directory=out, size=src.size, objects=objects, transform=src.transform, crs=src.crs
        )
