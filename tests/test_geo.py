"""Georeferenced round trip on real GeoTIFFs (rasterio's test data: a Landsat scene in UTM
zone 18N with nodata 0, and a world image in EPSG:4326)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.warp import transform as reproject_points

from segany.cli import main
from segany.geo import GeoError, map_to_pixels, write_label_geotiff, write_vectors
from segany.rasters import open_raster
from segany.tiled_everything import TiledMaskGenerator
from segany.tiles import TileGrid

from .conftest import TEST_DATA
from .mosaic import OracleGenerator

LANDSAT = TEST_DATA / "geotiff" / "RGB.byte.tif"
WORLD = TEST_DATA / "geotiff" / "world.rgb.tif"


def test_wgs84_point_lands_on_its_pixel() -> None:
    world = open_raster(WORLD)  # 0.703125 degrees per pixel from (-180, 90)
    px = map_to_pixels([[0.0, 0.0], [-179.9, 89.9], [2.35, 48.85]], "EPSG:4326", world)
    np.testing.assert_allclose(px[0], [256.0, 128.0])
    np.testing.assert_allclose(px[1], [0.1 / 0.703125, 0.1 / 0.703125], rtol=1e-9)
    assert np.floor(px[2]).tolist() == [259.0, 58.0]  # Paris
    landsat = open_raster(LANDSAT)
    centre = landsat.transform @ (400.5, 300.5)  # UTM 18N of pixel (400, 300)'s centre
    lon, lat = reproject_points(landsat.crs, "EPSG:4326", [centre[0]], [centre[1]])
    assert -80 < lon[0] < -75 and 23 < lat[0] < 26  # the Bahamas
    np.testing.assert_allclose(
        map_to_pixels([[lon[0], lat[0]]], "EPSG:4326", landsat), [[400.5, 300.5]], atol=1e-6
    )
    with pytest.raises(GeoError, match="unknown CRS"):
        map_to_pixels([[0, 0]], "EPSG:0", world)


def _segmentation(tmp_path, src):
    """Connected bright regions of the scene's first band, tiled (160 px, 8 px overlap)
    through the oracle generator: a label set with objects cut by tile borders."""
    import cv2

    rgb = src.read(0, 0, src.width, src.height)
    bright = ((rgb[..., 0] > 120) & src.valid(0, 0, src.width, src.height)).astype(np.uint8)
    _, gt, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=4)
    gt[stats[gt, cv2.CC_STAT_AREA] < 40] = 0  # the larger regions only: a quick test
    grid = TileGrid(height=src.height, width=src.width, tile=160, overlap=8)
    tiled = TiledMaskGenerator(OracleGenerator(gt.astype(np.uint32), grid), tile=160, overlap=8)
    return tiled.generate(src, tmp_path / "run", progress=False), gt


def test_label_raster_and_vectors_round_trip(tmp_path) -> None:
    src = open_raster(LANDSAT)
    seg, gt = _segmentation(tmp_path, src)
    assert len(seg.objects) > 20
    tif = write_label_geotiff(tmp_path / "labels.tif", seg, src)
    with rasterio.open(tif) as ds:
        assert ds.transform == src.transform and ds.crs == src.crs
        assert ds.dtypes == ("uint32",) and ds.nodata == 0
        labels = ds.read(1)
    np.testing.assert_array_equal(labels, seg.labels())
    import pyogrio.raw

    for suffix in (".gpkg", ".geojson"):
        path = write_vectors(tmp_path / f"objects{suffix}", seg, src)
        meta, _, geoms, fields = pyogrio.raw.read(path)
        assert meta["fields"].tolist() == ["id", "score", "area", "pixels"]
        assert rasterio.crs.CRS.from_user_input(meta["crs"]) == src.crs
        import shapely

        shapes = shapely.from_wkb(geoms)
        ids = fields[0]
        back = rasterize(
            zip(shapes, ids.tolist()), out_shape=src.size, transform=src.transform, dtype="uint32"
        )
        np.testing.assert_array_equal(back, labels)  # IoU 1.0 for every object
        pixel_area = abs(src.transform.a * src.transform.e)
        np.testing.assert_allclose(fields[2], fields[3] * pixel_area, rtol=1e-9)


@pytest.mark.weights
def test_segment_cli_writes_georeferenced_mask(mobile_sam, tmp_path, capsys) -> None:
    src = open_raster(LANDSAT)
    lon, lat = reproject_points(
        src.crs, "EPSG:4326", *(list(v) for v in zip(src.transform @ (420.5, 330.5)))
    )
    out = tmp_path / "mask.tif"
    rc = main(
        [
            "segment",
            str(LANDSAT),
            f"--point={lon[0]},{lat[0]}",  # a negative longitude is not an option
            "--point-crs",
            "EPSG:4326",
            "--tile-size",
            "512",
            "--overlap",
            "64",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    with rasterio.open(out) as ds:
        assert ds.transform == src.transform and ds.crs == src.crs and ds.shape == src.size
        mask = ds.read(1)
    assert mask[330, 420] == 255 and set(np.unique(mask)) == {0, 255}
    assert '"points_px"' in capsys.readouterr().out
