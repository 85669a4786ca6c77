"""`llamacpu bench`: prompt processing and generation speed, load time, memory.

Measured the way ../shared/peer/bench_llamacpp.py measures llama.cpp, so the two can be
compared side by side: load after evicting the file from the page cache (cold) and again
(warm); pp = one prompt of P random tokens from an empty context; tg = G tokens generated
greedily one at a time from an almost empty context, each fed back, timed in runs of 8 with a
read of the same weights before, between and after the runs (the read bandwidth generation is
set against); median of reps. A repetition during which other processes used more than
--max-others cores is run again, up to four times in a run; after that every repetition
counts.
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


def tensors_read_per_token(llm) -> list:
    """The tensors one generated token reads in full: all but the embedding table (one row of
    it is read), unless the output projection is tied to it."""
    t = llm._file.meta.tensors
    return [x for name, x in t.items() if llm.config.tied_output or name != "tok_embeddings"]


def weight_bytes_per_token(llm) -> int:
    return sum(x.size for x in tensors_read_per_token(llm))


def weight_span(llm) -> tuple[int, int]:
    """[start, end) of the file bytes a generated token reads (the converter writes the
    embedding table first, so these tensors are one run of the file)."""
    read = tensors_read_per_token(llm)
    return min(x.offset for x in read), max(x.offset + x.size for x in read)


# The read probe's patterns (_core.read_seconds: streams per 1 MiB chunk, software prefetch):
# which one reads fastest depends on the core, so the probe tries each and keeps the fastest.
READ_PATTERNS = ((4, True), (4, False), (2, False), (1, False))


def fastest_read_pattern(buf, threads: int, rounds: int = 2) -> tuple:
    """The READ_PATTERNS entry that read buf fastest, each tried rounds times in turn."""
    from . import _core

    best = None
    for _ in range(rounds):
        for pattern in READ_PATTERNS:
            t = _core.read_seconds(buf, threads, *pattern)
            if best is None or t < best[0]:
                best = (t, pattern)
    return best[1]


def generate_probed(mm, span, threads: int, logits, n_gen: int, greedy, seg: int = 8, pattern=READ_PATTERNS[0]):
    """Generates n_gen tokens in runs of seg, reading the weights a token reads once before,
    between and after the runs (the model's own mapping, the same pages, the same thread
    count). Returns (generation seconds, GB/s of all reads, GB/s of the fastest read): the
    first is sampled across the same seconds as the generation, so a shared host's drifting
    bandwidth weighs on both alike; the second is the strictest yardstick."""
    from . import _core

    view = memoryview(mm)[span[0]:span[1]]

    def probe():
        time.sleep(0.002)  # the generation's idle workers stop spinning first
        return _core.read_seconds(view, threads, *pattern)

    try:
        t_gen, probes = 0.0, [probe()]
        for start in range(0, n_gen, seg):
            t0 = time.perf_counter()
            logits = greedy(1 + start, logits, min(seg, n_gen - start))
            t_gen += time.perf_counter() - t0
            probes.append(probe())
        return t_gen, view.nbytes * len(probes) / sum(probes) / 1e9, view.nbytes / min(probes) / 1e9
    finally:
        view.release()


def run_bench(model: str, threads=None, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, isa=None,
              cold: bool = True, max_others: float = 0.15, max_retries: int = 4, log=print, n_batch: int = 64) -> dict:
    from . import _core
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

    per_tok = weight_bytes_per_token(llm)
    span = weight_span(llm)
    view = memoryview(llm._file.mm)[span[0]:span[1]]
    try:
        pattern = fastest_read_pattern(view, llm.n_threads)
    finally:
        view.release()
    pp, tg, noise, probes, shares = [], [], [], [], []
    attempts = retries = 0
    while len(pp) < reps:
        attempts += 1
        s0 = _cpu_snap()
        logits = prefill(prompt)
        s1 = _cpu_snap()
        r_pp = n_prompt / (s1[0] - s0[0])
        logits = m.forward(prompt[:1], 0)
        s2 = _cpu_snap()
        t_gen, bw, bw_best = generate_probed(llm._file.mm, span, llm.n_threads, logits, n_gen, greedy, pattern=pattern)
        s3 = _cpu_snap()
        r_tg = n_gen / t_gen
        busy = max(_others(s0, s1), _others(s2, s3))
        noise.append(round(busy, 3))
        # A disturbed repetition is run again, at most max_retries times in all; after that
        # every repetition counts, so the result always holds the reps asked for.
        if busy > max_others and retries < max_retries:
            retries += 1
            log(f"  rep {attempts}: other processes used {busy:.2f} cores -> retried")
            continue
        pp.append(r_pp)
        tg.append(r_tg)
        probes.append((round(bw, 2), round(bw_best, 2)))
        shares.append((r_tg * per_tok / 1e9 / bw, r_tg * per_tok / 1e9 / bw_best))

    # The Python side of one generated token: wall time minus time inside the kernels.
    logits = m.forward(prompt[:1], 0)
    k0, t0 = m.backend.seconds, time.perf_counter()
    greedy(1, logits, 32)
    py_cost = ((time.perf_counter() - t0) - (m.backend.seconds - k0)) / 32
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = {
        "model": os.path.basename(model), "file_mib": os.path.getsize(model) / 2**20,
        "threads": llm.n_threads, "isa": llm.isa, "n_prompt": n_prompt, "n_gen": n_gen, "n_batch": m.n_batch,
        "pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg), "pp_all": pp, "tg_all": tg,
        "load_s": load_warm, "load_cold_s": load_cold, "load_warm_s": load_warm,
        "peak_rss_mib": peak, "kv_cache_mib": m.cache.bytes / 2**20,
        "weights_per_token_gb": per_tok / 1e9, "tg_gbps": statistics.median(tg) * per_tok / 1e9,
        "python_us_per_token": py_cost * 1e6, "others_cores": noise,
        "read_gbps_during_tg": [p[0] for p in probes], "read_gbps_best_during_tg": [p[1] for p in probes],
        "tg_share_of_read": statistics.median(x[0] for x in shares), "tg_share_of_best_read": statistics.median(x[1] for x in shares),
        "tg_share_all": [x[0] for x in shares],
        "read_pattern": {"streams": pattern[0], "prefetch": pattern[1]},
        "kernel_prefetch": _core.software_prefetch(),
    }
    llm.close()
    return r


def print_report(r: dict, as_json: bool, out=sys.stdout) -> None:
    print(f"{r['model']}: {r['isa']}, {r['threads']} threads | load {r['load_cold_s'] * 1000:.0f} ms cold / "
          f"{r['load_warm_s'] * 1000:.1f} ms warm | pp{r['n_prompt']} {r['pp_tps']:.1f} t/s | "
          f"tg{r['n_gen']} {r['tg_tps']:.2f} t/s ({r['weights_per_token_gb']:.3f} GB/token -> "
          f"{r['tg_gbps']:.1f} GB/s: {100 * r['tg_share_of_read']:.0f}% of the weights' read bandwidth meanwhile, "
          f"{100 * r['tg_share_of_best_read']:.0f}% of its best) | Python {r['python_us_per_token']:.0f} us/token | "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB (file {r['file_mib']:.0f}, KV {r['kv_cache_mib']:.0f})", file=out)
    if as_json:
        print(json.dumps(r), file=out)
