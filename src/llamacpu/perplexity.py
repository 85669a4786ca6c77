"""`llamacpu perplexity`: the standard measure of what quantization costs a model.

Computed as llama.cpp's perplexity tool computes it, so the two can be compared number for
number: the whole text is tokenized once (with the beginning-of-text token when the model adds
one), cut into non-overlapping chunks of ctx tokens, and each chunk is evaluated from an empty
context with its first token replaced by BOS (when the model adds one). Only the second half
of each chunk is scored: the logits at positions ctx/2 .. ctx-2 predict the tokens after them,
so every scored prediction sees at least ctx/2 tokens of context. Perplexity is exp of the
mean negative log-likelihood (summed in float64); its standard error is llama.cpp's:
ppl * sqrt(var(nll) / (count - 1)).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from .errors import UsageError


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float  # of ppl
    chunks: int
    ctx: int
    scored: int  # predictions scored
    text_tokens: int  # the whole text, tokenized
    add_bos: bool
    seconds: float  # evaluation only (not load, not tokenization)
    running: list = field(default_factory=list)  # the estimate after each chunk

    @property
    def tokens_per_second(self) -> float:
        return self.chunks * self.ctx / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), tokens_per_second=self.tokens_per_second)


def read_text(path) -> str:
    """A text file as UTF-8, with CRLF line ends normalised to LF."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().replace("\r\n", "\n")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def make_chunks(tokens, ctx: int, n_chunks: Optional[int] = None, bos: Optional[int] = None) -> list:
    """Non-overlapping chunks of ctx tokens (a shorter tail is dropped), at most n_chunks of
    them; the first token of each becomes bos unless bos is None."""
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens) // ctx
    if n_chunks:
        n = min(n, n_chunks)
    chunks = []
    for i in range(n):
        c = tokens[i * ctx:(i + 1) * ctx].copy()
        if bos is not None:
            c[0] = bos
        chunks.append(c)
    return chunks


def scored_nll(logits: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Negative log-likelihoods (float64) of the second half of a chunk: the logits at
    positions ctx/2 .. ctx-2 against the tokens that follow them."""
    ctx = len(chunk)
    first = ctx // 2
    lg = np.asarray(logits[first:ctx - 1], np.float64)
    target = np.asarray(chunk[first + 1:ctx], np.int64)
    m = lg.max(axis=1)
    log_z = m + np.log(np.exp(lg - m[:, None]).sum(axis=1))
    return log_z - lg[np.arange(len(target)), target]


class Accumulator:
    """Running sums of nll and nll^2 over every scored token, and the estimate from them."""

    def __init__(self):
        self.nll = 0.0
        self.nll2 = 0.0
        self.count = 0

    def add(self, nll: np.ndarray) -> None:
        nll = np.asarray(nll, np.float64)
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.count += len(nll)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count) if self.count else float("nan")

    @property
    def stderr(self) -> float:
        """llama.cpp's: the standard error of the mean nll, carried to ppl (d ppl = ppl d nll)."""
        if self.count < 2:
            return float("nan")
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else 0.0


def tokenize_text(llm, text: str) -> tuple:
    """(tokens, add_bos): the whole text, with BOS first when the model adds one."""
    tok = llm.tokenizer
    add_bos = bool(tok.add_bos) and tok.bos_id >= 0
    return llm.tokenize(text, add_bos=add_bos), add_bos


def perplexity(llm, text: str, ctx: int = 512, n_chunks: Optional[int] = None,
               on_chunk: Optional[Callable[[int, int, Accumulator, float], None]] = None) -> PerplexityResult:
    """Perplexity of llm on text. on_chunk(i, n, acc, seconds) is called after each chunk."""
    if ctx < 4 or ctx % 2:
        raise UsageError(f"--ctx must be an even number >= 4, got {ctx}")
    if ctx > llm.n_ctx:
        raise UsageError(f"--ctx {ctx} is larger than the model's context ({llm.n_ctx})")
    if n_chunks is not None and n_chunks < 1:
        raise UsageError(f"--chunks must be positive, got {n_chunks}")
    tokens, add_bos = tokenize_text(llm, text)
    if len(tokens) < 2 * ctx:
        # As llama.cpp: fewer tokens than two chunks is an error, not a one-chunk estimate.
        raise UsageError(f"the text tokenizes to {len(tokens)} tokens; perplexity with a context of {ctx} "
                         f"needs at least {2 * ctx}")
    chunks = make_chunks(tokens, ctx, n_chunks, llm.token_bos() if add_bos else None)
    acc = Accumulator()
    running = []
    t0 = time.perf_counter()
    for i, chunk in enumerate(chunks):
        acc.add(scored_nll(llm.logits(chunk), chunk))
        running.append(acc.ppl)
        if on_chunk is not None:
            on_chunk(i, len(chunks), acc, time.perf_counter() - t0)
    return PerplexityResult(acc.ppl, acc.stderr, len(chunks), ctx, acc.count, len(tokens), add_bos,
                            time.perf_counter() - t0, running)


class ProgressLine:
    """The running estimate as a one-line bar on a terminal (stderr); silent otherwise."""

    def __init__(self, enabled: Optional[bool] = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def __call__(self, i: int, n: int, acc: Accumulator, seconds: float) -> None:
        if not self.enabled:
            return
        done = i + 1
        bar = "#" * (30 * done // n)
        eta = seconds / done * (n - done)
        self.stream.write(f"\rperplexity [{bar:<30}] {done}/{n}  PPL {acc.ppl:.4f} +/- {acc.stderr:.4f}  "
                          f"ETA {eta:4.0f}s ")
        if done == n:
            self.stream.write("\n")
        self.stream.flush()


def describe(r: PerplexityResult) -> str:
    return (f"PPL = {r.ppl:.4f} +/- {r.stderr:.5f} ({r.chunks} chunks of {r.ctx} tokens, {r.scored} tokens scored, "
            f"{r.seconds:.1f} s, {r.tokens_per_second:.1f} tokens/s)")
