"""The model's colour rule (``InferenceConfig.stain_grey``): a stained bright-field picture becomes the grey its
training data had, in every path that prepares an image for a model (segment, Predictor, napari, Dask)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from cellsam import segment
from cellsam.config import CellSAMConfig, InferenceConfig
from cellsam.data.normalize import hematoxylin, normalize_channel, rgb_to_channel
from cellsam.inference.preprocess import prepare_image, stain_grey
from cellsam.models.build import build_model
from tests.conftest import make_blobs

OPEN = dict(box_threshold=0.0, iou_threshold=-1e9, tile_size=64, min_area_rel=0.0)


def he_picture(shape: tuple[int, int] = (96, 112), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E picture (uint8 RGB) and its hematoxylin amount: purple nuclei (hematoxylin) on pink,
    textured tissue (eosin, patchy), by ``skimage.color.hed2rgb``."""
    from skimage.color import hed2rgb
    from skimage.filters import gaussian

    nuclei, _ = make_blobs(shape, n=10, radius=(5, 9), seed=seed)
    rng = np.random.default_rng(seed)
    h = 0.05 * (nuclei > 0.2).astype(np.float64)
    g = gaussian(rng.random(shape), 3)
    e = 0.005 + 0.03 * (g - g.min()) / (g.max() - g.min())  # eosin everywhere, in patches
    hed = np.stack([h, e, np.zeros(shape)], axis=-1)
    return (np.clip(hed2rgb(hed), 0, 1) * 255).astype(np.uint8), h


@pytest.fixture(scope="module")
def tiny_hed() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("vit_tiny").eval()
    net.cfg = net.cfg.replace(inference=dataclasses.replace(net.cfg.inference, stain_grey="hematoxylin"))
    return net


def test_the_rule_is_part_of_the_config_and_old_configs_read_as_luminance() -> None:
    with pytest.raises(ValueError, match="stain_grey"):
        InferenceConfig(stain_grey="eosin")  # type: ignore[arg-type]
    cfg = build_model("vit_tiny").cfg
    hed = cfg.replace(inference=dataclasses.replace(cfg.inference, stain_grey="hematoxylin"))
    assert CellSAMConfig.from_dict(hed.to_dict()).inference.stain_grey == "hematoxylin"
    old = cfg.to_dict()
    del old["inference"]["stain_grey"]  # a checkpoint written before the field existed
    assert CellSAMConfig.from_dict(old).inference.stain_grey == "luminance"
    assert stain_grey(object()) == "luminance"


def test_hematoxylin_keeps_the_nuclei_and_drops_the_eosin() -> None:
    rgb, h = he_picture()
    hed = prepare_image(rgb, channel_axis=-1, stain="hematoxylin")
    lum = prepare_image(rgb, channel_axis=-1)
    np.testing.assert_allclose(hed[2], normalize_channel(hematoxylin(rgb, 255.0)), atol=1e-6)
    np.testing.assert_array_equal(lum[2], normalize_channel(rgb_to_channel(rgb)))
    assert not hed[:2].any() and not lum[:2].any()  # one channel: blue, as before

    def corr(x: np.ndarray) -> float:
        return float(np.corrcoef(x.ravel(), h.ravel())[0, 1])

    assert corr(hed[2]) > 0.99 > corr(lum[2])  # the eosin patches show in the luminance, not in hematoxylin
    grey = np.repeat((h * 255).astype(np.uint8)[..., None], 3, axis=-1)  # grey pictures: unaffected
    np.testing.assert_array_equal(prepare_image(grey, channel_axis=-1, stain="hematoxylin"),
                                  prepare_image(grey, channel_axis=-1))


def test_segment_and_the_predictor_prepare_by_the_models_rule(tiny_hed: torch.nn.Module) -> None:
    from cellsam.inference.predictor import Predictor

    rgb, _ = he_picture()
    own = segment(rgb, tiny_hed, channel_axis=-1, **OPEN)
    as_hed = segment(prepare_image(rgb, channel_axis=-1, stain="hematoxylin"), tiny_hed, channel_axis=0,
                     normalize=False, **OPEN)
    as_lum = segment(prepare_image(rgb, channel_axis=-1), tiny_hed, channel_axis=0, normalize=False, **OPEN)
    assert own.n_cells > 0
    np.testing.assert_array_equal(own.labels, as_hed.labels)
    np.testing.assert_array_equal(own.scores, as_hed.scores)
    assert not np.array_equal(own.scores, as_lum.scores)  # the rule changed what the model saw
    lum_net = copy.deepcopy(tiny_hed)
    lum_net.cfg = lum_net.cfg.replace(inference=InferenceConfig())
    np.testing.assert_array_equal(segment(rgb, lum_net, channel_axis=-1, **OPEN).scores, as_lum.scores)

    p, q = Predictor(tiny_hed), Predictor(tiny_hed)
    p.set_image(rgb, channel_axis=-1)
    q.set_image(prepare_image(rgb, channel_axis=-1, stain="hematoxylin"), channel_axis=0, normalize=False)
    box = np.array([10.0, 10.0, 40.0, 40.0])
    lp = p.predict(box=box, return_logits=True)[0]
    np.testing.assert_allclose(lp, q.predict(box=box, return_logits=True)[0], atol=1e-5)


def test_napari_and_the_dask_normaliser_follow_the_rule(tiny_hed: torch.nn.Module) -> None:
    from cellsam.distributed.source import fit_normalizer, open_source, prepare_window
    from cellsam.napari.prompts import PromptTool
    from cellsam.napari.segmentation import ImageSpec, SegmentOptions, iter_segment

    rgb, _ = he_picture()
    gen = iter_segment(rgb, tiny_hed, spec=ImageSpec(channel_axis=-1), options=SegmentOptions(**OPEN))
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        seg = stop.value
    lib = segment(rgb, tiny_hed, channel_axis=-1, **OPEN)
    np.testing.assert_array_equal(seg.labels, lib.labels)
    np.testing.assert_allclose(np.sort(seg.scores), np.sort(lib.scores), rtol=1e-5)

    src = open_source(rgb, channel_axis=-1)
    h, w = src.shape
    for stain in ("luminance", "hematoxylin"):
        norm = fit_normalizer([src.read((0, 0, h, w))], 3, stain=stain)  # type: ignore[arg-type]
        np.testing.assert_allclose(prepare_window(src, norm, (0, 0, h, w)),
                                   prepare_image(rgb, channel_axis=-1, stain=stain), atol=1e-5)

    tool = PromptTool(tiny_hed)
    tool.set_image("he", rgb, ImageSpec(channel_axis=-1))
    tool.set_model(copy.deepcopy(tiny_hed), name="same rule")
    assert tool.has_image("he")
    lum_net = copy.deepcopy(tiny_hed)
    lum_net.cfg = lum_net.cfg.replace(inference=InferenceConfig())
    tool.set_model(lum_net, name="other rule")
    assert not tool.has_image("he")  # prepared by the old rule: registered again by the widget


# ------------------------------------------------------------------ prepare -> train -> evaluate, one rule
def he_folder(root, n: int = 3):  # noqa: ANN001, ANN201 - a pairs-layout folder of synthetic H&E pictures
    import tifffile
    from PIL import Image
    from skimage.measure import label

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, h = he_picture((96, 112), seed=i)
        Image.fromarray(rgb).save(root / f"he_{i}_img.png")
        tifffile.imwrite(root / f"he_{i}_masks.tif", label(h > 0).astype(np.uint16))
    return root


def test_prepare_records_the_rule_and_training_and_evaluation_follow_it(tmp_path) -> None:  # noqa: ANN001
    import json

    from cellsam.cli import main
    from cellsam.data.prepare import dataset_stain_grey
    from cellsam.eval.harness import load_data
    from cellsam.train.dataset import adopt_data_stain

    src = he_folder(tmp_path / "he")
    args = [str(src), "--target", "nuclear", "--no-progress"]
    assert main(["prepare", *args, "-o", str(tmp_path / "lum")]) == 0
    assert main(["prepare", *args, "-o", str(tmp_path / "hed"), "--stain-grey", "hematoxylin"]) == 0
    assert dataset_stain_grey(tmp_path / "lum") == "luminance" and dataset_stain_grey(tmp_path / "hed") == "hematoxylin"
    assert dataset_stain_grey(tmp_path / "nowhere") == "luminance"
    lum_tiles = np.load(tmp_path / "lum" / "train" / "images.npy")
    hed_tiles = np.load(tmp_path / "hed" / "train" / "images.npy")
    assert lum_tiles.shape == hed_tiles.shape and not np.allclose(lum_tiles, hed_tiles)
    manifest = json.loads((tmp_path / "hed" / "dataset.json").read_text())
    del manifest["options"]["stain_grey"]  # a dataset prepared before the option: luminance
    (tmp_path / "hed" / "dataset.json").write_text(json.dumps(manifest))
    assert dataset_stain_grey(tmp_path / "hed") == "luminance"
    manifest["options"]["stain_grey"] = "hematoxylin"
    (tmp_path / "hed" / "dataset.json").write_text(json.dumps(manifest))

    net = build_model("vit_tiny")
    assert adopt_data_stain(net, tmp_path / "hed").cfg.inference.stain_grey == "hematoxylin"
    assert adopt_data_stain(net, tmp_path / "lum").cfg.inference.stain_grey == "luminance"

    with pytest.raises(ValueError, match="no full images"):  # past the rule check (train has tiles only)
        load_data(tmp_path / "hed", "train", stain="hematoxylin")
    with pytest.raises(ValueError, match="--stain-grey luminance"):
        load_data(tmp_path / "hed", "train", stain="luminance")
    folder = load_data(src, stain="hematoxylin")  # a raw folder is read by the model's rule
    rgb, _ = he_picture((96, 112), seed=0)
    image, _ = next(it for it in folder if str(it.name).endswith("he_0_img.png")).load()
    np.testing.assert_allclose(image, prepare_image(rgb, channel_axis=-1, stain="hematoxylin"), atol=1e-6)


def test_a_training_run_gives_the_model_the_datas_rule(tmp_path) -> None:  # noqa: ANN001
    import json

    from cellsam.train.run import initial_model
    from tests.test_train import tiny_cfg

    cfg = tiny_cfg(tmp_path)
    assert initial_model(cfg).cfg.inference.stain_grey == "luminance"
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"options": {"stain_grey": "hematoxylin"}}))
    assert initial_model(cfg).cfg.inference.stain_grey == "hematoxylin"
