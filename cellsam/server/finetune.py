"""Fine-tune the current model on the project's corrected images, in a background thread.

Corrected images are those a person edited (paint, erase, delete, merge, click or box prompts; not
"Segment all", accepted boxes or imported labels alone) or marked reviewed, with at least one cell
(:attr:`~cellsam.server.records.ImageRecord.corrected`). With two or more, a fifth of them (at least
one, drawn with the job's seed) is held out of training.

A job: (1) saves the current model and writes a prepared dataset (docs/ARCHITECTURE.md layout,
``train`` split only, tiles of the model's own ``tile_size``) from the training images; (2) scores
the current model on the held-out images; (3) runs stage 1 ("detection", only when asked) and stage 2
("masks") with :func:`cellsam.train.run.train`; (4) scores the new model the same way. Scores are
:func:`cellsam.eval.metrics.evaluate_labels`'s ``f1_mean`` (F1 at IoU 0.5) and ``ap50`` of
:func:`cellsam.segment` against the corrected labels. With a single corrected image nothing can be
held out: the scores are then on the training image and the job says so in its ``warning``. A new
model whose F1 is lower than the current one's is marked ``worse`` with a warning, and
:meth:`FinetuneManager.use` refuses it unless forced; the new model is never used by itself.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellsam.data.normalize import StainGrey
from cellsam.inference.preprocess import stain_grey
from cellsam.models.protocol import PromptableModel, SegmentationModel
from cellsam.server.session import ModelSession
from cellsam.server.storage import ImageRecord, Project, ProjectError

log = logging.getLogger(__name__)

FINETUNE_DIR = "finetune"
HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class FinetuneOptions:
    """Steps of each stage (``detection_steps=0`` skips stage 1), batch size, trainer accelerator."""

    mask_steps: int = 200
    detection_steps: int = 0
    batch_size: int = 2
    accelerator: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mask_steps < 1 or self.detection_steps < 0 or self.batch_size < 1:
            raise ValueError("mask_steps and batch_size must be >= 1 and detection_steps >= 0")


@dataclass
class JobState:
    """What the page shows about a job. ``model`` is project-relative once the job is done."""

    id: str
    state: str = "running"  # running | done | failed | cancelled
    phase: str = "starting"
    progress: float = 0.0
    message: str = ""
    images: int = 0
    tiles: int = 0
    held_out: list[str] = field(default_factory=list)
    scored_on: str = ""
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    model: str | None = None
    worse: bool | None = None
    warning: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Cancelled(Exception):
    """The user cancelled the job."""


def corrected_images(project: Project) -> list[ImageRecord]:
    """Images a person edited or marked reviewed, with at least one cell."""
    return [r for r in project.images() if r.corrected]


def split_holdout(recs: list[ImageRecord], *, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training images, held-out images): ``HOLDOUT_FRACTION`` of them (at least one) held out when
    there are two or more, drawn by ``seed``; both lists in project order."""
    if len(recs) < 2:
        return list(recs), []
    n_hold = max(1, round(len(recs) * HOLDOUT_FRACTION))
    order = np.random.default_rng(seed).permutation(len(recs))
    held = set(order[:n_hold].tolist())
    return [r for i, r in enumerate(recs) if i not in held], [r for i, r in enumerate(recs) if i in held]


def compare(before: dict[str, Any], after: dict[str, Any], *, scored_on: str) -> tuple[bool, str | None]:
    """(worse, warning) of a new model's scores against the current model's (F1 at IoU 0.5 decides)."""
    worse = after["f1"] < before["f1"]
    if not worse:
        return False, None
    return True, (f"the new model scores worse than the current one on {scored_on}: F1 {after['f1']:.3f} vs "
                  f"{before['f1']:.3f} (AP50 {after['ap50']:.3f} vs {before['ap50']:.3f}); keep the current model, "
                  "or correct more images and fine-tune again")


def write_prepared(project: Project, recs: list[ImageRecord], out: Path, *, tile: int,
                   stain: StainGrey = "luminance") -> int:
    """Write ``out/train/{images.npy, labels.npy, tiles.json}``; returns the number of tiles (those
    with at least one cell after the paper's label filters). ``stain``: the model's colour rule."""
    from cellsam.data.labels import filter_labels
    from cellsam.data.tiling import crop, crop_origins
    from cellsam.server.export import export_labels
    from cellsam.server.images import load_raw, prepare

    imgs, labs, meta = [], [], []
    for rec in recs:
        image = prepare(load_raw(project.image_path(rec), rec), rec, stain)
        labels = export_labels(project, rec.id)
        for y0, x0 in crop_origins(labels.shape, tile=tile):
            lab, _ = filter_labels(crop(labels, y0, x0, tile=tile))
            if lab.max() == 0:
                continue
            imgs.append(crop(image, y0, x0, tile=tile).astype(np.float32))
            labs.append(lab[None].astype(np.int32))
            meta.append({"source": "project", "image": rec.name, "kind": "unknown", "y0": y0, "x0": x0,
                         "cells": int(lab.max())})
    d = out / "train"
    d.mkdir(parents=True, exist_ok=True)
    if imgs:
        np.save(d / "images.npy", np.stack(imgs))
        np.save(d / "labels.npy", np.stack(labs))
    (d / "tiles.json").write_text(json.dumps(meta))
    (out / "dataset.json").write_text(json.dumps({"format_version": 1, "command": "cellsam serve fine-tune",
                                                  "options": {"stain_grey": stain},  # the fine-tuned model keeps it
                                                  "sources": [{"name": "project", "path": str(project.root)}]}))
    return len(meta)


def _torch_model(model: PromptableModel) -> torch.nn.Module:
    """The session's model as the torch module that fine-tuning starts from and saves (a CellSAM)."""
    if not isinstance(model, torch.nn.Module):
        raise ProjectError(f"fine-tuning needs a CellSAM model, not a {type(model).__name__}")
    return model


def score(model: SegmentationModel, images: list[np.ndarray], gts: list[np.ndarray]) -> dict[str, Any]:
    """F1 at IoU 0.5 (``f1_mean``), AP50 and per-image F1 of :func:`cellsam.segment` against ``gts``."""
    from cellsam.eval.metrics import evaluate_labels
    from cellsam.inference.segment import Segmentation, segment

    preds = []
    for im in images:
        seg = segment(im, model, channel_axis=0, normalize=False)
        assert isinstance(seg, Segmentation)  # one image in, one result out
        preds.append(seg.labels)
    ev = evaluate_labels(gts, preds, deepcell=False, coco=False, per_image=True)
    return {"f1": ev["f1_mean"], "ap50": ev["ap50"], "n_true": ev["n_true"], "n_pred": ev["n_pred"],
            "per_image_f1": [row["f1"]["0.50"] for row in ev["per_image"]]}


def _last_step(run_dir: Path) -> int:
    """Latest training step logged by Lightning's CSV logger under ``run_dir`` (0 if none yet)."""
    step = 0
    for f in run_dir.glob("logs/version_*/metrics.csv"):
        try:
            with open(f, newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get("step"):
                        step = max(step, int(float(row["step"])) + 1)
        except (OSError, ValueError):
            continue
    return step


class FinetuneManager:
    """At most one job at a time per project."""

    def __init__(self, project: Project, session: ModelSession) -> None:
        self.project, self.session = project, session
        self.job: JobState | None = None
        self._opts: FinetuneOptions | None = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._stage: tuple[Path, int, float, float] | None = None  # run dir, steps, progress from, to

    def start(self, opts: FinetuneOptions) -> JobState:
        if self.job is not None and self.job.state == "running":
            raise ProjectError("a fine-tuning job is already running")
        recs = corrected_images(self.project)
        if not recs:
            raise ProjectError("no corrected images yet: edit an image (\"Segment all\" alone does not count) "
                               "or mark it reviewed first")
        train, held = split_holdout(recs, seed=opts.seed)
        job_id = time.strftime("%Y%m%d-%H%M%S")
        self.job = JobState(id=job_id, images=len(train), held_out=[r.name for r in held])
        self._opts, self._cancel = opts, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self.job, opts, train, held), daemon=True,
                                        name=f"finetune-{job_id}")
        self._thread.start()
        return self.job

    def status(self) -> JobState | None:
        job = self.job
        if job is not None and job.state == "running" and self._stage is not None:
            run, steps, p0, p1 = self._stage
            job.progress = p0 + (p1 - p0) * min(_last_step(run) / steps, 1.0)
        return job

    def cancel(self) -> JobState:
        if self.job is None or self.job.state != "running":
            raise ProjectError("no fine-tuning job is running")
        self._cancel.set()
        self.job.message = "cancelling after the current phase"
        return self.job

    def wait(self, timeout: float | None = None) -> JobState | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.job

    def use(self, *, force: bool = False) -> str:
        """Switch the session to the job's new model; returns its project-relative path.

        Raises:
            ProjectError: no finished job, or its model scored worse and ``force`` is False.
        """
        from cellsam.weights import load_model

        job = self.job
        if job is None or job.state != "done" or job.model is None:
            raise ProjectError("no fine-tuned model to use yet")
        if job.worse and not force:
            raise ProjectError(f"not switched: {job.warning}. To use it anyway, send force=true "
                               "(the page asks first)")
        path = self.project.resolve(job.model)
        device = next(_torch_model(self.session.model).parameters()).device
        self.session.set_model(load_model(path, device=device), name=job.model)
        self.project.set_meta("model", job.model)
        return job.model

    # ------------------------------------------------------------------ the job
    def _phase(self, job: JobState, phase: str, progress: float) -> None:
        if self._cancel.is_set():
            raise Cancelled
        job.phase, job.progress = phase, progress
        log.info("fine-tune %s: %s", job.id, phase)

    def _run(self, job: JobState, opts: FinetuneOptions, train: list[ImageRecord], held: list[ImageRecord]) -> None:
        try:
            self._run_inner(job, opts, train, held)
            job.state, job.phase, job.progress = "done", "done", 1.0
        except Cancelled:
            job.state, job.message = "cancelled", "cancelled by the user"
        except Exception as e:  # noqa: BLE001 - reported to the page; the server keeps running
            log.exception("fine-tune %s failed", job.id)
            job.state, job.message = "failed", f"{type(e).__name__}: {e}"
        finally:
            self._stage = None
            job.finished = time.time()

    def _run_inner(
        self, job: JobState, opts: FinetuneOptions, train: list[ImageRecord], held: list[ImageRecord]
    ) -> None:
        from cellsam.server.export import export_labels
        from cellsam.server.images import load_raw, prepare
        from cellsam.train.config import Stage, TrainConfig
        from cellsam.weights import load_model, save_model

        root = self.project.root / FINETUNE_DIR / job.id
        root.mkdir(parents=True, exist_ok=True)
        self._phase(job, "preparing data", 0.01)
        with self.session.lock:
            start = save_model(_torch_model(self.session.model), root / "start", version="start",
                               metadata={"description": f"model before fine-tune {job.id}"})
            tile = self.session.tile_size
            stain = stain_grey(self.session.model)
        job.tiles = write_prepared(self.project, train, root / "data", tile=tile, stain=stain)
        if job.tiles == 0:
            raise ProjectError("the corrected images have no usable cells (after the label filters)")
        scored = held or train
        if held:
            job.scored_on = f"{len(held)} held-out image(s) ({', '.join(r.name for r in held)})"
        else:
            job.scored_on = "the training image"
            job.warning = ("only one corrected image: none could be held out, so the scores are on the image it "
                           "trained on and do not show how the model does on new images")
        images = [prepare(load_raw(self.project.image_path(r), r), r, stain) for r in scored]
        gts = [export_labels(self.project, r.id) for r in scored]
        self._phase(job, "scoring the current model", 0.05)
        job.before = score(load_model(start), images, gts)
        total = opts.detection_steps + opts.mask_steps
        base = TrainConfig(
            data=str(root / "data"), seed=opts.seed, batch_size=min(opts.batch_size, job.tiles),
            accelerator=opts.accelerator, balance_sources=False, log_every_steps=1, checkpoint_every_steps=0,
            val_every_steps=0, version=f"finetune-{job.id}",
        )
        init, done = str(start), 0
        stages: tuple[tuple[Stage, int], ...] = (("detection", opts.detection_steps), ("masks", opts.mask_steps))
        for stage, steps in stages:
            if steps == 0:
                continue
            p0 = 0.1 + 0.8 * done / total
            p1 = 0.1 + 0.8 * (done + steps) / total
            self._phase(job, f"training stage {'1 (boxes)' if stage == 'detection' else '2 (masks)'}", p0)
            out = root / f"stage_{stage}"
            cfg = replace(base, stage=stage, init=init, output=str(out), max_steps=steps)
            self._stage = (out, steps, p0, p1)
            init = str(self._train(cfg))
            self._stage = None
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # resume state: large, not needed
            done += steps
        self._phase(job, "scoring the new model", 0.9)
        job.after = score(load_model(init), images, gts)
        job.model = Path(init).relative_to(self.project.root).as_posix()
        job.worse, worse_note = compare(job.before, job.after, scored_on=job.scored_on)
        if worse_note:
            job.warning = worse_note + (f" ({job.warning})" if job.warning else "")

    def _train(self, cfg: Any) -> Path:
        from cellsam.train.run import train

        kwargs: dict[str, Any] = {"extra": {"finetuned_on": str(self.project.root)}}
        if "callbacks" in inspect.signature(train).parameters:  # progress + cancel while training
            kwargs["callbacks"] = [_StopOnCancel(self._cancel)]
        return Path(train(cfg, **kwargs))


def _StopOnCancel(event: threading.Event) -> Any:  # noqa: N802 - a factory standing in for a class
    """A Lightning callback that stops training when ``event`` is set."""
    from lightning.pytorch.callbacks import Callback

    class StopOnCancel(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if event.is_set():
                trainer.should_stop = True

    return StopOnCancel()
