"""Routes: the project, its images (upload, channel roles, display tiles, labels) and exports."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from cellsam.server import export
from cellsam.server.context import ServerContext, edit_response
from cellsam.server.images import png_bytes, read_upload
from cellsam.server.schemas import EditResponse, ExportInfo, ImageInfo, ImageUpdate, ProjectInfo

MAX_TILE = 4096


def _read_limited(file: UploadFile, max_bytes: int) -> bytes:
    from cellsam.server.images import UploadError

    content = file.file.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise UploadError(f"{file.filename}: over the upload limit of {max_bytes} bytes", 413)
    return content


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["images"])
    project = ctx.project

    @r.get("/project", response_model=ProjectInfo)
    def get_project() -> ProjectInfo:
        """The project folder, the model in use and every image."""
        return ProjectInfo(root=str(project.root), name=project.root.name, model=ctx.session.name,
                           tile_size=ctx.session.tile_size, images=[ctx.info(rec) for rec in project.images()])

    @r.get("/images", response_model=list[ImageInfo])
    def list_images() -> list[ImageInfo]:
        return [ctx.info(rec) for rec in project.images()]

    @r.post("/images", response_model=ImageInfo, status_code=201)
    def upload_image(
        file: Annotated[UploadFile, File(description="TIFF, PNG or JPEG")],
        channel_axis: Annotated[int | None, Form(description="channel axis of a 3-D image whose file does not say")]
        = None,
    ) -> ImageInfo:
        """Add an image to the project (content checked, size limited). Its labels start empty."""
        name = file.filename or "image"
        content = _read_limited(file, ctx.limits.max_bytes)
        data, axis = read_upload(content, name, limits=ctx.limits, channel_axis=channel_axis)
        rec = project.add_image(name, data, channel_axis=axis, content=content)
        return ctx.info(rec)

    @r.get("/images/{image_id}", response_model=ImageInfo)
    def get_image(image_id: int) -> ImageInfo:
        return ctx.info(ctx.record(image_id))

    @r.patch("/images/{image_id}", response_model=ImageInfo)
    def update_image(image_id: int, body: ImageUpdate) -> ImageInfo:
        """Change the channel roles (nuclear / whole-cell channel index, null = unused) or the
        reviewed flag. New roles drop the image's cached embeddings."""
        fields = body.model_dump(exclude_unset=True)
        if fields.get("reviewed", True) is None:
            fields.pop("reviewed")
        rec = project.update_image(image_id, **fields)
        if "nuclear" in fields or "wholecell" in fields:
            ctx.session.forget(image_id)
        return ctx.info(rec)

    @r.delete("/images/{image_id}", status_code=204)
    def delete_image(image_id: int) -> Response:
        project.delete_image(image_id)
        ctx.session.forget(image_id)
        return Response(status_code=204)

    @r.get("/images/{image_id}/display.png", response_class=Response)
    def display(
        image_id: int,
        x0: int = Query(0, ge=0), y0: int = Query(0, ge=0),
        w: int = Query(MAX_TILE, ge=1, le=MAX_TILE), h: int = Query(MAX_TILE, ge=1, le=MAX_TILE),
    ) -> Response:
        """A window of the image as the page shows it (8-bit RGB PNG), for tiled display."""
        rec = ctx.record(image_id)
        if x0 >= rec.width or y0 >= rec.height:
            raise ValueError(f"window origin ({x0}, {y0}) is outside the {rec.width}x{rec.height} image")
        rgb = ctx.display(rec)[y0 : y0 + h, x0 : x0 + w]
        return Response(png_bytes(rgb), media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    @r.get("/images/{image_id}/labels", response_class=Response)
    def get_labels(image_id: int) -> Response:
        """The current labels: raw little-endian uint32, row-major; shape and version in the headers
        ``X-Height``, ``X-Width``, ``X-Labels-Version``."""
        version, labels = project.labels(image_id)
        return Response(
            np.ascontiguousarray(labels, dtype="<u4").tobytes(), media_type="application/octet-stream",
            headers={"X-Height": str(labels.shape[0]), "X-Width": str(labels.shape[1]),
                     "X-Labels-Version": str(version), "Cache-Control": "no-store"},
        )

    @r.post("/images/{image_id}/labels", response_model=EditResponse)
    def import_labels(
        image_id: int, file: Annotated[UploadFile, File(description="label image, TIFF or PNG")]
    ) -> EditResponse:
        """Replace the labels by an existing label image (to correct it); undoable."""
        rec = ctx.record(image_id)
        content = _read_limited(file, ctx.limits.max_bytes)
        data, _ = read_upload(content, file.filename or "labels", limits=ctx.limits, channel_axis=0)
        if data.shape != (rec.height, rec.width):
            raise ValueError(f"label image of shape {data.shape} does not match the image ({rec.height}, {rec.width})")
        return edit_response(project.set_labels(image_id, data, action="import labels"))

    # ------------------------------------------------------------------ exports
    @r.get("/images/{image_id}/export/labels.tif", response_class=Response, tags=["export"])
    def export_tiff(image_id: int) -> Response:
        rec = ctx.record(image_id)
        data = export.label_tiff_bytes(export.export_labels(project, image_id))
        return _download(data, "image/tiff", f"{export.stem(rec)}_labels.tif")

    @r.get("/images/{image_id}/export/labels.png", response_class=Response, tags=["export"])
    def export_png(image_id: int) -> Response:
        rec = ctx.record(image_id)
        data = export.label_png_bytes(export.export_labels(project, image_id))
        return _download(data, "image/png", f"{export.stem(rec)}_labels.png")

    @r.get("/export/coco.json", response_class=Response, tags=["export"])
    def export_coco(reviewed_only: bool = False) -> Response:
        """COCO instances (RLE masks) of every image (or the reviewed ones)."""
        recs = export.select(project, reviewed_only=reviewed_only)
        return _download(export.coco_bytes(project, recs), "application/json", f"{project.root.name}_coco.json")

    @r.get("/export/pairs.zip", response_class=Response, tags=["export"])
    def export_pairs_zip(reviewed_only: bool = False) -> Response:
        """A zip of the training-ready ``*_img.tif`` / ``*_masks.tif`` folder."""
        folder = _write_pairs(reviewed_only)
        return _download(export.zip_folder(project.resolve(folder.folder)), "application/zip",
                         f"{project.root.name}_pairs.zip")

    @r.post("/export/pairs", response_model=ExportInfo, tags=["export"])
    def export_pairs(reviewed_only: bool = False) -> ExportInfo:
        """Write ``exports/pairs-<time>/`` in the project folder (input of ``cellsam prepare``)."""
        return _write_pairs(reviewed_only)

    def _write_pairs(reviewed_only: bool) -> ExportInfo:
        recs = export.select(project, reviewed_only=reviewed_only)
        if not recs:
            raise ValueError("no images to export" + (" (none is marked reviewed)" if reviewed_only else ""))
        rel = f"exports/pairs-{time.strftime('%Y%m%d-%H%M%S')}"
        files = export.write_pairs(project, project.resolve(rel), recs)
        return ExportInfo(folder=rel, files=sorted(f.name for f in project.resolve(rel).iterdir()) if files else [])

    return r


def _download(data: bytes, media_type: str, filename: str) -> Response:
    return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
