"""The annotator on GeoTIFFs: 8-bit and 16-bit multi-band scenes are listed, shown (PNG),
segmented, and their objects export as polygons in the scene's CRS."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from segany import masks as M
from segany.predictor import Predictor

from ..conftest import TEST_DATA, tiny_sam
from .conftest import make_service

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")


@pytest.fixture()
def client(tmp_path):
    from fastapi.testclient import TestClient
    from rasterio.transform import Affine

    from segany.engine.server import create_app

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(TEST_DATA / "geotiff" / "RGB.byte.tif", images / "scene.tif")
    # 16-bit, 4 bands (as Sentinel-2 or Landsat reflectances), UTM, 10 m pixels
    rng = np.random.default_rng(0)
    data = rng.integers(200, 3000, size=(4, 60, 80), dtype=np.uint16)
    data[:, 10:30, 20:50] = 9000
    profile = {"driver": "GTiff", "width": 80, "height": 60, "count": 4, "dtype": "uint16"}
    profile.update(crs="EPSG:32618", transform=Affine(10, 0, 500000, 0, -10, 4100000))
    with rasterio.open(images / "s2.tif", "w", **profile) as dst:
        dst.write(data)
    svc = make_service(f"sqlite:///{tmp_path / 'a.db'}", images,
                       Predictor(tiny_sam(), model_id="tiny"), tmp_path / "cache")  # fmt: skip
    with TestClient(create_app(svc), base_url="http://localhost") as c:
        yield c
    svc.close()
    svc.store.close()


def _ids(client):
    return {im["path"]: im for im in client.get("/api/images").json()["images"]}


def test_geotiffs_are_listed_shown_and_segmented(client):
    ims = _ids(client)
    assert ims["scene.tif"]["width"] == 791 and ims["scene.tif"]["height"] == 718
    assert ims["s2.tif"]["width"] == 80 and ims["s2.tif"]["status"] == "ok"
    for name, size in (("scene.tif", (791, 718)), ("s2.tif", (80, 60))):
        r = client.get(f"/api/images/{ims[name]['id']}/file")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        shown = Image.open(io.BytesIO(r.content))
        assert shown.size == size and shown.mode == "RGB"
    # the 16-bit scene is scaled per band: the bright block is white, the rest dark
    rgb = np.asarray(
        Image.open(io.BytesIO(client.get(f"/api/images/{ims['s2.tif']['id']}/file").content))
    )
    assert rgb[15:25, 25:45].min() == 255 and rgb[40:, :].max() < 255
    r = client.post(f"/api/images/{ims['s2.tif']['id']}/predict",
                    json={"points": [[30, 20]], "labels": [1], "multimask": True})  # fmt: skip
    assert r.status_code == 200, r.text
    assert [m["segmentation"]["size"] for m in r.json()["masks"]] == [[60, 80]] * 3


def test_objects_export_as_polygons_in_the_scene_crs(client, tmp_path):
    from rasterio.features import rasterize
    from shapely import wkb

    ims = _ids(client)
    iid = ims["scene.tif"]["id"]
    mask = np.zeros((718, 791), bool)
    mask[300:360, 200:290] = True
    mask[330:400, 260:300] = True  # an L shape
    seg = M.masks_to_coco_rle(mask[None])[0]
    r = client.post(
        f"/api/images/{iid}/annotations", json={"segmentation": seg, "category": "cloud"}
    )
    assert r.status_code == 201, r.text
    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/gpkg").content))
    assert z.namelist() == ["scene.gpkg"]  # s2.tif has no objects
    z.extract("scene.gpkg", tmp_path)
    meta, _, geoms, fields = pyogrio.raw.read(tmp_path / "scene.gpkg")
    with rasterio.open(TEST_DATA / "geotiff" / "RGB.byte.tif") as ds:
        transform, crs = ds.transform, ds.crs
    assert rasterio.crs.CRS.from_user_input(meta["crs"]) == crs
    got = dict(zip(meta["fields"], [f[0] for f in fields], strict=True))
    assert got["category"] == "cloud" and got["pixels"] == mask.sum()
    assert got["area"] == pytest.approx(mask.sum() * abs(transform.a * transform.e))
    back = rasterize([wkb.loads(geoms[0])], out_shape=mask.shape, transform=transform)
    assert np.array_equal(back.astype(bool), mask)  # the polygon is the mask's outline
