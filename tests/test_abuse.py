"""Chat and generate under abuse: input far longer than the context, odd bytes, Ctrl-C and
Ctrl-D on a real terminal, a reader that goes away, and streamed text that must never split
a character. The CLI runs in a child process (on a pseudo-terminal where a terminal matters);
the streaming checks drive the API with chosen token sequences."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import llamacpu
from llamacpu.sampling import SamplingParams
from llamacpu.tokenizer import StreamDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
import seeds  # noqa: E402
from test_cli import cli_env, run_cli  # noqa: E402

LONG = "The little dog ran to the park and played with a red ball all day long. " * 60  # ~1000 tokens


def assert_clean_exit(proc) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err, err
    return err


@pytest.fixture(scope="module")
def model(stories_models):
    return stories_models["q4_0"]


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """stories260K without an end-of-text token: its answers go on until interrupted."""
    return seeds.write_endless_model(tmp_path_factory.mktemp("endless") / "endless.bin")


# ---- input longer than the context -------------------------------------------------------

def test_generate_prompt_far_longer_than_the_context(model):
    proc = run_cli("generate", model, LONG, "--ctx", "64", "-n", "16", "-t", "1", "--seed", "1")
    err = assert_clean_exit(proc)
    assert "longer than the context (64)" in err
    assert len(proc.stdout.decode().strip()) > 0


def test_chat_messages_far_longer_than_the_context(model):
    stdin = f"{LONG}\nHi\n{LONG}\n".encode()
    proc = run_cli("chat", model, "--ctx", "64", "-n", "12", "-t", "1", "--seed", "2", stdin=stdin)
    err = assert_clean_exit(proc)
    assert err.count("longer than the context") == 2  # the first message, then the third
    assert len(proc.stdout.decode().strip()) > 0


def test_chat_system_prompt_longer_than_the_context(model):
    proc = run_cli("chat", model, "--ctx", "64", "-n", "40", "-t", "1", "--seed", "3", "--system", LONG,
                   stdin=b"Hello\nTell me more\nAnd then?\n")
    err = assert_clean_exit(proc)
    assert "longer than the context" in err
    assert len(proc.stdout.decode().strip()) > 0


@pytest.mark.parametrize("n_ctx", [2, 3, 4, 8, 16, 64])
def test_chat_session_in_tiny_contexts(model, n_ctx):
    """Long and short messages, a long system prompt, long answers: the cache never
    overflows, whatever the context size."""
    params = SamplingParams.checked(0.8, 40, 0.95, 0.05, 1.1, 7)
    with llamacpu.Llama(model, n_ctx=n_ctx, n_threads=1) as llm:
        for system in (None, LONG[:300]):
            session = llm.chat_session(system=system)
            for message, max_tokens in ((LONG, 5), ("Hi", None), ("", 3), (LONG[:200], 2 * n_ctx), ("Bye", 1)):
                text = "".join(session.send(message, params, max_tokens))
                text.encode("utf-8")
                assert 0 < llm._n_past <= n_ctx
        out = llm(LONG, max_tokens=3 * n_ctx, temperature=0.8, seed=1)
        assert out["usage"]["completion_tokens"] >= 1


# ---- odd input ---------------------------------------------------------------------------

def test_chat_odd_bytes_and_line_endings(model):
    stdin = (b"nul\0byte\r\n" + b"\xed\xa0\x80 surrogate bytes\n" + b"\xf0\x9f\x98\n" + b"\t \x0b\x0c\n"
             + "é".encode() * 500 + b"\n" + b"continued \\\n")  # a continuation line, then end of input
    proc = run_cli("chat", model, "-n", "6", "-t", "1", "--seed", "1", stdin=stdin)
    assert_clean_exit(proc)
    assert len(proc.stdout.decode("utf-8").strip()) > 0


def test_generate_prompt_with_invalid_utf8_argument(model):
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates, which the
    tokenizer libraries refuse; they become U+FFFD instead of an internal error."""
    proc = subprocess.run([sys.executable, "-m", "llamacpu.cli", "generate", str(model).encode(),
                           b"\xff\xfe Once \xc3", b"-n", b"4", b"-t", b"1"], capture_output=True, timeout=60,
                          env=cli_env())
    assert_clean_exit(proc)


def test_chat_into_a_closed_pipe_exits_quietly(endless):
    p = subprocess.Popen([sys.executable, "-m", "llamacpu.cli", "chat", str(endless), "-n", "100000", "-t", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        p.stdin.write(b"Tell me a story\n")
        p.stdin.flush()
        head = p.stdout.read(10)
        p.stdout.close()
        rc = p.wait(timeout=60)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert len(head) == 10
    assert rc == 0 and err == b""


# ---- a real terminal: Ctrl-C and Ctrl-D ----------------------------------------------------

class Terminal:
    """The CLI on a pseudo-terminal, as a person at a keyboard runs it."""

    def __init__(self, *args):
        env = cli_env()
        pid, fd = pty.fork()
        if pid == 0:  # the child: default signal handling, whatever the test runner set, then exec
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(sys.executable, [sys.executable, "-m", "llamacpu.cli", *map(str, args)], env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.out, self.seen = pid, fd, b"", 0

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child has gone
            return False
        self.out += chunk
        return bool(chunk)

    def expect(self, text: bytes, timeout: float = 60) -> None:
        """Waits until text appears after what was expected last."""
        end = time.monotonic() + timeout
        while text not in self.out[self.seen:]:
            left = end - time.monotonic()
            if left <= 0 or not self.read(min(1.0, left)) and self.exited():
                raise AssertionError(f"no {text!r} in {self.out[-2000:]!r}")
        self.seen = self.out.index(text, self.seen) + len(text)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def exited(self) -> bool:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.status = status
        return bool(pid) or hasattr(self, "status")

    def exit_code(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while not self.exited():
            self.read(0.1)
            if time.monotonic() > end:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"still running: {self.out[-2000:]!r}")
        os.close(self.fd)
        return os.waitstatus_to_exitcode(self.status)


@pytest.mark.parametrize("key, codes", [(b"\x04", (0,)), (b"\x03", (0, 130))])
def test_ctrl_d_or_ctrl_c_at_an_empty_prompt(model, key, codes):
    term = Terminal("chat", model, "-t", "1")
    term.expect(b"> ")
    # The prompt is written just before the read begins; a Ctrl-C in between is seen by
    # Python only at the next interrupted call (a CPython quirk no person is fast enough for).
    time.sleep(0.5)
    term.send(key)
    assert term.exit_code() in codes
    assert b"Traceback" not in term.out


def test_ctrl_c_stops_the_answer_and_keeps_the_chat(endless):
    term = Terminal("chat", endless, "-n", "100000", "-t", "1", "--seed", "4")
    term.expect(b"> ")
    term.send(b"Tell me a story\r")
    term.expect(b"Tell me a story")  # the terminal's echo
    term.read(5)  # the answer has begun (it would go on for minutes)
    time.sleep(0.2)
    term.send(b"\x03")
    term.expect(b"[answer stopped]")
    term.expect(b"> ")
    term.send(b"And then?\r")  # the chat goes on
    term.expect(b"And then?")
    answer_start = len(term.out)
    time.sleep(0.5)
    term.read(1)
    term.send(b"\x03")
    term.expect(b"[answer stopped]")
    assert len(term.out[answer_start:term.seen].strip()) > len(b"[answer stopped]")  # it answered
    term.expect(b"> ")
    term.send(b"\x04")
    assert term.exit_code() == 0
    assert b"Traceback" not in term.out and b"error" not in term.out


# ---- streamed text never splits a character ------------------------------------------------

TEXTS = ["café", "naïve façade", "漢字かな交じり文", "emoji 🙂👍🏽 and 𝄞", "mixed é漢🙂 text", "ÿ"]


def byte_tokens(tok, text: str, rng) -> list:
    """Tokens for text: ASCII runs as ordinary pieces, other characters as byte pieces, with
    control tokens (which decode to nothing) dropped in at random."""
    ids = []
    for ch in text:
        if ch.isascii():
            ids += tok.encode(ch, add_bos=False)[-1:] if ch != " " else [tok.token_id("\u2581")]
        else:
            ids += [tok.token_id(f"<0x{b:02X}>") for b in ch.encode("utf-8")]
        if rng.random() < 0.2:
            ids.append(tok.bos_id)
    return ids


@pytest.fixture(scope="module")
def llm(model):
    with llamacpu.Llama(model, n_threads=1, seed=0) as m:
        yield m


def assert_whole_characters(pieces, expected: str):
    for p in pieces:
        assert "\ufffd" not in p, pieces
        p.encode("utf-8")  # no lone surrogates either
    assert "".join(pieces) == expected


def test_stream_decoder_never_splits_a_character(llm):
    tok = llm.tokenizer
    rng = np.random.default_rng(0)
    for text in TEXTS:
        ids = byte_tokens(tok, text, rng)
        assert all(i is not None for i in ids)
        dec = StreamDecoder(tok, at_start=False)
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        expected = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8")
        assert_whole_characters(pieces, expected)
        assert expected.replace(" ", "") == text.replace(" ", "")


def test_stream_decoder_with_invalid_bytes(llm):
    tok = llm.tokenizer
    bad = [tok.token_id(f"<0x{b:02X}>") for b in b"ok \xc3( \x80 \xf0\x9f\x98 end \xe2\x82"]
    dec = StreamDecoder(tok, at_start=False)
    text = "".join(dec.push(i) for i in bad) + dec.flush()
    assert text.startswith("ok ") and " end " in text and text.count("\ufffd") == 4


class ScriptedSampler:
    """Stands in for the C++ sampler: returns the given tokens, then end of text."""

    def __init__(self, ids, eos):
        self.ids, self.eos = list(ids), eos

    def seed(self, s):
        pass

    def sample(self, *args):
        return self.ids.pop(0) if self.ids else self.eos


@pytest.mark.parametrize("text", TEXTS)
def test_api_streams_never_split_a_character(model, text):
    with llamacpu.Llama(model, n_threads=1) as llm:
        tok = llm.tokenizer
        ids = byte_tokens(tok, text, np.random.default_rng(len(text)))
        expected = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8")

        llm._sampler = ScriptedSampler(ids, tok.eos_id)
        pieces = [c["choices"][0]["text"] for c in llm("Once upon a time", max_tokens=len(ids) + 1, stream=True)]
        assert_whole_characters(pieces, expected)

        llm._sampler = ScriptedSampler(ids, tok.eos_id)
        chunks = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=len(ids) + 1, stream=True)
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        assert_whole_characters(pieces, expected)

        llm._sampler = ScriptedSampler(ids, tok.eos_id)
        session = llm.chat_session()
        pieces = list(session.send("Hi", SamplingParams(), len(ids) + 1))
        assert_whole_characters(pieces, expected.rstrip() if expected != expected.rstrip() else expected)
