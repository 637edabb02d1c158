"""The shipped default model: bundled, registered, verified, documented, and it finds the sample's cells."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from cellsam import registry
from cellsam.cli.segment import sample_path
from cellsam.weights import load_model, sha256_file

# Measured on the shipped cellsam_cpu.v13 (see cellsam/pretrained/cellsam_cpu_v13.md); the floors sit
# below the measured values so that a broken model, pipeline or weights file fails, not noise.
SAMPLE_ID = "06c779330d6d3447be21df2b9f05d1088f5b3b50dc48724fc130b1fd2896a68c"
SAMPLE_F1_FLOOR = 0.75  # measured: 0.868 (23 cells; v12: 0.868, 23; v11: 0.868, 23; v10: 0.868, 23;
#                          v6: 0.909, 25; v5: 0.889, 24; v4: 0.893, 26; v3: 0.862, 28; v2: 0.486, 40; v1: 0.449, 19)
SAMPLE_CLICK_FLOOR = 0.6  # measured: mean IoU 0.735, one click on each innermost pixel (v12 0.733, v11 0.740,
#                           v10 0.730, v6 0.730, v5 0.726, v4 0.725, v3 0.684, v2 ~0.01)


@pytest.fixture(scope="module")
def default():  # type: ignore[no-untyped-def]
    return load_model("default")


def test_default_is_registered_bundled_and_verified() -> None:
    record = registry.get_weights("default")
    assert record.url.startswith("package:") and record.variant == "conv_cpu"
    from cellsam.weights import download

    path = download(record)  # verifies the sha256 of the bundled file
    assert path.is_file() and sha256_file(path) == record.sha256
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == record.sha256
    assert set(meta["training_data"]) == {"dsb2018", "deepcell1", "monuseg"}
    assert "non-commercial" in meta["license"]
    card = path.with_suffix(".md")
    assert card.is_file() and "MoNuSeg" in card.read_text()


def test_default_model_thresholds_and_architecture(default) -> None:  # type: ignore[no-untyped-def]
    from cellsam.models.conv_encoder import ConvEncoder
    from cellsam.models.dense_finder import DenseCellFinder

    assert default.img_size == 256 and isinstance(default.image_encoder, ConvEncoder)
    assert isinstance(default.cellfinder, DenseCellFinder)
    assert default.cfg.tile_size >= default.img_size  # the inference scale chosen on validation images
    inf = default.cfg.inference
    assert 0.0 < inf.box_threshold < 1.0 and 0.0 <= inf.mask_threshold < 1.0
    assert inf.box_threshold_rel == 0.5  # the relative box threshold (scripts/score_study.py, 2026-12-04)
    assert inf.multimask is False  # only the single-mask output was trained (boxes and clicks)
    assert inf.stain_grey == "hematoxylin"  # trained on stained pictures as their hematoxylin channel
    # the size model for diameter="auto" (configs/cpu_v10.yaml stage 8) and its reference diameter
    assert default.size_head is not None and default.size_head.fitted
    assert inf.cell_diameter is not None and 15.0 <= inf.cell_diameter <= 40.0


def test_default_model_segments_the_sample(default) -> None:  # type: ignore[no-untyped-def]
    import cellsam
    from cellsam.io import load_image

    image = load_image(sample_path()).data
    seg = cellsam.segment(image, default)
    assert seg.labels.shape == image.shape[:2]
    # the sample holds about 30 nuclei (its ground truth has 30 labels; it is a training image)
    assert 20 <= seg.n_cells <= 40, seg.stats  # measured: 23
    assert set(np.unique(seg.labels)) == set(range(seg.n_cells + 1))


@pytest.mark.data
def test_default_model_matches_the_samples_ground_truth(default, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    import cellsam
    from cellsam.data.sample import load_array
    from cellsam.eval.metrics import evaluate_labels
    from cellsam.io import load_image

    gt = load_array(shared_data / "dsb2018" / f"{SAMPLE_ID}_masks.png").astype(np.int32)
    seg = cellsam.segment(load_image(sample_path()).data, default)
    s = evaluate_labels([gt], [seg.labels], deepcell=False, coco=False, per_image=False)
    assert s["f1_mean"] >= SAMPLE_F1_FLOOR, s


def test_default_decode_window_gives_the_whole_frame_result(default) -> None:  # type: ignore[no-untyped-def]
    """The default decoder window (3x each box) without local decoding changes no pixel of the sample's
    labels vs whole frames, while a window of 0.5x (smaller than the cells) does; the model's stored local
    decoding (the transformer sees the window only) keeps the same cells."""
    import dataclasses

    import cellsam
    from cellsam.io import load_image

    assert default.cfg.inference.local_decoding  # v4-v13 ship with it (scripts/local_decoding_ab.py)
    image = load_image(sample_path()).data
    local = cellsam.segment(image, default)
    plain = copy.deepcopy(default)
    plain.cfg = plain.cfg.replace(inference=dataclasses.replace(plain.cfg.inference, local_decoding=False))
    whole = cellsam.segment(image, plain, decode_window=0)
    windowed = cellsam.segment(image, plain)  # the default window
    np.testing.assert_array_equal(windowed.labels, whole.labels)
    tight = cellsam.segment(image, plain, decode_window=0.5)
    assert (tight.labels > 0).sum() < (whole.labels > 0).sum()  # masks cut at their windows
    assert local.n_cells == whole.n_cells
    agree = ((local.labels > 0) == (whole.labels > 0)).mean()
    assert agree > 0.98, agree


@pytest.mark.data
def test_a_click_on_a_nucleus_gives_that_nucleus(default, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    """The web app's click tool path: Predictor.predict with one positive point per cell (its default
    multimask_output=True is ignored for this model: one mask, the trained output)."""
    from cellsam.data.sample import load_array
    from cellsam.inference.predictor import Predictor
    from cellsam.io import load_image
    from cellsam.train.clicks import innermost_points

    gt = load_array(shared_data / "dsb2018" / f"{SAMPLE_ID}_masks.png").astype(np.int32)
    p = Predictor(default)
    p.set_image(load_image(sample_path()).data)
    ious = []
    for cid, (x, y) in innermost_points(gt).items():
        masks, scores, _ = p.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))
        assert masks.shape == (1, *gt.shape) and scores.shape == (1,)
        cell = gt == cid
        ious.append((masks[0] & cell).sum() / max((masks[0] | cell).sum(), 1))
    assert float(np.mean(ious)) >= SAMPLE_CLICK_FLOOR, ious
