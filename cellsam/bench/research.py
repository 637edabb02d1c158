"""Research code that is not installed with the package, loaded from the source checkout when it is there.

``cellsam bench --reference`` times a rebuild of the official CellSAM pipeline (two encoder passes,
per-box decoding), which lives in the repository's ``benchmarks/reference_pipeline.py``: it is timing
tooling, not something a user of the library calls. An installed package without the checkout says so.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["BENCHMARKS", "ResearchCodeMissing", "load_research"]

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
"""The repository's ``benchmarks/`` folder (beside the ``cellsam`` package in a source checkout)."""


class ResearchCodeMissing(ImportError):
    """The research module is not there (an installed package, not a source checkout)."""


def load_research(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` of the source checkout as a module (loaded once, as ``cellsam_research.<name>``).

    Raises:
        ResearchCodeMissing: no such file (the package was installed without its repository).
    """
    key = f"cellsam_research.{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(key, path) if path.is_file() else None
    if spec is None or spec.loader is None:
        raise ResearchCodeMissing(
            f"{path} not found: this research tool lives in the cellsam repository's benchmarks/ folder and is "
            "not installed with the package; run it from a source checkout (pip install -e .)"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before running it: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
