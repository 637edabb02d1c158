"""SYNTHETIC data generators: exact, valid labels; deterministic; the archetypes look as intended."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam.data import synthetic
from cellsam.data.labels import filter_labels


@pytest.mark.parametrize("gen", [synthetic.yeast, synthetic.rod_bacteria])
def test_single_channel_generators(gen) -> None:
    img, lab = gen((128, 128), seed=4)
    img2, lab2 = gen((128, 128), seed=4)
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)  # deterministic
    assert img.dtype == np.float32 and lab.dtype == np.int32 and img.min() >= 0 and img.max() <= 1
    assert lab.max() >= 5 and sorted(np.unique(lab))[-1] == len(np.unique(lab)) - 1  # 1..n, no gaps
    filtered, drops = filter_labels(lab)
    assert drops == {"disjoint": 0, "thin": 0} and np.array_equal(filtered, lab)  # labels already valid
    assert not np.array_equal(gen((128, 128), seed=5)[1], lab)


def test_phase_contrast_halo() -> None:
    img, lab = synthetic.rod_bacteria((128, 128), seed=1, phase=True, noise=0.0)
    inside = lab > 0
    from scipy import ndimage as ndi

    ring = ndi.binary_dilation(inside, iterations=2) & ~inside
    far = ~ndi.binary_dilation(inside, iterations=8)
    assert img[inside].mean() < img[far].mean() < img[ring].mean()  # dark cells, bright halo


def test_yeast_buds_make_non_convex_cells() -> None:
    _, lab = synthetic.yeast((160, 160), n=20, seed=0, bud_fraction=1.0)
    from skimage.measure import regionprops

    solidity = [p.solidity for p in regionprops(lab)]
    assert min(solidity) < 0.95  # mother + bud is one, non-convex object


def test_dense_tissue_pairs_nuclei_with_cells() -> None:
    nuc, mem, cells, nuclei = synthetic.dense_tissue((128, 128), n=30, seed=2)
    assert nuc.shape == mem.shape == cells.shape == nuclei.shape
    assert cells.max() >= 25 and (cells > 0).mean() > 0.8  # densely packed
    for k in np.unique(nuclei)[1:]:
        assert (cells[nuclei == k] == k).all()  # nucleus k inside cell k
    assert mem[cells == 0].mean() > mem[cells > 0].mean()  # membrane channel marks the borders
    assert nuc[nuclei > 0].mean() > nuc[nuclei == 0].mean()


def test_write_pairs_is_readable(tmp_path) -> None:
    from cellsam.data.readers import detect_format, read_source

    paths = synthetic.write_pairs(tmp_path / "syn", n=3, size=96)
    assert len(paths) == 3 and detect_format(tmp_path / "syn") == "pairs"
    samples = list(read_source(tmp_path / "syn", target="whole-cell"))
    assert [s.image_id for s in samples] == ["rods_001", "tissue_002", "yeast_000"]
    assert all(s.labels.max() > 0 for s in samples)
