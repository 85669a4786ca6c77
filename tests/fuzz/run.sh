#!/usr/bin/env bash
# A bounded fuzz run of every loader: tests/fuzz/run.sh [SECONDS] (default 60, shared out
# evenly among the targets). Fails on any finding: a crash, a hang, or an exception other
# than llamacpu's own. Coverage-guided with atheris when it is installed, else a plain
# random-mutation loop (see harness.py). Findings are saved under $FUZZ_ARTIFACTS (default:
# a folder printed at the end).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
total="${1:-60}"
py="${PYTHON:-python}"
targets=(model_file model_meta gguf safetensors torchzip pickle chat_template)
share=$(( total / ${#targets[@]} ))
(( share >= 1 )) || share=1

work="$(mktemp -d "${TMPDIR:-/tmp}/llamacpu-fuzz.XXXXXX")"
export FUZZ_ARTIFACTS="${FUZZ_ARTIFACTS:-$work/artifacts}"
mkdir -p "$FUZZ_ARTIFACTS"
failed=()
for t in "${targets[@]}"; do
  echo "== fuzz_$t (${share}s)"
  # libFuzzer prints every new coverage line; keep the log, show its end.
  if "$py" "$here/fuzz_$t.py" "$share" "$work/$t" > "$work/$t.log" 2>&1; then
    tail -n 3 "$work/$t.log"
  else
    tail -n 40 "$work/$t.log"
    failed+=("$t")
  fi
done
# Scratch files of the targets (in /dev/shm when there is one).
rm -rf /dev/shm/llamacpu-fuzz-* "${TMPDIR:-/tmp}"/llamacpu-fuzz-[!.]* 2>/dev/null || true
if (( ${#failed[@]} )); then
  echo "fuzz: FINDINGS in ${failed[*]}; inputs and logs kept in $work" >&2
  exit 1
fi
rm -rf "$work"
echo "fuzz: ${#targets[@]} targets, ${total}s, no findings"
