"""The FastAPI application: :func:`create_app` wires a project, a model and the routes.

Routes live in :mod:`.routes_images` (project, images, uploads, display, exports),
:mod:`.routes_edit` (model prompts and label edits) and :mod:`.routes_jobs` (fine-tuning).
Errors are JSON ``{"error": "..."}`` with a 4xx status; an unexpected error is logged and answered
with a 500 that holds no stack trace. Access rules (token, allowed ``Host`` names, same-origin
state-changing requests) are in :mod:`.access`. Every answer carries ``Server-Timing: app;dur=<ms>``, the
time the server spent on it (``cellsam bench --prompts`` reads it). The interactive API docs (``/docs``,
``/redoc``) are off: their scripts come from a CDN and the page was blank offline; the schema is at
``/openapi.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cellsam.server.access import Access, check_request, cookie_name, token_matches
from cellsam.server.context import ServerContext
from cellsam.server.finetune import FinetuneManager
from cellsam.server.images import Limits, UploadError
from cellsam.server.session import CACHE_BYTES, CACHE_ITEMS, ModelSession
from cellsam.server.storage import NotFoundError, Project, ProjectError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


def create_app(
    project: Project | str | Path,
    model: Any = "default",
    *,
    model_name: str | None = None,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
    limits: Limits | None = None,
    cache_items: int = CACHE_ITEMS,
    cache_bytes: int = CACHE_BYTES,
    finetune_accelerator: str = "auto",
) -> FastAPI:
    """Build the app.

    Args:
        project: an open :class:`Project`, or a path for :meth:`Project.open` (folder of images,
            existing project, or a new folder).
        model: a CellSAM model, or a weights name / checkpoint path for :func:`cellsam.weights.load_model`.
        token: if given, required on every API request (``cellsam serve`` always makes one unless
            ``--no-token``).
        allowed_hosts: names the ``Host`` header may carry (``cellsam serve``: the bound address and
            the loopback names); None accepts any name (a caller that runs the app itself chooses).
        limits: upload limits. cache_items / cache_bytes: bounds of the embedding cache.
        finetune_accelerator: Lightning accelerator of fine-tuning jobs ("auto", "cpu", "gpu").
    """
    if not isinstance(project, Project):
        project = Project.open(project)
    if isinstance(model, (str, Path)):
        from cellsam.weights import load_model

        model_name = model_name or str(model)
        model = load_model(model)
    hosts = None if allowed_hosts is None else frozenset(h.strip("[]").lower() for h in allowed_hosts)
    access = Access(token=token or None, hosts=hosts)
    session = ModelSession(model, name=model_name or type(model).__name__, cache_items=cache_items,
                           cache_bytes=cache_bytes)
    ctx = ServerContext(project=project, session=session, finetune=FinetuneManager(project, session),
                        limits=limits or Limits(), access=access, finetune_accelerator=finetune_accelerator)

    app = FastAPI(
        title="cellsam labeling server",
        description="Segment cells with CellSAM, correct them, export the labels, fine-tune the model.",
        version=_version(),
        responses={400: {"model": _error_model()}, 404: {"model": _error_model()}},
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.add_middleware(GZipMiddleware, minimum_size=2048)
    _add_guards(app, ctx)
    _add_timing(app)
    _add_error_handlers(app)

    from cellsam.server import routes_edit, routes_images, routes_jobs

    app.include_router(routes_images.router(ctx))
    app.include_router(routes_edit.router(ctx))
    app.include_router(routes_jobs.router(ctx))

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        resp = FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
        given = request.query_params.get("token")
        if token_matches(given, ctx.access):
            resp.set_cookie(cookie_name(request.url.port), str(given), httponly=True, samesite="strict")
        return resp

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # no icon; a 404 here was logged on every page load

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _version() -> str:
    from cellsam import __version__

    return str(__version__)


def _error_model() -> Any:
    from cellsam.server.schemas import ErrorResponse

    return ErrorResponse


def _add_guards(app: FastAPI, ctx: ServerContext) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        refused = check_request(ctx.access, method=request.method, path=request.url.path,
                                headers=request.headers, cookies=request.cookies, port=request.url.port)
        if refused is not None:
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > ctx.limits.max_bytes + (1 << 20):
            return JSONResponse({"error": f"request of {length} bytes is over the upload limit of "
                                 f"{ctx.limits.max_bytes}"}, status_code=413)
        return await call_next(request)


def _add_timing(app: FastAPI) -> None:
    @app.middleware("http")
    async def server_timing(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        resp = await call_next(request)
        resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1e3:.2f}"
        return resp


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(ProjectError)
    async def conflict(request: Request, exc: ProjectError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Every error body is ``{"error": ...}``, the key the page reads (FastAPI's own is ``detail``)."""
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal server error ({type(exc).__name__}); see the server log"},
                            status_code=500)
