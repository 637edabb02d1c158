"""Routes: fine-tuning on the corrected images (start, progress, cancel, switch to the new model)."""

from __future__ import annotations

from fastapi import APIRouter

from cellsam.server.context import ServerContext
from cellsam.server.finetune import FinetuneOptions, JobState
from cellsam.server.schemas import FinetuneRequest, JobInfo


def _info(job: JobState) -> JobInfo:
    d = job.to_dict()
    return JobInfo(**{k: d[k] for k in JobInfo.model_fields})


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter(prefix="/api/finetune", tags=["fine-tune"])
    manager = ctx.finetune

    @r.post("", response_model=JobInfo, status_code=202)
    def start(body: FinetuneRequest | None = None) -> JobInfo:
        """Start fine-tuning the current model on the corrected images (reviewed or edited), in the
        background: stage 2 (masks), and stage 1 (boxes) first when ``detection_steps`` > 0."""
        body = body or FinetuneRequest()
        opts = FinetuneOptions(mask_steps=body.mask_steps, detection_steps=body.detection_steps,
                               batch_size=body.batch_size, accelerator=ctx.finetune_accelerator)
        return _info(manager.start(opts))

    @r.get("", response_model=JobInfo | None)
    def status() -> JobInfo | None:
        """The current or last job (null if none ran since the server started)."""
        job = manager.status()
        return None if job is None else _info(job)

    @r.post("/cancel", response_model=JobInfo)
    def cancel() -> JobInfo:
        return _info(manager.cancel())

    @r.post("/use", response_model=dict)
    def use() -> dict:
        """Switch to the fine-tuned model for all further prompts (embeddings are recomputed)."""
        return {"model": manager.use()}

    return r
