"""End-to-end `cellsam prepare` on tiny synthetic sources: layout, splits, COCO, determinism, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellsam.cli import main
from cellsam.data.prepare import PrepareError, PrepareOptions, prepare_dataset
from cellsam.data.splits import dhash, duplicate_groups, hash_split, resolve_duplicates
from cellsam.data.synthetic import write_pairs

OPTS = PrepareOptions(target="nuclear", tile=128, progress=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "synth"
    write_pairs(src, n=9, size=200, seed=3)
    return src


@pytest.fixture(scope="module")
def prepared(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "p"
    return out, prepare_dataset([source], out, options=OPTS, command="test", version="0")


def test_layout_shapes_and_counts(prepared: tuple[Path, dict]) -> None:
    out, manifest = prepared
    total_tiles = 0
    for split in ("train", "val", "test"):
        images = np.load(out / split / "images.npy")
        labels = np.load(out / split / "labels.npy")
        tiles = json.loads((out / split / "tiles.json").read_text())
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.shape[1:] == (3, 128, 128) and labels.shape[1:] == (1, 128, 128)
        assert len(images) == len(labels) == len(tiles) == manifest["counts"]["split"][split]["tiles"]
        if len(images):
            assert images.min() >= 0 and images.max() <= 1 and (images[:, :2] == 0).all()  # one channel -> blue
            assert all(labels[i].max() == t["cells"] > 0 for i, t in enumerate(tiles))  # no empty tiles, 1..n
            assert all(sorted(np.unique(lab))[-1] == len(np.unique(lab)) - 1 for lab in labels)
        total_tiles += len(tiles)
    assert sum(manifest["counts"]["split"][s]["images"] > 0 for s in ("train", "val", "test")) >= 2
    assert total_tiles == 9 * 4  # 200 px with tile 128 / stride 96 -> starts 0, 96 per axis
    assert manifest["sources"][0]["licence"].startswith("unknown")


def test_no_source_image_in_two_splits(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    where: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        for t in json.loads((out / split / "tiles.json").read_text()):
            where.setdefault(t["image"], set()).add(split)
        for e in json.loads((out / split / "images.json").read_text()):
            assert where.get(e["image"], {split}) == {split}
    assert len(where) == 9 and all(len(s) == 1 for s in where.values())


def test_coco_loads_and_areas_equal_label_areas(prepared: tuple[Path, dict]) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out, _ = prepared
    coco = COCO(str(out / "train" / "coco.json"))
    labels = np.load(out / "train" / "labels.npy")
    assert len(coco.getImgIds()) == len(labels)
    for img_id in coco.getImgIds()[:6]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        lab = labels[img_id, 0]
        assert len(anns) == lab.max()
        for k, a in enumerate(anns, start=1):
            m = mask_utils.decode(a["segmentation"])
            assert np.array_equal(m.astype(bool), lab == k) and a["area"] == int((lab == k).sum())
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(lab == k)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_full_images_and_checksums(prepared: tuple[Path, dict]) -> None:
    from cellsam.data.writer import sha256_file

    out, manifest = prepared
    on_disk = json.loads((out / "dataset.json").read_text())
    assert on_disk["checksums"] == manifest["checksums"]
    for rel, digest in manifest["checksums"].items():
        assert sha256_file(out / rel) == digest
    for split in ("val", "test"):
        for e in json.loads((out / split / "images.json").read_text()):
            img, lab = np.load(out / e["image_npy"]), np.load(out / e["labels_npy"])
            assert img.shape == (3, e["height"], e["width"]) and lab.max() == e["cells"]
    assert not (out / ".work").exists()


def test_rerun_is_byte_identical(source: Path, prepared: tuple[Path, dict], tmp_path: Path) -> None:
    out1, _ = prepared
    out2 = tmp_path / "p"  # same command text, different folder: array/JSON files identical
    prepare_dataset([source], out2, options=OPTS, command="test", version="0")
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    assert files1 == files2
    for rel in files1:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel


def test_hash_split_is_stable_and_seeded() -> None:
    keys = [f"s/{i}" for i in range(200)]
    a = [hash_split(k, seed=0) for k in keys]
    b = [hash_split(k, seed=1) for k in keys]
    assert a != b and a == [hash_split(k, seed=0) for k in keys]
    assert 0.7 < a.count("train") / len(a) < 0.9


def test_duplicates_across_splits_go_to_train(tmp_path: Path) -> None:
    src = tmp_path / "dups"
    paths = write_pairs(src, n=1, size=160, seed=5)
    for i in range(8):  # exact copies under other names land in other splits by hash
        shutil.copy(paths[0], src / f"copy{i}_img.tif")
        shutil.copy(str(paths[0]).replace("_img", "_masks"), src / f"copy{i}_masks.tif")
    m = prepare_dataset([src], tmp_path / "o", options=OPTS, command="t", version="0")
    assert m["duplicates_moved_to_train"] > 0
    assert m["counts"]["split"]["train"]["images"] == 9
    assert len(m["duplicate_groups_moved_to_train"]) == 1


def test_dhash_near_duplicates(rng: np.random.Generator) -> None:
    base = rng.random((64, 64))
    noisy = base + rng.normal(0, 0.01, base.shape)
    other = rng.random((64, 64))
    groups = duplicate_groups([[dhash(base)], [dhash(noisy * 3)], [dhash(other)]], max_distance=16)
    assert groups[0] == groups[1] != groups[2]
    splits, moved = resolve_duplicates(["val", "test", "test"], groups)
    assert splits == ["train", "train", "test"] and moved == 2


def test_bad_inputs_skip_or_stop(tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    write_pairs(src, n=2, size=140, seed=1)
    np.save(src / "broken_img.npy", np.zeros((30, 30)))
    np.save(src / "broken_masks.npy", np.zeros((20, 30), np.int32))
    m = prepare_dataset([src, tmp_path / "nowhere"], tmp_path / "o1", options=OPTS)
    assert len(m["errors"]) == 2 and m["counts"]["source"]["mixed"]["images"] == 2
    assert any("does not match image size" in e for e in m["errors"])
    assert any("does not exist" in e for e in m["errors"])
    stop = PrepareOptions(target="nuclear", tile=128, progress=False, on_error="stop")
    with pytest.raises(PrepareError, match="broken"):
        prepare_dataset([src], tmp_path / "o2", options=stop)


def test_cli_summary_and_stats(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = main(["prepare", str(source), "-o", str(out), "--target", "nuclear", "--stats", "--no-progress",
               "--split-seed", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "split" in text and "dropped" in text and "annotated cells per data type" in text
    m = json.loads((out / "dataset.json").read_text())
    assert m["command"].startswith("cellsam prepare") and m["options"]["split_seed"] == 2
    assert (out / "stats.json").is_file() and "stats.json" in m["checksums"]
    rc = main(["prepare", str(tmp_path / "missing"), "-o", str(tmp_path / "x"), "--no-progress", "--on-error", "stop"])
    assert rc == 1 and "does not exist" in capsys.readouterr().err


def test_rescale_bicubic_images_nearest_labels() -> None:
    from cellsam.data.prepare import standardise
    from cellsam.data.sample import Sample
    from tests.conftest import make_blobs

    img, lab = make_blobs((60, 70), n=4, radius=(4, 7))
    s = Sample(image=img[None], labels=lab, roles=("nuclear",), source="x", image_id="a", path="x/a")
    raw, image, labels = standardise(s, rescale=2.0)
    assert raw.shape == (1, 120, 140) and image.shape == (3, 120, 140) and labels.shape == (120, 140)
    assert set(np.unique(labels)) == set(np.unique(lab))  # nearest: no new label values
    assert abs((labels > 0).sum() - 4 * (lab > 0).sum()) < 0.05 * 4 * (lab > 0).sum()
