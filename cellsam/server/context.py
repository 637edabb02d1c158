"""What every route needs: the project, the model session, the fine-tune manager, the limits,
plus helpers shared by the route modules (image loading through the caches, edit responses)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellsam.inference.preprocess import stain_grey
from cellsam.server.access import Access
from cellsam.server.finetune import FinetuneManager
from cellsam.server.images import Limits, channel_key, display_rgb, load_raw, prepare
from cellsam.server.schemas import EditResponse, ImageInfo, encode_patch
from cellsam.server.session import ModelSession
from cellsam.server.storage import EditResult, ImageRecord, Project

MAX_PATCH_PIXELS = 1 << 20  # larger changes are not sent inline: the page reloads the labels


@dataclass
class ServerContext:
    project: Project
    session: ModelSession
    finetune: FinetuneManager
    limits: Limits
    access: Access = Access()
    finetune_accelerator: str = "auto"

    def record(self, image_id: int) -> ImageRecord:
        return self.project.image(image_id)

    def raw(self, rec: ImageRecord) -> np.ndarray:
        """(H, W, C) pixels of the image file (cached)."""
        return self.session.prepared(
            (rec.id, "raw"), lambda: load_raw(self.project.image_path(rec), rec)
        )

    def prepared(self, rec: ImageRecord) -> np.ndarray:
        """(3, H, W) float32 normalised image under the current channel roles, prepared as the session's
        model wants stained colour pictures (cached)."""
        stain = stain_grey(self.session.model)
        return self.session.prepared((*channel_key(rec), stain), lambda: prepare(self.raw(rec), rec, stain))

    def display(self, rec: ImageRecord) -> np.ndarray:
        """(H, W, 3) uint8 picture for the page (cached)."""
        return self.session.prepared(
            (*channel_key(rec), "display"), lambda: display_rgb(self.raw(rec), self.prepared(rec), rec)
        )

    def info(self, rec: ImageRecord) -> ImageInfo:
        n_undo, n_redo = self.project.history(rec.id)
        return ImageInfo(
            id=rec.id, name=rec.name, height=rec.height, width=rec.width, n_channels=rec.n_channels,
            nuclear=rec.nuclear, wholecell=rec.wholecell, reviewed=rec.reviewed, edited=rec.person_edits > 0,
            n_cells=rec.n_cells,
            version=rec.version, can_undo=n_undo > 0, can_redo=n_redo > 0,
        )


def edit_response(res: EditResult) -> EditResponse:
    """The API form of an edit; a change over ``MAX_PATCH_PIXELS`` is sent without its patch."""
    patch = res.patch if res.patch is not None and res.patch.size <= MAX_PATCH_PIXELS else None
    return EditResponse(
        image_id=res.image_id, action=res.action, version=res.version, base_version=res.base_version,
        window=res.window, patch=encode_patch(patch), n_cells=res.n_cells, cell=res.cell,
        can_undo=res.can_undo, can_redo=res.can_redo, edited=res.edited,
    )
