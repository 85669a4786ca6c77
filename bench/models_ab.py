#!/usr/bin/env python3
"""The weight matrices of one generated token, for two or more model files, replayed in turn
in one process: GB/s of weights read per file, and each file's speed per byte against the
first (median over rounds of ratios measured moments apart).

Meant for comparing formats on a model's real shapes and mix (e.g. the same model converted
with --dtype q4_0 and q4_k_m) where `llamacpu bench` drifts more than the difference: only
the matmuls run (no attention, norms or sampling), each round takes each file's fastest of
three passes, and the order of the files alternates by round.

    python bench/models_ab.py A.bin B.bin [...] [--threads 1] [--rounds 30] [--json]
"""

import argparse
import json
import statistics
import time

import numpy as np

from llamacpu import _core
from llamacpu.bench import weight_bytes_per_token
from llamacpu.llama import Llama


def token_matmuls(path: str, threads: int):
    """(llm, plan, bytes): a recorded plan of every weight matmul of one token, and the bytes
    of weights a token reads as `llamacpu bench` counts them (the norms' few KiB included)."""
    llm = Llama(path, n_ctx=64, n_threads=threads, seed=0)
    m = llm._model
    mats = [w for layer in m.layers for w in (layer.wqkv, layer.wo, layer.w13, layer.w2)] + [m.output]
    plan = _core.Plan()  # keeps the arrays it was recorded with alive
    m.backend.record(plan)
    try:
        for w in mats:
            m.backend.matmul(w, np.zeros((1, w.cols), np.float32), np.zeros((1, w.rows), np.float32), False)
    finally:
        m.backend.stop()
    m.backend.run(plan)  # warm: pages mapped, threads started
    return llm, plan, weight_bytes_per_token(llm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    runs = [token_matmuls(p, a.threads) for p in a.models]
    rates = [[] for _ in runs]
    for r in range(a.rounds):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            llm, plan, nbytes = runs[i]
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                llm._model.backend.run(plan)
                best = min(best, time.perf_counter() - t0)
            rates[i].append(nbytes / best / 1e9)
    out = []
    for path, (_, _, nbytes), rs in zip(a.models, runs, rates):
        rel = statistics.median(x / y for x, y in zip(rs, rates[0]))
        out.append({"model": path, "weight_mib": nbytes / 2**20, "best_gbps": max(rs),
                    "median_gbps": statistics.median(rs), "vs_first": rel})
    print(f"{a.threads} thread(s), {a.rounds} rounds: GB/s of weights per token's matmuls; per byte against the first")
    for o in out:
        print(f"  {o['model']}: {o['weight_mib']:.1f} MiB, best {o['best_gbps']:.2f}, median {o['median_gbps']:.2f}, "
              f"{o['vs_first']:.3f}x")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
