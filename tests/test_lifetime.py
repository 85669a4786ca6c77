"""Threads and lifetime in the Python API: many threads on one Llama or on several, close()
from anywhere at any time, what is left behind after close, and memory over many loads.
(test_api.py has the basic cases: two models in two threads, a stream holding the model.)"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

import llamacpu

GREEDY = dict(temperature=0, repeat_penalty=1.0)
PROMPTS = ["Once upon a time", "One day, a little dog", "Lily and Tom", "The sun was hot", "Tim had a red ball"]


@pytest.fixture(scope="module")
def model(stories_models):
    return stories_models["q4_0"]


def load(path, **kw):
    kw.setdefault("n_threads", 1)
    return llamacpu.Llama(path, **kw)


def text_of(out) -> str:
    return out["choices"][0]["text"]


def run_threads(fns, timeout=120):
    """Runs each function in its own thread, all started together; returns their results
    (or the exception each raised)."""
    results = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def worker(i):
        start.wait()
        try:
            results[i] = fns[i]()
        except BaseException as e:  # returned to the test, which decides
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results


def mapped(path) -> int:
    """How many mappings of this process are of path."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(real))


def open_fds(path) -> int:
    real = os.path.realpath(path)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == real
        except OSError:
            pass
    return n


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")


# ---- several Llama objects -------------------------------------------------------------

def test_separate_models_in_threads_match_running_alone(stories_models):
    """Four objects (two dtypes, two per file) in eight threads, with completions, chats,
    streams and logits all at once: each gives what it gives alone."""
    paths = [stories_models["f32"], stories_models["q4_0"]] * 2
    chat = [{"role": "user", "content": "Tell me about a cat"}]

    def work(llm, prompt):
        return (text_of(llm(prompt, max_tokens=24, **GREEDY)),
                llm.create_chat_completion(chat, max_tokens=16, seed=5)["choices"][0]["message"]["content"],
                "".join(text_of(c) for c in llm(prompt, max_tokens=16, stream=True, seed=9)),
                llm.logits(llm.tokenize(prompt)).tobytes())

    alone = []
    for path, prompt in zip(paths, PROMPTS):
        with load(path, n_threads=2) as llm:
            alone.append(work(llm, prompt))
    llms = [load(p, n_threads=2) for p in paths]
    try:
        got = run_threads([lambda i=i: work(llms[i], PROMPTS[i]) for i in range(4)]
                          + [lambda i=i: work(llms[i], PROMPTS[i]) for i in range(4)])
    finally:
        for m in llms:
            m.close()
    for i, g in enumerate(got):
        assert g == alone[i % 4], i


# ---- one Llama, many threads -----------------------------------------------------------

def test_one_model_many_threads_mixed_calls(model):
    """Sixteen threads share one object, each making a different kind of call. Calls are
    serialized: every result is what the call gives alone, the cache never mixes prompts."""
    with load(model, seed=0) as llm:
        tokens = llm.tokenize("The big dog")
        expect = {
            "completion": [text_of(llm(p, max_tokens=20, **GREEDY)) for p in PROMPTS],
            "logits": llm.logits(tokens),
            "generate": list(llm.generate(tokens, max_tokens=12, seed=3)),
            "chat": llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=12, seed=4),
        }

        calls = []
        for i in range(16):
            kind = ("completion", "stream", "logits", "generate", "chat", "tokens", "abandoned", "reset")[i % 8]
            p = PROMPTS[i % len(PROMPTS)]
            calls.append({
                "completion": lambda p=p: ("completion", p, text_of(llm(p, max_tokens=20, **GREEDY))),
                "stream": lambda p=p: ("completion", p, "".join(text_of(c) for c in llm(p, max_tokens=20, stream=True,
                                                                                         **GREEDY))),
                "logits": lambda: ("logits", None, llm.logits(tokens)),
                "generate": lambda: ("generate", None, list(llm.generate(tokens, max_tokens=12, seed=3))),
                "chat": lambda: ("chat", None, llm.create_chat_completion([{"role": "user", "content": "Hi"}],
                                                                        max_tokens=12, seed=4)),
                "tokens": lambda p=p: ("tokens", p, llm.detokenize(llm.tokenize(p, add_bos=False))),
                # A stream read once and dropped: its generator's close releases the model.
                "abandoned": lambda p=p: ("abandoned", p, next(iter(llm(p, max_tokens=50, stream=True)))),
                "reset": lambda: ("reset", None, llm.reset()),
            }[kind])
        for kind, p, got in run_threads(calls * 2):
            assert not isinstance(got, BaseException), repr(got)
            if kind == "completion":
                assert got == expect["completion"][PROMPTS.index(p)]
            elif kind == "logits":
                assert np.array_equal(got, expect["logits"])
            elif kind == "generate":
                assert got == expect["generate"]
            elif kind == "chat":
                assert got["choices"] == expect["chat"]["choices"] and got["usage"] == expect["chat"]["usage"]
            elif kind == "tokens":
                assert got == p
        assert text_of(llm(PROMPTS[0], max_tokens=20, **GREEDY)) == expect["completion"][0]


def test_close_from_another_thread_while_streams_are_open(model):
    """close() neither waits for an open stream (which may never finish) nor breaks it:
    new calls are refused at once, the stream runs to its end, and then all is released."""
    llm = load(model)
    stream = llm("Once upon a time", max_tokens=30, stream=True, **GREEDY)
    first = text_of(next(stream))
    closer = threading.Thread(target=llm.close)
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "close() waited for the stream"
    with pytest.raises(llamacpu.ClosedError):
        llm.tokenize("x")
    rest = "".join(text_of(c) for c in stream)
    assert len(first + rest) > 20
    assert llm._model is None  # released when the stream ended


def test_close_while_other_threads_call(model):
    """Threads keep calling while one closes: each call either completes normally or gets
    ClosedError; nothing else, no hang, and the model is released once they are done."""
    llm = load(model)

    def caller(i):
        outcomes = []
        for _ in range(40):
            try:
                if i % 2:
                    outcomes.append(text_of(llm(PROMPTS[i % 5], max_tokens=8, **GREEDY)))
                else:
                    outcomes.append("".join(text_of(c) for c in llm(PROMPTS[i % 5], max_tokens=8, stream=True)))
            except llamacpu.ClosedError as e:
                assert "closed" in str(e)
                outcomes.append(None)
        return outcomes

    def closer():
        time.sleep(0.05)
        for _ in range(3):
            llm.close()  # idempotent, from several threads
        return "closed"

    results = run_threads([lambda i=i: caller(i) for i in range(6)] + [closer, closer])
    for r in results[:6]:
        assert not isinstance(r, BaseException), repr(r)
        assert r[-1] is None  # refused after close, and from then on
        assert all(x is None for x in r[r.index(None):])
        assert all(isinstance(x, str) and x for x in r[:r.index(None)])
    assert llm._model is None


def test_use_after_close_raises_a_clear_error(model):
    from llamacpu.sampling import SamplingParams

    llm = load(model)
    session = llm.chat_session()
    llm.close()
    calls = [lambda: list(session.send("Hi", SamplingParams(), 4)),
             lambda: list(llm.chat_session().send("Hi", SamplingParams(), 4)),
             lambda: llm.isa, lambda: llm.n_threads, lambda: llm.token_bos() and llm.tokenize("x")]
    for call in calls:
        with pytest.raises(llamacpu.ClosedError, match="closed"):
            call()
    assert llm.n_vocab == 512 and llm.config.dim == 64  # plain facts about the file still answer


# ---- what close() leaves behind ------------------------------------------------------------

@needs_proc
@pytest.mark.parametrize("how", ["close", "with", "drop", "close-in-stream", "failed-load"])
def test_mapping_and_file_handles_are_released(tmp_path, model, how):
    path = tmp_path / "m.bin"
    path.write_bytes(model.read_bytes())
    assert mapped(path) == 0 and open_fds(path) == 0
    if how == "failed-load":
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF  # in the metadata
        path.write_bytes(data)
        with pytest.raises(llamacpu.ModelFileError):
            load(path)
    else:
        llm = load(path)
        assert mapped(path) >= 1
        llm("Once", max_tokens=4)
        if how == "close":
            llm.close()
        elif how == "with":
            with llm:
                llm.tokenize("x")
        elif how == "close-in-stream":
            stream = llm("Once", max_tokens=8, stream=True)
            next(stream)
            llm.close()
            assert mapped(path) >= 1  # the stream still reads the weights
            list(stream)
        del llm
    gc.collect()
    assert mapped(path) == 0 and open_fds(path) == 0


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs_proc
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer keeps freed memory in quarantine (tests/sanitize.sh)")
def test_load_generate_close_cycles_do_not_grow_memory(model):
    def cycle(i):
        with load(model, n_ctx=64) as llm:
            llm(PROMPTS[i % 5], max_tokens=8, seed=i)
            llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)

    for i in range(20):  # warm-up: imports, caches, allocator pools
        cycle(i)
    gc.collect()
    before = rss()
    for i in range(100):
        cycle(i)
    gc.collect()
    grown = rss() - before
    assert grown < 10 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 100 cycles"
