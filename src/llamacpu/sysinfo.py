"""What this machine offers: physical cores for the default thread count, the SIMD path."""

from __future__ import annotations

import os
from pathlib import Path


def default_threads() -> int:
    """Physical cores this process may run on.

    Token generation streams weights from memory and a second hyperthread on a core adds
    nothing but contention, so the default counts cores, not logical CPUs.
    LLAMACPU_THREADS overrides it.
    """
    env = os.environ.get("LLAMACPU_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def physical_memory():
    """Bytes of memory this machine has, or None if unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def requested_isa(isa=None) -> str:
    """The SIMD path to use: the argument, else LLAMACPU_ISA, else the best available."""
    return isa or os.environ.get("LLAMACPU_ISA") or "auto"
