#!/usr/bin/env bash
# Cross-compiles tests/native/kernel_check.cpp for AArch64 with the NEON kernel table (static,
# -O2) and runs it under qemu-aarch64 user-mode emulation, so that the Arm path is checked on
# a machine without an Arm CPU.
#
# Usage: tests/native/run_aarch64.sh [build-dir]     (default: a temporary directory)
# Environment: AARCH64_CXX (default aarch64-linux-gnu-g++), QEMU_AARCH64 (default qemu-aarch64).
# Exit status: kernel_check's (0 all kernels agree, 1 a mismatch), 77 when a tool is missing,
# any other non-zero status when the build fails.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cxx=${AARCH64_CXX:-aarch64-linux-gnu-g++}
qemu=${QEMU_AARCH64:-qemu-aarch64}
for tool in "$cxx" "$qemu"; do
    if ! command -v "$tool" >/dev/null; then
        echo "run_aarch64.sh: $tool not found, skipped" >&2
        exit 77
    fi
done

out=${1:-}
if [ -z "$out" ]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"

# The flags CMakeLists.txt gives every kernel unit (no implicit fma contraction: the scalar
# reference must multiply and add separately, as it does in the real build).
flags=(-std=c++17 -O2 -Wall -Wextra -ffp-contract=off -fno-math-errno "-I$root/csrc"
       -DLLAMACPU_HAVE_NEON -DCHECK_TABLE=kNeonKernels)
sources=(tests/native/kernel_check.cpp csrc/kernels_neon.cpp csrc/kquants_neon.cpp csrc/kernels_scalar.cpp
         csrc/kquants_scalar.cpp csrc/quantize.cpp csrc/kquants_quantize.cpp csrc/cpu.cpp)

pids=()
objects=()
for src in "${sources[@]}"; do
    obj="$out/$(basename "$src" .cpp).o"
    objects+=("$obj")
    extra=()
    [ "$src" = tests/native/kernel_check.cpp ] && extra=(-O1)  # the checker need not be fast
    "$cxx" "${flags[@]}" "${extra[@]}" -c "$root/$src" -o "$obj" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed compile ends the script here
"$cxx" -static -pthread -o "$out/kernel_check" "${objects[@]}"

# -L only matters for a dynamically linked binary; harmless for the static one.
"$qemu" -L /usr/aarch64-linux-gnu "$out/kernel_check"
