"""Every reader on a tiny synthetic example of its layout, and on the real data where it exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellsam.data.readers import detect_format, read_source
from cellsam.data.sample import Sample, SampleError
from tests.conftest import make_blobs


def _ok(items: list) -> list[Sample]:
    return [s for s in items if isinstance(s, Sample)]


def _errors(items: list) -> list[SampleError]:
    return [s for s in items if isinstance(s, SampleError)]


def test_pairs_tif_png_npy(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    src.mkdir()
    img, lab = make_blobs((40, 50), n=4, seed=1)
    tifffile.imwrite(src / "a_img.tif", (img * 1000).astype(np.uint16))
    tifffile.imwrite(src / "a_masks.tif", lab.astype(np.uint16))
    rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, -1)
    Image.fromarray(rgb).save(src / "b_img.png")
    Image.fromarray(lab.astype(np.uint16)).save(src / "b_masks.png")
    np.save(src / "c_img.npy", np.stack([img, img]))  # (2, H, W): nuclear, whole-cell
    np.save(src / "c_masks.npy", lab)
    assert detect_format(src) == "pairs"
    samples = _ok(list(read_source(src, target="nuclear")))
    assert [s.image_id for s in samples] == ["a", "b", "c"]
    for s in samples:
        assert s.labels.dtype == np.int32 and np.array_equal(s.labels, lab)
        assert s.image.shape[-2:] == lab.shape and s.target == "nuclear" and s.source == "mine"
    assert samples[1].image.shape[0] == 1 and np.array_equal(samples[1].image[0], rgb[..., 0])
    assert samples[2].roles == ("nuclear", "whole-cell")


def test_pairs_bad_inputs_one_message_each(tmp_path: Path) -> None:
    src = tmp_path / "bad"
    src.mkdir()
    img, lab = make_blobs((40, 40), n=2, radius=(3, 5))
    np.save(src / "size_img.npy", img)
    np.save(src / "size_masks.npy", lab[:10])
    np.save(src / "neg_img.npy", img)
    np.save(src / "neg_masks.npy", -lab)
    np.save(src / "float_img.npy", img)
    np.save(src / "float_masks.npy", lab + 0.5)
    (src / "corrupt_img.png").write_bytes(b"not a png")
    np.save(src / "corrupt_masks.npy", lab)
    np.save(src / "nolabel_img.npy", img)
    np.save(src / "good_img.npy", img)
    np.save(src / "good_masks.npy", lab)
    items = list(read_source(src))
    errs = {Path(e.path).name.split("_")[0]: e.message for e in _errors(items)}
    assert "does not match image size" in errs["size"]
    assert "negative" in errs["neg"]
    assert "non-integer" in errs["float"]
    assert "cannot read" in errs["corrupt"]
    assert "no label image" in errs["nolabel"]
    assert [s.image_id for s in _ok(items)] == ["good"]


def test_empty_and_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        detect_format(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown layout"):
        detect_format(tmp_path / "odd")
    errs = _errors(list(read_source(tmp_path / "odd")))
    assert len(errs) == 1 and "unknown layout" in errs[0].message


def test_multichannel(tmp_path: Path) -> None:
    src = tmp_path / "mc"
    src.mkdir()
    img, lab = make_blobs((30, 40), n=3)
    for name in ("both", "phaseonly", "nucleionly"):
        tifffile.imwrite(src / f"{name}_masks.tif", lab.astype(np.uint16))
    tifffile.imwrite(src / "both_phase.tif", (img * 100).astype(np.uint16))
    tifffile.imwrite(src / "both_nuclear.tif", (img * 200).astype(np.uint16))
    tifffile.imwrite(src / "phaseonly_phase.tif", (img * 100).astype(np.uint16))
    tifffile.imwrite(src / "nucleionly_nuclear.tif", (img * 200).astype(np.uint16))
    assert detect_format(src) == "multichannel"
    by_id = {s.image_id: s for s in _ok(list(read_source(src, target="whole-cell")))}
    assert by_id["both"].roles == ("nuclear", "whole-cell") and by_id["both"].image.shape == (2, 30, 40)
    assert by_id["both"].path == "mc/both_phase.tif"
    assert by_id["phaseonly"].image.shape == (1, 30, 40)
    assert by_id["nucleionly"].path == "mc/nucleionly_nuclear.tif"


def test_manifest_sets_target_and_kind(tmp_path: Path) -> None:
    src = tmp_path / "mc"
    src.mkdir()
    img, lab = make_blobs((30, 40), n=3)
    tifffile.imwrite(src / "n_masks.tif", lab.astype(np.uint16))
    tifffile.imwrite(src / "n_nuclear.tif", (img * 200).astype(np.uint16))
    (tmp_path / "manifest.csv").write_text("image,source,target,kind,cells\nmc/n_nuclear.tif,mc,nuclear,nuc / x,3\n")
    (s,) = _ok(list(read_source(src, target="whole-cell")))
    assert (s.target, s.kind, s.roles) == ("nuclear", "nuc / x", ("nuclear",))


def test_dsb_layout(tmp_path: Path) -> None:
    src = tmp_path / "dsbmini"
    img, lab = make_blobs((32, 32), n=3, seed=2)
    d = src / "abc"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    rgba = np.dstack([(img * 255).astype(np.uint8)] * 3 + [np.full((32, 32), 255, np.uint8)])
    Image.fromarray(rgba).save(d / "images" / "abc.png")
    for k in range(1, lab.max() + 1):
        Image.fromarray(((lab == k) * 255).astype(np.uint8)).save(d / "masks" / f"m{k}.png")
    assert detect_format(src) == "dsb"
    (s,) = _ok(list(read_source(src)))
    assert s.image_id == "abc" and s.image.shape == (1, 32, 32)
    assert np.array_equal(s.labels > 0, lab > 0) and s.labels.max() == lab.max()


def test_npz_layout(tmp_path: Path) -> None:
    img, lab = make_blobs((24, 24), n=3)
    X = np.stack([np.stack([img, img * 0.5], -1)] * 2)  # (2, H, W, 2)
    nuc = lab.copy()
    y = np.stack([np.stack([lab, nuc], -1)] * 2)
    np.savez(tmp_path / "tissue_train.npz", X=X, y=y)
    assert detect_format(tmp_path / "tissue_train.npz") == "npz"
    samples = _ok(list(read_source(tmp_path / "tissue_train.npz", target="nuclear")))
    assert len(samples) == 2 and samples[0].split == "train" and samples[0].target == "nuclear"
    assert samples[0].image.shape == (2, 24, 24) and samples[0].roles == ("nuclear", "whole-cell")
    np.savez(tmp_path / "bad.npz", X=X)
    assert "expected arrays" in _errors(list(read_source(tmp_path / "bad.npz")))[0].message


def test_coco_polygons_and_rle(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    src = tmp_path / "cocomini"
    src.mkdir()
    img = np.zeros((40, 40), np.uint8)
    Image.fromarray(img).save(src / "a.png")
    poly = [[5, 5, 15, 5, 15, 15, 5, 15]]  # square 5..15
    m = np.zeros((40, 40), np.uint8, order="F")
    m[20:30, 20:35] = 1
    rle = mask_utils.encode(m)
    inside = np.zeros((40, 40), np.uint8, order="F")
    inside[22:25, 22:25] = 1  # fully inside the RLE mask -> dropped (Cellpose rule)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": poly, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": {"size": [40, 40], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": {"size": [40, 40], "counts": mask_utils.encode(inside)["counts"].decode()}},
    ]
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 40}], "annotations": anns,
           "categories": [{"id": 1, "name": "cell"}]}
    (src / "livecell_val.json").write_text(json.dumps(doc))
    assert detect_format(src) == "coco"
    (s,) = _ok(list(read_source(src)))
    assert s.split == "val" and s.labels.max() == 2
    assert (s.labels[20:30, 20:35] == 2).all()
    assert (s.labels[6:14, 6:14] == 1).all()


# ---- real data (skipped where ../shared/data is absent) ----


@pytest.mark.data
def test_real_dsb2018_pairs(shared_data: Path) -> None:
    it = read_source(shared_data / "dsb2018")
    first = [next(it) for _ in range(3)]
    for s in first:
        assert isinstance(s, Sample) and s.target == "nuclear" and s.kind == "mixed" and s.image.shape[0] == 1
        assert s.labels.shape == s.image.shape[1:] and s.labels.max() > 0


@pytest.mark.data
def test_real_dsb2018_raw_matches_pairs(shared_data: Path) -> None:
    raw = _ok(list(read_source(shared_data / "dsb2018_raw")))
    assert len(raw) == 8
    for s in raw:
        # the pairs copy has community-fixed masks: object counts agree roughly, sizes exactly
        with Image.open(shared_data / "dsb2018" / f"{s.image_id}_masks.png") as im:
            ref = np.asarray(im)
        assert s.labels.shape == ref.shape and abs(int(s.labels.max()) - int(ref.max())) <= 0.3 * ref.max() + 3
        assert s.image.shape == (1, *ref.shape) and s.roles == ("whole-cell",)


@pytest.mark.data
def test_real_deepcell1_multichannel(shared_data: Path) -> None:
    samples = {s.image_id: s for s in _ok(list(read_source(shared_data / "deepcell1")))}
    assert len(samples) == 23
    assert samples["HeLa_joint_set1"].roles == ("nuclear", "whole-cell")
    assert samples["HeLa_joint_set1"].target == "whole-cell"
    assert samples["nuclei_set1"].target == "nuclear" and samples["nuclei_set1"].image.shape[0] == 1
    assert samples["RAW40X_set1"].roles == ("whole-cell",)
    assert samples["ecoli_set1"].kind == "bacteria / phase"


@pytest.mark.data
def test_real_monuseg(shared_data: Path) -> None:
    s = next(iter(read_source(shared_data / "monuseg")))
    assert isinstance(s, Sample) and s.kind == "H&E" and s.image.shape == (1, 1000, 1000)
    # H&E is inverted: nuclei (labelled) are brighter than background on average
    assert s.image[0][s.labels > 0].mean() > s.image[0][s.labels == 0].mean()
