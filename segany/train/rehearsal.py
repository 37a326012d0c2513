"""The general set rehearsed by default when fine-tuning, against forgetting natural images.

``segany train`` trains on the user's masks and, by default, on one batch per step of a
small labelled set of everyday photos (``--rehearse coco10``): the recipe measured in
docs/training.md (+11 points 1-click mIoU on nuclei while DAVIS 1-click also improved;
without rehearsal DAVIS fell 19 points). The set is 10 MS-COCO val2017 images with their
69 instance masks. Its annotations ship with segany (``segany/assets/coco10_rehearsal.json``,
COCO annotations are CC BY 4.0); the images keep their Flickr licences (``coco_license`` of
each image, several non-commercial), so they are not shipped: the first run downloads them
from COCO's servers into ``<cache>/datasets/coco10/images`` (each checked to decode at its
annotated size), and an offline machine is told where to put them.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from ..files import atomic_write

#: The name ``--rehearse`` takes for the shipped general set (its default).
GENERAL_SET = "coco10"
#: ``--rehearse none``: no rehearsal.
NO_REHEARSAL = "none"
ANNOTATIONS = Path(__file__).resolve().parents[1] / "assets" / "coco10_rehearsal.json"
_TIMEOUT = 60


class RehearsalError(RuntimeError):
    """The general set's images are missing and could not be downloaded."""


def images_dir() -> Path:
    """Where the general set's images are kept: ``<segany cache>/datasets/coco10/images``."""
    from ..weights import cache_dir

    return cache_dir() / "datasets" / GENERAL_SET / "images"


def _image_ok(path: Path, width: int, height: int) -> bool:
    from ..transforms import ImageError, load_image

    try:
        rgb = load_image(path)
    except (ImageError, OSError):
        return False
    return rgb.shape[:2] == (height, width)


def _download(url: str, dest: Path) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "segany"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
        atomic_write(dest, response.read())


def ensure_images(*, progress: bool = True, folder: Path | None = None) -> Path:
    """The folder holding every image of the general set, downloading the missing ones;
    :class:`RehearsalError` (saying where to put them) when that fails."""
    from tqdm import tqdm

    folder = folder or images_dir()
    images: list[dict[str, Any]] = json.loads(ANNOTATIONS.read_text())["images"]
    missing = [
        im for im in images if not _image_ok(folder / im["file_name"], im["width"], im["height"])
    ]
    if not missing:
        return folder
    failed: list[str] = []
    for im in tqdm(missing, desc="rehearsal images (COCO)", unit="img", disable=not progress):
        dest = folder / im["file_name"]
        try:
            _download(im["coco_url"], dest)
        except Exception as exc:  # noqa: BLE001 - URLError, HTTP and socket errors alike
            failed.append(f"{im['file_name']} ({type(exc).__name__}: {exc})")
            break  # offline or blocked: the others would fail the same way, slowly
        if not _image_ok(dest, im["width"], im["height"]):
            dest.unlink(missing_ok=True)
            failed.append(f"{im['file_name']} (not a {im['width']}x{im['height']} image)")
    if failed:
        raise RehearsalError(
            f"the default rehearsal set ({GENERAL_SET}: {len(images)} MS-COCO val2017 images "
            f"listed in {ANNOTATIONS}) is incomplete and could not be downloaded: "
            f"{'; '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}. Put "
            f"the val2017 files named there into {folder}, or train with --rehearse SRC "
            f"(your own labelled set) or --rehearse {NO_REHEARSAL}"
        )
    return folder


def resolve(
    rehearse: str | os.PathLike[str] | None,
    images: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
) -> tuple[str | None, str | None]:
    """``(source, images folder)`` for ``rehearse`` (``--rehearse``, ``--rehearse-images``):
    the general set by name (its images in ``images`` if given, else fetched into the cache
    when missing), ``None`` / ``"none"`` for no rehearsal, any other value a labelled source
    as ``--data`` takes."""
    if rehearse is None or os.fspath(rehearse) == NO_REHEARSAL:
        return None, None
    if os.fspath(rehearse) == GENERAL_SET:
        folder = Path(images) if images is not None else None
        return str(ANNOTATIONS), str(ensure_images(progress=progress, folder=folder))
    return os.fspath(rehearse), None if images is None else os.fspath(images)
