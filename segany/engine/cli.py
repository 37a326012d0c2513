"""``segany annotate``: the web annotator (data engine stages 1 and 2).

segany annotate IMAGES_DIR [--db URL] [--model NAME|PATH] [--detector NAME|FOLDER]
                [--labels "person,dog,car" | --labels-file FILE] [--host H] [--port P]
segany annotate IMAGES_DIR --add-user NAME [--admin]     # prints a new token, then exits
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..weights import DEFAULT_WEIGHTS

    p = sub.add_parser(
        "annotate",
        help="web annotator with the model in the loop (data engine stages 1 and 2)",
        description="Serve a web UI and JSON API to annotate the images of a folder with SAM "
        "in the loop. API docs at http://HOST:PORT/docs.",
    )
    p.add_argument(
        "images_dir", metavar="IMAGES_DIR", help="folder of images (searched recursively)"
    )
    p.add_argument(
        "--db",
        help="database URL or SQLite file: sqlite:///path.db, postgresql://user:pw@host/db "
        "(default: IMAGES_DIR/.segany/annotations.db)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_WEIGHTS,
        help=f"catalogue name or checkpoint path (default: {DEFAULT_WEIGHTS})",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch", "onnx", "onnx-int8"),
        help="inference backend (default auto: the faster exact one here, timed once)",
    )
    p.add_argument(
        "--detector",
        metavar="NAME|FOLDER",
        help="text detector for stage-2 pre-fills by class names (grounding-dino-tiny, "
        "grounding-dino-base, owlv2, a hub id or a folder; loaded on the first such "
        "pre-fill; needs: pip install 'segany[text]'). Default: none",
    )
    labels = p.add_mutually_exclusive_group()
    labels.add_argument(
        "--labels",
        metavar="NAMES",
        help='the project\'s label set, comma-separated (e.g. "person,dog,car"): registered in '
        "this order (ids, colours and the hotkeys Shift+1..9 follow it; labels already in the "
        "database keep theirs); the page can add more",
    )
    labels.add_argument(
        "--labels-file", metavar="FILE", help="like --labels: one name per line (UTF-8)"
    )
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        default=[],
        help="also answer to this Host name (repeatable; e.g. the machine's LAN name). "
        "Requests under any other name than localhost and --host are refused (DNS "
        "rebinding); '*' turns the check off",
    )
    auth = p.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth",
        dest="auth",
        action="store_const",
        const=True,
        help="require tokens (default when --host is not localhost)",
    )
    auth.add_argument(
        "--no-auth",
        dest="auth",
        action="store_const",
        const=False,
        help="no tokens, even when --host is not localhost (anyone who reaches the port "
        "can annotate)",
    )
    p.add_argument("--cache-dir", help="embedding cache (default: ~/.cache/segany/embeddings)")
    p.add_argument(
        "--memory-items", type=int, default=16, help="embeddings kept in memory (default: 16)"
    )
    p.add_argument(
        "--no-prefetch", action="store_true", help="do not embed the next image in the background"
    )
    p.add_argument("--max-pixels", type=int, help="refuse larger images (default: 50e6)")
    p.add_argument(
        "--web-decoder",
        action="store_true",
        help="let the page decode clicks itself with onnxruntime-web (MobileSAM / SAM 1; "
        "off by default: on a shared 2-core server it measured slower than server decoding, "
        "see docs/annotate.md)",
    )
    p.add_argument(
        "--web-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="the embedding sent to the page (default: float16, half the bytes)",
    )
    p.add_argument(
        "--no-isolation",
        action="store_true",
        help="no COOP/COEP headers: the page is not cross-origin isolated and its decoder "
        "runs on one thread",
    )
    p.add_argument(
        "--add-user",
        metavar="NAME",
        help="create the annotator NAME (or give it a new token), print the token and exit",
    )
    p.add_argument("--admin", action="store_true", help="with --add-user: may create users")
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="an image or video stays locked to the page that opened it this long after the page "
        "stops renewing it (closed, offline; default: 60)",
    )
    p.add_argument(
        "--assign",
        metavar="NAMES",
        help="at start, deal the images nobody is assigned to among these users in turn "
        "(comma-separated, e.g. alice,bob; created without a token if new): each sees only "
        "their own and unassigned images in their queue",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder of frames inside IMAGES_DIR (a path relative to it, or from here) to "
        "annotate as a video (repeatable; video files are found by themselves); the page's "
        "Add does the same",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server log level (default: info)",
    )
    p.set_defaults(func=run, auth=None)


def _labels(args: argparse.Namespace) -> list[str]:
    from .labels import parse_labels, read_labels_file

    if args.labels_file:
        return read_labels_file(args.labels_file)
    return parse_labels(args.labels) if args.labels else []


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .server import build_service, default_db, is_local, serve
    from .store import USER_NAME_PATTERN, Store, StoreError, redact

    root = Path(args.images_dir)
    if not root.is_dir():
        print(f"segany: error: images folder not found: {args.images_dir}", file=sys.stderr)
        return 2
    db = args.db or default_db(root)
    assignees = [n.strip() for n in (args.assign or "").split(",") if n.strip()]
    if not 1 <= args.lease_seconds <= 86400:
        print("segany: error: --lease-seconds must be between 1 and 86400", file=sys.stderr)
        return 2
    bad = [n for n in assignees if not re.fullmatch(USER_NAME_PATTERN, n)]
    if bad or (args.assign is not None and not assignees):
        print(
            f"segany: error: --assign: invalid user name(s) {bad or [args.assign]}: use 1-64 "
            "letters, digits, '_', '.', '@' or '-', separated by commas",
            file=sys.stderr,
        )
        return 2
    try:
        label_names = _labels(args)
    except ValueError as exc:
        print(f"segany: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.add_user is not None:
            store = Store(db)
            user, token = store.issue_token(args.add_user, is_admin=args.admin)
            store.close()
            print(json.dumps({"user": user.name, "admin": user.is_admin, "token": token}))
            return 0
        svc = build_service(
            root,
            db=db,
            model=args.model,
            backend=args.backend,
            auth=args.auth,
            host=args.host,
            cache_dir=args.cache_dir,
            prefetch=not args.no_prefetch,
            max_pixels=args.max_pixels,
            memory_items=args.memory_items,
            detector=args.detector,
            web_decoder=args.web_decoder,
            web_dtype=args.web_dtype,
            labels=label_names,
            lease_seconds=args.lease_seconds,
        )
    except (StoreError, ValueError) as exc:
        hint = "" if args.db else " (use --db to keep the database elsewhere)"
        print(f"segany: error: {exc}{hint}", file=sys.stderr)
        return 2
    for folder in args.video:
        from .schemas import ServiceError, VideoRequest

        try:
            inside = svc.root / folder  # relative to IMAGES_DIR, or to here
            full = inside if inside.exists() else Path(folder)
            rel = full.resolve().relative_to(svc.root).as_posix()
            svc.register_video(VideoRequest(path=rel))
        except (ValueError, ServiceError) as exc:
            msg = getattr(exc, "message", None) or f"{folder} is not inside {args.images_dir}"
            print(f"segany: error: --video {folder}: {msg}", file=sys.stderr)
            svc.close()
            return 2
    if assignees:
        users = [svc.store.ensure_user(n) for n in assignees]
        given = svc.work.deal([u.id for u in users])
        print(
            "segany annotate: assigned "
            + ", ".join(f"{u.name}: {given[u.id]}" for u in users)
            + " image(s)",
            file=sys.stderr,
        )
    token = svc.ensure_admin_token()
    if token is not None:
        print(f"segany annotate: admin token for user 'admin': {token}", file=sys.stderr)
    images = svc.list_images()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"segany annotate: http://{host}:{args.port}/  ({images.total} images, "
        f"{len(svc.list_videos().videos)} videos, "
        f"model {svc.model_name}, "
        + (f"detector {svc.detector_name}, " if svc.detector_name else "")
        + f"db {redact(svc.store.url)}, "
        + f"decoder {'in the page' if svc.web_decoder_info()['available'] else 'on the server'}, "
        f"auth {'on' if svc.auth else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    if not svc.auth and not is_local(args.host):
        print(
            "segany annotate: warning: auth is off and the server listens beyond this machine",
            file=sys.stderr,
        )
    serve(
        svc,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        allow_hosts=args.allow_host,
        isolation=not args.no_isolation,
    )
    return 0
