"""``cellsam bench``: statistics, stage accounting, the reference structure, mask parity, reports, CLI.

Everything runs on vit_tiny (64-pixel tiles) in well under a second per test; no timing value is
asserted, only structure (which stages ran, call counts, exclusivity of nested stages, sums).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from cellsam.bench import timing
from cellsam.bench.pipeline import (
    STAGES,
    BoxOracle,
    autocast_context,
    clip_logits_to_boxes,
    synthetic_scene,
    time_pipeline,
    write_scene,
)
from cellsam.bench.report import machine_info, render_markdown, write_report
from cellsam.bench.suite import SCHEMA, BenchSpec, comparisons
from cellsam.models.build import build_model

pytest.importorskip("segment_anything")
from cellsam.bench.research import load_research  # noqa: E402

_reference = load_research("reference_pipeline")  # benchmarks/reference_pipeline.py (not installed)
ReferencePipeline, parity_check, time_reference = (
    _reference.ReferencePipeline, _reference.parity_check, _reference.time_reference)

STAT_KEYS = {"median", "q1", "q3", "iqr", "min", "max", "mean", "n", "values"}


@torch.no_grad()
def _tiny_model(seed: int = 0) -> torch.nn.Module:
    """vit_tiny with perturbed weights (zero-initialised tables become random), so masks are not trivial."""
    torch.manual_seed(seed)
    net = build_model("vit_tiny").eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(noise * 0.5) if ("rel_pos" in name or "pos_embed" in name) else p.add_(noise * 0.02)
    return net


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return _tiny_model()


# ---------------------------------------------------------------------------------------------- timing
def test_summarize_statistics() -> None:
    s = timing.summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert set(s) == STAT_KEYS
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 100.0 and s["n"] == 5
    assert s["q1"] == 2.0 and s["q3"] == 4.0 and s["iqr"] == 2.0
    empty = timing.summarize([])
    assert empty["n"] == 0 and np.isnan(empty["median"])


def test_stage_timer_nested_stages_are_exclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    t = timing.StageTimer("cpu")
    with t.stage("outer"):  # enter 0
        with t.stage("inner"):  # enter 1
            pass  # exit 2
        with t.stage("inner"):  # enter 3
            pass  # exit 4
    # exit 5: outer ran 0-1, 2-3, 4-5 = 3 ticks; inner 2 ticks; together the 5 ticks of wall time
    assert t.seconds == {"outer": 3.0, "inner": 2.0}
    assert t.calls == {"outer": 1, "inner": 2}
    with pytest.raises(RuntimeError):
        with t.stage("x"):
            t.reset()


def test_peak_memory_sees_a_large_allocation() -> None:
    mem = timing.PeakMemory("cpu")
    if mem.method != "vmhwm":
        pytest.skip("peak RSS cannot be reset on this OS")
    mem.reset()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    peak = mem.peak()
    del block
    assert peak["rss_bytes"] - peak["rss_before_bytes"] >= 48 * 2**20
    assert set(timing.merge_peaks([peak, peak])) == {"peak_rss_bytes", "rss_before_bytes", "rss_method",
                                                     "peak_gpu_allocated_bytes"}


# ---------------------------------------------------------------------------------------------- scenes
@pytest.mark.parametrize("size,cells,expected", [(512, 100, 100), (256, 100, 25), (1024, 10, 40), (64, 1, 1)])
def test_synthetic_scene_has_exactly_the_requested_cells(size: int, cells: int, expected: int) -> None:
    sc = synthetic_scene(size, cells=cells, seed=3)
    assert sc.image.shape == (size, size) and sc.image.dtype == np.uint16
    assert sc.n_cells == expected
    ids = np.unique(sc.labels)
    assert list(ids) == list(range(expected + 1))  # every cell present, none merged
    for k, (x0, y0, x1, y1) in enumerate(sc.boxes.astype(int), start=1):
        ys, xs = np.nonzero(sc.labels == k)
        assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1, x1)
    assert sc.image[sc.labels > 0].mean() > sc.image[sc.labels == 0].mean() + 1000


def test_synthetic_scene_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="cells"):
        synthetic_scene(64, cells=0)
    with pytest.raises(ValueError, match="sides"):
        synthetic_scene(8, cells=1)


def test_box_oracle_and_clipping() -> None:
    boxes = np.array([[10, 10, 20, 20], [100, 100, 120, 110], [60, 5, 70, 15]], np.float32)
    oracle = BoxOracle(boxes, tile_size=64, model_side=128)

    class T:
        y0, x0, y1, x1 = 0, 48, 64, 112

    b = oracle.tile_boxes(T)  # only the third box has its centre in this tile; scaled x2
    np.testing.assert_allclose(b, [[24, 10, 44, 30]])
    oracle.record(T)
    with pytest.raises(RuntimeError, match="extract_tile"):
        oracle.detections(2, torch.device("cpu"))
    lo = torch.ones(1, 1, 32, 32)
    clipped = clip_logits_to_boxes(lo, torch.tensor([[32.0, 32.0, 64.0, 64.0]]), side=128)
    inside = clipped[0, 0] > 0
    assert inside[8:16, 8:16].all() and inside.sum() == 10 * 10  # 8x8 box grown by one low-res pixel
    with pytest.raises(ValueError, match="precision"):
        autocast_context("fp16", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- our pipeline
def test_time_pipeline_stages_and_schema(tiny: torch.nn.Module, tmp_path) -> None:
    sc = synthetic_scene(128, cells=200, seed=1)  # 12 cells, 9 tiles of 64 with overlap
    r = time_pipeline(tiny, sc, image_path=write_scene(sc, tmp_path), repeats=2, warmup=1, model_name="t")
    assert r["pipeline"] == "cellsam" and r["n_cells"] == 12 and r["tiles"] == 9
    assert set(r["stages"]) == {*STAGES, "other"}
    for s in r["stages"].values():
        assert set(s) == STAT_KEYS and s["n"] == 2 and s["min"] >= 0
    for s in ("read", "normalise", "tiling", "encoder", "cellfinder", "mask_decoder", "postprocess", "stitching",
              "merge"):
        assert r["stages"][s]["min"] > 0, s
    for i in range(2):  # per repeat: named stages + other == end to end, named stages <= end to end
        named = sum(r["stages"][s]["values"][i] for s in STAGES)
        assert named <= r["end_to_end"]["values"][i] + 1e-9
        assert named + r["stages"]["other"]["values"][i] == pytest.approx(r["end_to_end"]["values"][i])
    # the supplied boxes reach the decoder: each tile decodes the boxes centred in its core (every cell
    # once, twice near a split line), not all those centred in the tile
    from cellsam.inference.tiling import in_core, tile_cores, tile_grid

    tiles = tile_grid((128, 128), tile_size=64)
    oracle = BoxOracle(sc.boxes, tile_size=64, model_side=64)
    in_tiles = sum(len(oracle.tile_boxes(t)) for t in tiles)
    owned = sum(int(in_core(sc.boxes, c).sum()) for c in tile_cores(tiles, 64))
    assert sc.n_cells <= owned < in_tiles
    assert r["boxes_decoded"] == owned
    assert r["cells_found"] > 0
    assert r["stage_calls"]["tiling"] == 9
    assert r["memory"]["peak_rss_bytes"] > 0
    json.dumps(r)  # serialisable


def test_time_pipeline_restores_segment_helpers(tiny: torch.nn.Module) -> None:
    import cellsam.inference.segment as seg

    before = {n: getattr(seg, n) for n in ("extract_tile", "_crop_cell", "deduplicate", "merge_by_argmax")}
    time_pipeline(tiny, synthetic_scene(64, cells=50), repeats=1, warmup=0, precision="bf16")
    assert {n: getattr(seg, n) for n in before} == before


# ---------------------------------------------------------------------------------------------- reference
def test_reference_structure_counts_calls(tiny: torch.nn.Module, tmp_path) -> None:
    ref = ReferencePipeline(tiny)
    sc = synthetic_scene(64, cells=500, seed=2)  # 8 cells on one 64-pixel tile
    r = time_reference(ref, sc, write_scene(sc, tmp_path), repeats=1, warmup=1, model_name="t")
    assert r["counts"] == {"encoder_passes": 2, "decoder_calls": sc.n_cells}
    assert r["stage_calls"]["mask_decoder"] == sc.n_cells and r["stage_calls"]["encoder"] == 1
    assert r["stages"]["encoder"]["min"] > 0 and r["stages"]["cellfinder"]["min"] > 0
    # the reference's encoders hold copies of OUR weights, not the same tensors
    assert ref.detector_trunk is not ref.sam.image_encoder
    w_ours = tiny.image_encoder.patch_embed.proj.weight
    assert torch.equal(ref.detector_trunk.patch_embed.proj.weight, w_ours)
    assert ref.detector_trunk.patch_embed.proj.weight.data_ptr() != w_ours.data_ptr()
    with pytest.raises(ValueError, match="one 64-pixel tile"):
        time_reference(ref, synthetic_scene(128, cells=10), write_scene(sc, tmp_path), repeats=1)


def test_parity_batched_decoder_equals_per_box_loop(tiny: torch.nn.Module) -> None:
    from cellsam.inference.preprocess import prepare_image

    ref = ReferencePipeline(tiny)
    sc = synthetic_scene(64, cells=1000, seed=4)
    p = parity_check(tiny, ref, prepare_image(sc.image), sc.boxes, decode_chunk=5)  # 3+ decoder chunks
    assert p["n_boxes"] == sc.n_cells >= 12
    assert 0.02 < p["same_embedding"]["foreground_fraction"] < 0.98  # the masks are not trivial
    assert p["logit_max_abs_diff"] < 1e-4
    assert p["same_embedding"]["identical"] and p["same_embedding"]["pixels_differing"] == 0
    assert p["embedding_max_abs_diff"] < 1e-4 and p["own_encoders"]["min_iou"] > 0.99


def test_parity_detects_a_different_decoder(tiny: torch.nn.Module) -> None:
    from cellsam.inference.preprocess import prepare_image

    other = _tiny_model(seed=0)
    ref = ReferencePipeline(other)
    with torch.no_grad():
        other.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight.mul_(-1.0)  # ours now differs
    sc = synthetic_scene(64, cells=1000, seed=4)
    p = parity_check(other, ref, prepare_image(sc.image), sc.boxes)
    assert not p["same_embedding"]["identical"] and p["logit_max_abs_diff"] > 1e-2


# ---------------------------------------------------------------------------------------------- reports, CLI
def test_cli_bench_writes_json_and_markdown(tmp_path) -> None:
    from cellsam.cli import main

    out = tmp_path / "bench" / "tiny"
    rc = main(["bench", "--model", "vit_tiny", "--sizes", "64", "128", "--cells", "20", "100", "--repeats", "1",
               "--warmup", "0", "--reference", "--precision", "fp32", "bf16", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["schema"] == SCHEMA and res["command"][:2] == ["cellsam", "bench"]
    assert {"cpu", "logical_cores", "torch", "torch_threads", "env"} <= set(res["machine"])
    pipes = [(r["pipeline"], r["size"][0], r["cells"], r["precision"]) for r in res["runs"]]
    assert pipes.count(("reference", 64, 20, "fp32")) == 1 and ("reference", 128, 20, "fp32") not in pipes
    assert len([p for p in pipes if p[0] == "cellsam"]) == 2 * 2 * 2
    comp = [c for c in res["comparisons"] if c["size"] == [64, 64]]
    assert len(comp) == 4 and all(c["speedup_vs_reference"] > 0 for c in comp)
    assert [p["precision"] for p in res["parity"]] == ["fp32", "bf16"]
    assert res["parity"][0]["same_embedding"]["identical"]
    md = out.with_suffix(".md").read_text()
    for heading in ("## End to end", "## Stages", "## Ours vs reference", "## Mask parity", "## Models"):
        assert heading in md
    assert md.count("| cellsam | vit_tiny |") == 2 * 8  # end-to-end and stage tables
    assert any("skipped at 128" in n for n in res["notes"])


def test_cli_bench_rejects_bad_arguments(tmp_path) -> None:
    from cellsam.cli import main

    assert main(["bench", "--model", "vit_tiny", "--cells", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["bench", "--model", "vit_tiny", "--reference", "vit_b", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ValueError, match="precisions"):
        BenchSpec(precisions=["fp16"]).validate()
    with pytest.raises(ValueError, match="decode_window"):
        BenchSpec(decode_windows=[-2.0]).validate()
    with pytest.raises(ValueError, match="decode window"):
        BenchSpec(decode_windows=[]).validate()


def test_cli_bench_decode_windows_are_one_run_each(tmp_path) -> None:
    """--decode-window 3 0: an A/B in one run; 0 is recorded as whole frames (None) and both are labelled."""
    from cellsam.cli import main

    out = tmp_path / "win"
    assert main(["bench", "--model", "vit_tiny", "--sizes", "64", "--cells", "20", "--repeats", "1", "--warmup", "0",
                 "--decode-window", "3", "0", "--no-plot", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["decode_window"] for r in res["runs"]] == [3.0, None]
    assert res["command"][res["command"].index("--decode-window") + 1 :][:2] == ["3", "0"]
    md = out.with_suffix(".md").read_text()
    assert md.count("| fp32 | 3x |") == 2 and md.count("| fp32 | whole |") == 2  # end-to-end and stages


def test_markdown_renders_without_optional_parts() -> None:
    run = {"pipeline": "cellsam", "model": "m", "size": [512, 512], "cells": 100, "n_cells": 100,
           "precision": "fp32", "device": "cpu", "tiles": 1, "end_to_end": timing.summarize([2.0, 3.0]),
           "stages": {"encoder": timing.summarize([1.0])}, "memory": timing.merge_peaks([]),
           "tiles_per_s": None, "megapixels_per_s": float("nan"), "cells_found": 0}
    cp = {**run, "pipeline": "cellpose", "model": "cellpose3", "end_to_end": timing.summarize([5.0])}
    res = {"created": "now", "machine": machine_info("cpu"), "command": ["cellsam", "bench"],
           "spec": {"repeats": 2, "warmup": 0}, "runs": [run, cp], "comparisons": comparisons([run, cp])}
    md = render_markdown(res)
    assert "| cellsam | m | 512x512 | 100 |" in md and "2.00" in md  # cellpose / ours = 5 / 2.5
    assert "## Mask parity" not in md
    auto = {**run, "decode_window": 3.0, "diameter": "auto", "diameter_used": 9.0}
    (c,) = comparisons([auto, cp])
    assert c["diameter"] == "auto" and c["cellpose_s"] == 5.0  # without Cellpose at the cells' scale: as it is
    cp_d = {**cp, "diameter": 9.4, "end_to_end": timing.summarize([20.0])}  # Cellpose given the cells' diameter
    c_own, c_auto = comparisons([run, auto, cp, cp_d])
    assert (c_own["cellpose_s"], c_own["cellpose_diameter"]) == (5.0, None)  # each beside its own scale
    assert (c_auto["cellpose_s"], c_auto["cellpose_diameter"]) == (20.0, 9.4)
    md = render_markdown({**res, "runs": [run, auto, cp, cp_d], "comparisons": [c_own, c_auto]})
    assert "| m | 512x512 | 100 | fp32 | 3x, d=auto (9 px) | 2.500 | - | - | 20.000 | 9.4 | 8.00 |" in md
    assert "| m | 512x512 | 100 | fp32 | whole | 2.500 | - | - | 5.000 | - | 2.00 |" in md
    assert "| cellpose | cellpose3 | 512x512 | 100 | 100 | fp32 | d=9.4 |" in md


def test_write_report_paths(tmp_path) -> None:
    res = {"created": "now", "machine": machine_info("cpu"), "command": ["c"], "spec": {"repeats": 1, "warmup": 0},
           "runs": [], "np": np.float32(1.5)}
    paths = write_report(res, tmp_path / "r.json", plot=True)
    assert [p.name for p in paths] == ["r.json", "r.md"]  # nothing to plot
    assert json.loads(paths[0].read_text())["np"] == 1.5


def test_cellpose_missing_gives_install_hint() -> None:
    if importlib.util.find_spec("cellpose") is not None:
        pytest.skip("cellpose is importable here")
    from cellsam.bench.cellpose_ref import import_cellpose

    mod, msg = import_cellpose(None)
    assert mod is None and "pip install --no-deps --target" in msg


def test_cellpose_timing_when_installed(tmp_path) -> None:
    if importlib.util.find_spec("cellpose") is None:
        pytest.skip("Cellpose 3 not importable (see cellsam/bench/cellpose_ref.py for the install line)")
    from cellsam.bench.cellpose_ref import import_cellpose, time_cellpose

    if import_cellpose(None)[0] is None:
        pytest.skip("the installed cellpose is not 3.x")
    sc = synthetic_scene(128, cells=200, seed=5)
    r = time_cellpose(sc, write_scene(sc, tmp_path), repeats=1, warmup=0)
    assert r["pipeline"] == "cellpose" and set(r["stages"]) == {"read", "normalise", "network", "masks", "other"}
    assert r["stages"]["network"]["min"] > 0 and r["stages"]["masks"]["min"] > 0
    assert abs(r["cells_found"] - sc.n_cells) <= 1  # ideal flows rebuild the scene's cells
    assert r["diameter"] is None and r["network_pixels"] == 128 * 128
    big = time_cellpose(sc, write_scene(sc, tmp_path), repeats=1, warmup=0, diameter=10.0)  # cells to 30 px
    assert big["diameter"] == 10.0 and big["network_pixels"] == 384 * 384  # the network sees it 3x larger
    assert abs(big["cells_found"] - sc.n_cells) <= 1  # masks at the image's own size
    with pytest.raises(ValueError, match="diameter"):
        time_cellpose(sc, tmp_path / "x.tif", diameter=0.0)
    with pytest.raises(ValueError, match="labels"):
        time_cellpose(synthetic_scene(64, cells=10, keep_labels=False), tmp_path / "x.tif")


def test_research_code_missing_is_a_clear_error(tmp_path, monkeypatch) -> None:
    """An installed package has no benchmarks/: --reference says where the code lives, exit code 2."""
    from cellsam.bench import research
    from cellsam.bench.research import ResearchCodeMissing
    from cellsam.cli import main

    monkeypatch.setattr(research, "BENCHMARKS", tmp_path / "no_benchmarks")
    monkeypatch.delitem(__import__("sys").modules, "cellsam_research.reference_pipeline", raising=False)
    with pytest.raises(ResearchCodeMissing, match="not installed with the package"):
        research.load_research("reference_pipeline")
    assert main(["bench", "--model", "vit_tiny", "--sizes", "64", "--cells", "5", "--repeats", "1", "--warmup", "0",
                 "--reference", "--out", str(tmp_path / "x")]) == 2
