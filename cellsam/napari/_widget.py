"""The dock widget: Segment, box / click prompts, fine-tuning. Qt glue over the Qt-free modules
:mod:`.segmentation`, :mod:`.prompts`, :mod:`.finetuning` and :mod:`.layers`; the prompt layers' events
are :mod:`.prompt_layers`, the workers' never-raising bodies :mod:`.jobs`.

Long work (Segment, fine-tuning) runs in napari ``thread_worker``s that yield progress and can be
cancelled; prompts run in the GUI thread (one decoder pass on a cached tile embedding; a tile's first
prompt also embeds it). Every failure a user can cause (a bad image, a wrong channel choice, a missing
model file, a prompt off the image) ends as a napari notification with the library's message, never
as an exception: the worker bodies return :class:`~cellsam.napari.jobs.Failed` instead of raising.
"""

from __future__ import annotations

import logging
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning

from cellsam.inference.params import DEFAULT_MIN_AREA_REL
from cellsam.napari.jobs import Failed, guarded, message_of, returning
from cellsam.napari.layers import (
    AUTO,
    AXIS_CHOICES,
    NONE,
    box_rectangles,
    boxes_kwargs,
    default_axis,
    labels_kwargs,
    parse_channels,
    spatial_shape,
    training_images,
)
from cellsam.napari.prompt_layers import PromptLayers
from cellsam.napari.prompts import LabelEdit, PromptTool, cell_edit
from cellsam.napari.segmentation import ImageSpec, Progress, SegmentOptions, iter_segment, level0, n_channels

log = logging.getLogger(__name__)


def keep_triton_out() -> bool:
    """Make ``import triton`` fail in napari's process unless it is loaded already; True if it did.

    Loading Triton (its own LLVM) into a process where Mesa's OpenGL driver has loaded libLLVM (napari's
    canvas on Linux with llvmpipe / radeonsi) is a segmentation fault; ``torchvision.ops`` and
    Lightning import it through ``torch._dynamo``. The widget only runs inference in this process,
    which needs no Triton (torch then reports it absent); fine-tuning runs in a child process.
    """
    if not sys.platform.startswith("linux") or "triton" in sys.modules:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    log.info("cellsam: Triton is kept out of napari's process (it crashes beside Mesa's OpenGL)")
    return True


class CellSAMWidget(Container):
    """Segment cells with CellSAM; correct them with prompts; fine-tune on the corrections."""

    def __init__(self, napari_viewer: Any) -> None:
        keep_triton_out()
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._model: Any = None
        self._model_name: str | None = None
        self._model_lock = threading.Lock()
        self._tool: PromptTool | None = None
        self._worker: Any = None
        self._finetune_run: Any = None
        self.finetune_result: Any = None
        self.prompt_layers = PromptLayers(napari_viewer, self.prompt)

        self.model = ComboBox(label="model", choices=_weight_names(), value="default",
                              tooltip="'default' is the model shipped with cellsam")
        self.model_file = FileEdit(label="or a checkpoint", mode=FileDialogMode.EXISTING_FILE,
                                   filter="*.safetensors *.json *.pt *.pth",
                                   tooltip="a model file (our .safetensors, a Meta SAM .pth, an official CellSAM .pt); "
                                           "used instead of the model above when set")
        self.image = ComboBox(label="image", choices=self._image_choices)
        self.channel_axis = ComboBox(label="channel axis", choices=list(AXIS_CHOICES))
        self.nuclear = ComboBox(label="nuclear channel", choices=self._channel_choices)
        self.wholecell = ComboBox(label="whole-cell channel", choices=self._channel_choices)
        self.own_thresholds = CheckBox(value=True, text="use the model's own thresholds")
        self.box_threshold = FloatSpinBox(label="box threshold", value=0.4, min=0.0, max=0.99, step=0.05)
        self.iou_threshold = FloatSpinBox(label="IoU threshold", value=0.5, min=-1.0, max=1.0, step=0.05)
        self.mask_threshold = FloatSpinBox(label="mask threshold", value=0.5, min=0.01, max=0.99, step=0.05)
        self.min_area = SpinBox(label="min area (px)", value=15, min=0, max=100000)
        self.min_area_rel = FloatSpinBox(label="min area (x median cell)", value=DEFAULT_MIN_AREA_REL, min=0.0,
                                         max=0.95, step=0.05)
        self.show_boxes = CheckBox(value=False, text="also add the detector's boxes (with scores)")
        self.segment_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(value="")
        self.prompt_button = PushButton(text="Add prompt layers (box / click; Shift+click = outside)")
        self.next_cell_button = PushButton(text="Next cell (clear clicks)")
        self.overwrite = CheckBox(value=False, text="prompts may take other cells' pixels")
        self.mask_steps = SpinBox(label="fine-tune mask steps", value=200, min=1, max=100000)
        self.detection_steps = SpinBox(label="fine-tune box steps", value=0, min=0, max=100000)
        self.finetune_button = PushButton(text="Fine-tune on these labels")
        self.finetune_scores = Label(value="")
        self.use_button = PushButton(text="Use the fine-tuned model", enabled=False)
        self.extend([
            self.model, self.model_file, self.image, self.channel_axis, self.nuclear, self.wholecell,
            self.own_thresholds,
            self.box_threshold, self.iou_threshold, self.mask_threshold, self.min_area, self.min_area_rel,
            self.show_boxes,
            self.segment_button, self.cancel_button, self.progress, self.status, self.prompt_button,
            self.next_cell_button, self.overwrite, self.mask_steps, self.detection_steps, self.finetune_button,
            self.finetune_scores, self.use_button,
        ])
        self._set_threshold_state()
        self.own_thresholds.changed.connect(self._set_threshold_state)
        self.image.changed.connect(self._on_image_changed)
        self.channel_axis.changed.connect(self._update_channel_choices)
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button.clicked.connect(self.cancel)
        self.prompt_button.clicked.connect(self.add_prompt_layers)
        self.next_cell_button.clicked.connect(self.next_cell)
        self.finetune_button.clicked.connect(self.finetune)
        self.use_button.clicked.connect(self.use_finetuned)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._refresh_layers)
        self._on_image_changed()

    # ------------------------------------------------------------------ layers and choices
    def _image_choices(self, _widget: Any = None) -> list[str]:
        return [layer.name for layer in self.viewer.layers if type(layer).__name__ == "Image"]

    def _refresh_layers(self, _event: Any = None) -> None:
        self.image.reset_choices()

    def _on_image_changed(self, _value: Any = None) -> None:
        layer = self._image_layer(quiet=True)
        if layer is None:
            return
        axis = default_axis(layer)
        label = next(k for k, v in AXIS_CHOICES.items() if v == (None if axis is None else (0 if axis == 0 else -1)))
        # a 3-D array whose file did not say where its channels are: napari slides along its first axis
        if self.channel_axis.value != label:
            self.channel_axis.value = label  # updates the channel choices
        else:
            self._update_channel_choices()

    def _channel_choices(self, _widget: Any = None) -> list[str]:
        """'auto' (the default rules), and for an image with channels 'none' and each channel index."""
        layer = self._image_layer(quiet=True)
        n = 0 if layer is None else n_channels(level0(layer.data).shape, AXIS_CHOICES[self.channel_axis.value])
        return [AUTO, NONE] + [str(i) for i in range(n)] if n > 1 else [AUTO]

    def _update_channel_choices(self, _value: Any = None) -> None:
        for box in (self.nuclear, self.wholecell):
            box.reset_choices()
            box.value = AUTO

    def _set_threshold_state(self, _value: Any = None) -> None:
        for w in (self.box_threshold, self.iou_threshold, self.mask_threshold):
            w.enabled = not self.own_thresholds.value

    def _image_layer(self, *, quiet: bool = False) -> Any:
        name = self.image.value
        if name is None or name not in self.viewer.layers:
            if quiet:
                return None
            raise ValueError("open an image first (File > Open, or drag a file onto napari)")
        return self.viewer.layers[name]

    def image_spec(self, layer: Any) -> ImageSpec:
        """The channel axis and channels chosen for ``layer``; ValueError when they do not fit it."""
        axis = AXIS_CHOICES[self.channel_axis.value]
        if layer.rgb:
            axis = -1
        shape = level0(layer.data).shape
        if axis is not None and len(shape) != 3:
            raise ValueError(f"'{layer.name}' has shape {tuple(shape)}: a channel axis needs a 3-D image")
        spatial_shape(shape, axis)  # 2-D or 3-D with channels, with its message
        return ImageSpec(axis, parse_channels(self.nuclear.value, self.wholecell.value, n_channels(shape, axis)))

    def segment_options(self) -> SegmentOptions:
        own = self.own_thresholds.value
        return SegmentOptions(
            box_threshold=None if own else self.box_threshold.value,
            iou_threshold=None if own else self.iou_threshold.value,
            mask_threshold=None if own else self.mask_threshold.value,
            min_area=int(self.min_area.value),
            min_area_rel=float(self.min_area_rel.value),
        )

    # ------------------------------------------------------------------ the model
    def model_name(self) -> str:
        """The checkpoint file when one is set, else the chosen registered model."""
        text = str(self.model_file.value or "").strip()
        return str(self.model.value) if text in ("", ".") else text

    def get_model(self) -> Any:
        """The chosen model, loaded once (thread-safe; the workers call it too)."""
        from cellsam.weights import load_model

        name = self.model_name()
        with self._model_lock:
            if self._model is None or self._model_name != name:
                model = load_model(name)
                self._model, self._model_name = model, name
                if self._tool is not None:
                    self._tool.set_model(model, name=name)
            return self._model

    def _show_model_thresholds(self, model: Any) -> None:
        inf = getattr(getattr(model, "cfg", None), "inference", None)
        if inf is not None and self.own_thresholds.value:
            self.box_threshold.value = inf.box_threshold
            self.iou_threshold.value = inf.iou_threshold
            self.mask_threshold.value = inf.mask_threshold

    # ------------------------------------------------------------------ workers
    def busy(self) -> bool:
        return self._worker is not None

    def _start(self, worker: Any, what: str) -> None:
        self._worker = worker
        self.segment_button.enabled = self.finetune_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.value = 0
        self.status.value = f"{what}..."
        worker.yielded.connect(self._on_progress)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        worker.start()

    def _on_progress(self, p: Progress) -> None:
        self.progress.max = max(p.total, 1)
        self.progress.value = min(p.done, p.total)
        self.status.value = p.message

    def _on_aborted(self) -> None:
        self.status.value = "cancelled"
        show_info("cellsam: cancelled")

    def _on_finished(self) -> None:
        self._worker = None
        self.segment_button.enabled = self.finetune_button.enabled = True
        self.cancel_button.enabled = False

    def cancel(self) -> None:
        """Stop the running job: Segment at its next block, fine-tuning after its current step."""
        if self._finetune_run is not None:
            self._finetune_run.cancel()
            self.status.value = "cancelling fine-tuning..."
        elif self._worker is not None:
            self._worker.quit()

    # ------------------------------------------------------------------ Segment
    def segment(self) -> Any:
        """Start segmenting the chosen image; returns the worker (None when the input is refused)."""
        if self.busy():
            show_warning("cellsam: a job is already running (Cancel it first)")
            return None
        try:
            layer = self._image_layer()
            spec = self.image_spec(layer)
            options = self.segment_options()
        except ValueError as e:
            show_error(f"cellsam: {message_of(e)}")
            return None
        worker = create_worker(self._segment_job, layer.data, spec, options, _start_thread=False)
        worker.returned.connect(partial(self._on_segmented, layer, spec))
        self._start(worker, f"segmenting {layer.name}")
        return worker

    def _segment_job(self, data: Any, spec: ImageSpec, options: SegmentOptions) -> Any:
        yield Progress(0, 1, "loading the model")
        model = yield from guarded(returning(self.get_model))
        if isinstance(model, Failed):
            return model
        return (yield from guarded(iter_segment(data, model, spec=spec, options=options)))

    def _on_segmented(self, image_layer: Any, spec: ImageSpec, result: Any) -> None:
        if isinstance(result, Failed):
            self.status.value = "failed"
            show_error(f"cellsam: {result.message}")
            return
        if self._model is not None:
            self._show_model_thresholds(self._model)
        kwargs = labels_kwargs(image_layer, spec)
        labels = self.viewer.layers[kwargs["name"]] if kwargs["name"] in self.viewer.layers else None
        if labels is not None and type(labels).__name__ == "Labels" and labels.data.shape == result.labels.shape:
            labels.data = result.labels
            labels.metadata.update(kwargs["metadata"])
        else:
            self.viewer.add_labels(result.labels, **kwargs)
        if self.show_boxes.value:
            bkw = boxes_kwargs(image_layer, spec, result.scores)
            if bkw["name"] in self.viewer.layers:
                self.viewer.layers.remove(bkw["name"])
            if result.n_cells:
                self.viewer.add_shapes(box_rectangles(result.boxes), **bkw)
        self.status.value = f"{image_layer.name}: {result.n_cells} cell(s)"
        if result.tile_size:  # later prompts on this image: at the scale this segmentation ended at
            self.prompt_tool().use_scale(_prompt_key(image_layer, spec), result.tile_size)
        self.prompt_layers.forget_cell()
        if result.n_cells == 0:
            show_warning(f"cellsam: {result.message or 'no cells found'}")
        else:
            show_info(f"cellsam: {image_layer.name}: {result.n_cells} cell(s)")

    # ------------------------------------------------------------------ prompts
    def prompt_tool(self) -> PromptTool:
        model = self.get_model()
        if self._tool is None:
            self._tool = PromptTool(model, name=self.model_name())
        return self._tool

    def _target_labels(self, image_layer: Any, spec: ImageSpec) -> Any:
        kwargs = labels_kwargs(image_layer, spec)
        hw = spatial_shape(level0(image_layer.data).shape, -1 if image_layer.rgb else spec.channel_axis)
        if kwargs["name"] in self.viewer.layers:
            layer = self.viewer.layers[kwargs["name"]]
            if type(layer).__name__ != "Labels" or layer.data.shape != hw or not isinstance(layer.data, np.ndarray):
                raise ValueError(f"layer '{layer.name}' is not an in-memory {hw[0]}x{hw[1]} Labels layer")
            return layer
        return self.viewer.add_labels(np.zeros(hw, np.int32), **kwargs)

    def prompt(
        self,
        *,
        box: Any = None,
        points: Any = None,
        point_labels: Any = None,
        label: int | None = None,
        previous: tuple[int, int, int, int] | None = None,
    ) -> LabelEdit | None:
        """One prompt on the chosen image -> its cell drawn into '<image> labels' (a new label, or
        ``label`` redrawn) through ``data_setitem`` (so Ctrl+Z undoes it). None (and a notification)
        when it fails."""
        try:
            layer = self._image_layer()
            spec = self.image_spec(layer)
            tool = self.prompt_tool()
            key = _prompt_key(layer, spec)
            if not tool.has_image(key):
                tool.set_image(key, layer.data, spec)
            cell = tool.cell(key, box=box, points=points, point_labels=point_labels)
            target = self._target_labels(layer, spec)
            edit = cell_edit(target.data, cell, label=label, overwrite=self.overwrite.value, previous=previous)
            target.data_setitem(edit.indices, edit.values)
            target.selected_label = edit.label
        except (ValueError, KeyError, TypeError, FileNotFoundError, RuntimeError) as e:
            show_error(f"cellsam: {message_of(e)}")
            return None
        self.status.value = f"cell {edit.label} ({cell.score:.2f} predicted IoU)"
        return edit

    def add_prompt_layers(self) -> tuple[Any, Any]:
        """The Shapes (boxes) and Points (clicks) layers whose new entries are prompts, placed on the chosen
        image (its scale and translation)."""
        layer = self._image_layer(quiet=True)
        tf: dict[str, Any] = {}
        if layer is not None:
            try:
                tf = {k: v for k, v in labels_kwargs(layer, self.image_spec(layer)).items()
                      if k in ("scale", "translate")}
            except ValueError:
                tf = {}
        return self.prompt_layers.add(tf)

    def next_cell(self) -> None:
        """Finish the clicked cell: the next click starts a new one."""
        self.prompt_layers.next_cell()

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, *, accelerator: str = "auto", workdir: str | Path | None = None) -> Any:
        """Fine-tune on the Labels layers this widget made (as corrected), in a worker."""
        from cellsam.napari.finetuning import FinetuneRun

        if self.busy():
            show_warning("cellsam: a job is already running (Cancel it first)")
            return None
        try:
            images = training_images(list(self.viewer.layers))
            run = FinetuneRun(self.get_model(), images, mask_steps=self.mask_steps.value,
                              detection_steps=self.detection_steps.value, accelerator=accelerator, workdir=workdir)
        except (ValueError, KeyError, FileNotFoundError) as e:
            show_error(f"cellsam: {message_of(e)}")
            return None
        self._finetune_run, self.finetune_result = run, None
        self.use_button.enabled = False
        self.finetune_scores.value = ""
        worker = create_worker(lambda: (yield from guarded(run.iter_run())), _start_thread=False)
        worker.returned.connect(self._on_finetuned)
        worker.finished.connect(self._on_finetune_finished)
        self._start(worker, f"fine-tuning on {len(run.images)} image(s)")
        return worker

    def _on_finetuned(self, result: Any) -> None:
        if isinstance(result, Failed):
            show_error(f"cellsam: fine-tuning failed: {result.message}")
            self.status.value = "fine-tuning failed"
            return
        self.finetune_result = result
        self.finetune_scores.value = result.summary()
        self.status.value = f"fine-tuning {result.state}"
        if result.state == "done" and result.model is not None:
            self.use_button.enabled = True
            if result.worse:
                self.use_button.text = "Use the fine-tuned model anyway (it scores worse)"
                show_warning(f"cellsam: fine-tuned, but {result.summary()}")
            else:
                self.use_button.text = "Use the fine-tuned model"
                show_info(f"cellsam: fine-tuned. {result.summary()}. 'Use the fine-tuned model' to switch.")
        elif result.state == "cancelled":
            show_info("cellsam: fine-tuning cancelled")
        else:
            show_error(f"cellsam: {result.summary()}")

    def _on_finetune_finished(self) -> None:
        self._finetune_run = None

    def use_finetuned(self) -> None:
        """Switch to the fine-tuned model (what Segment and prompts use from now on)."""
        result = self.finetune_result
        if result is None or result.model is None:
            show_error("cellsam: no fine-tuned model yet")
            return
        self.model_file.value = result.model
        try:
            self.get_model()
        except (ValueError, KeyError, FileNotFoundError) as e:
            show_error(f"cellsam: {message_of(e)}")
            return
        self.use_button.enabled = False
        show_info(f"cellsam: using {result.model}")


def _weight_names() -> list[str]:
    """Registered trained weights ('default' first); architecture names alone are untrained."""
    from cellsam.weights import list_weights

    return ["default"] + sorted(n for n in list_weights() if n != "default")


def _prompt_key(layer: Any, spec: ImageSpec) -> str:
    """The prompt tool's key of an image layer read with ``spec``."""
    return f"{layer.name}|{id(level0(layer.data))}|{spec.channel_axis}|{spec.channels}"
