#!/usr/bin/env python3
"""Quantized matmul throughput per weight format, in bytes of weights read per second, measured
side by side in one run (the machine is shared: compare only figures from the same run).

Each format multiplies the same random weights: a set of matrices larger than the last-level
cache ("dram", what token generation sees) and one matrix that stays in the core's L2 cache
("cache", the kernel's compute speed), of the same size in bytes for every format (rows in
inverse proportion to bits per weight), so that no format is measured partly from L3.
Repetitions are interleaved across formats, each starting from a different one; each
repetition takes a format's fastest pass over 0.1 s of passes; each format's best is printed,
and its speed per byte against q4_0 as the median, over repetitions, of its rate over q4_0's
in the same repetition. Buffers start on a page, as a mapped model file's tensors do.

    python bench/kquants.py [--threads 1] [--tokens 1] [--rows 4096] [--cols 4096] [--reps 15]
                            [--cache-kib 384] [--isa auto] [--json]
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from llamacpu import _core

FORMATS = {"q4_0": _core.Q4_0, "q4_1": _core.Q4_1, "q8_0": _core.Q8_0, "q4_k": _core.Q4_K, "q6_k": _core.Q6_K}
_BLOCK32 = {_core.Q4_0: (256, 16), _core.Q4_1: (256, 32), _core.Q8_0: (512, 16)}  # quant bytes, fp16 scales


def page_aligned(src: np.ndarray) -> np.ndarray:
    """A copy of src's bytes starting on a page boundary, as a tensor of a mapped model file is
    (64-byte aligned offsets in a page-aligned map). A plain numpy buffer starts 16 bytes past a
    cache line, which splits every other 32-byte load across two lines and measures a case the
    engine never sees."""
    raw = np.empty(src.nbytes + 4096, np.uint8)
    start = -raw.ctypes.data % 4096
    out = raw[start:start + src.nbytes]
    out[:] = src.view(np.uint8).reshape(-1)
    return out


def make_matrix(dt: int, w: np.ndarray):
    rows, cols = w.shape
    if dt in (_core.Q4_K, _core.Q6_K):
        buf = np.zeros(_core.matrix_bytes(dt, rows, cols), np.uint8)
        _core.quantize_k_tiles(dt, w, buf, "ref")
    else:
        qb, sb = _BLOCK32[dt]
        blocks = -(-rows // 16) * (cols // 32)
        q, s = np.zeros(blocks * qb, np.uint8), np.zeros(blocks * sb, np.uint16)
        _core.quantize_tiles(dt, w, q, s)
        buf = np.concatenate([q, s.view(np.uint8)])
    buf = page_aligned(buf)
    return _core.Matrix(buf, 0, dt, rows, cols), buf


def rate(backend, mats, x, min_seconds=0.1) -> float:
    """Bytes of weights per second of the fastest pass through mats, over at least min_seconds
    of passes. The fastest pass is the one least disturbed by other work on a shared machine:
    a window's mean moves with whatever else runs, its best pass much less."""
    out = np.zeros((x.shape[0], mats[0][0].rows), np.float32)
    nbytes = sum(buf.nbytes for _, buf in mats)
    fastest, t_start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for m, _ in mats:
            backend.matmul(m, x, out)
        t1 = time.perf_counter()
        fastest = min(fastest, t1 - t0)
        if t1 - t_start >= min_seconds:
            return nbytes / fastest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--dram-mib", type=int, default=160, help="total size of the matrices of the dram case")
    ap.add_argument("--cache-kib", type=int, default=384, help="size of each format's matrix of the cache case")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads == 1 and hasattr(os, "sched_setaffinity"):
        # One core for the whole run, so that every format is measured on the same one: on a
        # shared machine the same kernel measured up to 20% apart on two cores.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = np.random.default_rng(0)
    backend = _core.Backend(a.threads, a.isa)
    w = rng.standard_normal((a.rows, a.cols)).astype(np.float32)
    x = rng.standard_normal((a.tokens, a.cols)).astype(np.float32)
    names = a.formats.split(",")
    cases = {}
    for name in names:
        dt = FORMATS[name]
        one = make_matrix(dt, w)
        copies = max(1, a.dram_mib * 2**20 // one[1].nbytes)
        # Copies of the bytes, so that each pass streams them from memory (a Matrix keeps its
        # buffer alive).
        dram = [one] + [(_core.Matrix(b, 0, dt, a.rows, a.cols), b) for b in (page_aligned(one[1]) for _ in range(copies - 1))]
        # About 384 KiB of weights: in a 512 KiB L2 with room for the activations and outputs.
        cache_rows = max(16, int(a.cache_kib * 1024 * a.rows / one[1].nbytes) // 16 * 16)
        cases[name] = {"dram": dram, "cache": [make_matrix(dt, w[:cache_rows])]}
    best = {(n, k): 0.0 for n in names for k in ("dram", "cache")}
    ratios = {(n, k): [] for n in names for k in ("dram", "cache")}
    for rep in range(a.reps):
        # Each repetition starts from a different format, so that none always runs first.
        order = names[rep % len(names):] + names[:rep % len(names)]
        for kind in ("dram", "cache"):
            got = {name: rate(backend, cases[name][kind], x) for name in order}
            for name, r in got.items():
                best[(name, kind)] = max(best[(name, kind)], r)
                if "q4_0" in got:
                    # Against q4_0 measured moments before: steadier than a ratio of bests
                    # when the machine's speed drifts.
                    ratios[(name, kind)].append(r / got["q4_0"])
    print(f"{backend.name}, {a.threads} thread(s), {a.tokens} token(s), [{a.rows} x {a.cols}]: GB/s of weights read "
          f"(best of {a.reps}); per byte against q4_0 (median over repetitions)")
    med = {key: statistics.median(v) for key, v in ratios.items() if v}
    for name in names:
        d, c = best[(name, "dram")], best[(name, "cache")]
        rel = f"  ({med[(name, 'dram')]:.2f}x / {med[(name, 'cache')]:.2f}x q4_0)" if med else ""
        print(f"  {name:5s} dram {d / 1e9:6.2f}   cache {c / 1e9:6.2f}{rel}")
    if a.json:
        out = {f"{n}_{k}_gbps": v / 1e9 for (n, k), v in best.items()}
        out.update({f"{n}_{k}_vs_q4_0": v for (n, k), v in med.items()})
        print(json.dumps(out))


if __name__ == "__main__":
    main()
