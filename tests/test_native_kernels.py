"""Kernel tables checked by a standalone C++ program, tests/native/kernel_check.cpp, against
the scalar reference, with no Python in between: the x86 tables natively, and the NEON table
cross-compiled for AArch64 and run under qemu-aarch64 (tests/native/run_aarch64.sh), so the Arm
path is tested on x86 machines. Each check builds from the repository's csrc/ and skips where
the compiler, the emulator or the CPU feature is missing."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NATIVE = REPO / "tests" / "native"
SKIPPED = 77  # kernel_check's status when this CPU cannot run the table

# The flags CMakeLists.txt gives every kernel unit: without -ffp-contract=off the compiler could
# fuse the scalar reference's multiply and add.
COMMON = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", f"-I{CSRC}"]


class X86Table:
    def __init__(self, symbol, define, sources, flags, cpu_flags=(), needs_header=None):
        self.symbol = symbol  # the KernelTable to check
        self.define = define  # what makes kernels.h declare it
        self.sources = sources  # its units: kernels_*.cpp and the K-quant kernels kquants_*.cpp
        self.flags = flags  # that unit's own flags, as in CMakeLists.txt
        self.cpu_flags = cpu_flags  # _core.cpu_features() keys this CPU needs
        self.needs_header = needs_header


X86_TABLES = {
    "avx2": X86Table("kAvx2Kernels", "LLAMACPU_HAVE_AVX2", ("kernels_avx2.cpp", "kquants_avx2.cpp"),
                     ["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c")),
    "avx512": X86Table("kAvx512Kernels", "LLAMACPU_HAVE_AVX512", ("kernels_avx512.cpp", "kquants_avx512.cpp"),
                       ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
                       ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "fma", "f16c")),
    # The AVX-512 code through SIMDe, built with FMA so that SIMDe's fused multiply-adds are
    # fused as the real instructions are: bitwise checks of the AVX-512 logic on AVX2 machines.
    "avx512-emu": X86Table("kAvx512EmuKernels", "LLAMACPU_HAVE_AVX512_EMU",
                           ("kernels_avx512_emu.cpp", "kquants_avx512_emu.cpp"), ["-O1", "-mavx2", "-mfma", "-mf16c"],
                           ("avx2", "fma", "f16c"), needs_header="simde/x86/avx512.h"),
    # The NEON code through SIMDe (CMakeLists.txt builds the emulated units at -O1).
    "neon-emu": X86Table("kNeonEmuKernels", "LLAMACPU_HAVE_NEON_EMU", ("kernels_neon_emu.cpp", "kquants_neon_emu.cpp"),
                         ["-O1"],
                         needs_header="simde/arm/neon.h"),
}


def compile_all(cxx, jobs, cwd):
    """Runs the (argv, ...) compile jobs in parallel; fails the test with the first error."""
    procs = [subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv in jobs]
    for argv, p in zip(jobs, procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{' '.join(argv)} failed:\n{out}"


def header_found(cxx, header):
    r = subprocess.run([cxx, "-E", "-x", "c++", "-"], input=f"#include <{header}>\n", capture_output=True, text=True)
    return r.returncode == 0


def check_output(result):
    """Asserts on kernel_check's exit status, showing its report on a mismatch."""
    if result.returncode == SKIPPED:
        pytest.skip(result.stdout.strip() or result.stderr.strip())
    assert result.returncode == 0, f"kernel_check found mismatches:\n{result.stdout}{result.stderr}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 16 and all(" ok " in line for line in lines), result.stdout


@pytest.mark.parametrize("name", sorted(X86_TABLES))
def test_x86_table_matches_scalar(name, tmp_path):
    table = X86_TABLES[name]
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("not an x86-64 machine")
    if table.cpu_flags:
        from llamacpu import _core

        features = _core.cpu_features()
        missing = [f for f in table.cpu_flags if not features.get(f)]
        if missing:
            pytest.skip(f"this CPU lacks {', '.join(missing)}")
    if table.needs_header and not header_found(cxx, table.needs_header):
        pytest.skip(f"<{table.needs_header}> not found")

    defines = [f"-D{table.define}", f"-DCHECK_TABLE={table.symbol}"]
    units = {
        NATIVE / "kernel_check.cpp": ["-O1"],  # the checker itself need not be fast to build or run
        **{CSRC / src: table.flags for src in table.sources},
        CSRC / "kernels_scalar.cpp": [],
        CSRC / "kquants_scalar.cpp": [],
        CSRC / "quantize.cpp": [],
        CSRC / "kquants_quantize.cpp": [],
        CSRC / "cpu.cpp": [],
    }
    if table.define == "LLAMACPU_HAVE_AVX2":  # the converter's scale search has an AVX2 build too
        units[CSRC / "kquants_quantize_avx2.cpp"] = ["-mavx2", "-mf16c"]
    objects = [tmp_path / f"{src.stem}.o" for src in units]
    compile_all(cxx, [[cxx, *COMMON, *defines, *flags, "-c", str(src), "-o", str(obj)]
                      for (src, flags), obj in zip(units.items(), objects)], tmp_path)
    exe = tmp_path / "kernel_check"
    compile_all(cxx, [[cxx, "-pthread", "-o", str(exe), *map(str, objects)]], tmp_path)
    check_output(subprocess.run([str(exe)], capture_output=True, text=True, timeout=300))


def test_neon_table_matches_scalar_under_qemu(tmp_path):
    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")
    result = subprocess.run(["bash", str(NATIVE / "run_aarch64.sh"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode not in (0, 1, SKIPPED):
        pytest.fail(f"run_aarch64.sh could not build the check:\n{result.stdout}{result.stderr}")
    check_output(result)
    assert "neon vs scalar" in result.stdout
