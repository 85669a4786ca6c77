"""Runs one fuzz target for a bounded time.

With atheris installed (pip install atheris) the run is coverage-guided: libFuzzer mutates
the seed corpus, guided by the Python code each input reaches. Without it, a plain loop
mutates the seeds at random (bit flips, interesting integers, cuts, splices): weaker, but
the same contract, so the CI step never depends on atheris building on its platform.

The contract: a target may raise llamacpu's own errors (LlamaCPUError), each one line.
Anything else escaping it (another exception, a hang past TIMEOUT seconds) is a finding:
the input is saved under the artifacts folder and the run fails. A crash (segfault, abort)
kills the process, which fails the run as well.

    python tests/fuzz/fuzz_gguf.py SECONDS [WORKDIR]

FUZZ_NO_ATHERIS=1 forces the fallback loop; FUZZ_SEED seeds it; FUZZ_ARTIFACTS is where
findings go.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT = 10  # seconds one input may take
MAX_LEN = 1 << 16

try:
    if os.environ.get("FUZZ_NO_ATHERIS"):  # to run (and test) the fallback where atheris is installed
        raise ImportError
    import atheris
except ImportError:  # the fallback loop below does the job, less cleverly
    atheris = None


def instrumented():
    """Imports inside this block are instrumented for coverage when atheris runs."""
    if atheris is not None:
        return atheris.instrument_imports(include=["llamacpu"])
    return contextlib.nullcontext()


def checked(target):
    """Wraps a target: llamacpu's errors are expected (and must read as one line)."""
    from llamacpu import LlamaCPUError

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except LlamaCPUError as e:
            if "\n" in str(e):
                raise AssertionError(f"error message is not one line: {str(e)!r}") from e

    return one_input


def scratch_dir() -> str:
    """Where targets write their inputs as files: memory when the machine has a tmpfs."""
    shm = "/dev/shm"
    return tempfile.mkdtemp(prefix="llamacpu-fuzz-", dir=shm if os.path.isdir(shm) else None)


def seeds(name: str) -> list:
    folder = HERE / "corpus" / name
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not files:
        sys.exit(f"fuzz_{name}: no seed corpus in {folder} (run tests/fuzz/make_corpus.py)")
    return files


def main(name: str, target) -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    artifacts = Path(os.environ.get("FUZZ_ARTIFACTS", work / "artifacts"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    one_input = checked(target)
    files = seeds(name)
    for f in files:  # every seed must pass on its own, or the corpus is stale
        _run_one(one_input, f.read_bytes(), artifacts, f"seed {f.name}")
    if atheris is not None:
        new = work / "corpus"
        new.mkdir(exist_ok=True)
        # New inputs go to the first folder; the seed folder in the repo stays as it is.
        args = [sys.argv[0], f"-max_total_time={max(1, int(seconds))}", f"-timeout={TIMEOUT}", "-rss_limit_mb=3072",
                f"-max_len={MAX_LEN}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(new),
                str(HERE / "corpus" / name)]
        atheris.Setup(args, one_input)
        atheris.Fuzz()  # exits the process: 0 when time is up, non-zero on a finding
    _random_loop(name, one_input, [f.read_bytes() for f in files], seconds, artifacts)


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang(f"one input took over {TIMEOUT} s")


def _run_one(one_input, data: bytes, artifacts: Path, what: str) -> None:
    # The alarm is ours only for this call: libFuzzer keeps its own SIGALRM timer.
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(TIMEOUT)
    try:
        one_input(data)
    except BaseException:
        signal.alarm(0)
        saved = artifacts / f"crash-{abs(hash(data)):016x}"
        saved.write_bytes(data)
        traceback.print_exc()
        sys.exit(f"FINDING in {what}: input saved as {saved}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def mutate(rng: random.Random, data: bytes, pool: list) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(8)
        at = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a bit
            b[min(at, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # a random byte
            b[min(at, len(b) - 1)] = rng.randrange(256)
        elif op == 2:  # an interesting integer, 1 to 8 bytes wide
            width = rng.choice((1, 2, 4, 8))
            v = rng.choice(INTERESTING) & ((1 << 8 * width) - 1)
            b[at:at + width] = v.to_bytes(width, "little")
        elif op == 3:  # cut the end off
            del b[at:]
        elif op == 4:  # delete a range
            del b[at:at + rng.randrange(1, 64)]
        elif op == 5:  # insert random bytes
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif op == 6 and b:  # copy a range elsewhere
            src = rng.randrange(len(b))
            b[at:at] = b[src:src + rng.randrange(1, 128)]
        elif op == 7:  # splice with another seed
            other = rng.choice(pool)
            b = b[:at] + other[rng.randrange(len(other) + 1):]
    return bytes(b[:MAX_LEN])


def _random_loop(name, one_input, pool, seconds, artifacts) -> None:
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "1")))
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        data = mutate(rng, rng.choice(pool), pool)
        _run_one(one_input, data, artifacts, f"input {n}")
        n += 1
    print(f"fuzz_{name}: {n} inputs in {seconds:g} s (random mutation; pip install atheris for guided fuzzing)")
