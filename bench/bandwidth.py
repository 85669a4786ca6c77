#!/usr/bin/env python3
"""Memory read bandwidth of this machine: every byte of a 1 GiB buffer read by N threads,
best of several passes of the fastest read pattern (the figure token generation is measured
against; llamacpu.bench.READ_PATTERNS lists the patterns tried).

    python bench/bandwidth.py --threads 2 [--mib 1024] [--reps 7] [--json]
"""

import argparse
import json

import numpy as np

from llamacpu import _core
from llamacpu.bench import fastest_read_pattern


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    buf = np.ones(a.mib << 20, np.uint8)  # touched, so every page is real
    streams, prefetch = fastest_read_pattern(buf, a.threads)
    times = sorted(_core.read_seconds(buf, a.threads, streams, prefetch) for _ in range(a.reps))
    gbps = buf.nbytes / times[0] / 1e9
    median = buf.nbytes / times[len(times) // 2] / 1e9
    how = f"{streams} stream(s) per MiB, {'with' if prefetch else 'without'} prefetch"
    print(f"read bandwidth, {a.threads} thread(s): {gbps:.1f} GB/s best, {median:.1f} GB/s median ({how})")
    if a.json:
        print(json.dumps({"threads": a.threads, "gbps": gbps, "median_gbps": median, "streams": streams,
                          "prefetch": prefetch}))


if __name__ == "__main__":
    main()
