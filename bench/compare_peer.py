#!/usr/bin/env python3
"""llamacpu against llama.cpp on the same model shapes, in the same sitting.

    bash ../shared/peer/setup.sh S M                     # once: builds the peer, writes its GGUFs
    python bench/compare_peer.py --shapes S M --types q4_0 q8_0 --threads 1 2

For each shape it writes the synthetic checkpoint (../shared/peer/make_checkpoint.py) and
converts it with `llamacpu convert` (both cached under --work), then runs the peer's
benchmark and `llamacpu bench` one after the other for every (type, threads) row, in
alternating order, and prints a Markdown table of ratios (llamacpu / llama.cpp). Generation
is put against the read bandwidth `llamacpu bench` measures while it generates (a read of
the same mapped weights with the same threads before, between and after runs of 8 tokens);
bench/bandwidth.py's reading of a 1 GiB buffer at the start is kept beside it. Raw results go
to --out as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = REPO.parent / "shared" / "peer"
PEER_DIR = Path(os.environ.get("LLAMACPU_PEER_DIR", Path.home() / ".cache" / "llamacpu-peer"))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def ensure_model(shape: str, dtype: str, work: Path) -> Path:
    ckpt = work / f"{shape}-hf"
    if not (ckpt / "config.json").exists():
        run([sys.executable, str(PEER / "make_checkpoint.py"), "--shape", shape, "--layout", "hf", "--out", str(ckpt)])
    out = work / f"{shape}-{dtype}.bin"
    if not out.exists():
        run([sys.executable, "-m", "llamacpu.cli", "convert", str(ckpt), str(out), "--dtype", dtype, "--no-progress"])
    return out


def peer_bench(gguf: Path, threads: int, reps: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        run([str(PEER_DIR / "venv" / "bin" / "python"), str(PEER / "bench_llamacpp.py"), str(gguf), str(threads),
             "--reps", str(reps), "--no-tgp", "--json", out])
        return json.loads(Path(out).read_text().strip().splitlines()[-1])
    finally:
        os.unlink(out)


def our_bench(model: Path, threads: int, reps: int) -> dict:
    out = run([sys.executable, "-m", "llamacpu.cli", "bench", str(model), "-t", str(threads), "--reps", str(reps),
               "--json"])
    return json.loads(out.strip().splitlines()[-1])


def bandwidth(threads: int) -> float:
    out = run([sys.executable, str(HERE / "bandwidth.py"), "--threads", str(threads), "--json"])
    return json.loads(out.strip().splitlines()[-1])["gbps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["S"])
    ap.add_argument("--types", nargs="+", default=["q4_0", "q8_0"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "llamacpu-bench"))
    ap.add_argument("--out", default=str(HERE / "results.jsonl"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    bw = {t: bandwidth(t) for t in a.threads}
    print(f"read bandwidth: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in bw.items()), flush=True)
    flip = False
    for shape in a.shapes:
        for dtype in a.types:
            model = ensure_model(shape, dtype, work)
            gguf = PEER_DIR / "models" / f"{shape}-{dtype.upper()}.gguf"
            if not gguf.exists():
                sys.exit(f"{gguf} missing: run bash {PEER}/setup.sh {shape}")
            for t in a.threads:
                if flip:
                    ours = our_bench(model, t, a.reps)
                    peer = peer_bench(gguf, t, a.reps)
                else:
                    peer = peer_bench(gguf, t, a.reps)
                    ours = our_bench(model, t, a.reps)
                flip = not flip
                row = {"shape": shape, "dtype": dtype, "threads": t, "ours": ours, "peer": peer, "bw_start": bw[t]}
                rows.append(row)
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(fmt_row(row), flush=True)
    print()
    print(table(rows))


def fmt_row(r) -> str:
    o, p = r["ours"], r["peer"]
    return (f"{r['shape']}-{r['dtype']} t={r['threads']}: pp {o['pp_tps']:.1f} vs {p['pp_tps']:.1f} "
            f"({o['pp_tps'] / p['pp_tps']:.2f}x), tg {o['tg_tps']:.2f} vs {p['tg0_tps']:.2f} "
            f"({o['tg_tps'] / p['tg0_tps']:.2f}x)")


def table(rows) -> str:
    lines = ["| model | threads | pp512 t/s (llamacpu / llama.cpp) | ratio | tg128 t/s (llamacpu / llama.cpp) | ratio "
             "| tg GB/s (share of the read bandwidth meanwhile / of its best pass) | warm load ms (llamacpu / llama.cpp) | peak RSS MiB (llamacpu / llama.cpp) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        o, p = r["ours"], r["peer"]
        lines.append(
            f"| {r['shape']}-{r['dtype']} | {r['threads']} | {o['pp_tps']:.1f} / {p['pp_tps']:.1f} | "
            f"**{o['pp_tps'] / p['pp_tps']:.2f}x** | {o['tg_tps']:.2f} / {p['tg0_tps']:.2f} | "
            f"**{o['tg_tps'] / p['tg0_tps']:.2f}x** | {o['tg_gbps']:.1f} ({100 * o['tg_share_of_read']:.0f}% / "
            f"{100 * o['tg_share_of_best_read']:.0f}%) | {o['load_warm_s'] * 1000:.1f} / {p['load2_s'] * 1000:.1f} | "
            f"{o['peak_rss_mib']:.0f} / {p['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
