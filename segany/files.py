"""Files: the one image discovery and the one atomic write.

Image discovery (:func:`find_images`): a folder is searched recursively in sorted order;
files and folders whose name starts with ``.`` are skipped (hidden, and the temporary
files of :func:`atomic_write`), symlinked folders are not followed, and a file counts as an
image by its suffix (:data:`IMAGE_SUFFIXES`, any case).

Atomic write (:func:`atomic_write`, :func:`atomic_file`, :func:`atomic_path` for tools
that write to a path themselves): the data goes to a hidden
temporary name beside the target (``.tmp-<pid>-<thread>-<name>``: writers in other
processes and threads never share one), is flushed and renamed over the
target with :func:`os.replace`, so a reader sees the old file or the whole new one, never
a part. With ``durable=True`` (the default) the file is fsynced before the rename and the
folder after it, so the new file also survives a power loss once the call returns.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: File suffixes read as images (Pillow decodes them all).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
#: Prefix of :func:`atomic_write`'s temporary files (a leftover one can be deleted).
TMP_PREFIX = ".tmp-"


def is_image_name(name: str | os.PathLike[str]) -> bool:
    """Whether a file name is a visible image file by its suffix."""
    return _visible_with(name, IMAGE_SUFFIXES)


def _visible_with(name: str | os.PathLike[str], suffixes: tuple[str, ...]) -> bool:
    p = Path(name)
    return p.suffix.lower() in suffixes and not p.name.startswith(".")


def find_images(
    source: str | os.PathLike[str],
    *,
    exclude: str | os.PathLike[str] | None = None,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> list[Path]:
    """The image files (``suffixes``: other file kinds, e.g. videos) of ``source`` as
    absolute paths: every image under a folder (see the
    module doc: recursive, sorted, hidden names skipped, symlinked folders not followed), or
    the file itself when it is an image. Paths under ``exclude`` (e.g. an output folder
    inside the input) are left out. Raises ``FileNotFoundError`` when ``source`` does not
    exist; a file that is not an image gives ``[]``."""
    src = Path(source).expanduser()
    if src.is_dir():
        found = []
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(os.path.abspath(os.path.join(root, n))) for n in sorted(files)
                      if _visible_with(n, suffixes)]  # fmt: skip
    elif src.is_file():
        found = [Path(os.path.abspath(src))] if _visible_with(src.name, suffixes) else []
    else:
        raise FileNotFoundError(f"no such file or folder: {source}")
    if exclude is not None:
        ex = os.path.abspath(exclude) + os.sep
        found = [f for f in found if not str(f).startswith(ex)]
    return found


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where not supported."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`atomic_file` writes before renaming it to ``path``."""
    p = Path(path)
    tid = threading.get_native_id()
    return p.with_name(f"{TMP_PREFIX}{os.getpid()}-{tid}-{p.name}")  # keeps the suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """``with atomic_path(path) as tmp:`` have a tool write the file ``tmp`` (for writers
    that take a path, e.g. ``torch.onnx.export``); on a normal exit it replaces ``path``
    (fsynced first with ``durable``), on an exception it is removed. The parent folder is
    created if needed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "wb", *, durable: bool = True
) -> Iterator[IO[Any]]:
    """``with atomic_file(path) as f:`` write to ``f``; on a normal exit the file replaces
    ``path`` (see the module doc), on an exception the temporary file is removed and
    ``path`` is untouched. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text). The parent
    folder is created if needed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path, durable=False) as tmp:
        with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
    if durable:
        fsync_dir(Path(path).parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, durable: bool = True) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns ``path``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, "wb", durable=durable) as f:
        f.write(raw)
    return Path(path)


__all__ = [
    "IMAGE_SUFFIXES",
    "TMP_PREFIX",
    "atomic_file",
    "atomic_path",
    "atomic_write",
    "find_images",
    "fsync_dir",
    "is_image_name",
    "temporary_name",
]
