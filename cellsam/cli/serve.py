"""``cellsam serve [FOLDER_OR_PROJECT]``: the browser labeling app (FastAPI + uvicorn).

A folder of images opens as a project (its images are used in place; ``*_masks`` / ``*_labels``
files next to them are imported as labels); a path that does not exist becomes a new, empty
project. Listens on 127.0.0.1 and, as Jupyter does, makes a random access token printed in the
address to open (``http://127.0.0.1:8000/?token=...``); ``--no-token`` turns it off, on a loopback
``--host`` only. Requests must name the bound address (or a loopback name) in their ``Host`` header,
and state-changing ones must come from the page's own origin (:mod:`cellsam.server.access`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``cellsam`` command."""
    p = subparsers.add_parser(
        "serve",
        help="label cells in the browser (segment, correct, export, fine-tune)",
        description="Start the labeling web app on a project folder or a folder of images.",
    )
    p.add_argument("project", nargs="?", default="cellsam_project", type=Path,
                   help="project folder, folder of images, or a new folder (default: ./cellsam_project)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 = every interface)")
    p.add_argument("--model", default=None,
                   help="weights name or checkpoint path (default: the project's fine-tuned model if it has one, "
                        "else the shipped model)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None,
                     help="access token (default: a random one, printed in the address to open)")
    tok.add_argument("--no-token", action="store_true",
                     help="no access token (only with a loopback --host; any local program can then use the API)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another name the browser may use for this server in its address (e.g. the machine's "
                        "host name); the bound address and the loopback names are always allowed; repeatable")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="default: auto")
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest accepted upload (default 1024 MB)")
    p.add_argument("--max-megapixels", type=float, default=200.0, help="largest accepted image (default 200 MP)")
    p.add_argument("--cache-mb", type=int, default=1024, help="memory for cached embeddings (default 1024 MB)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Start the server; returns when it stops (Ctrl+C)."""
    try:
        import uvicorn

        from cellsam.server.app import create_app
    except ImportError as e:
        log.error("cellsam serve needs the server extras: pip install 'cellsam[serve]' (%s)", e)
        return 1
    from cellsam.inference.runtime import resolve_device
    from cellsam.server.access import Access, new_token
    from cellsam.server.images import Limits
    from cellsam.server.storage import Project, ProjectError
    from cellsam.weights import load_model

    if args.port < 1 or args.port > 65535:
        log.error("--port must be in 1..65535, got %d", args.port)
        return 2
    try:
        access = Access.for_bind(args.host, token=None if args.no_token else (args.token or new_token()),
                                 extra_hosts=args.allow_host)
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        project = Project.open(args.project)
    except (ProjectError, OSError) as e:
        log.error("cannot open project %s: %s", args.project, e)
        return 1
    model_name = args.model
    if model_name is None:
        saved = project.get_meta("model")
        model_name = str(project.resolve(saved)) if saved and project.resolve(saved).is_file() else "default"
    try:
        model = load_model(model_name, device=resolve_device(args.device))
    except (KeyError, ValueError, OSError) as e:
        log.error("cannot load model %r: %s", model_name, e)
        return 1
    limits = Limits(max_bytes=args.max_upload_mb << 20, max_pixels=int(args.max_megapixels * 1e6))
    app = create_app(project, model, model_name=str(model_name), token=access.token, allowed_hosts=access.hosts,
                     limits=limits, cache_bytes=args.cache_mb << 20)
    print(f"cellsam serve: project {project.root} ({len(project.images())} image(s)), model {model_name}")
    print(f"open {address(args.host, args.port, access.token)}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def address(host: str, port: int, token: str | None) -> str:
    """The address to open: ``http://HOST:PORT/`` plus ``?token=...`` when there is one."""
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")
