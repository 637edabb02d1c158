"""``cellsam bench --prompts``: the time of one point or box prompt on an image whose embedding is cached.

The labeling server (:mod:`cellsam.server`) embeds each tile of an image once; a prompt then runs only
the prompt encoder and mask decoder. This measures that path on one image (the bundled sample by
default), at three depths, innermost first:

- ``predictor``: :meth:`cellsam.Predictor.predict` on the tile's cached embedding (prompt encoder, mask
  decoder, logit upscaling), with the arguments the server passes.
- ``session``: :meth:`cellsam.server.session.ModelSession.predict`, the server's model call (tile choice,
  the above, largest island + filled holes).
- ``http``: ``POST /api/images/{id}/cells`` through the real FastAPI app in process (``TestClient``):
  validation, the model call, the SQLite commit of the edit and the reply with the label patch.
  ``http-server`` is the app's own time (its ``Server-Timing`` header), ``http-client`` the time
  around the ``TestClient`` call. Each timed prompt adds a cell to empty labels and is undone, untimed,
  so every prompt sees the same labels.

Before timing, every tile is embedded (``POST /embed`` per tile); ``model.encode`` is counted and the
report says how often it ran during timing (0 when the cache works). Prompts are placed on the image's
bright blobs (Otsu threshold): a point at each blob's centre, a box around it with a 3-pixel margin.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.bench.timing import summarize

log = logging.getLogger(__name__)
SCHEMA = "cellsam-bench-prompts/1"
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "nuclei.png"
PATHS = ("http-server", "http-client", "session", "predictor")
PROMPTS = ("point", "box")


@dataclass
class PromptBenchSpec:
    """What to time: one model on one image, ``repeats`` prompts of each kind after ``warmup`` untimed ones."""

    model: str = "default"
    image: str | None = None  # None: the bundled sample
    repeats: int = 50
    warmup: int = 5
    device: str | None = None
    seed: int = 0
    budget_ms: float = 100.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if self.budget_ms <= 0:
            raise ValueError(f"budget_ms must be > 0, got {self.budget_ms}")
        if self.image is not None and not Path(self.image).is_file():
            raise FileNotFoundError(f"image {self.image} not found")


# ---------------------------------------------------------------------------------------------- prompts
def prompt_positions(grey: np.ndarray, n: int, *, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` prompts on the bright blobs of an (H, W) image: points (n, 2) xy and boxes (n, 4) xyxy.

    Blobs (Otsu threshold, at least 20 pixels) are used largest first and cycled when there are fewer
    than ``n``; an image without blobs gets a grid of 24-pixel boxes instead.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    if grey.ndim != 2 or n < 1:
        raise ValueError(f"need an (H, W) image and n >= 1, got shape {grey.shape} and n={n}")
    h, w = grey.shape
    g = grey.astype(np.float32)
    comp, k = (ndi.label(g > threshold_otsu(g)) if g.max() > g.min() else (np.zeros_like(g, np.int32), 0))
    found = []
    for i, sl in enumerate(ndi.find_objects(comp), start=1):
        blob = comp[sl] == i
        if blob.sum() < 20:
            continue
        ys, xs = np.nonzero(blob)
        cy, cx = ys.mean() + sl[0].start, xs.mean() + sl[1].start
        box = (max(sl[1].start - margin, 0), max(sl[0].start - margin, 0),
               min(sl[1].stop + margin, w), min(sl[0].stop + margin, h))
        found.append((int(blob.sum()), (float(cx), float(cy)), tuple(float(v) for v in box)))
    if not found:
        step = 24
        for y in range(step // 2, h - step // 2, step):
            for x in range(step // 2, w - step // 2, step):
                found.append((0, (x + 0.5, y + 0.5), (x - 12.0, y - 12.0, x + 12.0, y + 12.0)))
    if not found:
        raise ValueError(f"image of shape {grey.shape} is too small for prompts")
    found.sort(key=lambda f: -f[0])
    pts = np.array([found[i % len(found)][1] for i in range(n)], np.float32)
    boxes = np.array([found[i % len(found)][2] for i in range(n)], np.float32)
    return pts, boxes


@contextlib.contextmanager
def count_encoder_calls(model: Any) -> Iterator[list[int]]:
    """Count ``model.encode`` calls inside the block (a one-element list); the model is restored after."""
    had = "encode" in vars(model)
    original = model.encode
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    model.encode = counting
    try:
        yield calls
    finally:
        if had:
            model.encode = original
        else:
            del model.encode


# ---------------------------------------------------------------------------------------------- timing
def _timed(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds that ``fn(*args, **kwargs)`` took, and what it returned."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def _server_seconds(resp: Any) -> float:
    """Seconds from a ``Server-Timing: app;dur=<ms>`` header."""
    for part in resp.headers.get("server-timing", "").split(","):
        name, _, rest = part.strip().partition(";")
        if name == "app" and rest.startswith("dur="):
            return float(rest[4:]) / 1e3
    raise ValueError("the response has no Server-Timing app;dur= header")


def time_prompts(model: Any, image_path: Path, *, repeats: int, warmup: int, model_name: str = "model",
                 budget_ms: float = 100.0) -> dict[str, Any]:
    """Embed every tile of the image, then time ``repeats`` point and box prompts on each path.

    Returns:
        ``{"image", "encoder_calls": {"warm", "timed"}, "runs": [...], "notes": [...]}``; each run is
        ``{"path", "prompt", "n", "failed", "seconds" (:func:`summarize`), "within_budget"}``.
    """
    from fastapi.testclient import TestClient

    from cellsam.server.app import create_app
    from cellsam.server.images import channel_key

    notes: list[str] = []
    times: dict[tuple[str, str], list[float]] = {(p, q): [] for p in PATHS for q in PROMPTS}
    failed: dict[tuple[str, str], int] = {k: 0 for k in times}
    with tempfile.TemporaryDirectory() as tmp:
        # room for every tile of any image, whatever the server's default bounds
        app = create_app(Path(tmp) / "project", model, model_name=model_name, cache_items=4096, cache_bytes=4 << 30)
        ctx = app.state.ctx
        with TestClient(app) as client, count_encoder_calls(model) as calls:
            r = client.post("/api/images", files={"file": (image_path.name, image_path.read_bytes())})
            if r.status_code != 201:
                raise ValueError(f"{image_path}: upload refused: {r.json().get('error', r.text)}")
            info = r.json()
            url = f"/api/images/{info['id']}"
            rec = ctx.record(info["id"])
            img, key, session = ctx.prepared(rec), channel_key(rec), ctx.session
            size = session.scale(key, img)  # the tiles prompts on this image use (its scale)
            tiles = session.tiles((rec.height, rec.width), size)
            for t in tiles:  # warm the cache: one encoder pass per tile
                client.post(f"{url}/embed", json={"x": (t.x0 + t.x1) / 2, "y": (t.y0 + t.y1) / 2}).raise_for_status()
            warm_calls = calls[0]
            grey = img.mean(axis=0)
            pts, boxes = prompt_positions(grey, warmup + repeats)
            for i in range(warmup + repeats):
                keep = i >= warmup
                point, box = [float(v) for v in pts[i]], [float(v) for v in boxes[i]]
                for q, body in (("point", {"points": [point], "point_labels": [1]}), ("box", {"box": box})):
                    dt, resp = _timed(client.post, f"{url}/cells", json=body)
                    if resp.status_code == 200:
                        server = _server_seconds(resp)
                        client.post(f"{url}/undo").raise_for_status()
                    elif resp.status_code == 400:
                        failed[("http-server", q)] += keep
                        failed[("http-client", q)] += keep
                        continue
                    else:
                        raise RuntimeError(f"POST {url}/cells answered {resp.status_code}: {resp.text}")
                    if keep:
                        times[("http-server", q)].append(server)
                        times[("http-client", q)].append(dt)
                for q, kw in (("point", {"points": [tuple(point)], "point_labels": [1]}), ("box", {"box": tuple(box)})):
                    try:
                        dt, _ = _timed(session.predict, key, img, **kw)
                    except ValueError:  # the model found no cell there
                        failed[("session", q)] += keep
                        continue
                    if keep:
                        times[("session", q)].append(dt)
                for q in PROMPTS:
                    region = (*point, *point) if q == "point" else tuple(box)
                    ti = session.best_tile(tiles, region)
                    t = tiles[ti]
                    p = session._predictor(key, img, tiles, ti, size)  # the cached cellsam.Predictor of that tile
                    off = np.array([t.x0, t.y0], np.float32)
                    if q == "point":
                        kw = {"point_coords": pts[i : i + 1] - off, "point_labels": np.ones(1, np.int64),
                              "multimask_output": True}
                    else:
                        kw = {"box": boxes[i] - np.tile(off, 2), "multimask_output": False}
                    dt, _ = _timed(p.predict, **kw, return_logits=True)
                    if keep:
                        times[("predictor", q)].append(dt)
            timed_calls = calls[0] - warm_calls
        ctx.project.close()
    runs = []
    for (path, q), v in times.items():
        within = float(np.mean(np.asarray(v) <= budget_ms / 1e3)) if v else None
        runs.append({"path": path, "prompt": q, "n": len(v), "failed": failed[(path, q)], "seconds": summarize(v),
                     "within_budget": within})
    for q in PROMPTS:
        bad = [f"{path} {failed[(path, q)]}" for path in ("http-server", "session") if failed[(path, q)]]
        if bad:
            notes.append(f"{q} prompts where the model found no cell (not timed; the server answers 400) of "
                         f"{repeats}: {', '.join(bad)}; an untrained model does this")
    return {
        "image": {"name": image_path.name, "shape": [int(rec.height), int(rec.width)], "channels": rec.n_channels,
                  "tiles": len(tiles), "tile_size": int(size)},
        "encoder_calls": {"warm": warm_calls, "timed": timed_calls},
        "runs": runs,
        "notes": notes,
    }


def run_prompt_bench(spec: PromptBenchSpec, *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Load the model, time the prompts (see the module docstring); returns the JSON-serialisable result."""
    from cellsam.bench.report import report_header
    from cellsam.bench.suite import resolve_bench_model
    from cellsam.inference.runtime import resolve_device

    spec.validate()
    dev = resolve_device(spec.device)
    net, info = resolve_bench_model(spec.model, dev, seed=spec.seed)
    image = Path(spec.image) if spec.image else SAMPLE
    res = time_prompts(net, image, repeats=spec.repeats, warmup=spec.warmup, model_name=spec.model,
                       budget_ms=spec.budget_ms)
    notes = res.pop("notes")
    if info["note"]:
        notes.insert(0, f"{spec.model}: {info['note']}")
    if res["encoder_calls"]["timed"]:
        notes.append(f"the encoder ran {res['encoder_calls']['timed']} times while prompts were timed: the "
                     "embedding cache did not hold every tile")
    server = {r["prompt"]: r["seconds"] for r in res["runs"] if r["path"] == "http-server"}
    budget = spec.budget_ms / 1e3
    verdict = {q: {"median_within": s["median"] <= budget if s["n"] else None,
                   "max_within": s["max"] <= budget if s["n"] else None} for q, s in server.items()}
    return {
        **report_header(SCHEMA, spec, dev, command),
        "model": info,
        **res,
        "budget_ms": spec.budget_ms,
        "verdict": verdict,
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- report
def render_prompts_markdown(result: dict[str, Any]) -> str:
    """The result as markdown: machine, model, one table of prompt times (milliseconds), verdict, notes."""
    from cellsam.bench.report import _gib, _table

    m, mod, im, spec = result["machine"], result["model"], result["image"], result["spec"]
    ms = lambda x: "-" if x is None or x != x else f"{x * 1e3:.1f}"  # noqa: E731
    out = [
        f"# cellsam bench --prompts ({result['created']})",
        "",
        f"- Machine: {m['cpu']} ({m['usable_cores']} usable of {m['logical_cores']} logical cores), "
        f"{_gib(m['memory_bytes'])} GiB RAM; device {m['device']}; torch {m['torch']} ({m['torch_threads']} "
        f"threads); OMP_WAIT_POLICY={m['env'].get('OMP_WAIT_POLICY')}; git {m.get('git_commit')}",
        f"- Command: `{' '.join(result['command'])}`",
        f"- Model `{spec['model']}`: variant {mod['variant']}, {mod['parameters'] / 1e6:.1f} M parameters, tile "
        f"{mod['tile_size']}" + (", RANDOM weights" if mod["random_weights"] else ""),
        f"- Image {im['name']}: {im['shape'][0]}x{im['shape'][1]}, {im['tiles']} tiles of {im['tile_size']} px, "
        f"all embedded before timing; encoder calls: {result['encoder_calls']['warm']} while warming, "
        f"{result['encoder_calls']['timed']} while timing",
        f"- {spec['repeats']} prompts of each kind after {spec['warmup']} warm-up; times in milliseconds; "
        f"budget {result['budget_ms']:g} ms (server side).",
        "",
        _table(
            ["path", "prompt", "n", "failed", "median ms", "IQR ms", "min ms", "max ms",
             f"share <= {result['budget_ms']:g} ms"],
            [[r["path"], r["prompt"], str(r["n"]), str(r["failed"]), ms(r["seconds"]["median"]),
              ms(r["seconds"]["iqr"]), ms(r["seconds"]["min"]), ms(r["seconds"]["max"]),
              "-" if r["within_budget"] is None else f"{r['within_budget']:.0%}"] for r in result["runs"]],
        ),
        "",
        "Paths: `predictor` = `Predictor.predict` on the cached embedding; `session` = the server's model call "
        "(+ mask cleaning); `http-server` = `POST /cells` as the app timed it (+ validation, SQLite commit, "
        "reply); `http-client` = the same call timed around the in-process client.",
        "",
        "## Verdict (http-server)",
        "",
    ]
    word = {True: "within", False: "OVER", None: "not measured (no prompt made a cell)"}
    for q, v in result["verdict"].items():
        out.append(f"- {q}: median {word[v['median_within']]} budget, max {word[v['max_within']]} budget")
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(out) + "\n"
