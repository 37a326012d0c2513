"""The pictures of docs/remote-sensing.md and docs/microscopy.md (MobileSAM, tiled).

python benchmarks/figures_tiles.py            # writes docs/img/remote_sensing.png,
                                              # docs/img/microscopy_mosaic.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segany.everything import MaskGenerator  # noqa: E402
from segany.geo import map_to_pixels, write_vectors  # noqa: E402
from segany.loader import load_predictor  # noqa: E402
from segany.rasters import open_raster  # noqa: E402
from segany.tiled_everything import TiledMaskGenerator  # noqa: E402
from segany.tiles import TiledPredictor, TileGrid  # noqa: E402
from segany.viz import overlay_masks  # noqa: E402

IMG = REPO / "docs" / "img"


def remote_sensing(tmp: Path) -> None:
    import pyogrio.raw
    import shapely

    src = open_raster(REPO / "tests" / "data" / "geotiff" / "RGB.byte.tif")
    gen = MaskGenerator(load_predictor("mobile_sam"), preset="fast")
    seg = TiledMaskGenerator(gen, tile=512, overlap=64).generate(src, tmp / "rs")
    gpkg = write_vectors(tmp / "objects.gpkg", seg, src)
    _, _, geoms, fields = pyogrio.raw.read(gpkg)
    tp = TiledPredictor(gen.predictor, tile=512, overlap=64)
    tp.set_image(src)
    lonlat = (-77.669, 25.263)  # a cloud over the Bahamas, EPSG:4326 (lon, lat)
    px = map_to_pixels([lonlat], "EPSG:4326", src)
    pred = tp.predict(px, np.array([1]), multimask_output=False)
    rgb = src.read(0, 0, src.width, src.height)
    t = src.transform
    extent = (t.c, t.c + t.a * src.width, t.f + t.e * src.height, t.f)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    axes[0].imshow(rgb, extent=extent)
    for g in shapely.from_wkb(geoms):
        for poly in g.geoms:
            x, y = poly.exterior.xy
            axes[0].plot(x, y, lw=0.6, color="yellow")
    axes[0].set_title(f"segany everything --format gpkg: {len(geoms)} polygons (UTM 18N, m)")
    axes[1].imshow(overlay_masks(rgb, pred.masks[:1]), extent=extent)
    mx, my = t @ (px[0, 0], px[0, 1])
    axes[1].plot(mx, my, "r*", ms=14)
    axes[1].set_title(f"click at {lonlat} (EPSG:4326), score {pred.scores[0]:.2f}")
    for ax in axes:
        ax.ticklabel_format(style="plain")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(IMG / "remote_sensing.png", dpi=90)
    tp.close()


def microscopy(tmp: Path) -> None:
    from tests.mosaic import NUCLEI, build_mosaic, load_coco

    rgb, _ = build_mosaic(load_coco(NUCLEI), 3, 3, 248)
    rgb = np.ascontiguousarray(rgb[124:620, 124:620])
    gen = MaskGenerator(load_predictor("mobile_sam"), preset="fast")
    seg = TiledMaskGenerator(gen, tile=256, overlap=16).generate(rgb, tmp / "mic")
    labels = seg.labels()
    masks = [labels == o["id"] for o in seg.objects]
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    ax.imshow(overlay_masks(rgb, masks))
    grid = TileGrid(height=496, width=496, tile=256, overlap=16)
    for r, c in grid:
        x0, y0, x1, y1 = grid.window(r, c)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", color="w"))
    ax.set_title(f"tiled segment-everything, 4 tiles of 256 px: {len(masks)} objects")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(IMG / "microscopy_mosaic.png", dpi=90)


if __name__ == "__main__":
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        microscopy(Path(d))
        remote_sensing(Path(d))
