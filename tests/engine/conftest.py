"""Fixtures for the annotator: a folder of images (with bad files), a service on a tiny
random model over SQLite or a PostgreSQL server the tests start, and an HTTP client."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.engine.service import AnnotationService
from segany.engine.store import Store
from segany.predictor import Predictor

from ..conftest import tiny_sam
from .helpers import CHROMIUM_ARGS, Postgres, PostgresUnavailable, chromium_path


def make_images(root: Path) -> Path:
    """Three good images (one in a subfolder), a text file, a corrupt JPEG, an image over
    the pixel limit, and a symlink leading out of the folder."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(96, 144, 3), dtype=np.uint8)
    a[20:60, 30:90] = (200, 40, 40)
    Image.fromarray(a).save(root / "a.png")
    b = rng.integers(0, 255, size=(120, 80, 3), dtype=np.uint8)
    Image.fromarray(b).save(root / "b.jpg", quality=95)
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(a[:64, :64]).save(root / "sub" / "c.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.new("L", (8000, 6400)).save(root / "huge.png")  # 51 MP > the 50 MP default
    outside = root.parent / "outside.png"
    Image.fromarray(a).save(outside)
    try:
        os.symlink(outside, root / "escape.png")
    except OSError:  # pragma: no cover - no symlinks on this file system
        pass
    return root


@pytest.fixture(scope="session")
def images_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("template") / "images")


@pytest.fixture()
def images_dir(tmp_path: Path, images_template: Path) -> Path:
    import shutil

    dst = tmp_path / "images"
    shutil.copytree(images_template, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session (each test gets its own database), or the
    reason (a str, also printed) why it cannot be started here."""
    try:
        pg = Postgres().start()
    except (PostgresUnavailable, OSError) as exc:
        print(f"\nPostgreSQL tests skipped: {exc}", file=sys.stderr)
        yield str(exc)
        return
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'annotations.db'}"
    pg = request.getfixturevalue("postgres")
    if isinstance(pg, str):
        pytest.skip(f"PostgreSQL cannot be started here: {pg}")
    return pg.new_database()


@pytest.fixture(scope="session")
def tiny_predictor() -> Predictor:
    return Predictor(tiny_sam(), model_id="tiny-test-model")


def make_service(
    db: str | Path, images: Path, predictor: Predictor, cache: Path, **kw: object
) -> AnnotationService:
    kw.setdefault("model_name", "tiny")
    svc = AnnotationService(Store(db), images, predictor, cache_dir=cache, **kw)  # type: ignore[arg-type]
    svc.rescan()
    return svc


@pytest.fixture()
def service(db_url: str, images_dir: Path, tiny_predictor: Predictor, tmp_path: Path):
    svc = make_service(db_url, images_dir, tiny_predictor, tmp_path / "cache")
    yield svc
    svc.close()
    svc.store.close()


@pytest.fixture()
def client(service: AnnotationService):
    from fastapi.testclient import TestClient

    from segany.engine.server import create_app

    with TestClient(create_app(service), base_url="http://localhost") as c:
        yield c


def image_id(client, path: str, headers: dict | None = None) -> int:
    for im in client.get("/api/images", headers=headers).json()["images"]:
        if im["path"] == path:
            return im["id"]
    raise KeyError(path)


@pytest.fixture(scope="module")
def browser():
    """The system Chromium, headless, driven by Playwright (one per test module)."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed: {exc}")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium on this machine: apt-get install chromium (make system-deps)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
    except Error as exc:
        pw.stop()
        pytest.skip(f"chromium at {exe} cannot be started: {str(exc)[:500]}")
    yield b
    b.close()
    pw.stop()
