"""Checkpoint format, strict loading, the weights cache and downloads (cellsam.weights)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cellsam import registry, weights
from cellsam.config import CellSAMConfig
from cellsam.models.build import build_model
from cellsam.registry import WeightsRecord
from cellsam.weights import CheckpointError, load_model, save_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("CELLSAM_HOME", str(h))
    return h


def _outputs(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = model.preprocess(torch.rand(1, 3, model.img_size, model.img_size, generator=g))
    with torch.no_grad():
        enc = model.encode(x)
        det = model.detect(enc, x)
        box = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
        lo, iou = model.decode(enc.embedding, boxes=box, multimask_output=True)
    return [enc.trunk, enc.embedding, det["pred_logits"], det["pred_boxes"], lo, iou]


def _register(url: str, sha: str, variant: str = "vit_tiny") -> WeightsRecord:
    rec = WeightsRecord(name=f"test_{uuid.uuid4().hex[:8]}.v0", variant=variant, url=url, sha256=sha, version="v0")
    registry.register_weights(rec)
    return rec


# ------------------------------------------------------------------ format
def test_save_load_roundtrip_is_bit_exact(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "tiny.safetensors", version="v0", metadata={"training_data": "synthetic"})
    assert path == tmp_path / "tiny.safetensors" and (tmp_path / "tiny.json").is_file()
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert doc["variant"] == "vit_tiny" and doc["version"] == "v0" and doc["training_data"] == "synthetic"
    assert doc["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert CellSAMConfig.from_dict(doc["config"]) == tiny.cfg and doc["cellsam_version"] and doc["preprocessing"]
    for source in (path, tmp_path / "tiny.json"):
        loaded = load_model(source)
        assert not loaded.training
        ref, got = tiny.state_dict(), loaded.state_dict()
        assert ref.keys() == got.keys()
        for k in ref:
            assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
        for a, b in zip(_outputs(tiny), _outputs(loaded), strict=True):
            assert torch.equal(a, b)


def test_same_weights_give_the_same_file_in_every_process(tiny, tmp_path):
    """safetensors writes its metadata map in a per-process random order; ours is one entry, so the
    file (and the sha256 a registry records) depends only on the weights and config."""
    import subprocess
    import sys

    ref = tmp_path / "ref.pt"
    torch.save(tiny.state_dict(), ref)
    script = (
        "import sys, torch\n"
        "from cellsam.models.build import build_model\n"
        "from cellsam.weights import save_model\n"
        "m = build_model('vit_tiny'); m.load_state_dict(torch.load(sys.argv[1]))\n"
        "save_model(m, sys.argv[2], version='v0')\n"
    )
    digests = set()
    for i, seed in enumerate(("1", "2", "3")):  # other hash seeds: other dict/set orders
        out = tmp_path / f"run{i}"
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", script, str(ref), str(out)], check=True, env=env)
        digests.add(weights.sha256_file(out.with_suffix(".safetensors")))
    assert len(digests) == 1


def test_legacy_header_with_one_entry_per_field_still_loads(tiny, tmp_path):
    p = tmp_path / "old.safetensors"
    sd = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    save_file(sd, str(p), metadata={"format": "cellsam", "variant": "vit_tiny", "version": "v9",
                                    "cellsam_config": json.dumps(tiny.cfg.to_dict())})
    cfg, state, doc = weights.read_checkpoint(p)
    assert cfg == tiny.cfg and doc["version"] == "v9" and doc["variant"] == "vit_tiny"
    assert all(torch.equal(state[k], sd[k]) for k in sd)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={"cellsam": "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(bad)


def test_save_rejects_reserved_metadata_and_non_models(tiny, tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        save_model(tiny, tmp_path / "x", version="v0", metadata={"sha256": "0"})
    with pytest.raises(TypeError, match="CellSAM"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "y", version="v0")


def _rewrite(path: Path, sd: dict, tiny) -> None:
    """Write ``sd`` to ``path`` with the config in the header only (no JSON beside it)."""
    save_file(sd, str(path), metadata={weights.HEADER_KEY: json.dumps({"config": tiny.cfg.to_dict()})})


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(tiny, tmp_path):
    sd = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    drop = "mask_decoder.iou_token.weight"
    p = tmp_path / "missing.safetensors"
    _rewrite(p, {k: v for k, v in sd.items() if k != drop}, tiny)
    with pytest.raises(CheckpointError, match=r"missing keys \['mask_decoder\.iou_token\.weight'\]"):
        load_model(p)
    p = tmp_path / "extra.safetensors"
    _rewrite(p, {**sd, "cellfinder.bogus": torch.zeros(1)}, tiny)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['cellfinder\.bogus'\]"):
        load_model(p)
    p = tmp_path / "shape.safetensors"
    bad = dict(sd)
    bad["cellfinder.transformer.class_embed.bias"] = torch.zeros(7)
    _rewrite(p, bad, tiny)
    with pytest.raises(CheckpointError, match=r"class_embed\.bias.*\(7,\).*\(2,\)"):
        load_model(p)


def test_json_hash_mismatch_and_corrupt_files(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "m", version="v0")
    doc = json.loads(path.with_suffix(".json").read_text())
    doc["sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="0" * 64):
        load_model(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(junk)
    junk_pth = tmp_path / "junk.pth"
    junk_pth.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="could not read"):
        load_model(junk_pth)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.safetensors")


class _Evil:
    pass


def test_pth_is_read_with_weights_only(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"image_encoder.x": _Evil()}, p)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(p)
    q = tmp_path / "other.pth"
    torch.save({"foo.bar": torch.zeros(2)}, q)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_model(q)


def test_meta_sam_pth_loads_sam_parts_and_warns(tmp_path, caplog):
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    sam = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    sd = sam.state_dict()
    torch.save(sd, tmp_path / "sam.pth")
    with caplog.at_level(logging.WARNING, logger="cellsam.weights"):
        model = load_model(tmp_path / "sam.pth")
    assert any("UNTRAINED" in r.getMessage() for r in caplog.records)
    ours = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(ours[k], v), k
    assert model.cfg.encoder.embed_dim == 32 and model.cfg.encoder.img_size == 1024
    assert any(k.startswith("cellfinder.") for k in ours)


# ------------------------------------------------------------------ registry names
def test_default_missing_gives_clear_errors(monkeypatch, home):
    monkeypatch.setattr(registry, "_ALIASES", {})
    with pytest.raises(KeyError, match="default.*register_weights"):
        load_model("default")
    rec = WeightsRecord(name="ghost.v9", variant="vit_tiny", url="package:weights/ghost.v9.safetensors",
                        sha256="0" * 64, version="v9")
    monkeypatch.setattr(registry, "_WEIGHTS", {"ghost.v9": rec})
    monkeypatch.setattr(registry, "_ALIASES", {"default": "ghost.v9"})
    with pytest.raises(FileNotFoundError, match=r"ghost\.v9.*missing"):
        load_model("default")


def test_unknown_name_and_variant_name(home):
    with pytest.raises(KeyError, match="build_model"):
        load_model("vit_tiny")
    with pytest.raises(KeyError, match="neither a file nor registered"):
        load_model("no_such_weights")
    assert {"vit_b", "vit_tiny"} <= set(weights.list_models())


def test_registered_file_url_downloads_into_cache_and_loads(tiny, tmp_path, home):
    src = save_model(tiny, tmp_path / "src" / "tiny", version="v0")
    rec = _register(src.as_uri(), weights.sha256_file(src))
    assert rec.name in weights.list_models()
    model = load_model(rec.name)
    cached = home / "weights" / f"{rec.name}.safetensors"
    assert cached.is_file()  # the JSON is not fetched: the config comes from the safetensors header
    for k, v in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


# ------------------------------------------------------------------ cache + download
def test_cache_dir_honours_cellsam_home(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLSAM_HOME", str(tmp_path / "x"))
    assert weights.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("CELLSAM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert weights.cache_dir() == tmp_path / "h" / ".cache" / "cellsam"


def _payload(tmp_path: Path) -> tuple[Path, str]:
    f = tmp_path / "srv" / "blob.safetensors"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(bytes(range(256)) * 5000)  # > 1 MiB: several chunks
    return f, hashlib.sha256(f.read_bytes()).hexdigest()


def _rec(url: str, sha: str) -> WeightsRecord:
    return WeightsRecord(name=f"blob_{uuid.uuid4().hex[:6]}.v1", variant="vit_tiny", url=url, sha256=sha, version="v1")


def _check_download(url: str, sha: str, payload: Path, home: Path) -> None:
    rec = _rec(url, sha)
    out = weights.download(rec)
    assert out.parent == home / "weights" and out.read_bytes() == payload.read_bytes()
    assert weights.download(rec) == out  # cached: verified, not fetched again
    bad = _rec(url, "f" * 64)
    with pytest.raises(CheckpointError) as e:
        weights.download(bad)
    assert "f" * 64 in str(e.value) and sha in str(e.value)  # names both hashes
    assert not weights.cached_path(bad).exists()
    assert not list((home / "weights").glob("*.part"))


def test_download_file_url(tmp_path, home):
    payload, sha = _payload(tmp_path)
    _check_download(payload.as_uri(), sha, payload, home)
    with pytest.raises(OSError, match="could not download"):
        weights.download(_rec((tmp_path / "absent.bin").as_uri(), sha))


def test_download_http(tmp_path, home):
    payload, sha = _payload(tmp_path)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(payload.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        _check_download(f"{base}/{payload.name}", sha, payload, home)
        with pytest.raises(OSError, match="404"):
            weights.download(_rec(f"{base}/absent.bin", sha))
    finally:
        server.shutdown()
        server.server_close()


def test_package_url_is_verified_in_place(tmp_path, monkeypatch, home):
    payload, sha = _payload(tmp_path)
    monkeypatch.setattr(weights.resources, "files", lambda pkg: tmp_path)
    rel = str(payload.relative_to(tmp_path))
    assert weights.download(_rec(f"package:{rel}", sha)) == payload
    with pytest.raises(CheckpointError, match="f" * 64):
        weights.download(_rec(f"package:{rel}", "f" * 64))
    assert payload.is_file()  # bundled files are never deleted
    with pytest.raises(ValueError, match="package URL"):
        weights.download(_rec("package:../evil", sha))
    with pytest.raises(ValueError, match="unsupported URL"):
        weights.download(_rec("ftp://x/y", sha))


def test_real_package_root_resolution():
    p = weights.cached_path(_rec("package:weights/x.safetensors", "0" * 64))
    assert p.parts[-3:] == ("cellsam", "weights", "x.safetensors")


def test_loaded_state_dict_helper_reports_all(tiny):
    sd = dict(tiny.state_dict())
    sd.pop("prompt_encoder.not_a_point_embed.weight")
    with pytest.raises(CheckpointError, match="not_a_point_embed"):
        weights.load_state_dict_strict(tiny, sd, source="test")


# ------------------------------------------------------------------ cellsam models
def test_cli_models_list_and_download(tiny, tmp_path, home, capsys):
    from cellsam.cli import main

    src = save_model(tiny, tmp_path / "src" / "tiny", version="v0")
    rec = _register(src.as_uri(), weights.sha256_file(src))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if rec.name in ln)
    assert "version=v0" in line and "not downloaded" in line and "vit_tiny" in out
    assert main(["models", "download", rec.name]) == 0
    assert capsys.readouterr().out.strip() == str(home / "weights" / f"{rec.name}.safetensors")
    assert main(["models", "list"]) == 0
    assert "cached" in next(ln for ln in capsys.readouterr().out.splitlines() if rec.name in ln)
    assert main(["models", "download", "no_such_weights"]) == 2
    bad = _register(src.as_uri(), "e" * 64)
    assert main(["models", "download", bad.name]) == 1
