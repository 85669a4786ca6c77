"""The llamacpu.Llama API on stories260K: options, lifetime, tokens, completions (plain,
streamed, chat), sampling controls, errors, threads, and the chat session's cache reuse."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import llamacpu
from llamacpu import _core

from reference import STORIES_GREEDY_TEXT as KNOWN_TEXT

GREEDY = dict(temperature=0, repeat_penalty=1.0)


def load(path, **kw):
    kw.setdefault("n_threads", 1)
    return llamacpu.Llama(path, **kw)


@pytest.fixture(scope="module")
def model_path(stories_models):
    return stories_models["f32"]


@pytest.fixture
def llm(model_path):
    with load(model_path, seed=0) as m:
        yield m


def text_of(out) -> str:
    return out["choices"][0]["text"]


# ---- construction and lifetime ---------------------------------------------------------

def test_constructor_options(model_path, capsys):
    isa = _core.usable_isas()[-1]
    with llamacpu.Llama(model_path, n_ctx=100, n_threads=2, n_batch=9, seed=3, isa=isa, kv_f16=True,
                        chat_format="chatml", verbose=True) as llm:
        assert llm.n_ctx == 100 and llm.n_threads == 2 and llm.isa == isa
        assert llm._model.n_batch == 9
        assert llm.chat_format.name == "chatml"
        assert llm.n_vocab == 512 and llm.config.dim == 64 and llm.config.n_layers == 5
        assert llm.token_bos() == 1 and llm.token_eos() == 2
        assert llm.metadata["quantization"] == "f32"
        assert llm.load_seconds > 0
    err = capsys.readouterr().err
    assert "llamacpu: loaded" in err and isa in err and "n_ctx 100" in err


def test_defaults(model_path, capsys):
    with llamacpu.Llama(model_path) as llm:
        assert llm.n_ctx == 512  # the model's max_seq_len
        assert llm.n_threads >= 1
        assert llm.isa in _core.usable_isas()
        assert llm.chat_format.name == "plain"  # recorded by the converter for a base model
    assert capsys.readouterr().err == ""  # quiet unless verbose


@pytest.mark.parametrize("kw", [dict(n_ctx=1), dict(n_ctx=2.5), dict(n_threads=-1), dict(n_threads="2"),
                                dict(n_batch=0), dict(isa="no-such-isa"), dict(seed="x"), dict(seed=-5),
                                dict(chat_format="no-such-template")])
def test_bad_constructor_options_raise_usage_error(model_path, kw):
    with pytest.raises(llamacpu.UsageError):
        llamacpu.Llama(model_path, **kw)


def test_context_manager_closes(model_path):
    with load(model_path) as llm:
        assert llm.tokenize("a")
    with pytest.raises(llamacpu.ClosedError):
        llm.tokenize("a")


def test_close_is_idempotent_and_use_after_close_raises(model_path):
    llm = load(model_path)
    llm.close()
    llm.close()
    assert issubclass(llamacpu.ClosedError, ValueError)
    calls = [lambda: llm.tokenize("x"), lambda: llm.detokenize([1, 2]), lambda: llm.logits([1]),
             lambda: llm("x", max_tokens=2), lambda: llm.reset(),
             lambda: llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2),
             lambda: next(iter(llm("x", max_tokens=2, stream=True))),
             lambda: list(llm.generate([1], max_tokens=2))]
    for call in calls:
        with pytest.raises(llamacpu.ClosedError):
            call()


def test_close_inside_an_open_stream_waits_for_the_stream(model_path):
    """A with-block left while a stream is still open used to deadlock in close()."""
    with load(model_path) as llm:
        stream = llm("Once", max_tokens=5, stream=True, **GREEDY)
        first = next(stream)
    with pytest.raises(llamacpu.ClosedError):
        llm.tokenize("x")
    rest = [text_of(c) for c in stream]  # the open stream finishes on its own
    assert text_of(first) + "".join(rest) == " upon a time, there"
    assert llm._model is None  # released when the stream ended


# ---- tokens and logits -----------------------------------------------------------------

def test_tokenize(llm):
    ids = llm.tokenize("Once upon a time")
    assert ids == [1, 403, 407, 261, 378]
    assert llm.tokenize(b"Once upon a time") == ids
    assert llm.tokenize("Once upon a time", add_bos=False) == ids[1:]
    assert llm.tokenize("") == [1]
    assert all(isinstance(i, int) for i in ids)


@pytest.mark.parametrize("text", ["Once upon a time", "Lily saw a big, red ball.\nShe ran!", "Tom's café: 3€ ☕"])
def test_detokenize_round_trip(llm, text):
    assert llm.detokenize(llm.tokenize(text)) == text
    assert llm.detokenize(llm.tokenize(text, add_bos=False)) == text


def test_logits_shape_and_dtype(llm):
    out = llm.logits([1, 403, 407])
    assert out.shape == (3, 512) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert llm.logits([]).shape == (0, 512)
    assert np.array_equal(llm.logits(np.array([1, 403, 407])), out)


@pytest.mark.parametrize("tokens", [[1, 512], [-1], ["a"], [1.5, None]])
def test_bad_tokens_raise_usage_error(llm, tokens):
    with pytest.raises(llamacpu.UsageError):
        llm.logits(tokens)


def test_logits_longer_than_context_raise(model_path):
    with load(model_path, n_ctx=16) as llm:
        with pytest.raises(llamacpu.UsageError):
            llm.logits([1] * 17)


# ---- completions -----------------------------------------------------------------------

def check_completion_shape(out, model_path):
    assert out["id"].startswith("cmpl-")
    assert out["object"] == "text_completion"
    assert isinstance(out["created"], int) and out["created"] > 1_600_000_000
    assert out["model"] == str(model_path)
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert isinstance(choice["text"], str) and choice["index"] == 0 and choice["logprobs"] is None


def test_completion_dict(llm, model_path):
    prompt = "Once upon a time"
    out = llm.create_completion(prompt, max_tokens=12, **GREEDY)
    check_completion_shape(out, model_path)
    assert out["choices"][0]["finish_reason"] == "length"
    u = out["usage"]
    assert u == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert text_of(out) == KNOWN_TEXT[len(prompt):len(prompt) + len(text_of(out))]  # continuation only
    assert len(llm.tokenize(text_of(out), add_bos=False)) in range(10, 15)
    assert llm(prompt, max_tokens=12, **GREEDY)["choices"] == out["choices"]  # __call__ is the same


def test_completion_from_token_ids(llm):
    by_text = llm("Once upon a time", max_tokens=8, **GREEDY)
    by_ids = llm([1, 403, 407, 261, 378], max_tokens=8, **GREEDY)
    assert text_of(by_ids) == text_of(by_text)


def test_empty_prompt_starts_from_bos(llm):
    assert text_of(llm("", max_tokens=64, **GREEDY)) == KNOWN_TEXT


def test_stream_chunks_join_to_the_plain_text(llm, model_path):
    kw = dict(max_tokens=40, temperature=0.9, seed=11)
    whole = llm("Once upon a time", **kw)
    chunks = list(llm("Once upon a time", stream=True, **kw))
    assert len(chunks) > 5
    for c in chunks:
        check_completion_shape(c, model_path)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["choices"][0]["finish_reason"] is None and "usage" not in c for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert "".join(text_of(c) for c in chunks) == text_of(whole)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", ["Lily", ["park", "zzz"], [" girl named"]])
def test_stop_strings(llm, stream, stop):
    out = llm("", max_tokens=64, stop=stop, stream=stream, **GREEDY)
    if stream:
        chunks = list(out)
        text, reason = "".join(text_of(c) for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
        usage = chunks[-1]["usage"]
    else:
        text, reason, usage = text_of(out), out["choices"][0]["finish_reason"], out["usage"]
    first = min(KNOWN_TEXT.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in KNOWN_TEXT)
    assert text == KNOWN_TEXT[:first]
    assert reason == "stop"
    assert usage["completion_tokens"] < 64


def test_stop_string_not_in_text_runs_to_length(llm):
    out = llm("", max_tokens=20, stop=["zebra"], **GREEDY)
    assert out["choices"][0]["finish_reason"] == "length"
    assert KNOWN_TEXT.startswith(text_of(out))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ends_generation_unseen(llm, stream):
    # stories260K separates stories with BOS and never writes its EOS token, so the test makes
    # "." a stop token: generation ends on it, with reason "stop", and it never shows.
    period = llm.tokenize(".", add_bos=False)[-1]
    llm.tokenizer.stop_ids = frozenset({period})
    out = llm("", max_tokens=64, stream=stream, **GREEDY)
    if stream:
        chunks = list(out)
        text, last = "".join(text_of(c) for c in chunks), chunks[-1]
    else:
        text, last = text_of(out), out
    assert text == "Once upon a time, there was a little girl named Lily"
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"]["completion_tokens"] == len(llm.tokenize(text + ".", add_bos=False))


def test_same_seed_same_text_and_different_seed_different_text(llm):
    kw = dict(max_tokens=32, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = text_of(llm("Once upon a time", seed=1, **kw))
    b = text_of(llm("Once upon a time", seed=1, **kw))
    c = text_of(llm("Once upon a time", seed=2, **kw))
    assert a == b
    assert a != c


def test_constructor_seed_makes_runs_repeatable(model_path):
    texts = []
    for _ in range(2):
        with load(model_path, seed=1234) as llm:
            texts.append([text_of(llm("Once", max_tokens=16, temperature=1.0)) for _ in range(2)])
    assert texts[0] == texts[1]
    assert texts[0][0] != texts[0][1]  # the generator goes on between calls


@pytest.mark.parametrize("max_tokens", [1, 3, 17])
def test_max_tokens(llm, max_tokens):
    out = llm("Once upon a time", max_tokens=max_tokens, temperature=0.8, seed=5)
    assert out["usage"]["completion_tokens"] == max_tokens
    assert out["choices"][0]["finish_reason"] == "length"


def test_max_tokens_none_fills_the_context(model_path):
    with load(model_path, n_ctx=24) as llm:
        out = llm("Once upon a time", max_tokens=None, **GREEDY)
    assert out["usage"]["completion_tokens"] == 24 - 5


def test_temperature_zero_is_deterministic(llm):
    texts = {text_of(llm("One day", max_tokens=24, temperature=0, seed=s)) for s in (1, 2, 3)}
    assert len(texts) == 1


@pytest.mark.parametrize("kw", [dict(temperature="hot"), dict(temperature=-1), dict(temperature=None),
                                dict(top_k=1.5), dict(top_k=-1), dict(top_k=True), dict(seed="7"),
                                dict(seed=1.0), dict(seed=-2), dict(top_p=2.0), dict(min_p="0"),
                                dict(repeat_penalty=0), dict(stop=5), dict(stop=["a", 1]),
                                dict(max_tokens="8")])
def test_bad_sampling_options_raise_usage_error(llm, kw):
    with pytest.raises(llamacpu.UsageError):
        llm("Once", **kw)
    with pytest.raises(llamacpu.UsageError):
        list(llm("Once", stream=True, **kw))


# ---- chat completions ------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me about a cat."}]


def test_chat_completion_dict(llm, model_path):
    out = llm.create_chat_completion(MESSAGES, max_tokens=20, seed=3)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == str(model_path) and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 0 < u["completion_tokens"] <= 20
    # The plain template: BOS, the system text, "User: ...", "Assistant:".
    rendered = llm.tokenize("You tell short stories.\n\nUser: Tell me about a cat.\nAssistant:")
    assert u["prompt_tokens"] == len(rendered)


def test_chat_completion_stream(llm):
    kw = dict(max_tokens=20, seed=3)
    whole = llm.create_chat_completion(MESSAGES, **kw)
    chunks = list(llm.create_chat_completion(MESSAGES, stream=True, **kw))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert all("role" not in d for d in deltas[1:])
    assert all(set(d) <= {"role", "content"} for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    content = "".join(d.get("content", "") for d in deltas)
    assert content.strip() == whole["choices"][0]["message"]["content"]


def test_chat_stops_at_next_user_turn(llm):
    # The plain template's stop string: an answer never runs into a made-up "User:" turn.
    for seed in range(4):
        out = llm.create_chat_completion(MESSAGES, max_tokens=60, temperature=1.0, seed=seed)
        assert "User:" not in out["choices"][0]["message"]["content"]


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "hi"}], [{"role": "robot", "content": "hi"}],
                                      [{"role": "user", "content": 5}]])
def test_bad_chat_messages_raise_usage_error(llm, messages):
    with pytest.raises(llamacpu.UsageError):
        llm.create_chat_completion(messages, max_tokens=2)


# ---- errors opening a model ------------------------------------------------------------

def test_missing_model_raises_model_not_found(tmp_path):
    with pytest.raises(llamacpu.ModelNotFoundError) as e:
        llamacpu.Llama(tmp_path / "nope.bin")
    assert isinstance(e.value, OSError)
    assert "nope.bin" in str(e.value)


def test_folder_as_model_raises_model_file_error(tmp_path):
    with pytest.raises(llamacpu.ModelFileError):
        llamacpu.Llama(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\0" * 4096])
def test_garbage_file_raises_model_file_error(tmp_path, content):
    p = tmp_path / "garbage.bin"
    p.write_bytes(content)
    with pytest.raises(llamacpu.ModelFileError):
        llamacpu.Llama(p)


def test_truncated_model_raises_model_file_error(tmp_path, model_path):
    p = tmp_path / "cut.bin"
    p.write_bytes(model_path.read_bytes()[:-5000])
    with pytest.raises(llamacpu.ModelFileError):
        llamacpu.Llama(p)


# ---- threads ---------------------------------------------------------------------------

def run_threads(fns):
    results, errors = [None] * len(fns), []

    def worker(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # reported below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    return results


def test_two_models_in_two_threads_match_running_alone(stories_models):
    prompts = {"f32": "Once upon a time", "q4_0": "One day, a little dog"}
    alone = {}
    for dtype, prompt in prompts.items():
        with load(stories_models[dtype], n_threads=2) as llm:
            alone[dtype] = text_of(llm(prompt, max_tokens=32, **GREEDY))
    llms = {dtype: load(stories_models[dtype], n_threads=2) for dtype in prompts}
    try:
        fns = [lambda d=d: [text_of(llms[d](prompts[d], max_tokens=32, **GREEDY)) for _ in range(2)]
               for d in prompts]
        together = run_threads(fns)
    finally:
        for m in llms.values():
            m.close()
    for dtype, texts in zip(prompts, together):
        assert texts == [alone[dtype]] * 2


def test_one_model_shared_by_threads_serializes_calls(llm):
    prompts = ["Once upon a time", "One day", "Lily and Tom", "The sun"]
    alone = [text_of(llm(p, max_tokens=24, **GREEDY)) for p in prompts]
    alone_logits = llm.logits(llm.tokenize("The big dog"))
    fns = [lambda p=p: text_of(llm(p, max_tokens=24, **GREEDY)) for p in prompts * 2]
    fns += [lambda: llm.logits(llm.tokenize("The big dog"))] * 2
    fns += [lambda p=p: "".join(text_of(c) for c in llm(p, max_tokens=24, stream=True, **GREEDY)) for p in prompts]
    got = run_threads(fns)
    assert got[:8] == alone * 2
    assert all(np.array_equal(g, alone_logits) for g in got[8:10])
    assert got[10:] == alone


def test_call_inside_open_stream_raises_busy(llm):
    stream = llm("Once upon a time", max_tokens=10, stream=True, **GREEDY)
    next(stream)
    for call in (lambda: llm.tokenize("x"), lambda: llm("x", max_tokens=2), lambda: llm.logits([1])):
        with pytest.raises(llamacpu.BusyError):
            call()
    stream.close()
    assert llm.tokenize("Once", add_bos=False) == [403]  # usable again


def test_other_thread_waits_for_an_open_stream(llm):
    stream = llm("Once upon a time", max_tokens=10, stream=True, **GREEDY)
    next(stream)
    done = threading.Event()
    t = threading.Thread(target=lambda: (llm.tokenize("x"), done.set()))
    t.start()
    assert not done.wait(0.3)  # blocked: the stream holds the model
    rest = list(stream)
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    assert done.wait(10)
    t.join()


# ---- chat session ------------------------------------------------------------------------

def test_chat_session_evaluates_only_new_tokens(llm):
    from llamacpu.sampling import SamplingParams

    params = SamplingParams.checked(0.8, 40, 0.95, 0.05, 1.0, 3)
    evaluated = []
    forward = llm._model.forward

    def counting_forward(tokens, pos0, **kw):
        evaluated.append((len(tokens), pos0))
        return forward(tokens, pos0, **kw)

    llm._model.forward = counting_forward
    session = llm.chat_session(system="You tell stories.", template="plain")
    first = "".join(session.send("Hello there", params, max_tokens=20))
    assert first
    n_first = llm._n_past
    prompt1 = llm.tokenize("You tell stories.\n\nUser: Hello there\nAssistant:")
    assert sum(n for n, _ in evaluated) == len(prompt1) + 19  # the 20th token is not evaluated yet
    evaluated.clear()

    message = "Tell me more about the dog"
    second = "".join(session.send(message, params, max_tokens=20))
    assert second
    new_text = llm.tokenize(f"\nUser: {message}\nAssistant:", add_bos=False)
    # Turn 2 starts where turn 1 ended: one batch (the held-back last answer token and the new
    # message) at the end of the cache, then one token at a time.
    assert evaluated[0][1] == n_first
    assert abs(evaluated[0][0] - (1 + len(new_text))) <= 2
    assert all(n == 1 for n, _ in evaluated[1:])
    assert llm._n_past == n_first + evaluated[0][0] + 19
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[-1]["content"] == second.strip()
