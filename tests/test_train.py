"""Training: both stages on a tiny prepared set, freezing, resume, non-finite loss, DDP ranks agree."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from cellsam.train.config import TrainConfig, load_train_configs
from cellsam.train.dataset import PreparedTiles, StreamSampler
from cellsam.train.module import CellSAMModule, NonFiniteLossError
from cellsam.train.run import initial_model, train
from tests.conftest import make_blobs

REPO = Path(__file__).resolve().parents[1]


def make_prepared(root: Path, *, n_train: int = 6, n_val: int = 2, size: int = 64) -> Path:
    """A prepared dataset (docs/ARCHITECTURE.md layout) of synthetic disk tiles."""
    for split, n in (("train", n_train), ("val", n_val)):
        d = root / split
        d.mkdir(parents=True)
        imgs, labs, tiles = [], [], []
        for i in range(n):
            img, lab = make_blobs((size, size), n=4, radius=(4, 7), seed=i + (100 if split == "val" else 0))
            x = np.zeros((3, size, size), np.float32)
            x[2] = img
            imgs.append(x)
            labs.append(lab[None].astype(np.int32))
            tiles.append({"source": "synthetic" if i % 2 else "synthetic_b", "image": f"{split}{i}", "y0": 0, "x0": 0})
        np.save(d / "images.npy", np.stack(imgs))
        np.save(d / "labels.npy", np.stack(labs))
        (d / "tiles.json").write_text(json.dumps(tiles))
    return root


def tiny_cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    cfg = load_train_configs(REPO / "configs" / "tiny_test.yaml")[0]
    data = make_prepared(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    fields = {"data": str(data), "output": str(tmp_path / "run"), **kw}
    return dataclasses.replace(cfg, **fields)  # type: ignore[arg-type]


def test_dataset_targets_match_labels(tmp_path: Path) -> None:
    ds = PreparedTiles(make_prepared(tmp_path), "train")
    image, t = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    lab = t["labels_image"]
    for k, i in enumerate(t["ids"].tolist()):
        ys, xs = torch.nonzero(lab == i, as_tuple=True)
        assert t["boxes_xyxy"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()


def test_balanced_weights(tmp_path: Path) -> None:
    ds = PreparedTiles(make_prepared(tmp_path, n_train=5), "train")
    w = ds.source_weights()
    by_source: dict[str, float] = {}
    for tile, wi in zip(ds.tiles, w):
        by_source[tile["source"]] = by_source.get(tile["source"], 0) + wi
    assert all(abs(v - 1.0) < 1e-9 for v in by_source.values())  # each source drawn equally often


def test_source_balance_power(tmp_path: Path) -> None:
    root = make_prepared(tmp_path, n_train=10)
    tiles = json.loads((root / "train" / "tiles.json").read_text())
    for i, t in enumerate(tiles):
        t["source"] = "small" if i == 0 else "big"  # 1 tile vs 9
    (root / "train" / "tiles.json").write_text(json.dumps(tiles))
    ds = PreparedTiles(root, "train")
    for power, big_share in ((1.0, 0.5), (0.5, 3 / 4), (0.0, 0.9)):  # big drawn ~ 9 ** (1 - power)
        w = ds.source_weights(power)
        assert abs(sum(w[1:]) / sum(w) - big_share) < 1e-9
    sampler = StreamSampler(ds, steps=2000, batch_size=2, seed=0, balanced=True, balance_power=0.5)
    drawn = torch.tensor([key % len(ds) for key in sampler])
    assert abs((drawn != 0).float().mean().item() - 0.75) < 0.03
    with pytest.raises(ValueError, match="source_balance"):
        tiny_cfg(tmp_path, source_balance=1.5)


def test_missing_split_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cellsam prepare"):
        PreparedTiles(tmp_path, "train")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", ["detection", "masks", "joint"])
def test_stage_trains_the_right_parts(tmp_path: Path, stage: str) -> None:
    cfg = tiny_cfg(tmp_path, stage=stage, max_steps=3, val_max_tiles=0)
    torch.manual_seed(0)
    model = initial_model(cfg)
    before = _params(model)
    module = CellSAMModule(model, cfg)
    opt = module.configure_optimizers()["optimizer"]
    ds = PreparedTiles(cfg.data, "train")
    from cellsam.train.dataset import collate

    for step in range(2):
        images, targets = collate([ds[2 * step], ds[2 * step + 1]])
        loss = module.compute_losses(images, targets)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _params(model)

    def changed(prefix: str) -> bool:
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    trunk_changed = any(not torch.equal(before[k], after[k]) for k in before
                        if k.startswith("image_encoder.") and not k.startswith("image_encoder.neck"))
    assert trunk_changed == (stage != "masks")
    assert changed("cellfinder.") == (stage != "masks")
    assert changed("mask_decoder.") == (stage != "detection")
    assert changed("image_encoder.neck") == (stage != "detection")


def test_nonfinite_loss_stops_with_clear_error(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=1, stage="masks")
    model = initial_model(cfg)
    with torch.no_grad():  # a diverged IoU head: only the IoU loss becomes NaN
        next(model.mask_decoder.iou_prediction_head.parameters()).fill_(float("nan"))
    module = CellSAMModule(model, cfg)
    ds = PreparedTiles(cfg.data, "train")
    from cellsam.train.dataset import collate

    images, targets = collate([ds[0], ds[1]])
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        module.training_step((images, targets), 0)


def test_train_end_to_end_and_resume(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=4, checkpoint_every_steps=2)
    path = train(cfg)
    assert path.is_file()
    saved = yaml.safe_load((Path(cfg.output) / "config.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["stage"] == "joint"
    metrics = list((Path(cfg.output) / "logs").rglob("metrics.csv"))
    assert metrics and "train/loss" in metrics[0].read_text().splitlines()[0]
    assert (Path(cfg.output) / "checkpoints" / "last.ckpt").is_file()
    # resume continues from step 4 to step 6 instead of starting again
    cfg2 = dataclasses.replace(cfg, max_steps=6)
    train(cfg2, resume=True)
    summary = json.loads((Path(cfg.output) / "summary.json").read_text())
    assert summary["steps"] == 6


class StopAt(Callback):
    """An interruption: training stops after optimiser step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            trainer.should_stop = True


def run_interrupted(cfg: TrainConfig, output: Path, *, stop: int) -> Path:
    """``cfg`` run into ``output`` until step ``stop`` (checkpointed there), then resumed to its end; returns
    the exported model."""
    split = dataclasses.replace(cfg, checkpoint_every_steps=stop, output=str(output))
    train(split, callbacks=[StopAt(stop)])
    assert json.loads((output / "summary.json").read_text())["steps"] == stop
    return train(split, resume=True)


def test_resume_is_exact(tmp_path: Path) -> None:
    """2 steps + resume to 4 gives bit-identical weights to 4 steps in one go."""
    straight = tiny_cfg(tmp_path, max_steps=4, checkpoint_every_steps=0, val_max_tiles=0,
                        output=str(tmp_path / "straight"))
    train(straight)
    run_interrupted(straight, tmp_path / "split", stop=2)
    a = (tmp_path / "straight" / "rank0.sha256").read_text()
    b = (tmp_path / "split" / "rank0.sha256").read_text()
    assert a == b


def test_stream_sampler_balances_and_shards(tmp_path: Path) -> None:
    ds = PreparedTiles(make_prepared(tmp_path, n_train=5), "train")
    s = StreamSampler(ds, steps=300, batch_size=2, seed=0, balanced=True)
    keys = list(s)
    assert len(keys) == len(s) == 600
    tiles = [k % len(ds) for k in keys]
    per_source: dict[str, int] = {}
    for t in tiles:
        per_source[ds.tiles[t]["source"]] = per_source.get(ds.tiles[t]["source"], 0) + 1
    a, b = per_source.values()
    assert abs(a - b) < 0.2 * 600  # sources drawn about equally although 3 vs 2 tiles
    s.start_step = 100
    assert list(s) == keys[200:]  # resume skips exactly what was consumed


def test_recipe_chains_stages(tmp_path: Path) -> None:
    recipe = {"common": {"model": "vit_tiny", "data": "d", "max_steps": 1},
              "stages": [{"stage": "detection", "output": str(tmp_path / "s1")},
                         {"stage": "masks", "output": str(tmp_path / "s2"), "mask_trainable": ["neck"]}]}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    s1, s2 = load_train_configs(p, {"optim.lr_head": 0.5})
    assert s1.init is None and s2.init == str(tmp_path / "s1" / "model.safetensors")
    assert s1.optim.lr_head == 0.5 and s2.optim.lr_head == 0.5 and s2.mask_trainable == ("neck",)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"stagee": "masks"})


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on linux")
def test_ddp_two_cpu_processes_hold_identical_weights(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=3, val_max_tiles=0)
    p = tmp_path / "ddp.yaml"
    d = cfg.to_dict()
    d.update(devices=2, strategy="ddp", accelerator="cpu", checkpoint_every_steps=0)
    p.write_text(yaml.safe_dump(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    r = subprocess.run([sys.executable, "-m", "cellsam.cli", "train", "--config", str(p)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = Path(cfg.output)
    d0, d1 = (out / "rank0.sha256").read_text(), (out / "rank1.sha256").read_text()
    assert d0 == d1
    init = initial_model(cfg)
    assert d0 != _digest(init)  # weights did move


def _digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(("model." + name).encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_model_overrides_and_weights_only_init(tmp_path: Path) -> None:
    from cellsam.train.run import model_config
    from cellsam.weights import save_model

    cfg = tiny_cfg(tmp_path, model_overrides={"cellfinder": {"pos_scale": 3.0}})
    assert model_config(cfg).cellfinder.pos_scale == 3.0
    assert model_config(cfg).encoder == model_config(tiny_cfg(tmp_path)).encoder  # the rest is the variant's
    src = initial_model(cfg)
    assert src.cellfinder.transformer.pos_scale == 3.0
    path = save_model(src, tmp_path / "src", version="t")
    cont = initial_model(dataclasses.replace(cfg, init=str(path), init_weights_only=True, model_overrides={}))
    assert cont.cellfinder.transformer.pos_scale == model_config(tiny_cfg(tmp_path)).cellfinder.pos_scale
    for (k, a), (_, b) in zip(src.state_dict().items(), cont.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="unknown config keys"):
        model_config(tiny_cfg(tmp_path, model_overrides={"cellfinder": {"pos_scal": 3.0}}))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_parse_and_build(name: str) -> None:
    """Every config in configs/ resolves to valid stages whose architecture builds (no training)."""
    from cellsam.train.run import model_config

    configs = load_train_configs(Path(__file__).parents[1] / "configs" / name, {})
    assert configs
    for prev, cfg in zip(configs, configs[1:]):
        assert cfg.init == str(Path(prev.output) / "model.safetensors")  # stages chain
    for cfg in configs:
        mc = model_config(cfg)
        assert mc.tile_size > 0 and cfg.max_steps >= 1


def test_cli_skip_done_continues_a_recipe(tmp_path: Path, capsys) -> None:
    """--skip-done leaves finished stages alone and runs the rest, chained to the finished output."""
    from cellsam.cli import main

    data = make_prepared(tmp_path / "data")
    base = yaml.safe_load((REPO / "configs" / "tiny_test.yaml").read_text())
    common = {**base, "data": str(data), "max_steps": 1, "val_every_steps": 0, "checkpoint_every_steps": 0}
    common.pop("stage", None), common.pop("output", None)
    recipe = {"common": common,
              "stages": [{"stage": "detection", "output": str(tmp_path / "s1")},
                         {"stage": "masks", "output": str(tmp_path / "s2")}]}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(p)]) == 0
    s1, s2 = tmp_path / "s1" / "model.safetensors", tmp_path / "s2" / "model.safetensors"
    t1 = s1.stat().st_mtime_ns
    s2.unlink()
    capsys.readouterr()
    assert main(["train", "--config", str(p), "--skip-done"]) == 0
    out = capsys.readouterr().out
    assert "stage 1/2: detection" in out and "skipped" in out and "stage 2/2: masks ->" in out
    assert s1.stat().st_mtime_ns == t1 and s2.is_file()


def test_skip_done_starts_after_the_last_finished_stage(tmp_path: Path) -> None:
    """A finished later stage implies the earlier ones (a recipe continuing a shipped model)."""
    from cellsam.cli.train import first_stage_to_run
    from cellsam.train.config import TrainConfig

    configs = [TrainConfig(output=str(tmp_path / f"s{i}")) for i in range(4)]
    assert first_stage_to_run(configs) == 0
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "model.safetensors").write_bytes(b"x")  # stage 2 done, stage 1's file absent
    assert first_stage_to_run(configs) == 2
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / "model.safetensors").write_bytes(b"x")
    assert first_stage_to_run(configs) == 4


def test_scale_boxes_keeps_centres_and_scales_sides() -> None:
    from cellsam.ops.boxes import scale_boxes

    b = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 4.0, 4.0]])
    out = scale_boxes(b, torch.tensor([[2.0, 0.5], [1.0, 1.0]]))
    assert out.tolist() == [[0.0, 30.0, 40.0, 50.0], [0.0, 0.0, 4.0, 4.0]]


def test_box_scale_jitter_changes_the_prompts_only_when_asked(tmp_path: Path) -> None:
    """With box_scale_jitter the mask stage decodes differently sized boxes (seeded: same draw twice)."""
    seen: list[torch.Tensor] = []

    def run(jitter: float) -> list[torch.Tensor]:
        cfg = tiny_cfg(tmp_path, stage="masks", box_jitter=0.0, box_scale_jitter=jitter)
        module = CellSAMModule(initial_model(cfg), cfg)
        orig = module.model.decode
        seen.clear()
        module.model.decode = lambda emb, **k: seen.append(k["boxes"].clone()) or orig(emb, **k)  # type: ignore
        ds = PreparedTiles(cfg.data, "train")
        image, t = ds[0]
        module.compute_losses(image[None], [t])
        return list(seen)

    plain, scaled, again = run(0.0), run(0.9), run(0.9)
    w = lambda b: (b[:, 2] - b[:, 0])  # noqa: E731
    assert not torch.allclose(w(plain[0]), w(scaled[0])) and torch.equal(scaled[0], again[0])
    centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
    assert torch.allclose(centre(plain[0]), centre(scaled[0]), atol=1e-4)


def test_source_filters_for_specialists_and_leave_one_source_out(tmp_path: Path) -> None:
    from cellsam.train.run import make_loaders

    root = make_prepared(tmp_path / "d")  # train tiles alternate synthetic_b, synthetic
    only_b = PreparedTiles(root, "train", sources=("synthetic_b",))
    assert only_b.index == [0, 2, 4] and len(only_b) == 3
    image, _ = only_b[1]
    assert np.array_equal(image.numpy(), np.load(root / "train" / "images.npy")[2])  # the kept tile's pixels
    assert only_b.source_weights() == [1 / 3] * 3
    assert PreparedTiles(root, "train", exclude_sources=("synthetic_b",)).index == [1, 3, 5]
    assert PreparedTiles(root, "train").index == list(range(6))
    with pytest.raises(ValueError, match="unknown source.*dsb2018.*has \\['synthetic', 'synthetic_b'\\]"):
        PreparedTiles(root, "train", sources=("dsb2018",))
    with pytest.raises(ValueError, match="no tile left"):
        PreparedTiles(root, "train", sources=("synthetic",), exclude_sources=("synthetic",))
    assert len(PreparedTiles(root, "val", sources=("absent",), strict_sources=False)) == 0

    cfg = tiny_cfg(tmp_path, exclude_sources=("synthetic",))
    train_loader, val_loader = make_loaders(cfg)
    ds = train_loader.dataset
    assert {ds.tiles[j]["source"] for j in ds.index} == {"synthetic_b"}
    assert val_loader is not None and {val_loader.dataset.tiles[j]["source"] for j in val_loader.dataset.index} == {
        "synthetic_b"}


def test_cli_checks_every_stage_data_before_training(tmp_path: Path, capsys) -> None:
    """A bad source name or a missing dataset in a LATER stage stops before stage 1 trains."""
    from cellsam.cli import main

    data = make_prepared(tmp_path / "data")
    base = yaml.safe_load((REPO / "configs" / "tiny_test.yaml").read_text())
    common = {**base, "data": str(data), "max_steps": 1, "val_every_steps": 0, "checkpoint_every_steps": 0}
    common.pop("stage", None), common.pop("output", None)
    for bad, message in (({"sources": ["synthetik"]}, "unknown source"),
                         ({"data": str(tmp_path / "nowhere")}, "not a prepared split")):
        recipe = {"common": common, "stages": [{"stage": "detection", "output": str(tmp_path / "s1")},
                                               {"stage": "masks", "output": str(tmp_path / "s2"), **bad}]}
        p = tmp_path / "r.yaml"
        p.write_text(yaml.safe_dump(recipe))
        assert main(["train", "--config", str(p)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "s1").exists()


def test_output_root_moves_every_stage_and_keeps_the_chain(tmp_path: Path) -> None:
    configs = load_train_configs(REPO / "configs" / "cpu_default.yaml", {"sources": ["dsb2018"]},
                                 output_root=tmp_path / "dsb")
    assert [c.output for c in configs] == [str(tmp_path / "dsb" / f"stage{i}") for i in (1, 2, 3)]
    assert configs[1].init == str(tmp_path / "dsb" / "stage1" / "model.safetensors")
    assert all(c.sources == ("dsb2018",) for c in configs)
    recipe = {"common": {"stage": "detection"}, "stages": [{"output": "a/run"}, {"output": "b/run"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="same folder"):
        load_train_configs(tmp_path / "r.yaml", output_root=tmp_path / "x")


def test_shipped_recipe_v2_extends_v1() -> None:
    """configs/cpu_v2.yaml: v1's two joint stages unchanged (so v1's stage files can be reused), then the
    sqrt-balanced stages; the zero-shot config is v1's stage 1 as one stage."""
    v1 = load_train_configs(REPO / "configs" / "cpu_default.yaml")
    v2 = load_train_configs(REPO / "configs" / "cpu_v2.yaml")
    assert [c.stage for c in v2] == ["joint", "joint", "joint", "masks"]
    moved = {"output", "init", "version"}
    for a, b in zip(v1[:2], v2[:2], strict=True):
        da, db = a.to_dict(), b.to_dict()
        assert {k for k in da if da[k] != db[k]} <= moved
    assert v2[2].source_balance == v2[3].source_balance == 0.5 and v1[2].source_balance == 1.0
    assert v2[2].init == str(Path(v2[1].output) / "model.safetensors")
    da = v1[0].to_dict()
    dz = load_train_configs(REPO / "configs" / "zero_shot_cellsam.yaml")[0].to_dict()
    assert {k for k in da if da[k] != dz[k]} == {"output"}


def test_conv_dense_variant_trains_with_clicks_and_masks_stage_keeps_its_trunk(tmp_path: Path) -> None:
    """conv_tiny (conv encoder + dense CellFinder): joint steps with box and click prompts move the
    detector, the encoder and the point embeddings; a masks stage then leaves the trunk and its
    batch-norm statistics untouched and trains the neck."""
    from cellsam.models.conv_encoder import ConvEncoder
    from cellsam.models.dense_finder import DenseCellFinder
    from cellsam.weights import load_model

    cfg = tiny_cfg(tmp_path, model="conv_tiny", point_prompt_p=0.5, click_rounds=1, max_steps=3,
                   checkpoint_every_steps=0)
    start = initial_model(cfg).state_dict()
    joint = load_model(train(cfg))
    assert isinstance(joint.image_encoder, ConvEncoder) and isinstance(joint.cellfinder, DenseCellFinder)
    after = joint.state_dict()
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    for prefix in ("cellfinder.heatmap", "cellfinder.size", "image_encoder.stem", "image_encoder.neck",
                   "prompt_encoder.point_embeddings.1", "mask_decoder"):
        assert any(k.startswith(prefix) for k in moved), prefix
    assert any(k.endswith("running_mean") for k in moved)  # batch norm learnt statistics

    masks = dataclasses.replace(cfg, stage="masks", init=str(tmp_path / "run" / "model.safetensors"),
                                output=str(tmp_path / "masks"), max_steps=2)
    final = load_model(train(masks)).state_dict()
    trunk = [k for k in after if k.startswith("image_encoder.") and not k.startswith("image_encoder.neck.")]
    assert trunk and all(torch.equal(after[k], final[k]) for k in trunk)  # incl. running stats
    assert any(not torch.equal(after[k], final[k]) for k in after if k.startswith("image_encoder.neck."))
    assert all(torch.equal(after[k], final[k]) for k in after if k.startswith("cellfinder."))


def test_click_prompts_reach_the_loss(tmp_path: Path) -> None:
    """With every prompt a click (+1 correction), the mask losses come from point prompts: the
    positive point embedding gets a gradient, and the box-corner embeddings none."""
    cfg = tiny_cfg(tmp_path, model="conv_tiny", stage="masks", point_prompt_p=1.0, click_rounds=1)
    module = CellSAMModule(initial_model(cfg), cfg)
    ds = PreparedTiles(cfg.data, "train")
    images = torch.stack([ds[0][0], ds[1][0]])
    losses = module.compute_losses(images, [ds[0][1], ds[1][1]])
    losses["loss"].backward()
    pe = module.model.prompt_encoder.point_embeddings
    assert pe[1].weight.grad is not None and float(pe[1].weight.grad.abs().sum()) > 0
    assert pe[2].weight.grad is None or float(pe[2].weight.grad.abs().sum()) == 0


@pytest.mark.parametrize("model", ["vit_tiny", "conv_tiny"])
@pytest.mark.parametrize("stage", ["detection", "masks", "joint"])
def test_module_total_is_the_criterion_total_loss(tmp_path: Path, stage: str, model: str) -> None:
    """The trained total is ``total_loss`` of the criterion's and the mask losses' weight dicts, and
    bit-identical to the sequential sum the module used before (0 + detection total + each weighted mask term)."""
    from cellsam.train.criterion import total_loss
    from cellsam.train.dataset import collate

    cfg = tiny_cfg(tmp_path, stage=stage, model=model)
    torch.manual_seed(0)
    module = CellSAMModule(initial_model(cfg), cfg)
    ds = PreparedTiles(cfg.data, "train")
    images, targets = collate([ds[0], ds[1]])
    seen: dict[str, dict[str, torch.Tensor]] = {}
    module.criterion.register_forward_hook(lambda _m, _a, out: seen.__setitem__("det", out))
    mask_losses = module._mask_losses
    module._mask_losses = lambda *a, **k: seen.setdefault("mask", mask_losses(*a, **k))  # type: ignore[method-assign]
    loss = module.compute_losses(images, targets)["loss"]

    det, ml = seen.get("det", {}), seen.get("mask", {})
    assert bool(det) == (stage != "masks") and bool(ml) == (stage != "detection")
    weights = {**module.criterion.weight_dict, **module.mask_weights}
    torch.testing.assert_close(loss, total_loss({**det, **ml}, weights))
    before = images.new_zeros(())
    if det:
        before = before + module.criterion.total(det)
    for k, v in ml.items():
        before = before + module.mask_weights[k] * v
    assert torch.equal(loss, before)
