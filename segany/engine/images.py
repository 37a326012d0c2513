"""The annotator's images and their embeddings: the folder's registration (rescan), the
pixels (TIFF / GeoTIFF through :mod:`.georaster`), the image queue, and one embedding per
image (memory, then disk, computed once; prefetched in the background). A part of
:class:`~.service.AnnotationService`.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..files import find_images
from ..predictor import ImageEmbedding, Predictor, image_key
from ..runtime import torch_threads
from ..transforms import ImageError, load_image
from . import georaster
from .schemas import (
    BadRequest,
    DoneRequest,
    ImageList,
    ImageOut,
    NotFound,
    OpenOut,
    RescanOut,
    Unprocessable,
    UserRef,
)
from .store import Image

log = logging.getLogger("segany.engine")


def safe_relpath(root: Path, rel: str) -> Path:
    """``root / rel`` if ``rel`` is a relative path that stays inside ``root`` (after
    resolving symlinks); raises :class:`BadRequest` otherwise."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise BadRequest(f"invalid file name {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or rel.startswith("~"):
        raise BadRequest(f"file name {rel!r} must be relative to the images folder, without '..'")
    full = (root / Path(*p.parts)).resolve()
    if not full.is_relative_to(root):
        raise BadRequest(f"file name {rel!r} points outside the images folder")
    return full


class ImagesMixin:
    """Images and embeddings of :class:`~.service.AnnotationService` (its state is set up
    there)."""

    # -- images ------------------------------------------------------------------------------
    def rescan(self) -> RescanOut:
        """Register the images of the folder (new ones added, changed ones updated, vanished
        ones marked missing). Files that are not images are ignored; unreadable or too
        large images are listed with status ``error`` and the reason. Video files are
        registered as videos, and the images of registered folders of frames are frames,
        not images (:mod:`.video`)."""
        found: dict[str, dict[str, Any]] = {}
        frames = tuple(f"{p}/" for p in self._frame_folders())  # videos, not images
        for full in find_images(self.root):  # the one discovery rule (segany.files)
            try:
                real = full.resolve()
            except OSError:
                continue
            if not real.is_relative_to(self.root) or not real.is_file():
                continue  # a symlink leading out of the folder is never served
            rel = full.relative_to(self.root).as_posix()
            if not frames or not rel.startswith(frames):
                found[rel] = self._probe(real)
        out = self.store.sync_images(found)
        return RescanOut(**out, videos=self._rescan_videos())  # video.py

    def _probe(self, path: Path) -> dict[str, Any]:
        from PIL import Image as PILImage

        st = path.stat()
        fields: dict[str, Any] = {
            "size_bytes": int(st.st_size),
            "mtime": float(st.st_mtime),
            "width": 0,
            "height": 0,
            "status": "ok",
            "error": None,
        }
        try:
            if georaster.is_raster(path):  # any band count and type; no EXIF rotation
                (w, h), orient = georaster.size(path), 1
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with PILImage.open(path) as img:
                        w, h = img.size
                        try:
                            orient = img.getexif().get(0x0112, 1)
                        except Exception:
                            orient = 1
            if orient in (5, 6, 7, 8):
                w, h = h, w
            fields["width"], fields["height"] = int(w), int(h)
            if w * h > self.max_pixels:
                fields["status"] = "error"
                fields["error"] = (
                    f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the limit of "
                    f"{self.max_pixels / 1e6:.0f} MP (--max-pixels)"
                )
        except Exception as exc:
            fields["status"] = "error"
            reason = str(exc).replace(str(path), path.name)
            fields["error"] = f"not a readable image: {type(exc).__name__}: {reason}"
        return fields

    def _image_out(
        self, im: Image, counts: Any = None, work: Any = None, viewer: UserRef | None = None
    ) -> ImageOut:
        """``work``: the image's :class:`~.work_store.ImageWork` row (``None``: looked up;
        ``False``: left out)."""
        if work is None:
            work = self.work.get(im.id)
        fields = self._work_fields(work, self._names(), viewer) if work else {}
        return ImageOut(
            id=im.id,
            path=im.path,
            width=im.width,
            height=im.height,
            status=im.status,
            error=im.error,
            stage=im.stage,
            done=im.done,
            accepted=getattr(counts, "accepted", 0),
            pending=getattr(counts, "pending", 0),
            **fields,
        )

    def list_images(self, viewer: UserRef | None = None) -> ImageList:
        counts = self.store.counts()
        work = self.work.all()
        names = self._names()
        images = []
        frames = tuple(f"{p}/" for p in self._frame_folders())  # videos' frames (video.py)
        for im in self.store.images():
            if frames and im.path.startswith(frames):
                continue
            out = self._image_out(im, counts.get(im.id), work=False)
            w = work.get(im.id)
            if w is not None:
                out = out.model_copy(update=self._work_fields(w, names, viewer))
            images.append(out)
        cats = self.store.categories()
        return ImageList(
            images=images,
            total=len(images),
            done=sum(1 for i in images if i.done),
            annotated=sum(1 for i in images if i.accepted > 0),
            categories=cats,
        )

    def _image(self, image_id: int, *, usable: bool = False) -> Image:
        im = self.store.image(image_id)
        if im is None:
            raise NotFound(f"no image with id {image_id}")
        if usable and im.status != "ok":
            raise Unprocessable(f"image {im.path} cannot be annotated: {im.error}")
        return im

    def get_image(self, image_id: int, viewer: UserRef | None = None) -> ImageOut:
        im = self._image(image_id)
        return self._image_out(im, self.store.counts().get(image_id), viewer=viewer)

    def read_rgb(self, path: Path) -> np.ndarray:
        """An image file's RGB pixels under the pixel limit (TIFF / GeoTIFF through
        :mod:`segany.engine.georaster`)."""
        if georaster.is_raster(path):
            return georaster.read_rgb(path, max_pixels=self.max_pixels)
        return load_image(path, max_pixels=self.max_pixels)

    def display_image(self, image_id: int) -> tuple[Path | bytes, str | None]:
        """What the page shows: the file itself, or PNG bytes of a TIFF's pixels (browsers
        do not show TIFF); ``(file or bytes, media type or None)``."""
        path = self.image_file(image_id)
        if not georaster.is_raster(path):
            return path, None
        try:
            return georaster.png(self.read_rgb(path)), "image/png"
        except ImageError as exc:
            raise Unprocessable(f"image {path.name} cannot be read: {exc}") from None

    def image_file(self, image_id: int) -> Path:
        """The image's file on disk (checked to lie inside the images folder)."""
        im = self._image(image_id)
        if im.status == "missing":
            raise NotFound(f"image file {im.path} is gone from the images folder")
        path = safe_relpath(self.root, im.path)
        if not path.is_file():
            raise NotFound(f"image file {im.path} is gone from the images folder")
        return path

    def open_image(self, image_id: int, user: UserRef) -> OpenOut:
        """The annotator starts on an image: its embedding is computed in the background
        (if not cached), the next image of the queue is embedded after it, and the object
        timer starts. With a page session, the image's lease is taken (or, when another page
        holds it, ``lock.held`` is false and names the holder: the page is read-only)."""
        im = self._image(image_id)
        lock = self.lease(image_id, user) if user.session is not None else None
        ids = [i.id for i in self.store.images() if i.status == "ok"]
        prev_id = None
        all_ids = [i.id for i in self.store.images()]
        if image_id in all_ids:
            k = all_ids.index(image_id)
            prev_id = all_ids[k - 1] if k > 0 else None
        next_id = self.queue(user, after=image_id).next_id
        ready = True
        if im.status == "ok":
            ready = self.embedding_ready(im)
            if not ready:
                self.prefetch(im.id)
            later = [i for i in ids if i > image_id]
            if next_id is not None or later:
                self.prefetch(next_id if next_id is not None else later[0])
        self._start_timer(user, image_id)
        self._events.put(
            {
                "ts": time.time(),
                "kind": "open",
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
            }
        )
        return OpenOut(
            image=self._image_out(im, self.store.counts().get(image_id), viewer=user),
            embedding="ready" if ready else "computing",
            prev_id=prev_id,
            next_id=next_id,
            lock=lock,
        )

    def set_done(self, image_id: int, req: DoneRequest, user: UserRef) -> ImageOut:
        """Mark the image done (submitted for review) or not done."""
        self._image(image_id)
        self._check_writable(image_id, user)
        self.submit(image_id, req.done, user)
        im = self._image(image_id)
        self._events.put(
            {
                "ts": time.time(),
                "kind": "done" if req.done else "undone",
                "user_id": user.id,
                "image_id": image_id,
                "stage": im.stage,
            }
        )
        return self._image_out(im, self.store.counts().get(image_id), viewer=user)

    # -- embeddings --------------------------------------------------------------------------
    def _image_lock(self, image_id: int) -> threading.Lock:
        with self._locks_lock:
            lock = self._image_locks.get(image_id)
            if lock is None:
                lock = self._image_locks[image_id] = threading.Lock()
            return lock

    def _cache_key(self, content_key: str) -> str:
        return f"{self._key_prefix}-{content_key}"

    def embedding_ready(self, im: Image) -> bool:
        key = self._keys.get(im.id)
        if key is None and im.content_key:
            key = self._cache_key(im.content_key)
        return key is not None and self.cache.in_memory(key)

    def embedding(self, im: Image) -> ImageEmbedding:
        """The image's embedding, from memory, from disk, or computed now (once: concurrent
        callers for the same image wait for the first)."""
        key = self._keys.get(im.id)
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        with self._image_lock(im.id):
            for k in (self._keys.get(im.id), im.content_key and self._cache_key(im.content_key)):
                if k:
                    hit = self.cache.get(k)
                    if hit is not None:
                        self._keys[im.id] = k
                        return hit
            path = safe_relpath(self.root, im.path)
            try:
                rgb = self.read_rgb(path)
            except ImageError as exc:
                self.store.update_image(im.id, status="error", error=str(exc))
                raise Unprocessable(f"image {im.path} cannot be read: {exc}") from None
            content = image_key(rgb)
            key = self._cache_key(content)
            item = self.cache.get(key)
            if item is None:
                t0 = time.perf_counter()
                with torch_threads(self.embed_threads):
                    item = self._predictor().embed(rgb)
                self.cache.put(key, item)
                log.info("embedded %s in %.2fs", im.path, time.perf_counter() - t0)
            self._keys[im.id] = key
            if im.content_key != content:
                self.store.update_image(im.id, content_key=content)
            return item

    def prefetch(self, image_id: int) -> None:
        """Embed an image in the background thread (no-op when prefetch is off)."""
        if not self.prefetch_enabled or self._closed:
            return
        with self._locks_lock:
            if image_id in self._prefetch_pending:
                return
            self._prefetch_pending.add(image_id)
        self._prefetch_q.put(image_id)

    def _prefetch_loop(self) -> None:
        while True:
            image_id = self._prefetch_q.get()
            if image_id is None:
                return
            try:
                im = self.store.image(image_id)
                if im is not None and im.status == "ok" and not self.embedding_ready(im):
                    self.embedding(im)
            except Exception as exc:  # reported when the image is used
                log.warning("prefetch of image %s failed: %s", image_id, exc)
            finally:
                with self._locks_lock:
                    self._prefetch_pending.discard(image_id)

    def wait_prefetch(self, timeout: float = 60.0) -> None:
        """Block until the background embedding queue is empty (tests, benchmarks)."""
        end = time.time() + timeout
        while time.time() < end:
            with self._locks_lock:
                if not self._prefetch_pending:
                    return
            time.sleep(0.02)

    def _predictor(self) -> Predictor:
        p = getattr(self._tls, "predictor", None)
        if p is None:
            p = self._new_predictor()
            self._tls.predictor = p
        return p

    def _new_predictor(self) -> Predictor:
        if self._backend is None:
            return Predictor(self.model, cache=self.cache, model_id=self.model_id)
        return Predictor(
            self.model, cache=self.cache, model_id=self.model_id, backend=self._backend
        )
