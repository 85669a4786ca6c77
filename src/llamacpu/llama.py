"""llamacpu.Llama: the Python API, with the names llama-cpp-python users know.

The object owns the mapped model file, one backend (kernel table + thread pool), the KV
cache and a sampler. The cache remembers which tokens it holds, so a prompt that starts
like the previous one (the next turn of a chat) only evaluates what is new.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np

from . import _core
from .chat import BUILTIN, ChatFormat, chat_format
from .errors import BusyError, ClosedError, LlamaCPUError, ModelFileError, UsageError
from .fileformat import MappedModelFile
from .model import Transformer
from .sampling import SamplingParams
from .sysinfo import default_threads, physical_memory, requested_isa
from .textstream import StopMatcher
from .tokenizer import StreamDecoder, load_tokenizer

# Tokens the repeat penalty looks back over, as llama.cpp's default.
REPEAT_LAST_N = 64


class Llama:
    def __init__(self, model_path, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
                 seed: Optional[int] = None, verbose: bool = False, n_batch: int = 64,
                 chat_format: Optional[str] = None, isa: Optional[str] = None, kv_f16: Optional[bool] = None):
        self._closed = True
        self._lock = threading.Lock()
        self._holder = None
        self.verbose = verbose
        self.model_path = str(model_path)
        seed_value = _seed_value(seed)  # checked before anything needs releasing
        t0 = time.perf_counter()
        self._file = MappedModelFile(model_path)
        try:
            cfg = self._file.meta.config
            explicit_ctx = bool(n_ctx)
            if n_ctx is None or n_ctx == 0:
                n_ctx = min(cfg.max_seq_len, 8192)
            if not isinstance(n_ctx, int) or n_ctx < 2:
                raise UsageError(f"n_ctx must be an integer >= 2, got {n_ctx!r}")
            if n_threads is None or n_threads == 0:
                n_threads = default_threads()
            if not isinstance(n_threads, int) or not 1 <= n_threads <= 1024:
                raise UsageError(f"n_threads must be a positive integer, got {n_threads!r}")
            if not isinstance(n_batch, int) or n_batch < 1:
                raise UsageError(f"n_batch must be a positive integer, got {n_batch!r}")
            try:
                self._backend = _core.Backend(n_threads, requested_isa(isa))
            except ValueError as e:
                raise UsageError(str(e)) from None
            tok = self._file.meta.tokenizer
            self.tokenizer = load_tokenizer(tok["kind"], self._file.blob(tok["offset"], tok["size"]),
                                            self.model_path, tok)
            if self.tokenizer.n_vocab > cfg.vocab_size:
                raise ModelFileError(f"{self.model_path}: the tokenizer has {self.tokenizer.n_vocab} tokens, "
                                     f"the model only {cfg.vocab_size}")
            self._format = chat_format_for(chat_format, self._file.meta.chat_template, self.model_path)
            _check_memory(self.model_path, self._file.meta, n_ctx, n_batch, kv_f16, explicit_ctx)
            try:
                self._model = Transformer(self._file, self._backend, n_ctx, n_batch, kv_f16)
            except MemoryError:
                _memory_error(self.model_path, self._file.meta, n_ctx, explicit_ctx, "is more than can be allocated")
        except BaseException:
            self._file.close()
            raise
        self.n_ctx = n_ctx
        self._past = np.zeros(n_ctx, np.int32)  # the tokens the KV cache holds, by position
        self._n_past = 0
        self._logits = np.zeros(cfg.vocab_size, np.float32)  # of the last evaluated token
        self._sampler = _core.Sampler(seed_value)
        self.load_seconds = time.perf_counter() - t0
        self._closed = False
        self.notices: list = []
        if verbose:
            import sys

            print(f"llamacpu: loaded {self.model_path} in {self.load_seconds * 1000:.1f} ms; "
                  f"{self.isa} kernels, {n_threads} threads, n_ctx {n_ctx}", file=sys.stderr)

    # ---- basic properties -------------------------------------------------------------

    @property
    def config(self):
        return self._file.meta.config

    @property
    def metadata(self) -> dict:
        return dict(self._file.meta.extra, chat_template=self._file.meta.chat_template)

    @property
    def n_vocab(self) -> int:
        return self.config.vocab_size

    @property
    def isa(self) -> str:
        return self._open_backend().name

    @property
    def n_threads(self) -> int:
        return self._open_backend().n_threads

    def _open_backend(self):
        backend = getattr(self, "_backend", None)
        if backend is None:
            raise ClosedError("this Llama has been closed")
        return backend

    @property
    def chat_format(self) -> ChatFormat:
        return self._format

    def token_bos(self) -> int:
        return self.tokenizer.bos_id

    def token_eos(self) -> int:
        return self.tokenizer.eos_id

    # ---- lifetime and thread safety ----------------------------------------------------

    @contextmanager
    def _using(self):
        """One call at a time: other threads wait; the same thread inside an open stream
        gets an error instead of silently corrupting the stream's state."""
        me = threading.get_ident()
        if self._closed:
            raise ClosedError("this Llama has been closed")
        if not self._lock.acquire(blocking=False):
            if self._holder == me:
                raise BusyError("this Llama is busy with a streaming call in this thread; "
                                "finish or close that stream first")
            self._lock.acquire()
        try:
            if self._closed:
                raise ClosedError("this Llama has been closed")
            self._holder = me
            yield
        finally:
            self._holder = None
            self._lock.release()
            if self._closed:
                self._release_if_idle()  # close() was called during this call: it is over now

    def close(self) -> None:
        """Refuses new calls at once and releases the model file, the cache and the threads.
        Safe to call twice, and from any thread.

        While a call is running (or a stream is open, in this thread or another) close()
        does not wait for it, which could be forever: the call releases when it ends."""
        self._closed = True
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        # Whoever finds the lock free after _closed is set releases: close() itself, or the
        # call that held the lock, which looks at _closed only after letting the lock go.
        if self._lock.acquire(blocking=False):
            try:
                if self._model is not None:
                    self._release()
            finally:
                self._lock.release()

    def _release(self) -> None:
        self._model.close()
        self._model = None
        self._backend = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- tokens ---------------------------------------------------------------------

    def tokenize(self, text, add_bos: bool = True, special: bool = False) -> list:
        with self._using():
            return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._using():
            return self.tokenizer.decode(list(tokens))

    def _check_tokens(self, tokens) -> np.ndarray:
        try:
            arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise UsageError("tokens must be a sequence of integers") from None
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            raise UsageError(f"token ids must lie in [0, {self.n_vocab})")
        return arr.astype(np.int32)

    # ---- evaluation -----------------------------------------------------------------

    def _eval(self, tokens: np.ndarray, start: int) -> None:
        """Evaluates tokens at positions start.., in batches; keeps the last logits."""
        if len(tokens) == 0:
            return  # the last logits are still those of the last token in the cache
        m = self._model
        for i in range(0, len(tokens), m.n_batch):
            chunk = tokens[i:i + m.n_batch]
            logits = m.forward(chunk, start + i)
            self._past[start + i:start + i + len(chunk)] = chunk
            self._n_past = start + i + len(chunk)
        self._logits[:] = logits

    def _load_prompt(self, tokens: np.ndarray) -> None:
        """Puts tokens in the cache, reusing the longest prefix it already holds."""
        n = len(tokens)
        if n == 0:
            raise UsageError("the prompt has no tokens (and this model has no beginning-of-text token)")
        held = min(self._n_past, n)
        eq = self._past[:held] == tokens[:held]
        same = held if eq.all() else int(np.argmin(eq))
        if same == n:
            same = n - 1  # re-run the last token for its logits
        self._n_past = same
        self._eval(tokens[same:], same)

    def logits(self, tokens) -> np.ndarray:
        """Logits at every position of tokens, evaluated from an empty context: [n, n_vocab]."""
        with self._using():
            toks = self._check_tokens(tokens)
            if len(toks) == 0:
                return np.zeros((0, self.n_vocab), np.float32)
            if len(toks) > self.n_ctx:
                raise UsageError(f"{len(toks)} tokens do not fit the context of {self.n_ctx}")
            m = self._model
            out = np.empty((len(toks), self.n_vocab), np.float32)
            self._n_past = 0
            for i in range(0, len(toks), m.n_batch):
                chunk = toks[i:i + m.n_batch]
                out[i:i + len(chunk)] = m.forward(chunk, i, all_logits=True)
                self._past[i:i + len(chunk)] = chunk
                self._n_past = i + len(chunk)
            self._logits[:] = out[-1]
            return out

    def reset(self) -> None:
        """Forgets the cached context."""
        with self._using():
            self._n_past = 0

    # ---- generation -----------------------------------------------------------------

    def _fit_prompt(self, tokens: np.ndarray, n_keep: int) -> np.ndarray:
        """A prompt longer than the context keeps its first n_keep tokens and its end."""
        room = self.n_ctx - 1  # leave space for at least one generated token
        if len(tokens) <= room:
            return tokens
        n_keep = min(n_keep, room // 2)
        cut = np.concatenate([tokens[:n_keep], tokens[len(tokens) - (room - n_keep):]])
        self._notice(f"prompt of {len(tokens)} tokens is longer than the context ({self.n_ctx}); "
                     f"kept the first {n_keep} and the last {room - n_keep}")
        return cut

    def _notice(self, msg: str) -> None:
        self.notices.append(msg)
        if self.verbose:
            import sys

            print(f"llamacpu: {msg}", file=sys.stderr)

    def _shift_context(self, n_keep: int) -> None:
        """When the context is full: keep the first n_keep tokens, drop half of the rest (as
        llama.cpp does), and move the cache down so generation can go on."""
        n_keep = min(n_keep, self._n_past - 2)
        discard = (self._n_past - n_keep) // 2
        self._model.shift(n_keep, discard, self._n_past)
        self._past[n_keep:self._n_past - discard] = self._past[n_keep + discard:self._n_past].copy()
        self._n_past -= discard

    def _tokens(self, prompt: np.ndarray, params: SamplingParams, max_tokens: int, stop_ids, n_keep: int = 1
                ) -> Iterator[int]:
        """Yields generated tokens after prompt (reusing what the cache already holds)."""
        self._load_prompt(self._fit_prompt(prompt, n_keep))
        yield from self._continue(params, max_tokens, stop_ids, n_keep)

    def _continue(self, params: SamplingParams, max_tokens: int, stop_ids, n_keep: int) -> Iterator[int]:
        """Samples from the last logits, then feeds each token back; the cache holds every
        yielded token except the last (it is evaluated only if generation goes on)."""
        if params.seed is not None:
            self._sampler.seed(params.seed)
        sample = self._sampler.sample
        m = self._model
        for i in range(max_tokens):
            n = self._n_past
            recent = self._past[max(0, n - REPEAT_LAST_N):n]
            tok = sample(self._logits, params.temperature, params.top_k, params.top_p, params.min_p,
                         params.repeat_penalty, recent)
            yield tok
            if tok in stop_ids or i + 1 == max_tokens:
                return
            if self._n_past >= self.n_ctx:
                self._shift_context(n_keep)
            n = self._n_past
            self._logits[:] = m.forward((tok,), n)
            self._past[n] = tok
            self._n_past = n + 1

    def generate(self, tokens, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.1, seed: Optional[int] = None,
                 max_tokens: Optional[int] = None) -> Iterator[int]:
        """Yields sampled token ids after tokens, until end of text or max_tokens."""
        params = SamplingParams.checked(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        with self._using():
            toks = self._check_tokens(tokens)
            if len(toks) == 0:
                raise UsageError("generate needs at least one token")
            limit = self._max_tokens(max_tokens, len(toks))
            yield from self._tokens(toks, params, limit, self.tokenizer.stop_ids)

    def _max_tokens(self, max_tokens, n_prompt: int) -> int:
        if max_tokens is None or (isinstance(max_tokens, int) and max_tokens <= 0):
            return max(1, self.n_ctx - min(n_prompt, self.n_ctx - 1))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise UsageError(f"max_tokens must be an integer, got {max_tokens!r}")
        return max_tokens

    def _text_stream(self, tokens: Iterator[int], stop, stop_ids, at_start: bool, on_token=None):
        """Turns a token stream into text: yields (text, None, n_generated) pieces, then
        ("", finish_reason, n_generated). Stop tokens and stop strings never show."""
        matcher = StopMatcher(_stop_list(stop))
        dec = StreamDecoder(self.tokenizer, at_start)
        n_gen = 0
        reason = "length"
        for tok in tokens:
            n_gen += 1
            if on_token is not None:
                on_token(tok)
            if tok in stop_ids:
                reason = "stop"
                break
            text = matcher.push(dec.push(tok))
            if text:
                yield text, None, n_gen
            if matcher.hit:
                break
        if not matcher.hit:
            text = matcher.push(dec.flush())
            if not matcher.hit:
                text += matcher.flush()
            if text:
                yield text, None, n_gen
        if matcher.hit:
            reason = "stop"
        yield "", reason, n_gen

    def create_completion(self, prompt, max_tokens: Optional[int] = 16, temperature: float = 0.8, top_k: int = 40,
                          top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.1,
                          seed: Optional[int] = None, stop=None, stream: bool = False):
        """OpenAI-style completion of prompt (str, bytes or token ids)."""
        params = SamplingParams.checked(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        _stop_list(stop)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_path}

        def run():
            with self._using():
                if isinstance(prompt, (list, tuple, np.ndarray)):
                    toks = self._check_tokens(prompt)
                else:
                    toks = np.asarray(self.tokenizer.encode(prompt, add_bos=True), np.int32)
                if len(toks) == 0 and self.tokenizer.bos_id >= 0:
                    toks = np.asarray([self.tokenizer.bos_id], np.int32)
                at_start = len(toks) == 1 and toks[0] == self.tokenizer.bos_id
                limit = self._max_tokens(max_tokens, len(toks))
                stop_ids = self.tokenizer.stop_ids
                tokens = self._tokens(toks, params, limit, stop_ids)
                for piece in self._text_stream(tokens, stop, stop_ids, at_start):
                    yield piece, len(toks)

        def chunk(text, reason):
            return dict(meta, choices=[{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}])

        if stream:
            def streamer():
                for (text, reason, n_gen), n_prompt in run():
                    c = chunk(text, reason)
                    if reason is not None:
                        c["usage"] = _usage(n_prompt, n_gen)
                    yield c
            return streamer()
        parts, reason, n_gen, n_prompt = [], None, 0, 0
        for (text, reason, n_gen), n_prompt in run():
            parts.append(text)
        out = chunk("".join(parts), reason)
        out["usage"] = _usage(n_prompt, n_gen)
        return out

    __call__ = create_completion

    def create_chat_completion(self, messages, max_tokens: Optional[int] = None, temperature: float = 0.2,
                               top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                               repeat_penalty: float = 1.0, seed: Optional[int] = None, stop=None,
                               stream: bool = False):
        """OpenAI-style chat completion, rendered with the model's chat template."""
        params = SamplingParams.checked(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        _stop_list(stop)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_path}

        def run():
            with self._using():
                toks = np.asarray(self._render_chat(messages), np.int32)
                stops = list(self._format.stop_strings) + _stop_list(stop)
                limit = self._max_tokens(max_tokens, len(toks))
                stop_ids = self._chat_stop_ids()
                for piece in self._text_stream(self._tokens(toks, params, limit, stop_ids), stops, stop_ids, False):
                    yield piece, len(toks)

        if stream:
            def streamer():
                first = True
                for (text, reason, n_gen), n_prompt in run():
                    delta = {}
                    if first:
                        delta["role"] = "assistant"
                        first = False
                    if text:
                        delta["content"] = text
                    c = dict(meta, object="chat.completion.chunk",
                             choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])
                    if reason is not None:
                        c["usage"] = _usage(n_prompt, n_gen)
                    yield c
            return streamer()
        parts, reason, n_gen, n_prompt = [], None, 0, 0
        for (text, reason, n_gen), n_prompt in run():
            parts.append(text)
        return dict(meta, object="chat.completion",
                    choices=[{"index": 0, "message": {"role": "assistant", "content": "".join(parts).strip()},
                              "logprobs": None, "finish_reason": reason}],
                    usage=_usage(n_prompt, n_gen))

    # ---- chat helpers ---------------------------------------------------------------

    def _special_pieces(self):
        t = self.tokenizer
        bos = t.piece(t.bos_id) if t.bos_id >= 0 else ""
        eos = t.piece(t.eos_id) if t.eos_id >= 0 else ""
        return bos, eos

    def _render_chat(self, messages, add_generation_prompt: bool = True) -> list:
        bos, eos = self._special_pieces()
        text = self._format.render(messages, add_generation_prompt, bos, eos)
        return self._encode_chat_text(text, start=True)

    def _encode_chat_text(self, text: str, start: bool) -> list:
        t = self.tokenizer
        toks = t.encode(text, add_bos=False, special=True)
        if start and t.add_bos and t.bos_id >= 0 and (not toks or toks[0] != t.bos_id):
            toks = [t.bos_id] + toks
        return toks

    def _chat_stop_ids(self) -> frozenset:
        ids = set(self.tokenizer.stop_ids)
        for piece in self._format.stop_pieces:
            i = self.tokenizer.token_id(piece)
            if i is not None:
                ids.add(i)
        return frozenset(ids)

    def chat_session(self, system: Optional[str] = None, template: Optional[str] = None) -> "ChatSession":
        from .session import ChatSession

        return ChatSession(self, system, chat_format(template) if template else self._format)


def chat_format_for(requested: Optional[str], from_file: Optional[str], path: str = "model") -> ChatFormat:
    if requested:
        return chat_format(requested)
    try:
        return chat_format(from_file or "plain")
    except UsageError:
        raise ModelFileError(f"{path}: the file names a chat template this llamacpu lacks ({from_file[:40]!r}); "
                             f"choose one of {', '.join(BUILTIN)} with chat_format= (--template)") from None


def _check_memory(path: str, meta, n_ctx: int, n_batch: int, kv_f16: Optional[bool], explicit_ctx: bool) -> None:
    """Refuses a context whose KV cache and buffers could never fit in this machine's memory,
    before any is allocated: a hostile file or a typo in n_ctx gives an error, not an
    out-of-memory kill. (Most of it is touched only as the context fills, so the bound is the
    whole memory, not what is free now.)"""
    cfg = meta.config
    if kv_f16 is None:
        kv_f16 = any(t.dtype != "f32" for t in meta.tensors.values())
    batch = min(n_batch, n_ctx)
    kv = 2 * cfg.n_layers * cfg.kv_dim * n_ctx * (2 if kv_f16 else 4)
    rope = n_ctx * cfg.head_dim * 4 * 2
    acts = batch * (2 * cfg.dim + 2 * cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.ffn_dim + cfg.vocab_size) * 4
    need, have = kv + rope + acts, physical_memory()
    if have is not None and need > have:
        _memory_error(path, meta, n_ctx, explicit_ctx,
                      f"needs {need / 2**30:.1f} GiB for the KV cache and buffers, more than this machine's "
                      f"{have / 2**30:.1f} GiB of memory")


def _memory_error(path: str, meta, n_ctx: int, explicit_ctx: bool, what: str):
    if explicit_ctx:
        raise UsageError(f"n_ctx {n_ctx} {what}; choose a smaller n_ctx")
    raise ModelFileError(f"{path}: its context of {n_ctx} tokens (max_seq_len {meta.config.max_seq_len}) {what}; "
                         "choose a smaller n_ctx")


def _seed_value(seed) -> int:
    if seed is None or seed == -1:
        return int.from_bytes(os.urandom(8), "little")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    return seed & ((1 << 64) - 1)


def _stop_list(stop) -> list:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise UsageError("stop must be a string or a list of strings")


def _usage(n_prompt: int, n_gen: int) -> dict:
    return {"prompt_tokens": int(n_prompt), "completion_tokens": int(n_gen), "total_tokens": int(n_prompt + n_gen)}
