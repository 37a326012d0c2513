"""The project's label set: the classes of the store's ``categories`` table (fixed ids in
order of first use, one class per spelling up to case and white space: see
:meth:`.store.Store.category_name`), each with a stable colour (from its id) and, for the
first nine, a hotkey of the page (Shift+1 ... Shift+9).

``segany annotate DIR --labels "person,dog,car"`` (or ``--labels-file FILE``) registers the
names in that order before the server starts; the page lists them with ``GET /api/labels``
and adds one with ``POST /api/labels``. A label is never renamed or renumbered, so its id
(the COCO category id and, minus one, the YOLO class index), colour and hotkey stay put.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError, field_validator

from .schemas import Category, _clean_category, _Model, _Request
from .store import Store

#: Label colours, by id (id 1 gets the first). Distinct hues that read well at 45 % opacity
#: over photographs; none is the white of pending objects.
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
    "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000",
    "#aaffc3", "#808000", "#ffd8b1", "#000075",
)  # fmt: skip
#: Labels with a hotkey (Shift+1 ... Shift+9 on the page).
HOTKEYS = 9
#: Most names one --labels option or file may hold.
MAX_LABELS = 1000


class LabelOut(_Model):
    id: int
    name: str
    color: str
    hotkey: str | None = None


class LabelRequest(_Request):
    name: Category

    _cat = field_validator("name")(_clean_category)


def color(label_id: int) -> str:
    """The colour of label ``label_id`` (``#rrggbb``): the same for the label forever."""
    return PALETTE[(label_id - 1) % len(PALETTE)]


def label_set(store: Store) -> list[LabelOut]:
    """Every label, by id; the first :data:`HOTKEYS` with their hotkey."""
    return [
        LabelOut(id=i, name=n, color=color(i), hotkey=f"Shift+{k + 1}" if k < HOTKEYS else None)
        for k, (i, n) in enumerate(store.category_table())
    ]


def add_label(store: Store, name: str) -> LabelOut:
    """Register ``name`` (an existing label in another spelling is that label); the label."""
    stored = store.category_name(name)
    return next(lab for lab in label_set(store) if lab.name == stored)


def parse_labels(text: str) -> list[str]:
    """``"person, dog,car"`` or one name per line -> the names, cleaned like categories, in
    order, each class once (case and white space do not count). Raises :class:`ValueError`
    naming the bad name."""
    from .migrate import category_key

    names: list[str] = []
    seen: set[str] = set()
    for part in text.replace("\r", "\n").replace("\n", ",").split(","):
        if not part.strip():
            continue
        try:
            name = LabelRequest(name=part).name
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ValueError(f"label {part.strip()[:60]!r}: {reason}") from None
        if category_key(name) not in seen:
            seen.add(category_key(name))
            names.append(name)
    if len(names) > MAX_LABELS:
        raise ValueError(f"{len(names)} labels: at most {MAX_LABELS}")
    return names


def read_labels_file(path: str | Path) -> list[str]:
    """The names of a labels file (one per line or comma-separated; UTF-8)."""
    p = Path(path).expanduser()
    try:
        if p.stat().st_size > 2**20:
            raise ValueError(f"labels file {path} is over 1 MiB")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the labels file {path}: {exc}") from None
    return parse_labels(text)


def register(store: Store, names: list[str]) -> list[LabelOut]:
    """Register ``names`` in order (known ones keep their ids); the whole label set."""
    for name in names:
        store.category_name(name)
    return label_set(store)


__all__ = [
    "HOTKEYS",
    "LabelOut",
    "LabelRequest",
    "add_label",
    "color",
    "label_set",
    "parse_labels",
    "read_labels_file",
    "register",
]
