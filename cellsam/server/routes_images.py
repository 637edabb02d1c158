"""Routes: the project, its images (upload, channel roles, display tiles, labels) and exports."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from cellsam.server import export
from cellsam.server.context import ServerContext, edit_response
from cellsam.server.images import png_bytes, read_upload, stored_name
from cellsam.server.schemas import EditResponse, ExportInfo, ImageInfo, ImageUpdate, ProjectInfo
from cellsam.server.storage import ImageRecord

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
        """Add an image to the project. It is recognised by its content (not its name), size limited and
        decoded before it is accepted (415 if it is not a readable TIFF, PNG or JPEG). Its labels start empty."""
        name = file.filename or "image"
        content = _read_limited(file, ctx.limits.max_bytes)
        up = read_upload(content, name, limits=ctx.limits, channel_axis=channel_axis)
        rec = project.add_image(name, up.data, channel_axis=up.channel_axis, content=content,
                                file_name=stored_name(name, up.suffix))
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
        """Remove an image, its labels and its history from the project. A file uploaded through the
        page is deleted; an image used in place (a folder opened as a project) stays on disk."""
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
        data = read_upload(content, file.filename or "labels", limits=ctx.limits, channel_axis=0).data
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
        """A zip of the training-ready ``*_img.tif`` / ``*_masks.tif`` folder (built in a temporary folder:
        nothing is written into the project)."""
        recs = _pairs_records(reviewed_only)
        with tempfile.TemporaryDirectory(prefix="cellsam-pairs-") as tmp:
            folder = Path(tmp) / f"{project.root.name}_pairs"
            export.write_pairs(project, folder, recs)
            data = export.zip_folder(folder)
        return _download(data, "application/zip", f"{project.root.name}_pairs.zip")

    @r.post("/export/pairs", response_model=ExportInfo, tags=["export"])
    def export_pairs(reviewed_only: bool = False) -> ExportInfo:
        """Write ``exports/pairs-<time>/`` in the project folder (input of ``cellsam prepare``). It is
        written under a temporary name and renamed when complete: a failed export leaves nothing."""
        folder = export.write_pairs_folder(project, _pairs_records(reviewed_only))
        rel = folder.relative_to(project.root).as_posix()
        return ExportInfo(folder=rel, files=sorted(f.name for f in folder.iterdir()))

    def _pairs_records(reviewed_only: bool) -> list[ImageRecord]:
        recs = export.select(project, reviewed_only=reviewed_only)
        if not recs:
            raise ValueError("no images to export" + (" (none is marked reviewed)" if reviewed_only else ""))
        return recs

    return r


def _download(data: bytes, media_type: str, filename: str) -> Response:
    return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
