"""The dense CellFinder: targets <-> decoding round trip, its losses, the shared detect() contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellsam.config import DenseFinderConfig
from cellsam.models.build import build_model
from cellsam.models.dense_finder import DenseCellFinder, decode_dense, mean_of_views, unmirror
from cellsam.ops.boxes import box_iou, box_xyxy_to_cxcywh
from cellsam.train.dense_loss import DenseCriterion, centernet_focal_loss
from cellsam.train.dense_targets import dense_targets, gaussian_radius

STRIDE, SIDE = 4, 256


def scene(seed: int = 0) -> torch.Tensor:
    """Boxes 4 px to 200 px wide whose centres fall in distinct stride-4 locations, xyxy pixels."""
    rng = np.random.default_rng(seed)
    boxes, used = [], set()
    sizes = [4, 5, 8, 12, 20, 33, 50, 80, 120, 200]
    while len(boxes) < 40:
        w = float(rng.choice(sizes)) * rng.uniform(0.8, 1.2)
        h = w * rng.uniform(0.6, 1.4)
        cx, cy = rng.uniform(2, SIDE - 2, size=2)
        key = (int(cx // STRIDE), int(cy // STRIDE))
        near = any(abs(key[0] - u) <= 1 and abs(key[1] - v) <= 1 for u, v in used)
        if near:
            continue  # a peak needs its own 3x3 neighbourhood
        used.add(key)
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(boxes, dtype=torch.float32)


def perfect_outputs(boxes: torch.Tensor, ttf_alpha: float = 0.0) -> dict[str, torch.Tensor]:
    t = dense_targets(boxes, map_size=(SIDE // STRIDE, SIDE // STRIDE), stride=STRIDE, ttf_alpha=ttf_alpha)
    heat = torch.where(t.heatmap >= 1, torch.tensor(20.0), torch.logit(t.heatmap.clamp(1e-6, 0.99)))
    return {"heatmap": heat[None, None], "size": t.size[None], "offset": t.offset[None]}


@pytest.mark.parametrize("ttf_alpha", [0.0, 0.54])
def test_targets_decode_to_the_same_boxes(ttf_alpha: float) -> None:
    boxes = scene()
    out = perfect_outputs(boxes, ttf_alpha)
    det = decode_dense(out, image_size=SIDE, box_threshold=0.99, stride=STRIDE)[0]
    assert det["boxes"].shape == boxes.shape
    clipped = boxes.clamp(0, SIDE)
    iou = box_iou(det["boxes"], clipped)
    best = iou.max(dim=1).values
    assert best.min() > 0.999  # every decoded box is one of the true boxes ...
    assert len(set(iou.argmax(dim=1).tolist())) == len(boxes)  # ... and each true box is found once


def test_peaks_sit_at_the_centre_location_and_heatmap_is_one_only_there() -> None:
    boxes = scene(1)
    t = dense_targets(boxes, map_size=(64, 64), stride=STRIDE)
    c = box_xyxy_to_cxcywh(boxes)[:, :2] / STRIDE
    peaks = {(int(y), int(x)) for x, y in c.floor().tolist()}
    ones = {tuple(p) for p in torch.nonzero(t.heatmap >= 1).tolist()}
    assert ones == peaks and t.num_cells == len(boxes)
    assert float(t.heatmap.max()) == 1.0 and float(t.heatmap.min()) == 0.0
    for y, x in peaks:
        assert t.weight[y, x] == 1.0
        assert 0 <= float(t.offset[0, y, x]) < 1 and 0 <= float(t.offset[1, y, x]) < 1


def test_ttf_gaussians_spread_with_the_box_and_weigh_each_cell_once() -> None:
    """TTFNet's targets: a 28 px cell at stride 4 (7 locations) has one positive location and a 3x3 window
    of size / offset supervision (CenterNet's radius gives it one location); a 200 x 48 px cell a 27 x 7
    window; the weights of each cell sum to 1 and the heatmap is the cell's Gaussian inside its window."""
    boxes = torch.tensor([[100.0, 100.0, 128.0, 128.0], [10.0, 180.0, 210.0, 228.0]])
    old = dense_targets(boxes[:1], map_size=(64, 64), stride=STRIDE)
    assert int((old.weight > 0).sum()) == 1 and int((old.heatmap > 0).sum()) == 1
    t = dense_targets(boxes, map_size=(64, 64), stride=STRIDE, ttf_alpha=0.54)
    small, big = torch.zeros(64, 64, dtype=torch.bool), torch.zeros(64, 64, dtype=torch.bool)
    small[27:30, 27:30] = True  # peak (28, 28), radius floor(0.54 * 7 / 2) = 1
    big[48:55, 14:41] = True  # peak (51, 27), radii floor(0.54 * 50 / 2) = 13 and floor(0.54 * 12 / 2) = 3
    assert torch.equal(t.weight > 0, small | big) and torch.equal(t.heatmap > 0, small | big)
    assert float(t.weight[small].sum()) == pytest.approx(1.0) and float(t.weight[big].sum()) == pytest.approx(1.0)
    assert float(t.heatmap[28, 28]) == 1.0 and float(t.heatmap[51, 27]) == 1.0 and t.num_cells == 2
    assert float(t.heatmap[28, 29]) == pytest.approx(math.exp(-1 / (2 * 0.5**2)), rel=1e-5)  # sigma (2 + 1) / 6
    assert float(t.heatmap[51, 30]) == pytest.approx(math.exp(-9 / (2 * (27 / 6) ** 2)), rel=1e-5)
    assert torch.allclose(t.size[:, 51, 40], torch.log(torch.tensor([50.0, 12.0])))  # the owner's box everywhere
    assert float(t.offset[0, 51, 40]) == pytest.approx(27.5 - 40)


def test_empty_image_has_empty_targets_and_no_detections() -> None:
    t = dense_targets(torch.zeros(0, 4), map_size=(16, 16), stride=STRIDE)
    assert t.num_cells == 0 and float(t.heatmap.sum()) == 0 and float(t.weight.sum()) == 0
    out = {"heatmap": torch.full((1, 1, 16, 16), -5.0), "size": torch.zeros(1, 2, 16, 16),
           "offset": torch.zeros(1, 2, 16, 16)}
    det = decode_dense(out, image_size=64, box_threshold=0.4, stride=STRIDE)[0]
    assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,)


def test_gaussian_radius_keeps_iou_above_min_overlap() -> None:
    for side in (1.0, 3.0, 10.0, 50.0):
        w = h = torch.tensor([side])
        r = float(gaussian_radius(w, h, 0.7)[0])
        assert side**2 / (side + 2 * r) ** 2 >= 0.7 - 1e-5  # grown by r on every side
        r2 = r * 1.1 + 0.05  # a larger radius breaks the bound
        assert side**2 / (side + 2 * r2) ** 2 < 0.7
        assert 0.09 * side < r < 0.2 * side


def test_centernet_focal_loss_hand_values() -> None:
    # positive at p = 0.5: (1 - p)^2 * -log p; negative with target 0.5 at p = 0.5: (1 - 0.5)^4 * p^2 * -log(1 - p)
    assert math.isclose(float(centernet_focal_loss(torch.zeros(1), torch.ones(1))), 0.25 * math.log(2), rel_tol=1e-6)
    neg = float(centernet_focal_loss(torch.zeros(1), torch.tensor([0.5])))
    assert math.isclose(neg, 0.0625 * 0.25 * math.log(2), rel_tol=1e-6)
    # confident and right: nearly zero; confident and wrong: large
    assert float(centernet_focal_loss(torch.tensor([9.0, -9.0]), torch.tensor([1.0, 0.0]))) < 1e-3
    assert float(centernet_focal_loss(torch.tensor([-9.0, 9.0]), torch.tensor([1.0, 0.0]))) > 10


@pytest.mark.parametrize("ttf_alpha", [0.0, 0.54])
def test_dense_criterion_zero_for_perfect_outputs_and_hand_value_for_a_size_error(ttf_alpha: float) -> None:
    boxes = scene(2)
    out = perfect_outputs(boxes, ttf_alpha)
    crit = DenseCriterion(stride=STRIDE, weight_dict={"loss_heatmap": 1, "loss_size": 1, "loss_offset": 1,
                                                      "loss_giou": 1}, ttf_alpha=ttf_alpha)
    tgt = [{"boxes": box_xyxy_to_cxcywh(boxes) / SIDE, "labels": torch.zeros(len(boxes), dtype=torch.long)}]
    losses = crit(out, tgt)
    for k in ("loss_size", "loss_offset", "loss_giou"):
        assert float(losses[k]) < 1e-4, k
    t = dense_targets(boxes, map_size=(64, 64), stride=STRIDE, ttf_alpha=ttf_alpha)
    bad = dict(out, size=out["size"] + 0.1)  # log-size off by 0.1 everywhere
    expected = 0.2 * float(t.weight.sum()) / t.num_cells  # two channels, weighted, per cell
    assert math.isclose(float(crit(bad, tgt)["loss_size"]), expected, rel_tol=1e-4)
    assert float(crit(bad, tgt)["loss_giou"]) > 0.01
    assert float(crit.total(losses)) == pytest.approx(sum(float(v) for v in losses.values()), rel=1e-6)


@pytest.mark.parametrize("variant", ["vit_tiny", "conv_tiny"])
def test_detect_contract_shared_by_both_cellfinders(variant: str) -> None:
    torch.manual_seed(0)
    net = build_model(variant).eval()
    s = net.img_size
    x = net.preprocess(torch.rand(2, 3, s, s))
    with torch.no_grad():
        enc = net.encode(x)
        outputs = net.detect(enc, x)
    for thr, check_empty in ((0.0, False), (1.0, True)):
        dets = net.postprocess_detections(outputs, box_threshold=thr)
        assert len(dets) == 2
        for d in dets:
            assert set(d) >= {"scores", "boxes", "labels"}
            n = d["scores"].shape[0]
            assert d["boxes"].shape == (n, 4) and d["labels"].shape == (n,)
            assert torch.all(d["scores"][:-1] >= d["scores"][1:])  # sorted descending
            assert torch.all((d["boxes"] >= 0) & (d["boxes"] <= s))
            assert torch.all(d["scores"] > thr)
            if check_empty:
                assert n == 0
            else:
                assert n > 0


def test_dense_finder_checks_its_inputs() -> None:
    head = DenseCellFinder(DenseFinderConfig(head_channels=8), in_channels=4)
    with pytest.raises(ValueError, match="expected features"):
        head(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="bad outputs"):
        decode_dense({"heatmap": torch.zeros(1, 2, 4, 4), "size": torch.zeros(1, 2, 4, 4),
                      "offset": torch.zeros(1, 2, 4, 4)}, image_size=16, box_threshold=0.5, stride=4)
    cap = DenseCellFinder(DenseFinderConfig(head_channels=8, max_detections=3), in_channels=4)
    out = {"heatmap": torch.randn(1, 1, 16, 16), "size": torch.zeros(1, 2, 16, 16), "offset": torch.zeros(1, 2, 16, 16)}
    assert cap.postprocess(out, image_size=64, box_threshold=0.0)[0]["boxes"].shape[0] == 3


def test_dense_finder_on_a_vit_reads_its_token_grid() -> None:
    """Study arm (b) of issue #18: the dense CellFinder on vit_tiny's token grid needs stride = patch size;
    it then gives one heatmap location per token and boxes in input pixels."""
    from cellsam.registry import get_config

    cfg = get_config("vit_tiny")
    with pytest.raises(ValueError, match="stride must be the patch size"):
        build_model(cfg.replace(detector_kind="dense"))  # stride 4 on a patch-8 grid
    import dataclasses

    p = cfg.encoder.patch_size
    model = build_model(cfg.replace(detector_kind="dense",
                                    dense_finder=dataclasses.replace(cfg.dense_finder, stride=p))).eval()
    x = model.preprocess(torch.rand(2, 3, model.img_size, model.img_size))
    with torch.no_grad():
        out = model.detect(model.encode(x), x)
        dets = model.postprocess_detections(out, box_threshold=0.0)
    side = model.img_size // p
    assert out["heatmap"].shape == (2, 1, side, side) and len(dets) == 2
    assert all(((d["boxes"] >= 0) & (d["boxes"] <= model.img_size)).all() for d in dets)


@pytest.mark.parametrize("dims", [(-1,), (-2,), (-2, -1)])
def test_maps_of_a_mirrored_scene_unmirror_to_the_scene_boxes(dims: tuple[int, ...]) -> None:
    boxes = scene(2)
    mirrored = boxes.clone()
    if -1 in dims:
        mirrored[:, [0, 2]] = SIDE - boxes[:, [2, 0]]
    if -2 in dims:
        mirrored[:, [1, 3]] = SIDE - boxes[:, [3, 1]]
    back = unmirror(perfect_outputs(mirrored), dims)
    want = decode_dense(perfect_outputs(boxes), image_size=SIDE, box_threshold=0.99, stride=STRIDE)[0]["boxes"]
    got = decode_dense(back, image_size=SIDE, box_threshold=0.99, stride=STRIDE)[0]["boxes"]
    assert got.shape == want.shape == boxes.shape
    iou = box_iou(got, want)
    assert iou.max(dim=1).values.min() > 0.999 and len(set(iou.argmax(dim=1).tolist())) == len(boxes)
    with pytest.raises(ValueError, match="dims"):
        unmirror(back, (1,))


def test_mean_of_views_averages_probabilities_and_log_sizes() -> None:
    a = {"heatmap": torch.full((1, 1, 2, 2), math.log(0.9 / 0.1)), "size": torch.zeros(1, 2, 2, 2),
         "offset": torch.full((1, 2, 2, 2), 0.2)}
    b = {"heatmap": torch.full((1, 1, 2, 2), math.log(0.1 / 0.9)), "size": torch.full((1, 2, 2, 2), 2.0),
         "offset": torch.full((1, 2, 2, 2), 0.6)}
    m = mean_of_views([a, b])
    assert torch.allclose(m["heatmap"].sigmoid(), torch.full((1, 1, 2, 2), 0.5), atol=1e-6)
    assert torch.allclose(m["size"], torch.ones(1, 2, 2, 2))
    assert torch.allclose(m["offset"], torch.full((1, 2, 2, 2), 0.4))
    with pytest.raises(ValueError, match="no views"):
        mean_of_views([])


@pytest.mark.parametrize("mode, mirrors", [("mirrors", ((-1,), (-2,))), ("rot180", ((-2, -1),))])
def test_flip_test_is_the_mean_of_the_mirrored_views_at_inference_only(
        mode: str, mirrors: tuple[tuple[int, ...], ...]) -> None:
    import dataclasses

    torch.manual_seed(0)
    plain = build_model("conv_tiny")
    cfg = plain.cfg.replace(inference=dataclasses.replace(plain.cfg.inference, flip_test=mode))
    net = build_model(cfg)
    net.load_state_dict(plain.state_dict())
    net.eval(), plain.eval()
    x = net.preprocess(torch.rand(2, 3, net.img_size, net.img_size))
    with torch.no_grad():
        enc = net.encode(x)
        got = net.detect(enc, x)
        views = [plain.detect(enc, x)]
        for dims in mirrors:
            views.append(unmirror(plain.detect(plain.encode(x.flip(dims)), x.flip(dims)), dims))
        want = mean_of_views(views)
        for key in ("heatmap", "size", "offset"):
            assert torch.allclose(got[key], want[key], atol=1e-5), key
        assert not torch.allclose(got["heatmap"], views[0]["heatmap"], atol=1e-3)  # the mirrors changed it
        with pytest.raises(ValueError, match="preprocessed images"):
            net.detect(enc)
        assert torch.allclose(net.detect(enc, x, flip_test=False)["heatmap"], views[0]["heatmap"])  # asked off
        assert torch.allclose(net.detect(enc, x, flip_test="off")["heatmap"], views[0]["heatmap"])
        assert torch.allclose(plain.detect(enc, x, flip_test=mode)["heatmap"], got["heatmap"], atol=1e-5)  # on
        other = "rot180" if mode == "mirrors" else "mirrors"
        assert not torch.allclose(plain.detect(enc, x, flip_test=other)["heatmap"], got["heatmap"], atol=1e-4)
        with pytest.raises(ValueError, match="flip_test must be one of"):
            plain.detect(enc, x, flip_test="sideways")  # type: ignore[arg-type]
        net.train()
        trained = plain.train().detect(plain.encode(x), x)["heatmap"]
        assert torch.allclose(net.detect(net.encode(x), x)["heatmap"], trained)  # training: the one view
