"""How the model holds up on H&E pictures unlike its training images: half the magnification, other stains.

    python scripts/he_robustness.py [MODEL] --data prepared_hed --splits val test --out benchmarks/he_robustness

The hidden test set holds H&E tiles from a source we never saw; two things that differ between H&E sources
are the magnification (20x vs MoNuSeg's 40x) and the stain (how much haematoxylin and eosin, scanner colour).
This study takes the MoNuSeg images of ``--splits`` (the original RGB files the prepared set names, never
trained on) and makes variants of each:

* ``as_is``: the picture itself;
* ``half_size``: resized to half its side (bilinear; the labels by nearest neighbour): 20x-like nuclei of
  ~15 px, which ``diameter="auto"`` must find and enlarge;
* ``pale_h``: in the haematoxylin-eosin-DAB space of scikit-image's ``rgb2hed``, haematoxylin x 0.6 and
  eosin x 1.4 (a pink, weakly counter-stained slide);
* ``dark_h``: haematoxylin x 1.4 + 0.02, eosin x 0.7 (a blue, over-stained slide).

Each variant is written as a source folder (``<name>_img.png`` + ``<name>_masks.png``) and scored by the
evaluation harness with the model's stored defaults, reading it as ``cellsam evaluate --data FOLDER`` does
(the model's colour rule). Writes ``OUT.md`` and ``OUT.json``. A maintainer script for #18, not part of the
package.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from cellsam.eval.harness import cellsam_method, evaluate_methods, load_folder
from cellsam.inference.preprocess import stain_grey
from cellsam.weights import load_model

STAINS = {"pale_h": ((0.6, 1.4, 1.0), (0.0, 0.0, 0.0)), "dark_h": ((1.4, 0.7, 1.0), (0.02, 0.0, 0.0))}
VARIANTS = ("as_is", "half_size", *STAINS)


def restain(rgb: np.ndarray, scale: tuple[float, float, float], shift: tuple[float, float, float]) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 with each stain's optical density scaled and shifted."""
    hed = rgb2hed(rgb.astype(np.float64) / 255.0) * np.asarray(scale) + np.asarray(shift)
    return (np.clip(hed2rgb(hed), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_variant(files: list[tuple[str, Path, Path]], variant: str, folder: Path) -> None:
    """Write each (name, image, labels) file pair as ``variant`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image_path, labels_path in files:
        rgb = np.asarray(Image.open(image_path).convert("RGB"))
        labels = np.asarray(Image.open(labels_path))
        if variant == "half_size":
            size = (round(rgb.shape[1] / 2), round(rgb.shape[0] / 2))
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
            labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
        elif variant in STAINS:
            rgb = restain(rgb, *STAINS[variant])
        Image.fromarray(rgb).save(folder / f"{name}_img.png")
        Image.fromarray(labels).save(folder / f"{name}_masks.png")


def monuseg_files(data: Path, splits: list[str]) -> list[tuple[str, Path, Path]]:
    """(split_name, image file, labels file) of the MoNuSeg images of the prepared set's ``splits``."""
    out = []
    for split in splits:
        for it in json.loads((data / split / "images.json").read_text()):
            if it["source"] == "monuseg":
                name = f"{split}_{Path(it['files']['image']).name.removesuffix('_img.png')}"
                out.append((name, Path(it["files"]["image"]), Path(it["files"]["labels"])))
    if not out:
        raise SystemExit(f"no MoNuSeg images in {data} {splits}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--data", type=Path, default=Path("prepared_hed"))
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/he_robustness"))
    a = ap.parse_args()
    files = monuseg_files(a.data, a.splits)
    net = load_model(a.model).eval()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            folder = Path(tmp) / variant / "monuseg"
            write_variant(files, variant, folder)
            report = evaluate_methods(load_folder(folder, stain=stain_grey(net)), {variant: cellsam_method(net)})
            m = report["methods"][variant]
            rows[variant] = {"f1_50_mean": m["overall"]["f1_mean"],
                             "per_image": {Path(r["name"]).name.removesuffix("_img.png"): r["f1"]["0.50"]
                                           for r in m["per_image"]}}
            print(variant, f"{rows[variant]['f1_50_mean']:.3f}", flush=True)
    names = list(rows["as_is"]["per_image"])
    lines = [f"# H&E robustness of `{a.model}` (scripts/he_robustness.py, MoNuSeg {' + '.join(a.splits)})", "",
             "F1@0.5 per image and mean over images, the model's stored defaults (`diameter=\"auto\"`).", "",
             "| variant | mean | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for variant, r in rows.items():
        lines.append(f"| {variant} | **{r['f1_50_mean']:.3f}** | "
                     + " | ".join(f"{r['per_image'][n]:.3f}" for n in names) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"model": a.model, "splits": a.splits, "rows": rows}, indent=1))
    print(f"wrote {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
