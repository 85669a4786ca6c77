#!/usr/bin/env python3
"""The attention kernel of one generated token, for one key/value head and the query heads
that share it, at several cache lengths: microseconds per call, for one or more builds side
by side (one worker process per build, pinned to the same core, asked in turn round by round,
order alternating), and each build's speed over the first's (median over rounds of ratios
measured moments apart).

    python bench/attention.py [TREE ...] [--pos 256 1000 4000] [--hd 64] [--rep 8] [--f32]
                              [--isa auto] [--rounds 15] [--core 0] [--json]

TREE: a directory holding an importable llamacpu package (default: the one on sys.path);
TREE@ISA runs that build's ISA path instead of --isa's. The default shape is TinyLlama's
(head size 64, 8 query heads per key/value head, f16 cache).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(tree: str, isa: str, positions: list, hd: int, rep: int, f32: bool, core: int):
    os.sched_setaffinity(0, {core})
    if tree:
        sys.path.insert(0, tree)
    import numpy as np

    from llamacpu import _core

    kernels = _core.Kernels(isa)
    rng = np.random.default_rng(0)
    cases = []
    for n in positions:
        q = rng.standard_normal((1, rep * hd)).astype(np.float32)
        k, v = (rng.standard_normal((n, hd)).astype(np.float32) for _ in range(2))
        if not f32:
            k, v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
        cases.append((q, k, v, np.zeros((1, rep * hd), np.float32)))
    print("ready", kernels.name, flush=True)
    for _ in sys.stdin:
        times = []
        for q, k, v, out in cases:
            calls = max(1, 2000 // len(k))
            best = float("inf")
            for _ in range(10):
                t0 = time.perf_counter()
                for _ in range(calls):
                    kernels.attention(q, k, v, rep, 1.0 / hd ** 0.5, out)
                best = min(best, (time.perf_counter() - t0) / calls)
            times.append(best * 1e6)
        print(" ".join(map(str, times)), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trees", nargs="*", default=[""])
    ap.add_argument("--pos", nargs="+", type=int, default=[256, 1000, 4000])
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--rep", type=int, default=8, help="query heads per key/value head")
    ap.add_argument("--f32", action="store_true", help="f32 keys and values (default f16, the cache's default)")
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.trees[0], a.isa, a.pos, a.hd, a.rep, a.f32, a.core)
    procs, paths = {}, {}
    for t in a.trees:
        tree, _, isa = t.partition("@")
        cmd = [sys.executable, os.path.abspath(__file__), tree, "--worker", "--isa", isa or a.isa, "--hd", str(a.hd),
               "--rep", str(a.rep), "--core", str(a.core), "--pos", *map(str, a.pos)] + (["--f32"] if a.f32 else [])
        procs[t] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for t, p in procs.items():
        ready = p.stdout.readline().split()
        if ready[:1] != ["ready"]:
            sys.exit("a worker failed to start")
        paths[t] = ready[1]
    us = {t: [] for t in a.trees}
    for r in range(a.rounds):
        for t in a.trees if r % 2 == 0 else a.trees[::-1]:
            procs[t].stdin.write("go\n")
            procs[t].stdin.flush()
            us[t].append([float(v) for v in procs[t].stdout.readline().split()])
    for p in procs.values():
        p.stdin.close()
        p.wait()
    first = a.trees[0]
    rows = []
    print(f"attention, head size {a.hd}, {a.rep} query heads per key/value head, {'f32' if a.f32 else 'f16'} keys and "
          f"values, {a.rounds} rounds: best us per call (median over rounds); speed over the first build")
    for t in a.trees:
        for i, n in enumerate(a.pos):
            med = statistics.median(u[i] for u in us[t])
            rel = statistics.median(f[i] / u[i] for u, f in zip(us[t], us[first]))
            rows.append({"tree": t, "isa": paths[t], "positions": n, "us": med, "vs_first": rel})
        print(f"  {t or '(sys.path)'} ({paths[t]}): " +
              "  ".join(f"{r['positions']} pos {r['us']:.1f} us {r['vs_first']:.3f}x" for r in rows if r["tree"] == t))
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
