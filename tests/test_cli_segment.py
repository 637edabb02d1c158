"""`cellsam segment`: readers, writers, and the command over folders with a corrupt file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from cellsam import io
from cellsam.cli import main
from cellsam.cli import segment as cli_segment
from cellsam.models.build import build_model
from cellsam.ops.masks import outlines
from tests.conftest import make_blobs

OPEN = ["--box-threshold", "0", "--iou-threshold=-1e9", "--tile-size", "64"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from cellsam.weights import save_model

    torch.manual_seed(0)
    return save_model(build_model("vit_tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", version="test")


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    img, _ = make_blobs((70, 80), n=6)
    u8 = (img * 255).astype(np.uint8)
    Image.fromarray(u8).save(d / "grey.png")
    Image.fromarray(np.stack([u8] * 3, axis=-1)).save(d / "rgb.jpg", quality=95)
    tifffile.imwrite(d / "stack.tif", np.stack([u8, u8]).astype(np.uint16) * 100, metadata={"axes": "CYX"})
    np.save(d / "raw.npy", img)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (d / "notes.txt").write_text("ignored: not an image")
    return d


# ---------------------------------------------------------------- readers
def test_readers_return_arrays_and_the_stated_channel_axis(image_dir: Path, tmp_path: Path) -> None:
    grey = io.load_image(image_dir / "grey.png")
    assert grey.data.shape == (70, 80) and grey.data.dtype == np.uint8 and grey.channel_axis is None
    rgb = io.load_image(image_dir / "rgb.jpg")
    assert rgb.data.shape == (70, 80, 3) and rgb.channel_axis == -1
    two = io.load_image(image_dir / "stack.tif")
    assert two.data.shape == (2, 70, 80) and two.data.dtype == np.uint16 and two.channel_axis == 0
    raw = io.load_image(image_dir / "raw.npy")
    assert raw.data.dtype == np.float32 and raw.channel_axis is None
    tifffile.imwrite(tmp_path / "q.tif", np.zeros((4, 10, 12), np.uint8), photometric="minisblack")
    assert io.load_image(tmp_path / "q.tif").channel_axis is None  # unnamed axis: the user must say
    tifffile.imwrite(tmp_path / "s.ome.tif", np.zeros((1, 1, 1, 10, 12), np.uint8), metadata={"axes": "TCZYX"})
    assert io.load_image(tmp_path / "s.ome.tif").data.shape == (10, 12)
    assert io.image_name(tmp_path / "s.ome.tif") == "s"
    Image.fromarray(np.zeros((10, 12, 4), np.uint8), "RGBA").save(tmp_path / "a.png")
    assert io.load_image(tmp_path / "a.png").data.shape == (10, 12, 4)


def test_readers_refuse_bad_files(image_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(io.ImageReadError, match="cannot read image"):
        io.load_image(image_dir / "broken.png")
    with pytest.raises(io.ImageReadError, match="unsupported file type"):
        io.load_image(image_dir / "notes.txt")
    with pytest.raises(io.ImageReadError, match="no such file"):
        io.load_image(tmp_path / "nope.tif")
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((5, 10, 12), np.uint8), metadata={"axes": "ZYX"})
    with pytest.raises(io.ImageReadError, match="z-stacks"):
        io.load_image(tmp_path / "z.tif")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(io.ImageReadError):
        io.load_image(tmp_path / "bad.npy")


def test_ome_zarr(tmp_path: Path) -> None:
    try:
        import zarr
    except ImportError:
        (tmp_path / "x.zarr").mkdir()
        with pytest.raises(io.ImageReadError, match="needs the zarr package"):
            io.load_image(tmp_path / "x.zarr")
        return
    root = zarr.open_group(str(tmp_path / "x.ome.zarr"), mode="w")
    data = np.arange(2 * 10 * 12, dtype=np.uint16).reshape(1, 2, 1, 10, 12)
    root.create_dataset("0", data=data)
    root.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                  "axes": [{"name": a} for a in "tczyx"]}]
    img = io.load_image(tmp_path / "x.ome.zarr")
    assert img.data.shape == (2, 10, 12) and img.channel_axis == 0
    np.testing.assert_array_equal(img.data, data[0, :, 0])


def test_find_images_expands_folders_and_globs(image_dir: Path) -> None:
    paths, missing = io.find_images([str(image_dir), str(image_dir / "*.png"), "/no/such/*.tif"])
    names = [p.name for p in paths]
    assert names == ["broken.png", "grey.png", "raw.npy", "rgb.jpg", "stack.tif"]  # no duplicates, no .txt
    assert missing == ["/no/such/*.tif"]


# ---------------------------------------------------------------- writers
def test_labels_dtype_grows_with_the_cell_count(tmp_path: Path) -> None:
    small = np.arange(12, dtype=np.int32).reshape(3, 4)
    io.write_labels(tmp_path / "s.tif", small)
    assert tifffile.imread(tmp_path / "s.tif").dtype == np.uint16
    big = np.arange(70_000, dtype=np.int32).reshape(100, 700)
    io.write_labels(tmp_path / "b.tif", big)
    back = tifffile.imread(tmp_path / "b.tif")
    assert back.dtype == np.uint32 and (back == big).all()


def _check_outputs(out: Path, name: str, shape: tuple[int, int], coco: bool) -> int:
    labels = tifffile.imread(out / f"{name}_labels.tif")
    assert labels.shape == shape and labels.dtype == np.uint16
    n = int(labels.max())
    assert len(np.unique(labels)) - (0 in labels) == n  # labels 1..n, no gaps
    overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
    assert overlay.shape == (*shape, 3)
    edge = outlines(labels)
    assert (overlay[edge] == (255, 40, 40)).all()
    with open(out / f"{name}_cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["label"]) for r in rows] == list(range(1, n + 1))
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    for r in rows:
        k = int(r["label"])
        yy, xx = np.nonzero(labels == k)
        assert int(r["area"]) == areas[k] == yy.size
        assert abs(float(r["centroid_y"]) - yy.mean()) < 0.01 and abs(float(r["centroid_x"]) - xx.mean()) < 0.01
        assert [int(r[c]) for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")] == [
            yy.min(), xx.min(), yy.max() + 1, xx.max() + 1]
        assert 0 <= float(r["score"]) <= 1
    if coco:
        doc = json.loads((out / f"{name}_coco.json").read_text())
        assert doc["images"][0]["height"] == shape[0] and doc["images"][0]["width"] == shape[1]
        anns = doc["annotations"]
        assert len(anns) == n
        for ann, r in zip(anns, rows, strict=True):
            m = mask_utils.decode({"size": ann["segmentation"]["size"],
                                   "counts": ann["segmentation"]["counts"].encode()})
            k = int(r["label"])
            assert (m.astype(bool) == (labels == k)).all() and ann["area"] == areas[k]
            assert abs(ann["score"] - float(r["score"])) < 1e-4
            x, y, w, h = ann["bbox"]
            assert [y, x, y + h, x + w] == [int(r[c]) for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")]
    return n


# ---------------------------------------------------------------- the command
def test_cli_folder_with_a_corrupt_file(image_dir: Path, tmp_path: Path, checkpoint: Path, capsys) -> None:
    out = tmp_path / "out"
    (image_dir / "stack.tif").unlink()  # 2 channels: needs --channels (tested below)
    code = main(["segment", str(image_dir), "-o", str(out), "--model", str(checkpoint), "--device", "cpu",
                 "--coco", *OPEN])
    assert code == 1  # one file failed
    printed = capsys.readouterr().out
    assert "3 image(s) segmented" in printed and "1 failed" in printed and "broken.png" in printed
    failure = [line for line in printed.splitlines() if "broken.png: FAILED:" in line]
    assert len(failure) == 1 and printed.count(failure[0].split("FAILED: ")[1]) == 1  # the reason, once
    for name in ("grey.png", "rgb.jpg", "raw.npy"):  # a cell count per image
        assert any(line.startswith(f"{image_dir / name}: ") and line.endswith(" cell(s)")
                   for line in printed.splitlines()), printed
    assert printed.count(str(image_dir / "broken.png") + ":") == 1  # the path is not repeated in the reason
    total = sum(_check_outputs(out, name, (70, 80), coco=True) for name in ("grey", "rgb", "raw"))
    assert total > 0
    assert not (out / "broken_labels.tif").exists()


def test_cli_channels_for_a_two_channel_tiff(image_dir: Path, tmp_path: Path, checkpoint: Path, capsys) -> None:
    out, tif = tmp_path / "out2", str(image_dir / "stack.tif")
    code = main(["segment", tif, "-o", str(out), "--model", str(checkpoint), "--channels", "0", "1", *OPEN])
    assert code == 0
    _check_outputs(out, "stack", (70, 80), coco=False)
    # without --channels the 2-channel file is an error, reported, with exit code 1
    code = main(["segment", tif, "-o", str(out), "--model", str(checkpoint), *OPEN])
    printed = capsys.readouterr().out
    assert code == 1 and "--channels" in printed and "channels=" not in printed  # the flag, not the argument
    code = main(["segment", tif, "-o", str(out), "--model", str(checkpoint), "--channels", "none", "1", *OPEN])
    assert code == 0


def test_cli_sample_and_same_stem_names(tmp_path: Path, checkpoint: Path, monkeypatch) -> None:
    assert cli_segment.sample_path().is_file()
    src = tmp_path / "in"
    src.mkdir()
    img, _ = make_blobs((40, 40), n=3)
    Image.fromarray((img * 255).astype(np.uint8)).save(src / "cells.png")
    np.save(src / "cells.npy", img)
    out = tmp_path / "out3"
    code = main(["segment", str(src), "--sample", "-o", str(out), "--model", str(checkpoint),
                 "--box-threshold", "0", "--iou-threshold=-1e9", "--tile-size", "128", "--batch-size", "8"])
    assert code == 0
    sample = np.asarray(Image.open(cli_segment.sample_path()))
    _check_outputs(out, "nuclei", sample.shape, coco=False)
    assert (out / "cells_labels.tif").exists() and (out / "cells_png_labels.tif").exists()


def test_cli_usage_errors(tmp_path: Path, checkpoint: Path, capsys) -> None:
    assert main(["segment", "-o", str(tmp_path)]) == 2  # nothing to do
    assert main(["segment", str(tmp_path / "missing*.png"), "-o", str(tmp_path)]) == 1
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(img)
    assert main(["segment", str(img), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "no.safetensors")]) == 1
    with pytest.raises(SystemExit):
        main(["segment", str(img), "--channels", "0", "green"])
    # an output "folder" that is a file: a clear message and exit 2, not a traceback
    assert main(["segment", str(img), "-o", str(img), "--model", str(checkpoint)]) == 2
    # an invalid relative minimum area fails the image with the library's message (as other invalid options)
    assert main(["segment", str(img), "-o", str(tmp_path / "o"), "--model", str(checkpoint),
                 "--min-area-rel", "1.5"]) == 1
    assert "min_area_rel must be in [0, 1)" in capsys.readouterr().out
    # --dask with a wrong model: refused once, before any cluster starts
    assert main(["segment", str(img), "-o", str(tmp_path / "o"), "--dask", "--model", str(tmp_path / "no.st")]) == 1


def test_png_above_pils_bomb_limit_reads_when_max_pixels_allows(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL refuses images above 2 x MAX_IMAGE_PIXELS (~179 MP by default); cellsam's own limit is max_pixels."""
    path = tmp_path / "big.png"
    Image.fromarray(np.arange(60 * 50, dtype=np.uint16).reshape(60, 50).astype(np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3,000 px is a "bomb" to PIL now
    assert io.load_image(path).data.shape == (60, 50)
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's own setting is restored
    with pytest.raises(io.ImageTooLarge):
        io.load_image(path, max_pixels=2000)


def test_cli_words_library_errors_as_flags(tmp_path: Path, checkpoint: Path, capsys) -> None:
    stack = tmp_path / "c7.npy"
    np.save(stack, np.random.default_rng(0).random((7, 32, 32)).astype(np.float32))
    assert main(["segment", str(stack), "-o", str(tmp_path / "o"), "--model", str(checkpoint), *OPEN]) == 1
    printed = capsys.readouterr().out
    assert "--channel-axis 0" in printed and "channel_axis=" not in printed
    assert cli_segment.cli_wording("CUDA is not available (use device='cpu' or 'auto')") == \
        "CUDA is not available (use --device cpu or auto)"
    assert cli_segment.cli_wording("needs channels=(nuclear_idx, wholecell_idx) (None for a missing one)") == \
        "needs --channels nuclear_idx wholecell_idx (none for a missing one)"


def test_version_and_thread_policy(capsys) -> None:
    import subprocess
    import sys

    from cellsam import __version__
    from cellsam.cli import apply_thread_policy

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cellsam {__version__}"
    env: dict[str, str] = {}
    want = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}  # brief spin, then sleep
    assert apply_thread_policy(env) == want and env == want
    for policy in ("ACTIVE", "PASSIVE"):  # the user's choice wins, spin count included
        mine = {"OMP_WAIT_POLICY": policy}
        assert apply_thread_policy(mine) == {} and mine == {"OMP_WAIT_POLICY": policy}
    spin = {"GOMP_SPINCOUNT": "500"}
    assert apply_thread_policy(spin) == {"OMP_WAIT_POLICY": "PASSIVE"} and spin["GOMP_SPINCOUNT"] == "500"
    # the policy must be set before torch loads: importing the command line does not import torch
    out = subprocess.run([sys.executable, "-c", "import sys, cellsam.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_import_cellsam_sets_the_thread_policy_unless_the_user_did() -> None:
    """The library's entry point (``import cellsam``, which the command line, the server and the Dask workers
    go through) sets OMP_WAIT_POLICY=PASSIVE before torch loads; the user's own value wins."""
    import os
    import subprocess
    import sys

    code = "import os, sys, cellsam; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["PASSIVE", "False"]  # set, and torch not loaded yet: it will read it
    run = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["ACTIVE", "False"]


def test_log_lines_go_above_the_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the images are segmented, log records go through tqdm (above the bar), not into it."""
    import logging

    from cellsam.cli import main
    from cellsam.cli import segment as cli_segment

    seen: list[list[str]] = []

    def fake_segment_file(path, outdir, name, model, params, options):  # type: ignore[no-untyped-def]
        seen.append([type(h).__name__ for h in logging.getLogger().handlers])
        logging.getLogger("cellsam.test").warning("a warning while segmenting %s", name)
        return 3

    for i in range(2):
        tifffile.imwrite(tmp_path / f"im{i}.tif", np.zeros((32, 32), np.uint16))
    monkeypatch.setattr(cli_segment, "segment_file", fake_segment_file)
    monkeypatch.setattr(cli_segment, "load_model", lambda *a, **k: object())
    logging.getLogger().addHandler(logging.StreamHandler())
    try:
        assert main(["segment", str(tmp_path / "im0.tif"), str(tmp_path / "im1.tif"), "-o", str(tmp_path / "o")]) == 0
    finally:
        logging.getLogger().handlers.pop()
    assert len(seen) == 2 and all("_TqdmLoggingHandler" in names for names in seen), seen
    assert not any("_TqdmLoggingHandler" in type(h).__name__ for h in logging.getLogger().handlers)


def test_segment_and_evaluate_commands_take_flip_test() -> None:
    import argparse

    from cellsam.cli import evaluate as evaluate_cli
    from cellsam.cli.segment import add_parser, params_of

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    add_parser(sub)
    evaluate_cli.add_parser(sub)
    cases = (([], None), (["--flip-test", "mirrors"], "mirrors"), (["--no-flip-test"], "off"),
             (["--flip-test", "rot180"], "rot180"), (["--flip-test", "off"], "off"))
    for argv, want in cases:
        assert params_of(ap.parse_args(["segment", *argv])).flip_test == want
        args = ap.parse_args(["evaluate", "--data", "d", *argv])
        assert evaluate_cli.data_options(args)["flip_test"] == want
    for cmd in (["segment"], ["evaluate", "--data", "d"]):
        for bad in (["--flip-test", "sideways"], ["--flip-test", "im.tif"], ["--flip-test"]):
            with pytest.raises(SystemExit):  # a mode is required: a file name is not taken for one
                ap.parse_args([*cmd, *bad])
