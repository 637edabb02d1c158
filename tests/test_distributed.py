"""Dask: the block pipeline equals single-process ``segment``; OME-Zarr output; failures; many files.

The model is a ``vit_tiny`` with random weights saved by ``save_model``: with open thresholds it finds
arbitrary but deterministic cells, many overlapping and cut by tile borders, which is what the stitching
has to reproduce. Both paths get the same normalised input (``normalize=False``): block-wise
normalisation is only statistically equal to the image-global one (see ``cellsam.distributed.source``).
"""

from __future__ import annotations

import filecmp
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from cellsam import io  # noqa: E402
from cellsam.cli import main  # noqa: E402
from cellsam.distributed import cluster as C  # noqa: E402
from cellsam.distributed import files as F  # noqa: E402
from cellsam.distributed import pipeline as P  # noqa: E402
from cellsam.distributed.blocks import GridTiles, plan_blocks  # noqa: E402
from cellsam.distributed.source import fit_normalizer, open_source, prepare_window  # noqa: E402
from cellsam.eval.matching import label_overlap, match_objects  # noqa: E402
from cellsam.inference.preprocess import prepare_image  # noqa: E402
from cellsam.inference.segment import segment  # noqa: E402
from cellsam.inference.tiling import tile_cores, tile_grid  # noqa: E402
from cellsam.models.build import build_model  # noqa: E402
from cellsam.weights import load_model, save_model  # noqa: E402
from tests.conftest import make_blobs  # noqa: E402

OPEN = dict(box_threshold=0.0, iou_threshold=-1e9, tile_size=256, batch_size=1)
CLI_OPEN = ["--box-threshold", "0", "--iou-threshold=-1e9", "--tile-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model("vit_tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", version="test")


@pytest.fixture(scope="module")
def client():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    c, _ = C.get_client(None, n_workers=2, threads_per_worker=1)
    yield c
    C.close_client(c)


def same_cells(a: np.ndarray, b: np.ndarray) -> int:
    """Number of cells when ``a`` and ``b`` have the same cells (a bijection of ids, every IoU 1)."""
    assert a.shape == b.shape
    assert np.array_equal(a > 0, b > 0)
    fg = a > 0
    pairs = set(zip(a[fg].tolist(), b[fg].tolist(), strict=True))
    assert len(pairs) == len(np.unique(a[fg])) == len(np.unique(b[fg]))
    return len(pairs)


# ------------------------------------------------------------------------------------ no cluster
def test_grid_and_blocks_cover_the_single_process_tiles() -> None:
    grid = GridTiles((700, 1000), tile_size=256, overlap=0.25)
    assert (
        list(grid) == tile_grid((700, 1000), tile_size=256, overlap=0.25) and grid[-1] == grid[len(grid) - 1]
    )
    # each tile decodes the same boxes in a block as in the single-process run
    assert [grid.core(i) for i in range(len(grid))] == tile_cores(list(grid), 256)
    blocks = plan_blocks(grid, 2)
    assert sorted(t for b in blocks for t in b.tiles) == list(range(len(grid)))
    with pytest.raises(ValueError, match="block_tiles"):
        plan_blocks(grid, 0)


def test_nan_in_a_large_image_is_an_error_not_an_empty_region() -> None:
    from cellsam.distributed.source import Normalizer, fit_normalizer

    x = np.random.default_rng(0).random((64, 64, 1)).astype(np.float32)
    bad = x.copy()
    bad[:5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_normalizer([bad], 1)  # the strided sample saw it
    norm = fit_normalizer([x], 1)
    assert norm.apply(x).shape == (3, 64, 64)
    for v in (np.nan, np.inf):
        w = x.copy()
        w[3, 3] = v
        with pytest.raises(ValueError, match="NaN or infinite"):
            norm.apply(w)  # a block the sample missed fails with the same message
    with pytest.raises(ValueError, match="NaN or infinite"):
        Normalizer(prepared=True).apply(np.full((4, 4, 3), np.nan, np.float32))


def test_sources_read_windows_lazily(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60000, (2, 90, 70), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", img, metadata={"axes": "CYX"}, tile=(32, 32))
    root = zarr.open_group(str(tmp_path / "a.ome.zarr"), mode="w")
    root.create_dataset("0", data=img[None, :, None], chunks=(1, 1, 1, 32, 32))
    root.attrs["multiscales"] = [
        {"version": "0.4", "datasets": [{"path": "0"}], "axes": [{"name": a} for a in "tczyx"]}
    ]
    np.save(tmp_path / "a.npy", np.moveaxis(img, 0, -1))
    rect = (10, 20, 77, 61)
    want = np.moveaxis(img[:, 10:77, 20:61], 0, -1)
    for src in (
        open_source(tmp_path / "a.tif"),
        open_source(tmp_path / "a.ome.zarr"),
        open_source(tmp_path / "a.npy", channel_axis=-1),
        open_source(img, channel_axis=0),
    ):
        assert src.shape == (90, 70) and src.n_channels == 2
        np.testing.assert_array_equal(src.read(rect), want)
        np.testing.assert_array_equal(src.read((0, 0, 90, 70), 3), np.moveaxis(img[:, ::3, ::3], 0, -1))
    with pytest.raises(ValueError, match="channel_axis=0"):
        open_source(img)
    tifffile.imwrite(tmp_path / "z.tif", img, metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match="z-stacks"):
        open_source(tmp_path / "z.tif")
    with pytest.raises(TypeError, match="path or array"):
        open_source(3.0)


def test_whole_image_window_normalises_like_prepare_image() -> None:
    img, _ = make_blobs((300, 260), n=20)
    raw = (img * 4000).astype(np.uint16)
    src = open_source(raw)
    norm = fit_normalizer([src.read((0, 0, 300, 260))], 1)  # the sample is every pixel
    np.testing.assert_allclose(prepare_window(src, norm, (0, 0, 300, 260)), prepare_image(raw), atol=1e-6)
    part = prepare_window(src, norm, (100, 80, 200, 180))  # a window: CLAHE on window + 128 px halo
    assert (
        part.shape == (3, 100, 100)
        and float(np.abs(part - prepare_image(raw)[:, 100:200, 80:180]).mean()) < 0.05
    )
    with pytest.raises(ValueError, match="normalize=False"):
        fit_normalizer([], 1, normalize=False)


def test_inverted_float_rgb_windows_share_the_whole_images_range_top() -> None:
    """A float grey bright-field RGB picture (dark cells on a light background, 0..255) whose brightest
    pixels all lie in its left half: every window is inverted from the whole image's top, so a window
    normalises like the same pixels of the whole image (without CLAHE, which is per window)."""
    rng = np.random.default_rng(0)
    grey = 200.0 - 150.0 * make_blobs((64, 128), n=8)[0] + rng.normal(0, 2, (64, 128))
    grey[:, :64] += 50.0  # the left half is brighter: the right half's own top is ~200, the image's ~250
    rgb = np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=-1).astype(np.float32)
    src = open_source(rgb, channel_axis=-1)
    norm = replace(fit_normalizer([src.read((0, 0, 64, 128))], 3), clahe=False)
    assert norm.invert and norm.top == pytest.approx(float(rgb.max()))
    whole = prepare_window(src, norm, (0, 0, 64, 128))
    np.testing.assert_allclose(prepare_window(src, norm, (0, 64, 64, 128)), whole[:, :, 64:], atol=1e-6)
    own_top = replace(norm, top=None)  # each window inverted from its own top: shifted by ~50 grey levels
    assert float(np.abs(prepare_window(src, own_top, (0, 64, 64, 128)) - whole[:, :, 64:]).mean()) > 0.05


# ------------------------------------------------------------------------------------ on a LocalCluster
@pytest.mark.parametrize(
    "side, tile, block_tiles, chunk, n_levels, rel, area_rel",
    [(520, 128, 2, 128, 4, 0.0, 0.6), (520, 128, 2, 128, 4, 0.95, 0.0),
     pytest.param(1500, 256, 3, 256, 4, 0.0, 0.15, marks=pytest.mark.slow)],
)
def test_dask_equals_single_process_and_writes_ome_zarr(
    tmp_path: Path,
    checkpoint: Path,
    client,
    side: int,
    tile: int,
    block_tiles: int,
    chunk: int,
    n_levels: int,
    rel: float,
    area_rel: float,
) -> None:
    """520 px: 5 x 5 tiles in 3 x 3 blocks (default run); 1500 px: 8 x 8 tiles in 3 x 3 blocks (--runslow).
    ``rel``: the relative box threshold, ``area_rel``: the relative minimum area, each one floor over every
    block's cells as over the whole image's."""
    img, _ = make_blobs((side, side), n=side * side // 5600, radius=(6, 14))
    prep = prepare_image(img)
    opts = {**OPEN, "tile_size": tile, "box_threshold_rel": rel, "min_area_rel": area_rel}
    single = segment(prep, load_model(checkpoint), normalize=False, channel_axis=0, **opts)
    assert single.n_cells > 30 and single.stats["stitched"] < single.stats["confident"]  # copies were removed
    assert (single.stats["confident"] < single.stats["masks"]) == (rel > 0)  # the floor dropped cells
    if area_rel >= 0.5:  # the area floor dropped cells (0.15 may drop none of these blobs)
        assert single.n_cells < segment(prep, load_model(checkpoint), normalize=False, channel_axis=0,
                                        **{**opts, "min_area_rel": 0.0}).n_cells
    # the input as an OME-Zarr (c, y, x), read lazily by the workers
    root = zarr.open_group(str(tmp_path / "in.ome.zarr"), mode="w")
    root.create_dataset("0", data=prep, chunks=(3, 200, 200))
    root.attrs["multiscales"] = [
        {"version": "0.4", "datasets": [{"path": "0"}], "axes": [{"name": a} for a in "cyx"]}
    ]
    out = tmp_path / "labels.ome.zarr"
    res = P.segment_dask(
        tmp_path / "in.ome.zarr",
        str(checkpoint),
        output=out,
        client=client,
        normalize=False,
        block_tiles=block_tiles,
        chunk=chunk,
        **opts,
    )
    assert res.stats["blocks"] == 9 and res.stats["tiles"] == single.stats["tiles"]
    labels = zarr.open_array(str(out / "0"), mode="r")
    assert same_cells(single.labels, labels[:].astype(np.int64)) == single.n_cells == res.n_cells
    np.testing.assert_array_equal(labels[:], single.labels)  # even the ids: score order, as single-process
    assert res.rows == io.cell_table(single.labels, single.scores, single.ious)
    # OME-Zarr: shapes, chunks, NGFF 0.4 multiscales, nearest levels; readable by cellsam.io
    ms = zarr.open_group(str(out), mode="r").attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert res.levels == len(ms["datasets"]) == n_levels
    for k, ds in enumerate(ms["datasets"]):
        lev = zarr.open_array(str(out / ds["path"]), mode="r")
        assert ds["coordinateTransformations"][0]["scale"] == [2.0**k, 2.0**k]
        assert lev.shape == (-(-side // 2**k),) * 2 and lev.chunks == (min(chunk, lev.shape[0]),) * 2
        assert lev.dtype == np.uint32
        np.testing.assert_array_equal(lev[:], single.labels[:: 2**k, :: 2**k])
    np.testing.assert_array_equal(io.load_image(out).data, single.labels)
    # one model load per worker although each worker ran several blocks (and earlier tests)
    loads = client.run(lambda: list(__import__("cellsam.distributed.cluster", fromlist=["LOADS"]).LOADS))
    assert all(len(v) <= 1 for v in loads.values()) and sum(len(v) for v in loads.values()) >= 1


def test_dask_prepares_colour_pictures_by_the_models_rule(tmp_path: Path, checkpoint: Path, client) -> None:
    """A checkpoint whose model wants stained pictures as hematoxylin: the workers normalise the H&E picture's
    windows by that rule (read from the model on a worker), and the labels equal ``cellsam.segment``'s."""
    from tests.test_stain_grey import he_picture

    net = load_model(checkpoint)
    net.cfg = net.cfg.replace(inference=replace(net.cfg.inference, stain_grey="hematoxylin"))
    hed = save_model(net, tmp_path / "hed", version="test")
    rgb, _ = he_picture((300, 260), seed=1)
    opts = {**OPEN, "tile_size": 128, "min_area_rel": 0.0}
    res = P.segment_dask(rgb, str(hed), output=tmp_path / "he.ome.zarr", client=client, channel_axis=-1,
                         block_tiles=2, **opts)
    single = segment(rgb, load_model(hed), channel_axis=-1, **opts)
    labels = zarr.open_array(str(tmp_path / "he.ome.zarr" / "0"), mode="r")[:]
    lum = segment(rgb, load_model(checkpoint), channel_axis=-1, **opts)  # the same weights, luminance

    def matched(a: np.ndarray, b: np.ndarray) -> int:  # cells at IoU >= 0.9 (Dask normalises per window)
        return len(match_objects(label_overlap(a, b.astype(np.int64)), threshold=0.9).gt_index)

    assert single.n_cells > 10 and res.n_cells == single.n_cells == matched(single.labels, labels)
    assert matched(lum.labels, labels) < lum.n_cells // 2  # the rule mattered


def test_a_block_that_raises_is_reported_by_position(
    tmp_path: Path, checkpoint: Path, client, capsys, monkeypatch
) -> None:
    img, _ = make_blobs((300, 300), n=30)
    arr = zarr.open_array(
        str(tmp_path / "bad.zarr"), mode="w", shape=(3, 300, 300), chunks=(3, 100, 100), dtype=np.float32
    )
    arr[:] = prepare_image(img)
    (tmp_path / "bad.zarr" / "0.2.2").write_bytes(b"not a blosc chunk")  # pixels y 200:300, x 200:300
    out = tmp_path / "bad_labels.ome.zarr"
    with pytest.raises(C.BlockFailure) as err:
        P.segment_dask(
            tmp_path / "bad.zarr",
            str(checkpoint),
            output=out,
            client=client,
            channel_axis=0,
            normalize=False,
            block_tiles=2,
            retries=1,
            polarity="as_is",  # "auto" reads the image's sample first and would fail there (tested below)
            **{**OPEN, "tile_size": 64},
        )
    failed = [pos for pos, _ in err.value.failures]
    assert err.value.stage == "segment" and failed and all("x " in p and "y " in p for p in failed)
    assert all(int(p.split("y ")[1].split(":")[1].split(",")[0]) > 200 for p in failed)  # the bottom-right
    assert len(failed) < 16 and not out.exists()  # the others were fine; nothing written
    with pytest.raises(C.BlockFailure) as err:  # polarity "auto" (the default) reads the whole sample
        P.segment_dask(tmp_path / "bad.zarr", str(checkpoint), output=out, client=client, channel_axis=0,
                       normalize=False, retries=1, **{**OPEN, "tile_size": 64})
    assert err.value.stage == "polarity" and "sample" in err.value.failures[0][0] and not out.exists()
    # through the CLI (normalising: the statistics pass meets the bad chunk first): exit 1, position printed
    monkeypatch.setattr(F, "LARGE_PIXELS", 100 * 100)
    code = main(
        [
            "segment",
            str(tmp_path / "bad.zarr"),
            "-o",
            str(tmp_path / "o"),
            "--model",
            str(checkpoint),
            "--channel-axis",
            "0",
            "--dask",
            client.scheduler.address,
            *CLI_OPEN,
        ]
    )
    assert code == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "sample region y 0:300, x 0:300" in printed


def test_many_files_equal_the_single_process_cli(
    tmp_path: Path, checkpoint: Path, client, capsys, monkeypatch
) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):
        img, _ = make_blobs((90, 110), n=8, seed=k)
        np.save(d / f"im{k}.npy", img)
    tifffile.imwrite(d / "big.tif", (make_blobs((200, 180), n=12, seed=9)[0] * 4000).astype(np.uint16))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    monkeypatch.setattr(F, "LARGE_PIXELS", 150 * 150)  # big.tif goes through the block pipeline
    one, many = tmp_path / "one", tmp_path / "many"
    args = [str(d), "--model", str(checkpoint), *CLI_OPEN, "--coco"]
    assert main(["segment", *args, "-o", str(one)]) == 1  # broken.png
    assert main(["segment", *args, "-o", str(many), "--dask", client.scheduler.address]) == 1
    assert "FAILED" in capsys.readouterr().out
    for k in range(3):
        for suffix in ("_labels.tif", "_overlay.png", "_cells.csv", "_coco.json"):
            assert filecmp.cmp(one / f"im{k}{suffix}", many / f"im{k}{suffix}", shallow=False), suffix
    big = zarr.open_array(str(many / "big_labels.ome.zarr" / "0"), mode="r")[:]
    assert big.shape == (200, 180) and big.max() > 0
    with open(many / "big_cells.csv") as f:
        assert sum(1 for _ in f) - 1 == len(np.unique(big)) - 1


def test_blank_regions_of_a_tiff_get_no_encoder_pass(tmp_path: Path, checkpoint: Path, client) -> None:
    """A tiled TIFF read window by window, cells in one corner: every tile outside it is skipped."""
    side, patch, tile = 1100, 200, 128
    img = np.zeros((3, side, side), np.float32)
    img[1:, :patch, :patch] = prepare_image(make_blobs((patch, patch), n=20)[0])[1:]
    tifffile.imwrite(tmp_path / "corner.tif", img, tile=(256, 256), compression="zlib",
                     metadata={"axes": "CYX"})
    res = P.segment_dask(tmp_path / "corner.tif", str(checkpoint), output=tmp_path / "corner.ome.zarr",
                         client=client, normalize=False, block_tiles=4, **{**OPEN, "tile_size": tile})
    grid = tile_grid((side, side), tile_size=tile, overlap=0.25)
    assert res.stats["tiles"] == len(grid)
    assert res.stats["blank_tiles"] == sum(t.y0 >= patch or t.x0 >= patch for t in grid) > 100
    labels = zarr.open_array(str(tmp_path / "corner.ome.zarr" / "0"), mode="r")[:]
    assert labels[: patch + tile, : patch + tile].any() and not labels[patch + tile :].any()


def test_auto_diameter_is_measured_on_windows_of_a_large_image(tmp_path: Path, client) -> None:
    """segment_dask's default diameter="auto": the default model on the sample at 0.4x (nuclei ~18 px)
    pasted twice into a dark 1200 x 900 TIFF segments it at the small sample's own auto scale (smaller
    tiles than the model's), with about the cells cellsam.segment finds on the two pieces."""
    from skimage.transform import rescale

    from cellsam.cli.segment import sample_path

    small = rescale(io.load_image(sample_path()).data.astype(np.float32), 0.4, order=1, preserve_range=True)
    big = np.zeros((1200, 900), np.float32)
    big[100:244, 600:744] = small
    big[900:1044, 100:244] = small[::-1]
    tifffile.imwrite(tmp_path / "small_nuclei.tif", big)
    model = load_model("default")
    own = segment(small, model)
    res = P.segment_dask(tmp_path / "small_nuclei.tif", "default", output=tmp_path / "auto.ome.zarr",
                         client=client)
    assert own.tile_size is not None and own.diameter is not None and res.diameter is not None
    assert res.tile_size < model.cfg.tile_size / 1.3
    assert max(res.tile_size, own.tile_size) <= 1.3 * min(res.tile_size, own.tile_size)
    assert abs(res.n_cells - 2 * own.n_cells) <= max(4, 0.2 * own.n_cells), (res.n_cells, own.n_cells)
    assert not own.inverted and not res.inverted  # fluorescence: dark background, polarity not checked


def test_auto_polarity_is_decided_on_windows_of_a_large_image(tmp_path: Path, client) -> None:
    """segment_dask's default polarity="auto": the sample's negative (dark nuclei on white) pasted into a
    white 900 x 700 TIFF is segmented inverted, with the cells cellsam.segment finds in it; with
    polarity="as_is" fewer of them are found. (The dark-background test above is not inverted.)"""
    from cellsam.cli.segment import sample_path
    from cellsam.eval.matching import label_overlap, match_objects

    def f1(a: np.ndarray, b: np.ndarray) -> float:
        return match_objects(label_overlap(a, b), threshold=0.5).f1

    image = io.load_image(sample_path()).data.astype(np.float32)
    negative = image.max() - image
    big = np.full((900, 700), float(negative.max()), np.float32)
    big[300 : 300 + negative.shape[0], 200 : 200 + negative.shape[1]] = negative
    tifffile.imwrite(tmp_path / "negative.tif", big)
    own = segment(big, "default")
    assert own.inverted and own.n_cells >= 20
    res = P.segment_dask(tmp_path / "negative.tif", "default", output=tmp_path / "neg.ome.zarr", client=client)
    assert res.inverted
    inverted = f1(own.labels, io.load_image(tmp_path / "neg.ome.zarr").data.astype(np.int64))
    assert inverted >= 0.8
    kept = P.segment_dask(tmp_path / "negative.tif", "default", output=tmp_path / "kept.ome.zarr", client=client,
                          polarity="as_is")
    assert not kept.inverted  # v6 found other cells (F1 < 0.5), v10 fewer of the same (0.64)
    assert f1(own.labels, io.load_image(tmp_path / "kept.ome.zarr").data.astype(np.int64)) < inverted
