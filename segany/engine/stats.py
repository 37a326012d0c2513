"""The measurements the paper reports for its data engine, per annotator and per stage:
seconds per accepted mask, clicks (prompts) per mask, masks per image; and for stage 2 how
many pre-filled masks were accepted, fixed or rejected.

Definitions (see :mod:`.service`): an object's *seconds* run from the moment its annotator
opened the image, or accepted / rejected the previous object on it, to its accept, with
every pause between two actions counted as at most
:data:`~.predictions.IDLE_CAP` seconds (idle time is not annotation time); its *clicks* are
the prompts sent in that time (a box drag is one). Pre-filled masks accepted as they are
have 0 clicks. Imported objects are counted but have no timing. Pre-filled masks deleted
later stay in the stage-2 figures: in ``proposed`` and in ``deleted``.

Undo (:mod:`.edits`): a restored object is no longer deleted (its ``restore`` event offsets
the ``delete``); a fix whose accept was undone (the fix deleted, the pending object set back
to pending: a ``status`` event marked ``unfix``) no longer counts as fixed, and counts again
when the undo is redone (the fix's ``restore``).

Videos are counted apart (``videos``, :class:`VideoStats`): objects (tracks) *proposed*
(every object made, also those deleted since: their ``track_delete`` events), *accepted*,
*pending* and *deleted*; per annotator (who made the object) and overall, the seconds per
accepted object (its ``seconds``: the annotator's active time on the video, pauses capped
at ``IDLE_CAP`` as for images, summed over the writes on that object: made, key frames,
renamed, propagated, accepted; :mod:`.video_work`), clicks per accepted object (prompts on
the video's frames), key frames per accepted object.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from pydantic import BaseModel

from .store import Store, Track
from .video_store import VideoStore


class StatRow(BaseModel):
    annotator: str
    stage: int
    masks: int
    images: int
    masks_per_image: float
    seconds_per_mask: float | None
    median_seconds: float | None
    clicks_per_mask: float | None
    manual: int
    prefill: int


class PrefillStats(BaseModel):
    proposed: int
    accepted: int
    rejected: int
    fixed: int
    pending: int
    deleted: int
    acceptance_rate: float | None


class VideoStatRow(BaseModel):
    annotator: str
    #: objects made (tracks now), accepted among them, videos they are on
    objects: int
    accepted: int
    videos: int
    #: over the accepted objects with a time (made since schema 7)
    seconds_per_object: float | None
    median_seconds: float | None
    clicks_per_object: float | None
    key_frames_per_object: float | None


class VideoStats(BaseModel):
    videos_total: int
    videos_annotated: int
    proposed: int
    accepted: int
    pending: int
    deleted: int
    rows: list[VideoStatRow]
    all: VideoStatRow


class StatsOut(BaseModel):
    rows: list[StatRow]
    stages: list[StatRow]
    prefill: PrefillStats
    images_total: int
    images_done: int
    images_annotated: int
    imported: int
    categories: dict[str, int]
    clicks_total: int
    undo_total: int
    #: the videos' objects (tracks), apart from the images' figures
    videos: VideoStats


def _row(annotator: str, stage: int, items: list[Any]) -> StatRow:
    secs = [a.seconds for a in items if a.seconds is not None]
    clicks = [a.clicks for a in items if a.source in ("manual", "prefill")]
    images = len({a.image_id for a in items})
    return StatRow(
        annotator=annotator,
        stage=stage,
        masks=len(items),
        images=images,
        masks_per_image=round(len(items) / images, 2) if images else 0.0,
        seconds_per_mask=round(statistics.fmean(secs), 2) if secs else None,
        median_seconds=round(statistics.median(secs), 2) if secs else None,
        clicks_per_mask=round(statistics.fmean(clicks), 2) if clicks else None,
        manual=sum(1 for a in items if a.source == "manual"),
        prefill=sum(1 for a in items if a.source == "prefill"),
    )


def _deleted_prefill(data: dict[str, Any] | None) -> bool:
    """A delete event of a pre-filled mask (pending, rejected or accepted before)."""
    return (data or {}).get("source") == "prefill"


def _video_row(annotator: str, tracks: list[Track], keys: dict[int, int]) -> VideoStatRow:
    acc = [t for t in tracks if t.status == "accepted"]
    secs = [t.seconds for t in acc if t.seconds is not None]
    return VideoStatRow(
        annotator=annotator,
        objects=len(tracks),
        accepted=len(acc),
        videos=len({t.video_id for t in tracks}),
        seconds_per_object=round(statistics.fmean(secs), 2) if secs else None,
        median_seconds=round(statistics.median(secs), 2) if secs else None,
        clicks_per_object=round(statistics.fmean(t.clicks for t in acc), 2) if acc else None,
        key_frames_per_object=(
            round(statistics.fmean(keys.get(t.id, 0) for t in acc), 2) if acc else None
        ),
    )


def video_stats(store: Store, names: dict[int, str], deleted: int) -> VideoStats:
    """The videos' section of the stats (``deleted``: the ``track_delete`` events)."""
    vs = VideoStore(store)
    tracks = vs.tracks()
    keys = {tid: len(k) for tid, (k, _) in vs.frame_counts([t.id for t in tracks]).items()}
    per_user: dict[str, list[Track]] = defaultdict(list)
    for t in tracks:
        per_user[names.get(t.user_id, "?") if t.user_id is not None else "?"].append(t)
    accepted = sum(1 for t in tracks if t.status == "accepted")
    return VideoStats(
        videos_total=sum(1 for v in vs.videos() if v.status == "ok"),
        videos_annotated=len({t.video_id for t in tracks if t.status == "accepted"}),
        proposed=len(tracks) + deleted,
        accepted=accepted,
        pending=len(tracks) - accepted,
        deleted=deleted,
        rows=[_video_row(who, ts, keys) for who, ts in sorted(per_user.items())],
        all=_video_row("all", tracks, keys),
    )


def compute(store: Store) -> StatsOut:
    names = {u.id: u.name for u in store.users()}
    anns = store.annotations(light=True)
    accepted = [a for a in anns if a.status == "accepted" and a.source != "import"]
    per_user: dict[tuple[str, int], list[Any]] = defaultdict(list)
    per_stage: dict[int, list[Any]] = defaultdict(list)
    for a in accepted:
        who = names.get(a.user_id, "?") if a.user_id is not None else "?"
        per_user[(who, a.stage)].append(a)
        per_stage[a.stage].append(a)
    rows = [_row(who, stage, items) for (who, stage), items in sorted(per_user.items())]
    stages = [_row("all", stage, items) for stage, items in sorted(per_stage.items())]

    pre = [a for a in anns if a.source == "prefill"]
    events = store.events(
        kinds=["accept", "predict", "undo", "delete", "restore", "status", "track_delete"]
    )
    fixed = sum(
        1 for e in events if e.kind in ("accept", "restore") and (e.data or {}).get("replaces")
    ) - sum(1 for e in events if e.kind == "status" and (e.data or {}).get("unfix"))
    deleted = sum(1 for e in events if e.kind == "delete" and _deleted_prefill(e.data)) - sum(
        1 for e in events if e.kind == "restore" and _deleted_prefill(e.data)
    )
    n_acc = sum(1 for a in pre if a.status == "accepted")
    n_rej = sum(1 for a in pre if a.status == "rejected")
    decided = n_acc + n_rej + deleted
    prefill = PrefillStats(
        proposed=len(pre) + deleted,
        accepted=n_acc,
        rejected=n_rej - fixed,
        fixed=fixed,
        pending=sum(1 for a in pre if a.status == "pending"),
        deleted=deleted,
        acceptance_rate=round(n_acc / decided, 3) if decided else None,
    )
    images = store.images()
    cats: dict[str, int] = defaultdict(int)
    for a in anns:
        if a.status == "accepted":
            cats[a.category] += 1
    return StatsOut(
        rows=rows,
        stages=stages,
        prefill=prefill,
        images_total=len(images),
        images_done=sum(1 for im in images if im.done),
        images_annotated=len({a.image_id for a in anns if a.status == "accepted"}),
        imported=sum(1 for a in anns if a.source == "import"),
        categories=dict(sorted(cats.items())),
        clicks_total=sum(1 for e in events if e.kind == "predict"),
        undo_total=sum(1 for e in events if e.kind == "undo"),
        videos=video_stats(store, names, sum(1 for e in events if e.kind == "track_delete")),
    )
