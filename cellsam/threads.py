"""The thread policy: idle OpenMP threads spin only briefly, then sleep, so cellsam is quick on a quiet
machine and does not collapse beside other work.

PyTorch runs its CPU kernels on an OpenMP thread pool (libgomp in the Linux wheels). With OpenMP's default
wait policy idle threads spin for long, which is a little faster on a machine of one's own and far slower
when other processes want the same cores: one 696x520 image took 61-80 s beside two busy processes
against 7.5-9.8 s with ``OMP_WAIT_POLICY=PASSIVE`` (2-core machine, ``cellsam_cpu.v2``). A fully passive
pool wakes its threads through the kernel at every parallel kernel, which costs the mask decoder's many
small kernels dearly: one prompt took 6.7-8.6 ms per decoder call passive, 2.3 ms with the spin below. A spin of
``GOMP_SPINCOUNT=10000`` before sleeping keeps most of both (2-core machine, ``cellsam_cpu.v10``, the dense
512 px DSB crop at its own scale, ``benchmarks/thread_policy.md``): 0.54 s quiet against 0.91 s passive,
1.36 s beside two busy processes against 1.12 s passive.

OpenMP reads these variables once, when torch loads it, so ``import cellsam`` (and the ``cellsam`` command,
which imports torch only in its sub-commands) sets them unless the environment sets ``OMP_WAIT_POLICY``:
``OMP_WAIT_POLICY=ACTIVE`` or ``PASSIVE`` is the user's choice and opts out of all of it. A program that
imports torch before cellsam has to export them itself; setting them then still reaches the processes it
starts (Dask workers), not its own thread pool.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

THREAD_POLICY: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def apply_thread_policy(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Fill in :data:`THREAD_POLICY` where ``environ`` (default ``os.environ``) leaves it unset; returns what
    was set: nothing when the user chose a wait policy (``OMP_WAIT_POLICY`` set)."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env:
        return {}
    added = {k: v for k, v in THREAD_POLICY.items() if k not in env}
    env.update(added)
    return added
