"""``cellsam bench --prompts``: structure of the report and the cached-embedding path (vit_tiny, a 96x80 image).

No timing value is asserted beyond being positive; the encoder must not run while prompts are timed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import tifffile  # noqa: E402

from cellsam.bench.prompts import (  # noqa: E402
    PATHS,
    PROMPTS,
    SCHEMA,
    PromptBenchSpec,
    count_encoder_calls,
    prompt_positions,
    render_prompts_markdown,
    run_prompt_bench,
)
from cellsam.models.build import build_model  # noqa: E402
from tests.conftest import make_blobs  # noqa: E402


@pytest.fixture()
def blob_tif(tmp_path: Path) -> Path:
    img, _ = make_blobs((96, 80), n=6, radius=(6, 10), seed=0)  # 2 x 2 tiles of vit_tiny's 64 px
    path = tmp_path / "blobs.tif"
    buf = io.BytesIO()
    tifffile.imwrite(buf, (img * 4000).astype(np.uint16))
    path.write_bytes(buf.getvalue())
    return path


def test_prompt_positions_sit_on_the_blobs() -> None:
    img, lab = make_blobs((96, 80), n=6, radius=(6, 10), seed=0)
    pts, boxes = prompt_positions(img, 9)
    assert pts.shape == (9, 2) and boxes.shape == (9, 4)
    for (x, y), (x0, y0, x1, y1) in zip(pts, boxes, strict=True):
        assert lab[int(y), int(x)] > 0 and x0 < x < x1 and y0 < y < y1
        assert 0 <= x0 and 0 <= y0 and x1 <= 80 and y1 <= 96
    flat_pts, _ = prompt_positions(np.zeros((64, 64), np.float32), 3)  # no blobs: a grid
    assert flat_pts.shape == (3, 2)
    with pytest.raises(ValueError):
        prompt_positions(np.zeros((4, 4, 3)), 1)


def test_count_encoder_calls_counts_and_restores() -> None:
    from cellsam import Predictor

    torch.manual_seed(0)
    net = build_model("vit_tiny").eval()
    p = Predictor(net)
    with count_encoder_calls(net) as calls:
        p.set_image(np.random.default_rng(0).random((64, 64), dtype=np.float32))
        p.predict(box=np.array([4.0, 4.0, 30.0, 30.0]))
    assert calls == [1] and "encode" not in vars(net)


def test_prompt_bench_report(blob_tif: Path) -> None:
    spec = PromptBenchSpec(model="vit_tiny", image=str(blob_tif), repeats=3, warmup=1)
    res = run_prompt_bench(spec, command=["cellsam", "bench", "--prompts"])
    assert res["schema"] == SCHEMA and res["model"]["random_weights"]
    assert res["image"]["shape"] == [96, 80] and res["image"]["tiles"] == 4
    assert res["encoder_calls"] == {"warm": 4, "timed": 0}  # prompts reuse the cached embeddings
    assert [(r["path"], r["prompt"]) for r in res["runs"]] == [(p, q) for p in PATHS for q in PROMPTS]
    for r in res["runs"]:
        assert r["n"] + r["failed"] == 3, r
        if r["n"]:
            assert 0 < r["seconds"]["min"] <= r["seconds"]["median"] <= r["seconds"]["max"] < 60
            assert 0 <= r["within_budget"] <= 1
    assert all(r["n"] == 3 for r in res["runs"] if r["path"] == "predictor")  # the model call never refuses
    assert set(res["verdict"]) == set(PROMPTS)
    md = render_prompts_markdown(res)
    assert "| http-server | point |" in md and "## Verdict (http-server)" in md and "RANDOM weights" in md


def test_cli_bench_prompts(blob_tif: Path, tmp_path: Path) -> None:
    from cellsam.cli import main

    out = tmp_path / "r" / "prompts"
    assert main(["bench", "--prompts", "--model", "vit_tiny", "--image", str(blob_tif), "--repeats", "2",
                 "--warmup", "0", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["command"][:3] == ["cellsam", "bench", "--prompts"] and res["spec"]["repeats"] == 2
    assert out.with_suffix(".md").is_file() and not out.with_suffix(".png").exists()
    assert main(["bench", "--prompts", "--model", "vit_tiny", "--reference", "--out", str(tmp_path / "x")]) == 2
    assert main(["bench", "--prompts", "--model", "vit_tiny", "--image", str(tmp_path / "missing.tif"),
                 "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x.json").exists()
