"""The thread policy: idle OpenMP threads sleep instead of spinning, so cellsam does not collapse beside
other work.

PyTorch runs its CPU kernels on an OpenMP thread pool. With OpenMP's default wait policy idle threads
spin, which is a little faster on a machine of one's own and far slower when other processes want the
same cores: one 696x520 image took 61-80 s beside two busy processes against 7.5-9.8 s with
``OMP_WAIT_POLICY=PASSIVE`` (2-core machine, ``cellsam_cpu.v2``). OpenMP reads the variable once, when
torch loads it, so ``import cellsam`` (and the ``cellsam`` command, which imports torch only in its
sub-commands) sets it unless the environment already does: ``OMP_WAIT_POLICY=ACTIVE`` opts out.
A program that imports torch before cellsam has to export ``OMP_WAIT_POLICY=PASSIVE`` itself; setting
it then still reaches the processes it starts (Dask workers), not its own thread pool.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

THREAD_POLICY: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_thread_policy(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Fill in :data:`THREAD_POLICY` where ``environ`` (default ``os.environ``) leaves it unset; returns what
    was set (nothing when the user chose)."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in THREAD_POLICY.items() if k not in env}
    env.update(added)
    return added
