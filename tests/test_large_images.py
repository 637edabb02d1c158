"""Huge images (#19): sizes from file headers, refusal before decoding, the batch goes on, routing to the
block pipeline, no encoder pass on blank tiles.

The huge files cost almost nothing: a 40000 x 40000 TIFF written from one zlib-compressed blank tile
repeated (1.7 MB), header-only PNG / NPY files, a zarr array with no chunk written. No test decodes them;
``tracemalloc`` (which sees numpy's allocations) checks that refusing them allocates almost nothing.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellsam import io
from cellsam.cli import build_parser, main
from cellsam.cli import segment as cli_segment
from cellsam.inference.segment import blank_tile, segment
from cellsam.inference.tiling import Tile, tile_grid
from cellsam.models.build import build_model
from tests.conftest import make_blobs

OPEN = ["--box-threshold", "0", "--iou-threshold=-1e9", "--tile-size", "64", "--device", "cpu"]


def huge_tiff(path: Path, side: int, tile: int = 1024) -> Path:
    """A blank (side x side) uint8 TIFF, zlib-compressed in tiles, written without the full array."""
    encoded = zlib.compress(np.zeros((tile, tile), np.uint8).tobytes())
    n = -(-side // tile)
    tifffile.imwrite(path, (encoded for _ in range(n * n)), shape=(side, side), dtype=np.uint8,
                     tile=(tile, tile), compression="zlib")
    return path


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height (PIL opens it lazily; its pixels are never there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return path


def header_only_npy(path: Path, shape: tuple[int, ...], dtype: Any = np.uint16) -> Path:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from cellsam.weights import save_model

    torch.manual_seed(0)
    return save_model(build_model("vit_tiny"), tmp_path_factory.mktemp("ckpt") / "tiny", version="test")


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Path:
    return huge_tiff(tmp_path_factory.mktemp("huge") / "huge.tif", 40000)


# ------------------------------------------------------------------------------------ headers
def test_sizes_come_from_headers_without_decoding(huge: Path, tmp_path: Path) -> None:
    assert huge.stat().st_size < 4_000_000
    tracemalloc.start()
    try:
        tif = io.probe_image(huge)
        png = io.probe_image(header_only_png(tmp_path / "wide.png", 30000, 20000))  # above PIL's bomb limit
        npy = io.probe_image(header_only_npy(tmp_path / "stack.npy", (3, 30000, 20000)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak
    assert (tif.shape, tif.dtype, tif.channel_axis, tif.pixels) == ((40000, 40000), np.uint8, None, 40000**2)
    assert (png.shape, png.side, png.blockwise) == ((20000, 30000), (20000, 30000), False)
    # 3-D without a stated channel axis: the two largest sides bound H x W whatever the channel axis is
    assert npy.shape == (3, 30000, 20000) and npy.side == (30000, 20000) and npy.blockwise
    assert io.ImageInfo(npy.path, (30000, 20000, 3), npy.dtype, None).side == (30000, 20000)
    assert io.ImageInfo(npy.path, (5, 7, 4000), npy.dtype, 1).side == (5, 4000)


def test_probe_agrees_with_load_image(tmp_path: Path) -> None:
    img = (make_blobs((40, 50))[0] * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", np.stack([img, img, img])[:, None], metadata={"axes": "CZYX"})
    Image.fromarray(np.stack([img] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(img).convert("P").save(tmp_path / "pal.png")
    np.save(tmp_path / "g.npy", img.astype(np.float32))
    zarr = pytest.importorskip("zarr")
    zarr.open_array(str(tmp_path / "z.zarr"), mode="w", shape=(40, 50), chunks=(20, 20), dtype=np.uint16)
    for name in ("c.tif", "rgb.png", "pal.png", "g.npy", "z.zarr"):
        info, loaded = io.probe_image(tmp_path / name), io.load_image(tmp_path / name)
        assert info.shape == loaded.data.shape and info.channel_axis == loaded.channel_axis, name
        assert info.dtype == loaded.data.dtype, name
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(io.ImageReadError, match="cannot read"):
        io.probe_image(tmp_path / "broken.png")


def test_load_image_refuses_above_max_pixels_before_decoding(huge: Path, tmp_path: Path) -> None:
    npy = header_only_npy(tmp_path / "big.npy", (30000, 30000))  # no data: decoding it would fail
    tracemalloc.start()
    try:
        for path in (huge, npy):
            with pytest.raises(io.ImageTooLarge) as e:
                io.load_image(path, max_pixels=10**8)
            assert e.value.info.path == path and e.value.max_pixels == 10**8
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert "30000x30000" in str(e.value) and "segment_dask" in str(e.value)
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((10, 10), np.uint8))
    assert io.load_image(small, max_pixels=100).data.shape == (10, 10)  # at the limit: read
    with pytest.raises(io.ImageTooLarge):
        io.load_image(small, max_pixels=99)


def test_default_limit_follows_available_memory() -> None:
    assert io.default_max_pixels(available=64 * 2**30) == int(64 * 2**30 * io.MEMORY_MARGIN) // (
        io.IN_MEMORY_BYTES_PER_PIXEL)
    assert io.default_max_pixels(available=0) == 1
    avail = io.available_memory_bytes()
    assert avail is None or avail > 0
    assert io.default_max_pixels() >= 1


# ------------------------------------------------------------------------------------ the command
def test_a_batch_with_huge_files_refuses_them_in_one_line_and_segments_the_rest(
    huge: Path, tmp_path: Path, checkpoint: Path, capsys
) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "huge.tif").symlink_to(huge)
    header_only_npy(d / "big.npy", (30000, 30000))
    header_only_png(d / "wide.png", 30000, 20000)
    img, _ = make_blobs((70, 80), n=6)
    Image.fromarray((img * 255).astype(np.uint8)).save(d / "good.png")
    out = tmp_path / "out"
    code = main(["segment", str(d), "-o", str(out), "--model", str(checkpoint), "--max-pixels", "16000x16000",
                 *OPEN])
    printed = capsys.readouterr().out
    assert code == 1
    assert (out / "good_labels.tif").exists() and (out / "good_cells.csv").exists()
    assert "1 image(s) segmented" in printed and "3 failed" in printed and "Traceback" not in printed
    lines = {name: [ln for ln in printed.splitlines() if ln.startswith(f"{d / name}: FAILED: ")]
             for name in ("huge.tif", "big.npy", "wide.png")}
    assert all(len(v) == 1 for v in lines.values()), printed
    assert "40000x40000 image" in lines["huge.tif"][0] and "--max-pixels 256 megapixels" in lines["huge.tif"][0]
    assert "--dask (writes huge_labels.ome.zarr)" in lines["huge.tif"][0] and "--dask" in lines["big.npy"][0]
    assert "convert it to a tiled TIFF or OME-Zarr" in lines["wide.png"][0]
    assert not (out / "huge_labels.tif").exists()


def test_max_pixels_flag_and_memory_errors(tmp_path: Path, checkpoint: Path, capsys, monkeypatch) -> None:
    img, _ = make_blobs((70, 80), n=6)
    for name in ("a", "b"):
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    assert main(["segment", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--model", str(checkpoint),
                 "--max-pixels", "5e3", *OPEN]) == 1  # 70 x 80 = 5600 > 5000
    assert "above --max-pixels" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["segment", str(tmp_path / "a.png"), "--max-pixels", "lots"])
    real = cli_segment.segment_file

    def oom_on_a(path: Path, *args: Any) -> int:
        if path.name == "a.png":
            raise MemoryError("Unable to allocate 6.71 GiB for an array with shape (30000, 30000)")
        return real(path, *args)

    monkeypatch.setattr(cli_segment, "segment_file", oom_on_a)
    code = main(["segment", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(tmp_path / "o2"),
                 "--model", str(checkpoint), *OPEN])
    printed = capsys.readouterr().out
    assert code == 1 and (tmp_path / "o2" / "b_labels.tif").exists() and "Traceback" not in printed
    assert "a.png: FAILED: out of memory (Unable to allocate 6.71 GiB" in printed and "--dask" in printed


def test_dask_routing_reads_headers(huge: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """--dask: huge or above --max-pixels -> block pipeline; PNG (decoded whole) -> a file task."""
    pytest.importorskip("distributed")
    from cellsam.distributed import cluster as C
    from cellsam.distributed import files as F

    small_tif = tmp_path / "small.tif"
    tifffile.imwrite(small_tif, np.zeros((300, 300), np.uint16))
    png = header_only_png(tmp_path / "wide.png", 30000, 20000)
    assert F.image_pixels(huge) == 40000**2 and F.image_pixels(png) == 0
    assert F.image_pixels(header_only_npy(tmp_path / "s.npy", (2, 500, 600)), channel_axis=0) == 300_000
    calls: dict[str, list[str]] = {"files": [], "large": []}

    def files(paths: list[Path], names: list[str], *a: Any, **k: Any) -> tuple[list, list]:
        calls["files"] += [p.name for p in paths]
        return [(p, 0) for p in paths], []

    def large(path: Path, *a: Any) -> int:
        calls["large"].append(path.name)
        return 0

    monkeypatch.setattr(C, "get_client", lambda address: (object(), False))
    monkeypatch.setattr(F, "segment_files", files)
    monkeypatch.setattr(F, "segment_large_file", large)
    args = build_parser().parse_args(["segment", "--dask", "--max-pixels", str(200 * 200)])
    assert cli_segment.run_dask(args, [huge, small_tif, png], 0, tmp_path) == 0
    assert calls == {"files": ["wide.png"], "large": ["huge.tif", "small.tif"]}  # 300^2 > --max-pixels


# ------------------------------------------------------------------------------------ blank tiles
def test_blank_tile() -> None:
    img = np.zeros((3, 100, 100), np.float32)
    img[2, :, :50] = 0.5
    assert blank_tile(img, Tile(0, 0, 64, 64), 64) is False  # a step inside the tile
    assert blank_tile(img, Tile(0, 50, 64, 100), 50) is True
    assert blank_tile(img, Tile(0, 0, 64, 40), 64) is False  # constant 0.5 next to zero padding
    assert blank_tile(img, Tile(0, 60, 64, 100), 64) is True  # zeros, padded with zeros
    img[1] = 0.25
    assert blank_tile(img, Tile(0, 0, 64, 40), 40) is True  # one value per channel


class _CountingModel(torch.nn.Module):
    """A model whose encoder passes are counted (images per pass)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.encoded = net, []
        self.cfg, self.img_size = net.cfg, net.img_size

    def encode(self, x: torch.Tensor) -> Any:
        self.encoded.append(int(x.shape[0]))
        return self.net.encode(x)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def test_blank_tiles_get_no_encoder_pass() -> None:
    torch.manual_seed(0)
    net = _CountingModel(build_model("vit_tiny").eval())
    img = np.zeros((3, 64, 400), np.float32)
    blobs, _ = make_blobs((64, 100), n=4)
    img[1] = img[2] = np.pad(blobs, ((0, 0), (0, 300)))  # cells on the left 100 px, zeros elsewhere
    seg = segment(img, net, channel_axis=0, normalize=False, box_threshold=0.0, iou_threshold=-1e9,
                  tile_size=64, batch_size=4)
    grid = tile_grid((64, 400), tile_size=64, overlap=0.25)
    tiles, empty = len(grid), sum(t.x0 >= 100 for t in grid)
    assert seg.stats["tiles"] == tiles and seg.stats["blank"] == empty >= 4
    assert sum(net.encoded) == tiles - empty
    assert not seg.labels[:, 160:].any()  # nothing found where nothing is
    before = sum(net.encoded)
    blank = segment(np.zeros((3, 64, 400), np.float32), net, channel_axis=0, normalize=False,
                    box_threshold=0.0, tile_size=64)
    assert blank.n_cells == 0 and blank.message and blank.stats["blank"] == tiles
    assert sum(net.encoded) == before  # no encoder pass at all


def test_tiff_compressed_in_huge_strips_is_refused_for_window_reads(tmp_path: Path, monkeypatch) -> None:
    from cellsam.distributed import tiff

    img = (make_blobs((100, 120))[0] * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "strip.tif", img, compression="zlib", rowsperstrip=100)
    tifffile.imwrite(tmp_path / "tiled.tif", img, compression="zlib", tile=(32, 32))
    monkeypatch.setattr(tiff, "MAX_SEGMENT_BYTES", 4096)  # one 100 x 120 strip: 12000 bytes
    with pytest.raises(ValueError, match=r"strips of 100x120 pixels .*rewrite it tiled"):
        tiff.TiffArray(str(tmp_path / "strip.tif"))
    np.testing.assert_array_equal(tiff.TiffArray(str(tmp_path / "tiled.tif"))[10:50, 20:90], img[10:50, 20:90])
