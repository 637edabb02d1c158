"""The napari layers a person prompts on: a Shapes layer whose drawn boxes and a Points layer whose clicks
become cells (through the widget's ``prompt``), with the click sequence of the cell being drawn.

A box draws a new cell and is cleared once drawn. Clicks refine one cell until "Next cell": the first
click draws it, later ones redraw the same label; Shift+click is a negative click (red).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from cellsam.napari.layers import box_of, click_prompt
from cellsam.napari.prompts import LabelEdit

BOX_LAYER, CLICK_LAYER = "cellsam box prompts", "cellsam click prompts"
POSITIVE, NEGATIVE = "lime", "red"

PromptFn = Callable[..., "LabelEdit | None"]
"""``prompt(*, box=, points=, point_labels=, label=, previous=) -> LabelEdit | None`` (the widget's)."""


class PromptLayers:
    """The prompt layers of one viewer, and the clicked cell being drawn.

    Attributes:
        click_label, click_rect: the label and rectangle of the cell the clicks are drawing (None: the next
            click starts a new cell).
        shift: whether the last press on the Points layer held Shift (the click it adds is negative).
    """

    def __init__(self, viewer: Any, prompt: PromptFn) -> None:
        self.viewer = viewer
        self._prompt = prompt
        self.click_label: int | None = None
        self.click_rect: tuple[int, int, int, int] | None = None
        self.shift = False
        self._quiet = False  # set while this class edits a layer itself (its events are not prompts)

    def add(self, transform: dict[str, Any]) -> tuple[Any, Any]:
        """The (Shapes, Points) layers, made with the image's ``transform`` (``scale`` / ``translate``) if
        missing; the Shapes layer becomes active in rectangle mode."""
        if BOX_LAYER in self.viewer.layers:
            shapes = self.viewer.layers[BOX_LAYER]
        else:
            shapes = self.viewer.add_shapes(name=BOX_LAYER, ndim=2, edge_color="cyan", face_color="transparent",
                                            edge_width=1, **transform)
            shapes.events.data.connect(partial(self._on_box_event, shapes))
        if CLICK_LAYER in self.viewer.layers:
            points = self.viewer.layers[CLICK_LAYER]
        else:
            points = self.viewer.add_points(name=CLICK_LAYER, ndim=2, size=5, features={"positive": np.zeros(0, bool)},
                                            face_color=POSITIVE, **transform)
            points.events.data.connect(partial(self._on_click_event, points))
            points.mouse_drag_callbacks.append(self._remember_modifiers)
        shapes.mode = "add_rectangle"
        self.viewer.layers.selection.active = shapes
        return shapes, points

    def forget_cell(self) -> None:
        """The next click starts a new cell (the clicks on the layer stay)."""
        self.click_label = self.click_rect = None

    def next_cell(self) -> None:
        """Finish the clicked cell: forget it and clear the clicks."""
        self.forget_cell()
        if CLICK_LAYER in self.viewer.layers and len(self.viewer.layers[CLICK_LAYER].data):
            self._clear(self.viewer.layers[CLICK_LAYER])

    def _remember_modifiers(self, _layer: Any, event: Any) -> None:
        self.shift = "Shift" in getattr(event, "modifiers", ())

    def _on_box_event(self, shapes: Any, event: Any) -> None:
        if self._quiet or _action(event) != "added" or not len(shapes.data):
            return
        self.next_cell()
        self._prompt(box=box_of(shapes.data[-1]))
        from qtpy.QtCore import QTimer  # clear the drawn box once napari has finished adding it

        QTimer.singleShot(0, partial(self._clear, shapes))

    def _on_click_event(self, points: Any, event: Any) -> None:
        action = _action(event)
        if self._quiet or action not in ("added", "removed"):
            return
        if action == "added":
            new = [int(i) % len(points.data) for i in getattr(event, "data_indices", (-1,))]
            positive = np.asarray(points.features["positive"], bool).copy() if len(points.features) else np.ones(
                len(points.data), bool)
            positive[new] = not self.shift
            self.shift = False
            self._quiet = True
            try:
                points.features = {"positive": positive}
                points.face_color = [POSITIVE if p else NEGATIVE for p in positive] if len(positive) else POSITIVE
            finally:
                self._quiet = False
        if not len(points.data):
            return
        xy, signs = click_prompt(points.data, np.asarray(points.features["positive"], bool))
        edit = self._prompt(points=xy, point_labels=signs, label=self.click_label, previous=self.click_rect)
        if edit is not None:
            self.click_label, self.click_rect = edit.label, edit.rect

    def _clear(self, layer: Any) -> None:
        self._quiet = True
        try:
            layer.data = []
            if "positive" in getattr(layer, "features", {}):
                layer.features = {"positive": np.zeros(0, bool)}
        finally:
            self._quiet = False


def _action(event: Any) -> str:
    """A layer data event's action ("added", "removed", ...), whatever napari's enum prints as."""
    action = getattr(event, "action", "")
    return str(getattr(action, "value", action)).lower()
