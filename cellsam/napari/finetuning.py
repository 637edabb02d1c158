"""Fine-tune on the label layers corrected in napari, with the web app's fine-tuning job. No Qt.

:class:`FinetuneRun` does not train anything itself: it writes the images and their corrected labels
into a temporary ``cellsam serve`` project (:class:`cellsam.server.storage.Project`, each image marked
reviewed) and runs :class:`cellsam.server.finetune.FinetuneManager` on it, the same job the web app
starts: prepared tiles, the model's score before, stage 2 (and stage 1 when asked) training, its score
after. :meth:`FinetuneRun.iter_run` yields the job's progress; the new model is only a file until the
user chooses to use it.

The job runs in a separate (spawned) Python process, not in napari's: training imports Lightning, which
imports Triton, and loading Triton's LLVM into a process where Mesa's OpenGL driver has already loaded
its own LLVM (llvmpipe, radeonsi: napari's canvas on many Linux machines) crashes the process (measured:
a segmentation fault inside napari under Xvfb). A separate process also keeps napari responsive and
leaves it alive whatever training does; cancelling asks the job to stop, as the web app's button does.
"""

from __future__ import annotations

import io
import queue
import re
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.napari.segmentation import Channels, Progress, level0


@dataclass
class TrainingImage:
    """One image layer and its corrected labels.

    Attributes:
        name: layer name; data: (H, W) or 3-D array; channel_axis / channels as in ``ImageSpec``;
        labels: (H, W) integer labels, 0 = background.
    """

    name: str
    data: Any
    channel_axis: int | None
    channels: Channels | None
    labels: np.ndarray


@dataclass(frozen=True)
class FinetuneResult:
    """The job's end: ``state`` done / failed / cancelled, scores before and after, the new model file,
    and the job's own verdict where it gives one (``worse``: the new model scores lower; ``warning``:
    why, or that the scores are on the training images)."""

    state: str
    message: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    model: Path | None
    worse: bool = False
    warning: str = ""
    scored_on: str = ""

    def summary(self) -> str:
        if self.state != "done" or self.before is None or self.after is None:
            return f"fine-tuning {self.state}: {self.message}".rstrip(": ")
        where = self.scored_on or "the corrected images"
        text = (f"F1@0.5 on {where} {self.before['f1']:.3f} -> {self.after['f1']:.3f}, "
                f"AP50 {self.before['ap50']:.3f} -> {self.after['ap50']:.3f}")
        return f"{text}; {self.warning}" if self.warning else text


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"


class FinetuneRun:
    """One fine-tuning job on ``images``, in ``workdir`` (a new temporary folder by default)."""

    def __init__(
        self,
        model: Any,
        images: Sequence[TrainingImage],
        *,
        mask_steps: int = 200,
        detection_steps: int = 0,
        batch_size: int = 2,
        accelerator: str = "auto",
        workdir: str | Path | None = None,
    ) -> None:
        from cellsam.server.finetune import FinetuneOptions

        self.options = FinetuneOptions(
            mask_steps=int(mask_steps), detection_steps=int(detection_steps), batch_size=int(batch_size),
            accelerator=accelerator,
        )
        usable = [im for im in images if int(np.asarray(im.labels).max(initial=0)) > 0]
        if not usable:
            raise ValueError("no labels to learn from: segment an image and correct its Labels layer first")
        self.model, self.images = model, list(usable)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="cellsam-napari-ft-"))
        self._cancel: Any = None

    def _project(self) -> Any:
        from cellsam.inference.preprocess import to_channels_last
        from cellsam.server.storage import Project

        project = Project(self.workdir / "project")
        for k, im in enumerate(self.images):
            data = np.asarray(level0(im.data))
            labels = np.asarray(im.labels)
            hw = to_channels_last(data, channel_axis=im.channel_axis).shape[:2]
            if labels.shape != hw:
                raise ValueError(f"{im.name}: labels of shape {labels.shape} do not match the image's {hw}")
            buf = io.BytesIO()
            np.save(buf, data)
            rec = project.add_image(f"{k:03d}_{_safe(im.name)}.npy", data, channel_axis=im.channel_axis,
                                    content=buf.getvalue())
            nuc, wc = im.channels if im.channels is not None else (None, None)
            project.update_image(rec.id, nuclear=nuc, wholecell=wc, reviewed=True)
            project.set_labels(rec.id, labels.astype(np.int32), action="napari")
        return project

    def iter_run(self, poll_s: float = 0.5) -> Generator[Progress, None, FinetuneResult]:
        """Start the job in a child process and yield its progress (0..1000) until it ends."""
        import multiprocessing

        from cellsam.weights import save_model

        project = self._project()
        root = str(project.root)
        project.close()
        ckpt = save_model(self.model, self.workdir / "current_model", version="napari",
                          metadata={"description": "the model napari used when fine-tuning started"})
        ctx = multiprocessing.get_context("spawn")
        messages, self._cancel = ctx.Queue(), ctx.Event()
        proc = ctx.Process(target=_run_job, args=(root, str(ckpt), self.options, messages, self._cancel),
                           name="cellsam-finetune", daemon=True)
        proc.start()
        done, phase = 0, "starting"
        try:
            while True:
                try:
                    kind, value, extra = messages.get(timeout=poll_s)
                except queue.Empty:
                    if not proc.is_alive():
                        return FinetuneResult("failed", f"the fine-tuning process ended (exit code {proc.exitcode})",
                                              None, None, None)
                    yield Progress(done, 1000, f"fine-tuning: {phase}")
                    continue
                if kind == "progress":
                    done, phase = int(1000 * value), str(extra)
                    yield Progress(done, 1000, f"fine-tuning: {phase}")
                elif kind == "error":
                    return FinetuneResult("failed", str(value), None, None, None)
                else:
                    job = value
                    return FinetuneResult(job["state"], job["message"], job["before"], job["after"],
                                          Path(extra) if extra else None, worse=bool(job.get("worse")),
                                          warning=job.get("warning") or "", scored_on=job.get("scored_on") or "")
        finally:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    def cancel(self) -> None:
        """Ask the job to stop after its current phase (training stops at the next step)."""
        if self._cancel is not None:
            self._cancel.set()


def _run_job(project_dir: str, model_path: str, options: Any, messages: Any, cancel: Any) -> None:
    """The child process: the web app's fine-tuning job on the project, reported through ``messages``
    as ("progress", fraction, phase) tuples and one final ("done", job dict, model path) or ("error", ...)."""
    try:
        from cellsam.server.finetune import FinetuneManager
        from cellsam.server.session import ModelSession
        from cellsam.server.storage import Project
        from cellsam.weights import load_model

        project = Project(project_dir)
        manager = FinetuneManager(project, ModelSession(load_model(model_path), name="napari"))
        job = manager.start(options)
        asked = False
        while job.state == "running":
            if cancel.is_set() and not asked:
                manager.cancel()
                asked = True
            messages.put(("progress", float(job.progress), job.phase))
            manager.wait(0.3)
            latest = manager.status()
            assert latest is not None  # the job started above stays the manager's job
            job = latest
        model = str(project.resolve(job.model)) if job.model else ""
        messages.put(("done", job.to_dict(), model))
    except Exception as e:  # noqa: BLE001 - reported to napari as the job's failure
        messages.put(("error", f"{type(e).__name__}: {e}", ""))
