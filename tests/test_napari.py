"""The napari plugin in a real napari viewer (``make_napari_viewer``, pytest-qt, offscreen Qt).

napari draws with OpenGL, which Qt's offscreen platform has only on an X display: where ``DISPLAY`` is
unset and Debian's ``Xvfb`` is installed (``.ci/run`` installs it), a private Xvfb is started for
these tests (``-terminate``: it exits with this process). Everything here skips cleanly where napari,
pytest-qt or an OpenGL context is missing.

Models: ``vit_tiny`` with random weights saved to a checkpoint (fast; with open thresholds it finds
arbitrary but deterministic cells, so the widget is checked against ``cellsam.segment`` itself) and
the real default model on the bundled sample (the widget's cells equal the library's, which finds
the sample's nuclei).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("npe2")

import torch  # noqa: E402

try:  # Triton before OpenGL, for the whole test session: loading Triton's LLVM after Mesa's (napari's
    import triton  # noqa: F401 - canvas) crashes the process; see cellsam.napari._widget.keep_triton_out
except ImportError:
    pass

from cellsam.cli.segment import sample_path  # noqa: E402
from cellsam.inference.segment import segment  # noqa: E402
from cellsam.io import load_image  # noqa: E402
from tests.conftest import make_blobs  # noqa: E402

TIMEOUT_MS = 120_000


def _start_xvfb() -> None:
    """A private Xvfb on a free display number (or nothing if it does not come up in 10 s)."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            ["Xvfb", "-displayfd", str(w), "-screen", "0", "1280x1024x24", "-nolisten", "tcp", "-terminate"],
            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(w)
    text, deadline = b"", time.monotonic() + 10
    while not text.endswith(b"\n") and time.monotonic() < deadline:  # read the whole line: Xvfb writes
        ready, _, _ = select.select([r], [], [], 1)  # the newline apart, and dies of SIGPIPE without a reader
        chunk = os.read(r, 32) if ready else b""
        if ready and not chunk:
            break
        text += chunk
    os.close(r)
    number = text.decode().strip()
    if number:
        os.environ["DISPLAY"] = f":{number}"
    else:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session", autouse=True)
def qt_with_opengl():
    """Skip unless a Qt application with an OpenGL context can be made (offscreen platform)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    if not os.environ.get("DISPLAY") and shutil.which("Xvfb"):
        _start_xvfb()
    try:
        from qtpy.QtGui import QOpenGLContext
        from qtpy.QtWidgets import QApplication
    except Exception as e:  # noqa: BLE001 - no Qt binding or its libraries
        pytest.skip(f"Qt cannot start: {e}")
    app = QApplication.instance() or QApplication([])  # kept: pytest-qt's qapp reuses it
    context = QOpenGLContext()
    ok = context.create()
    del context
    if not ok:
        pytest.skip("no OpenGL context (napari needs one): run where DISPLAY is set or Xvfb is installed")
    yield app


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from cellsam.models.build import build_model
    from cellsam.weights import save_model

    torch.manual_seed(0)
    return save_model(build_model("vit_tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", version="test")


def blobs() -> tuple[np.ndarray, np.ndarray]:
    img, lab = make_blobs((160, 144), n=14, radius=(6, 10), seed=3)
    return (img * 4000).astype(np.uint16), lab


def make_widget(viewer, model: str | Path = "default"):
    from cellsam.napari._widget import CellSAMWidget

    widget = CellSAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="cellsam")
    if model == "default":
        assert widget.model.value == "default" and widget.model_name() == "default"
    else:
        widget.model_file.value = model
    return widget


def run(qtbot, widget, worker) -> None:
    """Wait for the widget's worker to end (its own ``finished`` slot, connected before it started,
    clears ``busy()``; a signal connected here could come too late for a job that fails at once)."""
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.busy(), timeout=TIMEOUT_MS)


def open_thresholds(widget) -> None:
    widget.own_thresholds.value = False
    widget.box_threshold.value = 0.0
    widget.iou_threshold.value = -1.0
    widget.mask_threshold.value = 0.5


def notes(since: int = 0) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[since:]]


def n_notes() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


# ----------------------------------------------------------------------------------- manifest, reader, writer
def test_manifest_is_installed_and_valid() -> None:
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_distribution("cellsam")
    manifest.validate_imports()
    assert {c.id for c in manifest.contributions.commands} >= {
        "cellsam.get_reader", "cellsam.write_labels", "cellsam.make_widget", "cellsam.nuclei_sample"}
    pm = PluginManager.instance()
    pm.discover()
    assert "cellsam" in pm._manifests  # the napari.manifest entry point
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "cellsam"], capture_output=True, text=True)
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr


def test_triton_is_kept_out_of_napari_only_when_not_loaded(monkeypatch) -> None:
    from cellsam.napari._widget import keep_triton_out

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    if not sys.platform.startswith("linux"):
        assert keep_triton_out() is False
        return
    assert keep_triton_out() is True and sys.modules["triton"] is None
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    assert keep_triton_out() is False  # already decided


def test_reader_and_writer_round_trip(make_napari_viewer, tmp_path: Path) -> None:
    import napari
    import tifffile
    import zarr
    from PIL import Image

    from cellsam.napari._reader import get_reader

    viewer = make_napari_viewer()
    img, lab = blobs()
    tifffile.imwrite(tmp_path / "grey.tif", img)
    two = np.stack([img, img // 2], axis=-1)
    tifffile.imwrite(tmp_path / "two.tif", two, metadata={"axes": "YXS"})
    Image.fromarray(np.stack([(img >> 4).astype(np.uint8)] * 3, axis=-1)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "arr.npy", img)
    g = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    g.create_dataset("0", data=img[None, None, None])
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in "tczyx"],
                               "datasets": [{"path": "0"}]}]
    assert get_reader(str(tmp_path / "notes.txt")) is None
    layers = {}
    for name in ("grey.tif", "two.tif", "rgb.png", "arr.npy", "img.ome.zarr"):
        (layer,) = viewer.open(str(tmp_path / name), plugin="cellsam")
        layers[name] = layer
    np.testing.assert_array_equal(layers["grey.tif"].data, img)
    np.testing.assert_array_equal(layers["arr.npy"].data, img)
    np.testing.assert_array_equal(layers["img.ome.zarr"].data, img)
    assert layers["rgb.png"].rgb and layers["rgb.png"].metadata["cellsam"]["channel_axis"] == -1
    assert layers["two.tif"].data.shape == (2, *img.shape)  # channels first, as napari shows them
    assert layers["two.tif"].metadata["cellsam"]["channel_axis"] == 0
    # labels: napari's save through our writer, read back as a Labels layer
    labels = viewer.add_labels(lab, name="blobs labels")
    out = napari.save_layers(str(tmp_path / "blobs_labels.tif"), [labels], plugin="cellsam")
    assert [Path(p).name for p in out] == ["blobs_labels.tif"]
    assert tifffile.imread(tmp_path / "blobs_labels.tif").dtype == np.uint16
    (back,) = viewer.open(str(tmp_path / "blobs_labels.tif"), plugin="cellsam")
    assert type(back).__name__ == "Labels"
    np.testing.assert_array_equal(back.data, lab)


def test_reader_opens_a_large_ome_zarr_lazily(make_napari_viewer, qtbot, tmp_path: Path, monkeypatch,
                                              tiny_checkpoint: Path) -> None:
    import zarr

    from cellsam.napari import _reader

    monkeypatch.setattr(_reader, "LAZY_READ_PIXELS", 100)
    img, _ = blobs()
    g = zarr.open_group(str(tmp_path / "big.ome.zarr"), mode="w")
    g.create_dataset("0", data=np.stack([img, img // 2])[None], chunks=(1, 1, 64, 64))
    g.create_dataset("1", data=np.stack([img, img // 2])[None, :, ::2, ::2])
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in "tcyx"],
                               "datasets": [{"path": "0"}, {"path": "1"}]}]
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "big.ome.zarr"), plugin="cellsam")
    assert layer.multiscale and type(layer.data[0]).__module__.startswith("dask")
    assert layer.data[0].shape == (2, *img.shape) and layer.metadata["cellsam"]["channel_axis"] == 0
    # Segment reads it block by block (the lazy path) into labels of the image's size
    widget = make_widget(viewer, tiny_checkpoint)
    open_thresholds(widget)
    assert widget.channel_axis.value == "first (C, Y, X)" and widget.nuclear.choices == ("auto", "none", "0", "1")
    widget.nuclear.value, widget.wholecell.value = "0", "1"
    run(qtbot, widget, widget.segment())
    labels = viewer.layers["big labels"]
    assert labels.data.shape == img.shape and labels.metadata["cellsam"]["channels"] == (0, 1)


# ----------------------------------------------------------------------------------- Segment
def test_segment_tiny_model_equals_the_library(make_napari_viewer, qtbot, tiny_checkpoint: Path) -> None:
    from cellsam.weights import load_model

    viewer = make_napari_viewer()
    img, _ = blobs()
    viewer.add_image(img, name="blobs")
    widget = make_widget(viewer, tiny_checkpoint)
    open_thresholds(widget)
    widget.show_boxes.value = True
    assert widget.image.value == "blobs" and widget.channel_axis.value == "none (2-D)"
    run(qtbot, widget, widget.segment())
    expect = segment(img, load_model(tiny_checkpoint), box_threshold=0.0, iou_threshold=-1.0, mask_threshold=0.5)
    assert expect.n_cells > 0
    labels = viewer.layers["blobs labels"]
    np.testing.assert_array_equal(labels.data, expect.labels)
    boxes = viewer.layers["blobs boxes"]
    assert len(boxes.data) == expect.n_cells
    np.testing.assert_allclose(boxes.features["score"], np.round(expect.scores, 3), atol=1e-3)
    assert labels.metadata["cellsam"]["image"] == "blobs"
    assert "cell(s)" in widget.status.value and not widget.busy()


def test_segment_default_model_on_the_sample(make_napari_viewer, qtbot) -> None:
    """The real default model on the bundled sample, as a user would: open, Segment."""
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(sample_path()), plugin="cellsam")
    widget = make_widget(viewer)
    t0 = time.perf_counter()
    run(qtbot, widget, widget.segment())
    seconds = time.perf_counter() - t0
    expect = segment(load_image(sample_path()).data, "default")
    labels = viewer.layers[f"{layer.name} labels"].data
    assert expect.n_cells >= 20  # the sample's nuclei
    assert int(labels.max()) == len(np.unique(labels)) - 1 == expect.n_cells
    np.testing.assert_array_equal(labels, expect.labels)
    from cellsam.weights import load_model

    stored = load_model("default").cfg.inference.box_threshold
    assert widget.box_threshold.value == pytest.approx(stored)  # the model's own thresholds, shown
    print(f"Segment in the widget (incl. loading the model): {seconds:.2f} s")


# ----------------------------------------------------------------------------------- prompts
def test_box_prompt_adds_one_label_and_undo_removes_it(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(sample_path()), plugin="cellsam")
    widget = make_widget(viewer)
    ref = segment(load_image(sample_path()).data, "default")
    k = int(np.argmax(np.bincount(ref.labels.ravel())[1:])) + 1  # the largest nucleus
    truth = ref.labels == k
    start = np.where(truth, 0, ref.labels).astype(np.int32)  # the labels without that cell
    labels = viewer.add_labels(start.copy(), name=f"{layer.name} labels")
    shapes, _ = widget.add_prompt_layers()
    ys, xs = np.nonzero(truth)
    y0, x0, y1, x1 = ys.min() - 2, xs.min() - 2, ys.max() + 3, xs.max() + 3
    t0 = time.perf_counter()
    shapes.add_rectangles(np.array([[y0, x0], [y1, x1]], float))  # as if drawn
    seconds = time.perf_counter() - t0
    new = labels.data
    assert int(new.max()) == int(start.max()) + 1
    added = new == new.max()
    assert (new != start).sum() == added.sum() > 0  # one new label, nothing else changed
    iou = (added & truth).sum() / (added | truth).sum()
    assert iou > 0.6, iou
    qtbot.waitUntil(lambda: len(shapes.data) == 0, timeout=5000)  # the drawn box is cleared
    labels.undo()
    np.testing.assert_array_equal(labels.data, start)
    print(f"one box prompt in the widget (first on its tile, incl. embedding): {seconds:.3f} s")


def test_clicks_draw_then_refine_one_cell(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(sample_path()), plugin="cellsam")
    widget = make_widget(viewer)
    ref = segment(load_image(sample_path()).data, "default")
    k = int(np.argmax(np.bincount(ref.labels.ravel())[1:])) + 1
    ys, xs = np.nonzero(ref.labels == k)
    _, points = widget.add_prompt_layers()
    points.add([[ys.mean(), xs.mean()]])  # a positive click in the cell
    labels = viewer.layers[f"{layer.name} labels"]  # made by the first prompt
    assert int(labels.data.max()) == 1 and list(points.features["positive"]) == [True]
    first = labels.data == 1
    assert (first & (ref.labels == k)).sum() / (first | (ref.labels == k)).sum() > 0.5
    widget.prompt_layers.shift = True  # what Shift+click records: a negative click
    points.add([[ys.max() + 15, xs.max() + 15]])
    assert list(points.features["positive"]) == [True, False]
    assert int(labels.data.max()) == 1  # the same cell was redrawn, not a new one
    widget.next_cell()
    assert len(points.data) == 0 and widget.prompt_layers.click_label is None


# ----------------------------------------------------------------------------------- cancel and bad input
def test_cancel_stops_segment(make_napari_viewer, qtbot, tiny_checkpoint: Path) -> None:
    viewer = make_napari_viewer()
    img, _ = make_blobs((640, 640), n=60, seed=1)
    viewer.add_image(img, name="big")
    widget = make_widget(viewer, tiny_checkpoint)
    open_thresholds(widget)
    worker = widget.segment()
    with qtbot.waitSignal(worker.aborted, timeout=TIMEOUT_MS):
        widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy(), timeout=TIMEOUT_MS)
    assert "big labels" not in viewer.layers and widget.status.value == "cancelled"
    assert widget.segment_button.enabled and not widget.cancel_button.enabled


def test_bad_input_gives_notifications_not_tracebacks(make_napari_viewer, qtbot, tiny_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer = make_napari_viewer()
    widget = make_widget(viewer, tiny_checkpoint)
    n0 = n_notes()
    assert widget.segment() is None  # no image layer at all
    viewer.add_image(np.zeros((4, 40, 50), np.float32) + np.arange(4)[:, None, None], name="stack")
    widget.channel_axis.value = "none (2-D)"
    assert widget.segment() is None  # a 3-D image read as 2-D
    img = blobs()[0].astype(np.float32)
    img[3, 3] = np.nan
    viewer.add_image(img, name="nan")
    widget.image.value = "nan"
    run(qtbot, widget, widget.segment())  # refused by the library inside the worker
    widget.model_file.value = tmp_path / "missing.safetensors"
    widget.image.value = "stack"
    widget.channel_axis.value = "first (C, Y, X)"
    run(qtbot, widget, widget.segment())
    assert widget.prompt(box=(1, 1, 5, 5)) is None
    msgs = notes(n0)
    assert any("open an image first" in m for m in msgs)
    assert any("channel axis" in m for m in msgs)
    assert any("NaN" in m for m in msgs), msgs
    assert sum("missing.safetensors" in m for m in msgs) == 2, msgs  # Segment and the prompt
    new = notification_manager.records[n0:]
    assert all(type(n).__name__ == "Notification" for n in new)  # no ErrorNotification (traceback)
    assert all(n.severity in (NotificationSeverity.ERROR, NotificationSeverity.WARNING, NotificationSeverity.INFO)
               for n in new)
    assert not [lay for lay in viewer.layers if type(lay).__name__ == "Labels"]


# ----------------------------------------------------------------------------------- fine-tuning
def test_finetune_offers_the_new_model_with_scores(make_napari_viewer, qtbot, tiny_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    img, lab = blobs()
    viewer.add_image(img, name="blobs")
    widget = make_widget(viewer, tiny_checkpoint)
    open_thresholds(widget)
    run(qtbot, widget, widget.segment())
    viewer.layers["blobs labels"].data = lab  # the user's corrections
    widget.mask_steps.value = 2
    run(qtbot, widget, widget.finetune(accelerator="cpu", workdir=tmp_path / "ft"))
    result = widget.finetune_result
    assert result is not None and result.state == "done", (result, notes())
    assert result.before["n_true"] == result.after["n_true"] == lab.max()
    assert "->" in widget.finetune_scores.value and widget.use_button.enabled
    old = widget.get_model()
    widget.use_finetuned()
    assert widget.get_model() is not old and Path(widget.model_name()) == result.model
    assert not widget.use_button.enabled
