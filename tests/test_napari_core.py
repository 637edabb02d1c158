"""The napari plugin's Qt-free parts (segmentation by blocks, prompts, label edits, fine-tuning, reader,
layer helpers). Nothing here imports napari or Qt, so these run everywhere (``vit_tiny`` with random
weights: deterministic, arbitrary cells; the default model where the result must be real)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam.inference.segment import segment
from cellsam.models.build import build_model
from cellsam.napari.finetuning import FinetuneRun, TrainingImage
from cellsam.napari.layers import box_of, box_rectangles, click_prompt, parse_channels, spatial_shape
from cellsam.napari.prompts import Cell, PromptTool, apply_edit, cell_edit
from cellsam.napari.segmentation import ImageSpec, Progress, SegmentOptions, iter_segment, segment_params
from tests.conftest import make_blobs

OPEN = dict(box_threshold=0.0, iou_threshold=-1.0, mask_threshold=0.5)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


def blobs() -> tuple[np.ndarray, np.ndarray]:
    img, lab = make_blobs((160, 144), n=14, radius=(6, 10), seed=3)
    return (img * 4000).astype(np.uint16), lab


def drain(gen) -> tuple[list[Progress], object]:
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        return steps, stop.value


# ----------------------------------------------------------------------------------- Segment by blocks
@pytest.mark.parametrize("block_tiles", [1, 2, 10])
def test_blocks_give_the_labels_of_cellsam_segment(tiny, block_tiles: int) -> None:
    img, _ = blobs()
    expect = segment(img, tiny, **OPEN)
    steps, seg = drain(iter_segment(img, tiny, options=SegmentOptions(**OPEN, block_tiles=block_tiles)))
    assert expect.n_cells > 0
    np.testing.assert_array_equal(seg.labels, expect.labels)
    np.testing.assert_allclose(seg.scores, expect.scores, rtol=1e-5)  # tiles batched by block, not in order
    np.testing.assert_allclose(seg.boxes, expect.boxes, rtol=1e-5, atol=1e-3)
    done = [p.done for p in steps]
    assert done == sorted(done) and steps[-1].done == steps[-1].total and len(steps) >= 3
    assert len(steps) - 2 == math.ceil(3 / block_tiles) ** 2  # one step per block (3 x 3 tiles of 64 px)
    if block_tiles == 2:  # the relative minimum area over the whole image, as the library's
        fewer = segment(img, tiny, **OPEN, min_area_rel=0.9)
        _, seg = drain(iter_segment(img, tiny, options=SegmentOptions(**OPEN, min_area_rel=0.9, block_tiles=2)))
        assert 0 < fewer.n_cells < expect.n_cells
        np.testing.assert_array_equal(seg.labels, fewer.labels)


def test_lazy_path_reads_dask_arrays_by_blocks() -> None:
    """The default model on the sample, read block by block from a dask array (a big OME-Zarr's path)."""
    da = pytest.importorskip("dask.array")
    from cellsam.cli.segment import sample_path
    from cellsam.io import load_image

    im = load_image(sample_path()).data
    model = __import__("cellsam").load_model("default")
    # both at the image's own scale, then both with diameter "auto" (the default): the lazy image measures
    # it on its windows (here one window: the whole sample), in memory by the size model and a second pass
    _, mem = drain(iter_segment(im, model, options=SegmentOptions(diameter=None)))
    steps, lazy = drain(iter_segment(da.from_array(im, chunks=100), model,
                                     options=SegmentOptions(block_tiles=1, diameter=None)))
    assert lazy.diameter is None and lazy.tile_size == model.cfg.tile_size
    assert len(steps) == 2 * 2 + 2  # four blocks of one tile
    _, mem_auto = drain(iter_segment(im, model))
    _, lazy_auto = drain(iter_segment(da.from_array(im, chunks=100), model, options=SegmentOptions(block_tiles=1)))
    assert lazy_auto.tile_size == mem_auto.tile_size and lazy_auto.diameter is not None
    assert abs(lazy_auto.n_cells - mem_auto.n_cells) <= 2
    assert lazy.n_cells == mem.n_cells >= 20
    a, b = mem.labels > 0, lazy.labels > 0
    assert (a & b).sum() / (a | b).sum() > 0.95


def test_bad_images_and_options_raise_the_library_messages(tiny) -> None:
    with pytest.raises(ValueError, match="channel_axis"):
        drain(iter_segment(np.zeros((3, 40, 40)), tiny))
    with pytest.raises(ValueError, match="NaN"):
        drain(iter_segment(np.full((40, 40), np.nan), tiny))
    with pytest.raises(ValueError):
        segment_params(tiny, SegmentOptions(mask_threshold=1.5))
    with pytest.raises(ValueError, match="min_area_rel"):
        segment_params(tiny, SegmentOptions(min_area_rel=1.5))
    with pytest.raises(ValueError, match="channel"):
        drain(iter_segment(np.zeros((3, 40, 40)), tiny, spec=ImageSpec(0, (5, None))))
    _, seg = drain(iter_segment(np.zeros((40, 40), np.uint8), tiny))
    assert seg.n_cells == 0 and seg.message.startswith("no cells found")


# ----------------------------------------------------------------------------------- prompts and edits
def test_box_prompt_and_label_edits(tiny) -> None:
    img, lab = blobs()
    tool = PromptTool(tiny)
    tool.set_image("img", img, ImageSpec())
    ys, xs = np.nonzero(lab == 1)
    cell = tool.cell("img", box=(xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2))
    assert cell.mask.any() and cell.mask.dtype == bool
    labels = np.zeros(lab.shape, np.int32)
    labels[:4, :4] = 7
    edit = cell_edit(labels, cell)
    assert edit.label == 8 and (edit.values == 8).all()
    before = labels.copy()
    apply_edit(labels, edit)
    h, w = cell.mask.shape
    window = before[cell.y0 : cell.y0 + h, cell.x0 : cell.x0 + w]
    assert (labels == 8).sum() == (cell.mask[: window.shape[0], : window.shape[1]] & (window == 0)).sum()
    assert (labels == 7).sum() == 16  # the other cell kept its pixels
    # redraw the same cell smaller: its old pixels go, nothing else changes
    small = Cell(cell.y0, cell.x0, np.zeros_like(cell.mask), cell.score)
    small.mask[: cell.mask.shape[0] // 2] = cell.mask[: cell.mask.shape[0] // 2]
    if small.mask.any():
        apply_edit(labels, cell_edit(labels, small, label=8, previous=edit.rect))
        assert (labels == 8).sum() == small.mask.sum() and (labels == 7).sum() == 16
    with pytest.raises(ValueError, match="empty"):
        cell_edit(labels, Cell(0, 0, np.zeros((3, 3), bool), 0.0))
    with pytest.raises(ValueError, match="only cover other cells"):
        cell_edit(labels, Cell(0, 0, np.ones((2, 2), bool), 0.0))
    apply_edit(labels, cell_edit(labels, Cell(0, 0, np.ones((2, 2), bool), 0.0), overwrite=True))
    assert (labels[:2, :2] == labels.max()).all()
    with pytest.raises(KeyError):
        tool.cell("other", box=(0, 0, 5, 5))
    edge = tool.cell("img", box=(-5, -5, 20, 20))  # drawn past the edge: clipped to the image
    assert edge.y0 >= 0 and edge.x0 >= 0
    with pytest.raises(ValueError, match="outside"):
        tool.cell("img", box=(-30, -30, -5, -5))
    with pytest.raises(ValueError, match="positive"):
        tool.cell("img", points=[(10, 10)], point_labels=[0])


def test_prompts_on_a_lazy_image_use_one_tile_in_image_coordinates(tiny) -> None:
    img, lab = blobs()
    lazy, mem = PromptTool(tiny), PromptTool(tiny)
    lazy.set_image("a", img, ImageSpec(), lazy=True)
    mem.set_image("a", img, ImageSpec(), lazy=False)
    ys, xs = np.nonzero(lab == lab.max())
    box = (xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2)
    a, b = lazy.cell("a", box=box), mem.cell("a", box=box)
    assert (a.y0, a.x0) == (b.y0, b.x0)  # the same tile, in image coordinates
    np.testing.assert_array_equal(a.mask, b.mask)  # the window normalised alone = the whole image here
    assert len(lazy.session.embeddings) == 1  # one tile embedded
    # after a Segment that ended at another scale: the lazy prompt is decoded on a tile of that side
    for tool in (lazy, mem):
        tool.use_scale("a", 96)
    a, b = lazy.cell("a", box=box), mem.cell("a", box=box)
    assert len(lazy.session.embeddings) == 2  # a tile of the new side embedded
    assert (a.y0, a.x0) == (b.y0, b.x0)  # the same 96 px tile as the in-memory image's prompt


# ----------------------------------------------------------------------------------- fine-tuning, layers, reader
def test_finetune_refuses_without_labels_or_with_mismatched_ones(tiny) -> None:
    img, lab = blobs()
    with pytest.raises(ValueError, match="no labels"):
        FinetuneRun(tiny, [TrainingImage("a", img, None, None, np.zeros_like(lab))])
    run = FinetuneRun(tiny, [TrainingImage("a", img, None, None, lab[:100])])
    with pytest.raises(ValueError, match="do not match"):
        drain(run.iter_run())


def test_layer_helpers() -> None:
    assert spatial_shape((3, 40, 50), 0) == (40, 50) and spatial_shape((40, 50, 3), -1) == (40, 50)
    with pytest.raises(ValueError, match="channel axis"):
        spatial_shape((3, 40, 50), None)
    assert parse_channels("auto", "auto", 3) is None
    assert parse_channels("1", "none", 3) == (1, None) and parse_channels("auto", "0", 2) == (None, 0)
    with pytest.raises(ValueError, match="does not exist"):
        parse_channels("4", "none", 2)
    with pytest.raises(ValueError):
        parse_channels("none", "none", 2)
    (rect,) = box_rectangles(np.array([[1, 2, 5, 9]], np.float32))
    assert box_of(rect) == (1.0, 2.0, 5.0, 9.0)
    xy, signs = click_prompt(np.array([[3.0, 4.0], [5.0, 6.0]]), [True, False])
    assert xy == [(4.0, 3.0), (6.0, 5.0)] and signs == [1, 0]


def test_reader_reads_what_cellsam_reads(tmp_path: Path) -> None:
    import tifffile

    from cellsam.napari._reader import get_reader
    from cellsam.napari._writer import write_labels

    img, lab = blobs()
    assert get_reader(str(tmp_path / "x.txt")) is None and get_reader([]) is None
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([img, img], -1), metadata={"axes": "YXS"})
    ((data, kw, kind),) = get_reader(str(tmp_path / "stack.tif"))(str(tmp_path / "stack.tif"))
    assert kind == "image" and data.shape == (2, *img.shape) and kw["metadata"]["cellsam"]["channel_axis"] == 0
    (out,) = write_labels(str(tmp_path / "cells_masks"), lab, {})
    assert out.endswith("cells_masks.tif")
    ((back, _, kind),) = get_reader(out)(out)
    assert kind == "labels"
    np.testing.assert_array_equal(back, lab)
    with pytest.raises(ValueError, match="2-D"):
        write_labels(str(tmp_path / "x.tif"), np.zeros((2, 4, 4), np.int32), {})


def test_finetune_job_can_be_cancelled(tiny, tmp_path: Path) -> None:
    """The job runs in a child process; cancel() stops it after its current phase."""
    img, lab = blobs()
    run = FinetuneRun(tiny, [TrainingImage("a", img, None, None, lab)], mask_steps=500, accelerator="cpu",
                      workdir=tmp_path)
    gen = run.iter_run(poll_s=0.2)
    first = next(gen)
    assert first.total == 1000 and first.message.startswith("fine-tuning")
    run.cancel()
    steps, result = drain(gen)
    assert result.state == "cancelled", result
    assert result.model is None and "cancelled" in result.summary()
    assert (tmp_path / "project" / "cellsam_project.db").is_file()


def test_widget_segmentation_takes_the_diameter_as_the_library_does() -> None:
    """SegmentOptions.diameter (a number, or the default "auto" on an in-memory image) gives the labels
    and the scale of cellsam.segment with the same diameter."""
    import cellsam
    from cellsam.cli.segment import sample_path
    from cellsam.io import load_image

    im = load_image(sample_path()).data
    model = cellsam.load_model("default")
    for diameter in (60.0, "auto"):
        _, seg = drain(iter_segment(im, model, options=SegmentOptions(diameter=diameter)))
        expect = cellsam.segment(im, model, diameter=diameter)
        assert seg.tile_size == expect.tile_size and seg.diameter == pytest.approx(expect.diameter)
        np.testing.assert_array_equal(seg.labels, expect.labels)
    assert seg.tile_size != model.cfg.tile_size  # the sample's ~41 px nuclei are rescaled to the model's 27.7


def test_widget_segmentation_mends_a_wrong_size_estimate_as_the_library_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the size model off by 2.5x, the widget's blockwise "auto" measures its first pass's cells and
    segments again at their scale, as cellsam.segment does: the same labels, the same final scale."""
    import cellsam
    import cellsam.inference.scale as scale
    from cellsam.cli.segment import sample_path
    from cellsam.io import load_image

    im = load_image(sample_path()).data
    model = cellsam.load_model("default")
    right = cellsam.segment(im, model)
    true_estimate = scale.estimate_diameter
    monkeypatch.setattr(scale, "estimate_diameter", lambda *a: 2.5 * true_estimate(*a))
    steps, seg = drain(iter_segment(im, model, options=SegmentOptions()))
    expect = cellsam.segment(im, model)
    assert seg.tile_size == expect.tile_size and seg.diameter == pytest.approx(expect.diameter)
    np.testing.assert_array_equal(seg.labels, expect.labels)
    assert right.tile_size is not None and seg.tile_size is not None
    assert max(seg.tile_size, right.tile_size) <= 1.3 * min(seg.tile_size, right.tile_size)
    assert sum(p.done == 0 for p in steps) == 2  # two passes over the tiles


def test_prompt_tool_keeps_the_scale_a_segmentation_set(tiny) -> None:
    img, _ = blobs()
    tool = PromptTool(tiny)
    tool.use_scale("a", 96)
    tool.set_image("a", img, ImageSpec())
    assert tool.session.known_scale("a") == 96
    tool.cell("a", box=(10, 10, 40, 40))
    assert {k[2] for k in tool.session.embeddings._d} == {96}  # the tile embedded at that scale
    tool.forget("a")
    assert tool.session.known_scale("a") is None and len(tool.session.embeddings) == 0


def test_napari_segments_a_negative_as_cellsam_segment_does() -> None:
    """The sample's negative (dark nuclei on white), in memory and as a dask array: both inverted, with
    the cells cellsam.segment finds in it; polarity="as_is" is obeyed."""
    da = pytest.importorskip("dask.array")
    from cellsam.cli.segment import sample_path
    from cellsam.io import load_image

    raw = load_image(sample_path()).data.astype(np.float32)
    neg = raw.max() - raw
    model = __import__("cellsam").load_model("default")
    expect = segment(neg, model)
    assert expect.inverted and expect.n_cells >= 20
    _, mem = drain(iter_segment(neg, model))
    _, lazy = drain(iter_segment(da.from_array(neg, chunks=100), model, options=SegmentOptions(block_tiles=1)))
    assert mem.inverted and lazy.inverted
    assert abs(mem.n_cells - expect.n_cells) <= 2 and abs(lazy.n_cells - expect.n_cells) <= 2
    inter = (mem.labels > 0) & (expect.labels > 0)
    assert inter.sum() >= 0.9 * (expect.labels > 0).sum()
    _, kept = drain(iter_segment(neg, model, options=SegmentOptions(polarity="as_is")))
    assert not kept.inverted and ((kept.labels > 0) & (expect.labels > 0)).sum() < inter.sum()


# ----------------------------------------------------------------------------------- prompt layers, jobs
class _Signal:
    def __init__(self) -> None:
        self.slots: list = []

    def connect(self, fn) -> None:
        self.slots.append(fn)

    def emit(self, event) -> None:
        for fn in self.slots:
            fn(event)


class _FakeLayer:
    """What PromptLayers uses of a napari Shapes / Points layer; ``add`` extends the features first, as
    napari does before it emits the data event."""

    def __init__(self, name: str, features: dict | None = None, **_: object) -> None:
        from types import SimpleNamespace

        self.name, self.data, self.mode, self.face_color = name, np.zeros((0, 2)), "pan_zoom", None
        self.features = dict(features) if features is not None else {}
        self.events = SimpleNamespace(data=_Signal())
        self.mouse_drag_callbacks: list = []

    def add(self, yx) -> None:
        from types import SimpleNamespace

        self.data = np.vstack([np.asarray(self.data, float).reshape(-1, 2), np.asarray(yx, float)])
        if "positive" in self.features:
            self.features = {"positive": np.append(np.asarray(self.features["positive"], bool), True)}
        self.events.data.emit(SimpleNamespace(action="added", data_indices=(-1,)))


class _Layers(dict):
    def __init__(self) -> None:
        from types import SimpleNamespace

        super().__init__()
        self.selection = SimpleNamespace(active=None)


class _FakeViewer:
    def __init__(self) -> None:
        self.layers = _Layers()

    def _add(self, name: str, **kwargs) -> _FakeLayer:
        self.layers[name] = _FakeLayer(name, **kwargs)
        return self.layers[name]

    def add_shapes(self, *, name: str, **kwargs) -> _FakeLayer:
        return self._add(name, **kwargs)

    def add_points(self, *, name: str, **kwargs) -> _FakeLayer:
        return self._add(name, **kwargs)


def test_click_sequence_draws_one_cell_until_next_cell() -> None:
    from types import SimpleNamespace

    from cellsam.napari.prompt_layers import NEGATIVE, POSITIVE, PromptLayers

    viewer = _FakeViewer()
    calls: list[dict] = []
    answers = iter([SimpleNamespace(label=7, rect=(1, 2, 30, 40)), None, SimpleNamespace(label=7, rect=(1, 2, 33, 44))])

    def prompt(**kw):
        calls.append(kw)
        return next(answers)

    layers = PromptLayers(viewer, prompt)
    shapes, points = layers.add({})
    assert layers.add({}) == (shapes, points) and len(viewer.layers) == 2  # made once
    assert viewer.layers.selection.active is shapes and shapes.mode == "add_rectangle"

    points.add([[10.0, 20.0]])  # (y, x): a positive click starts a cell
    assert calls[-1] == dict(points=[(20.0, 10.0)], point_labels=[1], label=None, previous=None)
    assert layers.click_label == 7 and layers.click_rect == (1, 2, 30, 40)

    points.mouse_drag_callbacks[0](points, SimpleNamespace(modifiers=("Shift",)))  # Shift held: negative
    points.add([[50.0, 60.0]])
    assert list(points.features["positive"]) == [True, False] and points.face_color == [POSITIVE, NEGATIVE]
    assert calls[-1] == dict(points=[(20.0, 10.0), (60.0, 50.0)], point_labels=[1, 0], label=7,
                             previous=(1, 2, 30, 40))  # the same cell, redrawn
    assert layers.click_label == 7 and layers.click_rect == (1, 2, 30, 40)  # a failed prompt changes nothing
    assert layers.shift is False  # the next click is positive again

    points.add([[12.0, 22.0]])
    assert calls[-1]["point_labels"] == [1, 0, 1] and layers.click_rect == (1, 2, 33, 44)

    layers.next_cell()
    assert len(points.data) == 0 and list(points.features["positive"]) == []
    assert layers.click_label is None and layers.click_rect is None and len(calls) == 3  # clearing prompts nothing


def test_box_layer_events_other_than_added_are_not_prompts() -> None:
    from types import SimpleNamespace

    from cellsam.napari.prompt_layers import PromptLayers

    viewer = _FakeViewer()
    calls: list[dict] = []
    layers = PromptLayers(viewer, lambda **kw: calls.append(kw))
    shapes, points = layers.add({})
    shapes.events.data.emit(SimpleNamespace(action="removed"))
    points.events.data.emit(SimpleNamespace(action="changed"))
    points.events.data.emit(SimpleNamespace(action="removed"))  # nothing left to prompt with
    assert calls == []


def test_jobs_turn_exceptions_into_failed_and_pass_progress_through() -> None:
    from cellsam.napari.jobs import Failed, guarded, message_of, returning

    def work():
        yield "half"
        return 42

    def broken():
        yield "start"
        raise KeyError("no channel 3")

    assert drain(guarded(work())) == (["half"], 42)
    assert drain(guarded(broken())) == (["start"], Failed("no channel 3"))  # a KeyError's text, unquoted
    assert drain(guarded(returning(lambda: "model"))) == ([], "model")
    assert drain(guarded(returning(lambda: 1 / 0))) == ([], Failed("division by zero"))
    assert message_of(ValueError()) == "ValueError"
