#!/usr/bin/env bash
# Builds llamacpu._core with AddressSanitizer and UndefinedBehaviorSanitizer, in a build
# folder of its own, and runs the kernel and loader tests against that build. Fails on any
# sanitizer report (or failing test). Self-contained: it needs only a Python with the test
# requirements (pytest, numpy, pybind11, ...), cmake and a C++ compiler; the installed
# llamacpu package, if any, is neither used nor touched.
#
#   tests/sanitize.sh [BUILD_DIR]      (default: build/sanitize in the repository)
#
# PYTHON picks the interpreter (default python); SANITIZE_TIMEOUT bounds the test run in
# seconds (default 900); SANITIZE_TESTS replaces the list of test files.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python}"
build="$(mkdir -p "${1:-$repo/build/sanitize}" && cd "${1:-$repo/build/sanitize}" && pwd)"
jobs="$(nproc 2>/dev/null || echo 2)"

# ---- build ---------------------------------------------------------------------------------
command -v cmake >/dev/null 2>&1 || { echo "sanitize: needs cmake (pip install cmake)" >&2; exit 1; }
pybind11_dir="$("$py" -m pybind11 --cmakedir 2>/dev/null)" \
  || { echo "sanitize: needs pybind11 in $py's environment (pip install pybind11)" >&2; exit 1; }
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] && generator=()  # keep the generator the folder was made with
# -O1 -g come from CMakeLists.txt's LLAMACPU_SANITIZE; -fno-sanitize-recover makes every
# UBSan finding fatal (by default it reports and carries on). float-cast-overflow (not part
# of "undefined" in GCC) catches NaN or huge floats converted to integers in the kernels.
# The SIMDe-emulated ISA paths are left out: slow to build, and not built with the sanitizers.
cmake -S "$repo" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Debug \
  -DLLAMACPU_SANITIZE="address,undefined,float-cast-overflow" \
  -DLLAMACPU_EMULATED_ISAS= \
  -DCMAKE_CXX_FLAGS="-fno-sanitize-recover=all" \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$pybind11_dir" >/dev/null
cmake --build "$build" --target _core -j "$jobs"

# ---- an import tree: the sources of this checkout, the sanitized extension -----------------
tree="$build/py"
rm -rf "$tree" && mkdir -p "$tree/llamacpu"
for f in "$repo"/src/llamacpu/*; do ln -s "$f" "$tree/llamacpu/"; done
ln -s "$repo/convert" "$tree/llamacpu/convert"
so="$(find "$build" -maxdepth 1 -name '_core*.so' | head -n 1)"
[ -n "$so" ] || { echo "sanitize: no _core*.so in $build" >&2; exit 1; }
ln -s "$so" "$tree/llamacpu/"
# ldd's output is taken whole first: under pipefail, `ldd | grep -q` fails at random when
# grep stops reading at the first match and ldd, still writing, dies of SIGPIPE.
if command -v ldd >/dev/null 2>&1; then
  deps="$(ldd "$so")"
  case "$deps" in
    *libasan*) ;;
    *) echo "sanitize: $so is not linked with AddressSanitizer" >&2; exit 1 ;;
  esac
fi

# ---- run -----------------------------------------------------------------------------------
cxx="$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")"
asan="$("${cxx:-c++}" -print-file-name=libasan.so)"
stdcxx="$("${cxx:-c++}" -print-file-name=libstdc++.so)"
[ -f "$asan" ] || { echo "sanitize: cannot find libasan.so (compiler ${cxx:-c++})" >&2; exit 1; }
# Python itself is not built with ASan, so the runtime must be loaded first, and libstdc++
# with it: ASan's __cxa_throw interceptor looks for the real one when it starts, and a C++
# exception thrown before libstdc++ was there would abort the process. Leak checking
# would report the interpreter's own allocations; huge allocations a hostile file asks for
# must fail as in a normal run (MemoryError), not abort.
export LD_PRELOAD="$asan $stdcxx"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1

where="$("$py" -c 'import llamacpu._core as c; print(c.__file__)')"
case "$where" in
  "$tree"/*) ;;
  *) echo "sanitize: llamacpu._core came from $where, not the sanitized build (an editable install?)" >&2; exit 1 ;;
esac

read -r -a tests <<< "${SANITIZE_TESTS:-tests/test_kernels.py tests/test_sampler.py tests/test_gguf.py tests/test_hostile_files.py tests/test_lifetime.py}"
log="$build/pytest.log"
cd "$repo"
status=0
timeout "${SANITIZE_TIMEOUT:-900}" "$py" -m pytest -q -p no:cacheprovider -x "${tests[@]}" 2>&1 | tee "$log" \
  || status=$?
# Damaged weights once more on the scalar kernels, whose NaN handling the SIMD tests skip.
if [ "$status" = 0 ] && [ -z "${SANITIZE_TESTS:-}" ]; then
  LLAMACPU_ISA=scalar timeout 300 "$py" -m pytest -q -p no:cacheprovider -x tests/test_hostile_files.py \
    -k "damaged_weights or random_damage or sampler" 2>&1 | tee -a "$log" || status=$?
fi
if grep -qE "AddressSanitizer|LeakSanitizer|runtime error:" "$log"; then
  echo "sanitize: sanitizer reports above (log: $log)" >&2
  exit 1
fi
if [ "$status" != 0 ]; then
  echo "sanitize: tests failed or timed out under the sanitizers (status $status; log: $log)" >&2
  exit "$status"
fi
echo "sanitize: no sanitizer reports"
