"""Command-line glue for images of any size and georeferenced ones: the options that
``segany segment`` and ``segany everything`` gain, and the runs they switch to (tiled
prompting, tiled segment-everything, GeoTIFF / GeoJSON / GeoPackage outputs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from . import validate as V
from .rasters import TIFF_SUFFIXES, open_raster
from .tiles import DEFAULT_OVERLAP, DEFAULT_TILE
from .transforms import MAX_PIXELS

#: segany everything --format values written here (one label raster or vector file per image)
GEO_FORMATS = ("geotiff", "geojson", "gpkg")


def _bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bands must be like 4,3,2; got {text!r}") from None


def _scale(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale must be LOW,HIGH; got {text!r}") from None
    return low, high


def add_large_image_args(p: argparse.ArgumentParser, *, prompts: bool) -> None:
    """Options for large and georeferenced images (``prompts``: ``segany segment``)."""
    g = p.add_argument_group("large and georeferenced images (docs/remote-sensing.md)")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help=f"refuse images above N pixels (default {MAX_PIXELS} for images decoded whole; "
        "TIFFs are read by window and have no limit unless given)",
    )
    when = (
        f"default for TIFFs larger than {DEFAULT_TILE} px or with a CRS"
        if prompts
        else "implied by --format " + "|".join(GEO_FORMATS)
    )
    g.add_argument(
        "--tile-size",
        type=int,
        default=None,
        metavar="PX",
        help=f"work tile by tile, tiles of PX pixels (default {DEFAULT_TILE}; {when})",
    )
    g.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        metavar="PX",
        help=f"minimum overlap of neighbouring tiles (default {DEFAULT_OVERLAP})",
    )
    g.add_argument("--bands", type=_bands, metavar="R,G,B", help="1-based bands (1 or 3)")
    g.add_argument("--scale", type=_scale, metavar="LOW,HIGH", help="raw values mapped to 0..255")
    if prompts:
        g.add_argument(
            "--point-crs",
            metavar="CRS",
            help="--point values are map coordinates in this CRS (e.g. EPSG:4326: lon,lat)",
        )


def _wants_tiles(args: argparse.Namespace, path: str) -> bool:
    if args.tile_size or args.bands or args.scale or getattr(args, "point_crs", None):
        return True
    if Path(path).suffix.lower() not in TIFF_SUFFIXES or not Path(path).is_file():
        return False
    with open_raster(path) as src:
        return src.is_georeferenced or max(src.size) > DEFAULT_TILE


def handles_segment(args: argparse.Namespace) -> bool:
    return args.text is None and _wants_tiles(args, args.image)


def handles_everything(args: argparse.Namespace) -> bool:
    return args.format in GEO_FORMATS or bool(args.tile_size)


def _open(args: argparse.Namespace, path: str):
    return open_raster(path, bands=args.bands, scale=args.scale, max_pixels=args.max_pixels)


def run_segment(args: argparse.Namespace) -> int:
    """``segany segment`` on a large or georeferenced image: tiled prompting; the mask is a
    GeoTIFF with the input's transform and CRS when ``--out`` ends in .tif."""
    from PIL import Image

    from .cli_common import CliError
    from .geo import map_to_pixels, write_mask_geotiff
    from .loader import load_predictor
    from .tiles import TiledPredictor

    if not args.point and args.box is None:
        raise CliError("give at least one --point or a --box")
    src = _open(args, args.image)
    pts = np.asarray(args.point, dtype=np.float64).reshape(-1, 3)
    coords = pts[:, :2] if len(pts) else None
    if coords is not None and args.point_crs:
        coords = map_to_pixels(coords, args.point_crs, src)
    labels = pts[:, 2].astype(np.int64) if len(pts) else None
    box = np.asarray(args.box, dtype=np.float64) if args.box is not None else None
    multimask = args.multimask if args.multimask is not None else len(pts) == 1 and box is None
    predictor = load_predictor(args.model, backend=args.backend, precision=args.precision)
    tp = TiledPredictor(
        predictor,
        tile=args.tile_size or DEFAULT_TILE,
        overlap=args.overlap,
        cache_dir=args.embedding_cache,
    )
    try:
        tp.set_image(src)
        pred = tp.predict(coords, labels, box, multimask_output=multimask)
    finally:
        tp.close()
    best = int(np.argmax(pred.scores))
    mask = pred.window_masks[best]
    out = Path(args.out)
    if out.suffix.lower() in (".tif", ".tiff"):
        write_mask_geotiff(out, mask, pred.window, src)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred.masks[best].astype(np.uint8) * 255).save(out)
    summary = {
        "image": str(args.image),
        "size": [src.width, src.height],
        "crs": str(src.crs) if src.crs is not None else None,
        "points_px": None if coords is None else np.round(coords, 3).tolist(),
        "tile": list(pred.tile),
        "window": list(pred.window),
        "best": best,
        "score": round(float(pred.scores[best]), 4),
        "area": int(mask.sum()),
        "mask": str(out),
    }
    print(V.dumps(summary, indent=2))
    return 0


def run_everything(args: argparse.Namespace, images: list[Path]) -> int:
    """``segany everything`` tile by tile: per image, ``OUT/STEM.tif`` (uint32 label
    raster, georeferenced like the input), ``.geojson`` or ``.gpkg`` (polygons with id,
    score, area), and the resumable run in ``OUT/STEM.tiles/``."""
    from .cli_common import CliError
    from .everything import MaskGenerator
    from .geo import write_label_geotiff, write_vectors
    from .loader import load_predictor
    from .tiled_everything import TiledMaskGenerator

    try:
        gen = MaskGenerator(
            load_predictor(args.model, backend=args.backend, precision=args.precision),
            preset=args.preset,
            points_per_side=args.points_per_side,
            crop_n_layers=args.crop_layers,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_thresh,
        )
        tiled = TiledMaskGenerator(gen, tile=args.tile_size or DEFAULT_TILE, overlap=args.overlap)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; everything writes into a folder")
    out.mkdir(parents=True, exist_ok=True)
    fmt = args.format if args.format in GEO_FORMATS else "geotiff"
    written = []
    for path in images:
        with _open(args, str(path)) as src:
            seg = tiled.generate(src, out / f"{path.stem}.tiles")
            if fmt == "geotiff":
                dest = write_label_geotiff(out / f"{path.stem}.tif", seg, src)
            else:
                suffix = ".geojson" if fmt == "geojson" else ".gpkg"
                dest = write_vectors(out / f"{path.stem}{suffix}", seg, src)
        written.append({"image": str(path), "objects": len(seg.objects), "file": str(dest)})
        print(f"segany: {path}: {len(seg.objects)} objects -> {dest}", file=sys.stderr)
    print(V.dumps({"out": str(out), "format": fmt, "images": written}, indent=2))
    return 0
