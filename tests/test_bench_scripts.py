"""The benchmark scripts still run and report what they promise, on tiny sizes (the figures
themselves are bench/README.md's business, not a test's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

BENCH = REPO / "bench"


def run_json(*args) -> dict:
    out = subprocess.run([sys.executable, *map(str, args), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kquants_reports_every_format_against_q4_0():
    got = run_json(BENCH / "kquants.py", "--rows", 64, "--cols", 512, "--dram-mib", 1, "--cache-kib", 16,
                   "--reps", 2, "--formats", "q4_0,q4_k,q6_k,q8_0")
    for f in ("q4_0", "q4_k", "q6_k", "q8_0"):
        for case in ("dram", "cache"):
            assert got[f"{f}_{case}_gbps"] > 0
            assert got[f"{f}_{case}_vs_q4_0"] > 0
    assert got["q4_0_dram_vs_q4_0"] == pytest.approx(1.0)


def test_kquants_buffers_start_on_a_page_like_a_mapped_tensor():
    sys.path.insert(0, str(BENCH))
    try:
        import kquants
    finally:
        sys.path.remove(str(BENCH))
    src = np.arange(5000, dtype=np.uint32)
    out = kquants.page_aligned(src)
    assert out.ctypes.data % 4096 == 0
    assert out.tobytes() == src.tobytes()
    for name in ("q4_0", "q4_k"):
        _, buf = kquants.make_matrix(kquants.FORMATS[name], np.ones((16, 256), np.float32))
        assert buf.ctypes.data % 4096 == 0


def test_bandwidth_reports_a_rate():
    from llamacpu.bench import READ_PATTERNS

    got = run_json(BENCH / "bandwidth.py", "--mib", 8, "--reps", 2)
    assert got["gbps"] >= got["median_gbps"] > 0
    assert (got["streams"], got["prefetch"]) in READ_PATTERNS


@pytest.mark.parametrize("words", [0, 1, 7, 31, 32, 33, 1000, (1 << 17) + 45, 3 * (1 << 17) + 8 * 4 * 3 + 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("streams, prefetch", [(4, True), (2, True), (2, False), (1, False), (1, True)])
def test_bandwidth_probe_reads_every_word(words, threads, streams, prefetch):
    # Chunk and stream boundaries, tails shorter than a stream's step, several chunks per
    # thread, each read pattern: a probe that skipped bytes would report a bandwidth it never
    # reached.
    from llamacpu import _core

    rng = np.random.default_rng(words)
    buf = rng.integers(0, 2**63, size=words, dtype=np.uint64)
    want = int(np.bitwise_xor.reduce(buf)) if words else 0
    assert _core.read_xor(buf, threads, streams, prefetch) == want
    # A byte past the last whole word is not a word: the probe ignores it.
    extra = np.concatenate([buf.view(np.uint8), np.array([0xAB], np.uint8)])
    assert _core.read_xor(extra, threads, streams, prefetch) == want


@pytest.mark.parametrize("streams", [0, 3, 8, -1])
def test_bandwidth_probe_refuses_other_stream_counts(streams):
    from llamacpu import _core

    with pytest.raises(ValueError, match="streams is 1, 2 or 4"):
        _core.read_seconds(np.zeros(64, np.uint64), 1, streams, True)


def test_models_ab_compares_files_per_byte(stories_models):
    got = run_json(BENCH / "models_ab.py", stories_models["q4_0"], stories_models["q8_0"], "--rounds", 2)
    assert [o["model"] for o in got] == [str(stories_models["q4_0"]), str(stories_models["q8_0"])]
    assert got[0]["vs_first"] == pytest.approx(1.0)
    assert got[1]["weight_mib"] > got[0]["weight_mib"] > 0  # the same matrices in more bytes
    assert all(o["best_gbps"] >= o["median_gbps"] > 0 for o in got)


def test_kquants_ab_runs_each_build_on_its_named_path():
    import llamacpu
    from llamacpu import _core

    tree = str(Path(os.path.abspath(llamacpu.__file__)).parent.parent)
    out = subprocess.run([sys.executable, str(BENCH / "kquants_ab.py"), tree, tree + "@scalar", "--formats", "q4_0,q4_k",
                          "--regime", "l2", "--rows", "64", "--cols", "256", "--rounds", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    auto = next(ln for ln in lines if ln.startswith(f"  {tree} ("))
    assert "(scalar)" not in auto or _core.usable_isas()[0] == "scalar"
    scalar = next(ln for ln in lines if ln.startswith(f"  {tree}@scalar (scalar): q4_0 "))
    assert "vs q4_0: q4_k" in scalar
    assert any(ln.startswith("  q4_k: ") for ln in lines)


def test_kquants_ab_interleaves_formats_from_memory_on_two_threads():
    import llamacpu

    tree = str(Path(os.path.abspath(llamacpu.__file__)).parent.parent)
    out = subprocess.run([sys.executable, str(BENCH / "kquants_ab.py"), tree, "--formats", "q4_0,q4_k",
                          "--regime", "dram", "--rows", "64", "--cols", "2048", "--rounds", "2", "--threads", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "2 thread(s)" in lines[0]
    row = next(ln for ln in lines if ln.startswith(f"  {tree} ("))
    speeds = row.split("|")[0].split("): ")[1].split()
    assert speeds[0::2] == ["q4_0", "q4_k"] and all(float(v) > 0 for v in speeds[1::2])
    assert float(row.split("vs q4_0: q4_k ")[1]) > 0


def test_kquants_ab_gauge_reports_the_fastest_and_slowest_third_of_rounds():
    import llamacpu

    tree = str(Path(os.path.abspath(llamacpu.__file__)).parent.parent)
    cmd = [sys.executable, str(BENCH / "kquants_ab.py"), tree, "--formats", "q4_0,q4_k,q6_k", "--rows", "64",
           "--cols", "2048", "--rounds", "9"]
    out = subprocess.run(cmd + ["--regime", "dram", "--gauge"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    thirds = [ln for ln in lines if ln.startswith(f"  {tree} ") and " third of " in ln]
    # Rounds whose two readings disagree are left out; a noisy host may leave fewer than three.
    assert len(thirds) in (0, 2), out.stdout
    for ln, label in zip(thirds, ("fastest", "slowest")):
        assert f" {label} third of " in ln
        lo, hi = (float(v) for v in ln.split("(gauge ")[1].split(" GB/s")[0].split("-"))
        assert 0 < lo <= hi
        ratios = ln.split("): ")[1].split()
        assert ratios[0::2] == ["q4_k", "q6_k"] and all(float(v) > 0 for v in ratios[1::2])
    bad = subprocess.run(cmd + ["--regime", "l2", "--gauge"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--gauge needs --regime dram" in bad.stderr


def test_attention_bench_compares_builds_per_cache_length():
    import llamacpu

    tree = str(Path(os.path.abspath(llamacpu.__file__)).parent.parent)
    got = run_json(BENCH / "attention.py", tree, tree + "@scalar", "--pos", 8, 40, "--hd", 16, "--rep", 3,
                   "--rounds", 2)
    assert [(r["tree"], r["positions"]) for r in got] == [(t, n) for t in (tree, tree + "@scalar") for n in (8, 40)]
    assert all(r["us"] > 0 and r["vs_first"] > 0 for r in got)
    assert [r["isa"] for r in got][2:] == ["scalar", "scalar"]
    assert got[0]["vs_first"] == pytest.approx(1.0)
