"""``segany serve``: one HTTP server answering the annotation tools' own model contracts.

segany serve [--model NAME|PATH] [--host H] [--port P] [--token TOKEN]... [--detector NAME]
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..weights import DEFAULT_WEIGHTS

    p = sub.add_parser(
        "serve",
        help="model backend for Label Studio, CVAT and X-AnyLabeling (one model, one cache)",
        description="Serve the model behind the annotation tools' own contracts: Label "
        "Studio's ML backend at http://HOST:PORT/labelstudio, CVAT's interactor at "
        "http://HOST:PORT/cvat, X-AnyLabeling's remote server at "
        "http://HOST:PORT/xanylabeling. GET /health answers without a token.",
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
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="require this token (repeatable; also $SEGANY_SERVE_TOKEN). Accepted as "
        "'Authorization: Bearer TOKEN', 'Authorization: Token TOKEN', basic auth with "
        "TOKEN as password (Label Studio), or 'Token: TOKEN' (X-AnyLabeling). Default: none",
    )
    p.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        default=[],
        help="also answer to this Host name (repeatable; e.g. host.docker.internal when "
        "the tool runs in Docker, or the machine's LAN name); '*' turns the check off",
    )
    p.add_argument(
        "--detector",
        metavar="NAME|FOLDER",
        help="text detector for text prompts (grounding-dino-tiny, owlv2, a hub id or a "
        "folder; loaded on the first text prompt; needs: pip install 'segany[text]'). "
        "Default: none (text prompts are refused)",
    )
    p.add_argument("--cache-dir", help="embedding cache (default: ~/.cache/segany/embeddings)")
    p.add_argument(
        "--memory-items", type=int, default=16, help="embeddings kept in memory (default: 16)"
    )
    p.add_argument("--max-pixels", type=int, help="refuse larger images (default: 50e6)")
    p.add_argument(
        "--max-body-mb", type=float, default=64, help="request body limit in MiB (default: 64)"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server log level (default: info)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.guards import MiB
    from .app import serve
    from .core import build_session

    tokens = list(args.token)
    if os.environ.get("SEGANY_SERVE_TOKEN"):
        tokens.append(os.environ["SEGANY_SERVE_TOKEN"])
    session = build_session(
        args.model,
        backend=args.backend,
        cache_dir=args.cache_dir,
        memory_items=args.memory_items,
        max_pixels=args.max_pixels,
        detector=args.detector,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    print(
        f"segany serve: {base}/health  (model {session.name}, backend {session.backend_name}, "
        + (f"detector {session.detector_name}, " if session.detector_name else "")
        + f"token {'on' if tokens else 'off'})\n"
        f"  Label Studio ML backend URL: {base}/labelstudio\n"
        f"  CVAT interactor:             {base}/cvat\n"
        f"  X-AnyLabeling server URL:    {base}/xanylabeling",
        file=sys.stderr,
        flush=True,
    )
    if not tokens and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "segany serve: warning: no --token and the server listens beyond this machine",
            file=sys.stderr,
        )
    serve(
        session,
        host=args.host,
        port=args.port,
        tokens=tokens,
        allow_hosts=args.allow_host,
        max_body=int(args.max_body_mb * MiB),
        log_level=args.log_level,
    )
    return 0
