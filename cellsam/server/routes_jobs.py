"""Routes: fine-tuning on the corrected images (start, progress, cancel, switch to the new model)."""

from __future__ import annotations

from fastapi import APIRouter

from cellsam.server.context import ServerContext
from cellsam.server.finetune import FinetuneOptions, JobState
from cellsam.server.schemas import FinetuneRequest, JobInfo, UseRequest, UseResponse


def _info(job: JobState) -> JobInfo:
    d = job.to_dict()
    return JobInfo(**{k: d[k] for k in JobInfo.model_fields})


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter(prefix="/api/finetune", tags=["fine-tune"])
    manager = ctx.finetune

    @r.post("", response_model=JobInfo, status_code=202)
    def start(body: FinetuneRequest | None = None) -> JobInfo:
        """Start fine-tuning the current model on the corrected images (marked reviewed, or edited by a
        person: "Segment all" alone does not count), in the background: stage 2 (masks), and stage 1
        (boxes) first when ``detection_steps`` > 0. With two or more corrected images a fifth of them
        (at least one) is held out and the before / after scores are measured on them."""
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

    @r.post("/use", response_model=UseResponse)
    def use(body: UseRequest | None = None) -> UseResponse:
        """Switch to the fine-tuned model for all further prompts (embeddings are recomputed). A model
        that scored worse than the current one is refused (409) unless ``force`` is true."""
        force = body is not None and body.force
        model = manager.use(force=force)
        job = manager.status()
        return UseResponse(model=model, warning=None if job is None else job.warning)

    return r
