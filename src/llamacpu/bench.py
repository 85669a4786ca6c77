"""`llamacpu bench`: prompt processing and generation speed, load time, memory.

Measured the way ../shared/peer/bench_llamacpp.py measures llama.cpp, so the two can be
compared side by side: load after evicting the file from the page cache (cold) and again
(warm); pp = one prompt of P random tokens from an empty context; tg = G tokens generated
greedily one at a time from an almost empty context, each fed back; median of reps. A
repetition during which other processes used more than --max-others cores is retried.
"""

from __future__ import annotations

import gc
import json
import os
import random
import resource
import statistics
import sys
import time

import numpy as np

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cpu_snap():
    """(wall, busy jiffies of the machine incl. steal, jiffies of this process)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        mine = int(st[11]) + int(st[12])
    except OSError:
        busy = mine = 0
    return time.perf_counter(), busy, mine


def _others(a, b) -> float:
    dt = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / HZ / dt) if dt > 0 else 0.0


def weight_bytes_per_token(llm) -> int:
    """Bytes of weights one generated token reads: every tensor but the embedding table (one
    row of it is read), unless the output projection is tied to it."""
    t = llm._file.meta.tensors
    total = sum(x.size for x in t.values())
    if not llm.config.tied_output:
        total -= t["tok_embeddings"].size
    return total


def run_bench(model: str, threads=None, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, isa=None,
              cold: bool = True, max_others: float = 0.15, max_retries: int = 4, log=print, n_batch: int = 64) -> dict:
    from .llama import Llama

    n_ctx = max(n_prompt + n_gen + 8, 256)
    if cold:
        evict(model)
    t0 = time.perf_counter()
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, isa=isa, n_batch=n_batch, seed=0)
    load_cold = time.perf_counter() - t0
    llm.close()
    del llm
    gc.collect()
    t0 = time.perf_counter()
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, isa=isa, n_batch=n_batch, seed=0)
    load_warm = time.perf_counter() - t0
    m = llm._model
    # Python's random, not numpy.random: importing the latter adds ~7 MiB (OpenSSL among it)
    # to the peak RSS this command reports, memory the engine itself never needs.
    rng = random.Random(0)
    prompt = np.array([llm.token_bos()] + [rng.randrange(100, llm.n_vocab) for _ in range(n_prompt - 1)], np.int32)

    def prefill(tokens):
        # As the API does it: in batches of n_batch tokens.
        logits = None
        for i in range(0, len(tokens), m.n_batch):
            logits = m.forward(tokens[i:i + m.n_batch], i)
        return logits

    def greedy(start_pos, logits, n):
        # The Python loop of a generated token: argmax, then one forward step.
        for i in range(n):
            tok = int(logits.argmax())
            logits = m.forward((tok,), start_pos + i)
        return logits

    m.forward(prompt[:32], 0)  # warm-up: first touch of buffers, threads
    greedy(32, m.logits[0], 4)

    pp, tg, noise = [], [], []
    attempts = 0
    while len(pp) < reps and attempts < reps + max_retries:
        attempts += 1
        s0 = _cpu_snap()
        logits = prefill(prompt)
        s1 = _cpu_snap()
        r_pp = n_prompt / (s1[0] - s0[0])
        logits = m.forward(prompt[:1], 0)
        s2 = _cpu_snap()
        greedy(1, logits, n_gen)
        s3 = _cpu_snap()
        r_tg = n_gen / (s3[0] - s2[0])
        busy = max(_others(s0, s1), _others(s2, s3))
        noise.append(round(busy, 3))
        if busy > max_others and attempts < reps + max_retries:
            log(f"  rep {attempts}: other processes used {busy:.2f} cores -> retried")
            continue
        pp.append(r_pp)
        tg.append(r_tg)

    # The Python side of one generated token: wall time minus time inside the kernels.
    logits = m.forward(prompt[:1], 0)
    k0, t0 = m.backend.seconds, time.perf_counter()
    greedy(1, logits, 32)
    py_cost = ((time.perf_counter() - t0) - (m.backend.seconds - k0)) / 32
    per_tok = weight_bytes_per_token(llm)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = {
        "model": os.path.basename(model), "file_mib": os.path.getsize(model) / 2**20,
        "threads": llm.n_threads, "isa": llm.isa, "n_prompt": n_prompt, "n_gen": n_gen, "n_batch": m.n_batch,
        "pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg), "pp_all": pp, "tg_all": tg,
        "load_s": load_warm, "load_cold_s": load_cold, "load_warm_s": load_warm,
        "peak_rss_mib": peak, "kv_cache_mib": m.cache.bytes / 2**20,
        "weights_per_token_gb": per_tok / 1e9, "tg_gbps": statistics.median(tg) * per_tok / 1e9,
        "python_us_per_token": py_cost * 1e6, "others_cores": noise,
    }
    llm.close()
    return r


def print_report(r: dict, as_json: bool, out=sys.stdout) -> None:
    print(f"{r['model']}: {r['isa']}, {r['threads']} threads | load {r['load_cold_s'] * 1000:.0f} ms cold / "
          f"{r['load_warm_s'] * 1000:.1f} ms warm | pp{r['n_prompt']} {r['pp_tps']:.1f} t/s | "
          f"tg{r['n_gen']} {r['tg_tps']:.2f} t/s ({r['weights_per_token_gb']:.3f} GB/token -> "
          f"{r['tg_gbps']:.1f} GB/s) | Python {r['python_us_per_token']:.0f} us/token | "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB (file {r['file_mib']:.0f}, KV {r['kv_cache_mib']:.0f})", file=out)
    if as_json:
        print(json.dumps(r), file=out)
