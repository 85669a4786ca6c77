#!/usr/bin/env python3
"""Kernel speed of two or more builds of llamacpu, side by side: one worker process per build,
pinned to the same cores, each asked in turn (order alternating by round) for its fastest pass
over each format's matrices, the formats' passes interleaved from memory; reported per build
as GB/s of weights and per byte against q4_0, and per format as each build's speed over the
first build's (median over rounds of the ratio of passes measured moments apart). Meant for
changes of a few percent on a shared, noisy machine, where separate runs of bench/kquants.py
drift more than that.

    python bench/kquants_ab.py TREE_A TREE_B [...] [--formats q4_0,q4_k,q6_k] [--rounds 40]
                               [--regime l2|dram] [--tokens 1] [--core 0] [--threads 1] [--rows 4096]
                               [--cols 4096] [--isa auto]

TREE: a directory holding an importable llamacpu package (a site-packages, or an import tree
of src/llamacpu plus a built _core); TREE@ISA runs that build's ISA path (avx2, avx512, ...)
instead of --isa's, so one build's paths can be set side by side. regime l2: one matrix per
format of about 384 KiB (within a core's L2 cache); dram: 128 MiB of copies of a rows x cols
matrix per format. --threads N: each worker runs N threads pinned to cores core .. core + N - 1
(the cores share the memory bus, as a multi-threaded token's matmuls do).

--gauge (dram only): on a shared host the compute a core gets moves too (another tenant on the
sibling hardware thread, frequency), and the per-byte ratios from memory move with it. Each
round then times every format once, between two readings of the core's compute speed (the
build's q4_0 kernel on a matrix in L2, best of 9 short passes), and the per-byte ratios are
also given for the third of the rounds with the fastest gauge and the third with the slowest.
Rounds whose two readings differ by more than 10% (the state changed within the round) are
left out of those two figures.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

BPW = {"q4_0": 4.5, "q4_1": 5.0, "q8_0": 8.5, "q4_k": 4.5, "q6_k": 6.5625}


def worker(tree: str, formats: list, regime: str, tokens: int, core: int, threads: int, shape: tuple, isa: str,
           gauge: bool):
    os.sched_setaffinity(0, set(range(core, core + threads)))
    sys.path.insert(0, tree)
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    import numpy as np

    from llamacpu import _core

    import kquants

    assert os.path.abspath(_core.__file__).startswith(os.path.abspath(tree)), _core.__file__
    n_rows, cols = shape
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_rows, cols)).astype(np.float32)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    backend = _core.Backend(threads, isa)
    mats = {}
    for f in formats:
        rows = max(16, int(384 * 1024 * 8 / BPW[f] / cols) // 16 * 16) if regime == "l2" else n_rows
        m, buf = kquants.make_matrix(kquants.FORMATS[f], w[:rows])
        ms = [(m, buf)]
        if regime == "dram":
            copies = 128 * 2**20 // buf.nbytes
            ms += [(_core.Matrix(b, 0, kquants.FORMATS[f], rows, cols), b)
                   for b in (kquants.page_aligned(buf) for _ in range(copies - 1))]
        mats[f] = ms
    if gauge:
        g_rows = int(384 * 1024 * 8 / BPW["q4_0"] / cols) // 16 * 16
        g_w = np.random.default_rng(1).standard_normal((g_rows, cols)).astype(np.float32)
        g_mat, g_buf = kquants.make_matrix(kquants.FORMATS["q4_0"], g_w)
        g_out = np.zeros((tokens, g_rows), np.float32)

    def gauge_rate():
        best = float("inf")
        for _ in range(9):
            t0 = time.perf_counter()
            backend.matmul(g_mat, x, g_out)
            best = min(best, time.perf_counter() - t0)
        return g_buf.nbytes / best / 1e9

    print("ready", backend.name, flush=True)
    passes = 12 if regime == "l2" else 3
    outs = {f: np.zeros((tokens, ms[0][0].rows), np.float32) for f, ms in mats.items()}
    nbytes = {f: sum(b.nbytes for _, b in ms) for f, ms in mats.items()}

    def one_pass(f):
        t0 = time.perf_counter()
        for m, _ in mats[f]:
            backend.matmul(m, x, outs[f])
        return time.perf_counter() - t0

    # A request names formats. From memory their passes alternate (a, b, c, a, b, c, ...), so
    # every format's best pass comes from the same stretch of time: on a shared host the
    # bandwidth left to this core drifts from one tenth of a second to the next, and blocks
    # of one format's passes measured in turn caught different stretches. In L2 each format
    # keeps its block of passes: the formats' matrices together would not fit.
    warm = False
    for line in sys.stdin:
        fs = line.split()
        if gauge:
            # One pass per format between two readings: short rounds, each in one state of the host.
            if not warm:
                for f in fs:
                    one_pass(f)
                warm = True
            g0 = gauge_rate()
            t = {f: one_pass(f) for f in fs}
            g1 = gauge_rate()
            print(" ".join(str(nbytes[f] / t[f] / 1e9) for f in fs), g0, g1, flush=True)
            continue
        best = dict.fromkeys(fs, float("inf"))
        for group in ([fs] if regime == "dram" else [[f] for f in fs]):
            for f in group:
                one_pass(f)
            for _ in range(passes):
                for f in group:
                    best[f] = min(best[f], one_pass(f))
        print(" ".join(str(nbytes[f] / best[f] / 1e9) for f in fs), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--formats", default="q4_0,q4_k,q6_k")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--regime", choices=("l2", "dram"), default="l2")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=4096, help="rows of the dram case's matrix")
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--isa", default="auto", help="the kernel path of every TREE without @ISA")
    ap.add_argument("--gauge", action="store_true", help="dram: also report rounds by the core's compute speed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    formats = a.formats.split(",")
    if a.gauge and a.regime != "dram":
        ap.error("--gauge needs --regime dram")
    if a.worker:
        return worker(a.trees[0], formats, a.regime, a.tokens, a.core, a.threads, (a.rows, a.cols), a.isa, a.gauge)
    names = list(a.trees)
    procs = {}
    for t in names:
        tree, _, isa = t.partition("@")
        cmd = [sys.executable, os.path.abspath(__file__), tree, "--worker", "--isa", isa or a.isa,
               "--formats", a.formats, "--regime", a.regime, "--tokens", str(a.tokens), "--core", str(a.core),
               "--threads", str(a.threads),
               "--rows", str(a.rows), "--cols", str(a.cols)] + (["--gauge"] if a.gauge else [])
        procs[t] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    paths = {}
    for t, p in procs.items():
        ready = p.stdout.readline().split()
        if ready[:1] != ["ready"]:
            sys.exit("a worker failed to start")
        paths[t] = ready[1]
    rates = {(t, f): [] for t in names for f in formats}
    gauges = {t: [] for t in names}
    for r in range(a.rounds):
        # Formats and builds take turns starting, round by round.
        fs = formats[r % len(formats):] + formats[:r % len(formats)]
        for t in names if r % 2 == 0 else names[::-1]:
            procs[t].stdin.write(" ".join(fs) + "\n")
            procs[t].stdin.flush()
            vals = [float(v) for v in procs[t].stdout.readline().split()]
            for f, v in zip(fs, vals):
                rates[(t, f)].append(v)
            if a.gauge:
                gauges[t].append(vals[len(fs):])
    for p in procs.values():
        p.stdin.close()
        p.wait()
    med = lambda a, b: statistics.median(x / y for x, y in zip(a, b))  # noqa: E731
    print(f"regime {a.regime}, {a.tokens} token(s), {a.rounds} rounds, {a.threads} thread(s) from core {a.core}: best GB/s of weights; "
          "per byte against q4_0 and against the first build (median over rounds)")
    for t in names:
        rel = " ".join(f"{f} {med(rates[(t, f)], rates[(t, 'q4_0')]):.3f}" for f in formats if f != "q4_0")
        print(f"  {t} ({paths[t]}): " + " ".join(f"{f} {max(rates[(t, f)]):.2f}" for f in formats) + (f"  | vs q4_0: {rel}" if rel else ""))
    for f in formats:
        print(f"  {f}: " + " ".join(f"{t} {med(rates[(t, f)], rates[(names[0], f)]):.3f}" for t in names[1:]))
    if a.gauge and "q4_0" in formats:
        print("by the core's compute (gauge: the build's q4_0 in L2), per byte against q4_0 (median over rounds)")
        for t in names:
            steady = sorted((min(g), i) for i, g in enumerate(gauges[t]) if max(g) <= 1.1 * min(g))
            third = len(steady) // 3
            for label, part in (("fastest third", steady[-third:]), ("slowest third", steady[:third])):
                if not third:
                    continue
                rel = " ".join(f"{f} {statistics.median(rates[(t, f)][i] / rates[(t, 'q4_0')][i] for _, i in part):.3f}"
                               for f in formats if f != "q4_0")
                print(f"  {t} {label} of {len(steady)} steady rounds (gauge {part[0][0]:.1f}-{part[-1][0]:.1f} GB/s): {rel}")


if __name__ == "__main__":
    main()
