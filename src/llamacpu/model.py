"""The LLaMA decoder: weights from the mapped file, a preallocated KV cache, and forward().

_decoder() reads top to bottom like the paper's figure. Each line is one backend op (a C++
kernel that uses the thread pool); this module only decides which buffers they read and
write. The ops of a batch size are recorded once into a plan and then replayed by a single
call that releases the GIL, so a generated token costs one trip into C++, not ~10 per layer.
Buffers are allocated once, at load, for the largest batch; a generated token allocates
nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _core
from .config import ModelConfig
from .fileformat import DTYPES, MappedModelFile


@dataclass
class Layer:
    attention_norm: np.ndarray
    wqkv: "_core.Matrix"
    wo: "_core.Matrix"
    ffn_norm: np.ndarray
    w13: "_core.Matrix"
    w2: "_core.Matrix"


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, with LLaMA-3 style scaling when the model asks for it."""
    hd = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        factor = float(rs.get("factor", 8.0))
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / freqs
        smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
        scaled = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = np.where(wavelen < old_ctx / high, freqs, np.where(wavelen > old_ctx / low, freqs / factor, scaled))
    elif kind == "linear":
        freqs = freqs / float(rs.get("factor", 1.0))
    return freqs


def rope_rows(freqs: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[n, 2, head_dim] float32: cos2 = [c0,c0,c1,c1..], sin2 = [-s0,s0,-s1,s1..] per position."""
    ang = np.outer(positions.astype(np.float64), freqs)
    c, s = np.cos(ang), np.sin(ang)
    out = np.empty((len(positions), 2, 2 * len(freqs)), np.float32)
    out[:, 0, 0::2] = c
    out[:, 0, 1::2] = c
    out[:, 1, 0::2] = -s
    out[:, 1, 1::2] = s
    return out


class Transformer:
    def __init__(self, mf: MappedModelFile, backend: "_core.Backend", n_ctx: int, n_batch: int = 64,
                 kv_f16: Optional[bool] = None):
        self.cfg = cfg = mf.meta.config
        self.backend = backend
        self.n_ctx = n_ctx
        self.n_batch = n_batch = max(1, min(n_batch, n_ctx))
        tensors = mf.meta.tensors

        def matrix(name):
            t = tensors[name]
            if t.segments:  # rows stored in segments of different types: one matrix all the same
                return _core.Matrix.stacked([_core.Matrix(mf.mm, off, DTYPES[dt], rows, t.shape[1])
                                             for rows, dt, off in t.segments])
            return _core.Matrix(mf.mm, t.offset, DTYPES[t.dtype], t.shape[0], t.shape[1])

        def vector(name):
            t = tensors[name]
            return np.frombuffer(mf.mm, np.float32, t.shape[0], t.offset)

        if cfg.tied_output or tensors["tok_embeddings"].segments:
            self.tok_embeddings = matrix("tok_embeddings")
            self.output = self.tok_embeddings if cfg.tied_output else matrix("output")
        else:
            # Only embed reads this table, a row per token: rows come from the file by pread,
            # and the table never adds to resident memory (through a mapping, every row a
            # prompt touched would stay resident, with the pages the kernel maps around it).
            t = tensors["tok_embeddings"]
            self.tok_embeddings = _core.Matrix.from_file(mf.fd, t.offset, DTYPES[t.dtype], t.shape[0], t.shape[1])
            self.output = matrix("output")
        self.norm = vector("norm")
        self.layers = [
            Layer(vector(p + "attention_norm"), matrix(p + "wqkv"), matrix(p + "wo"), vector(p + "ffn_norm"),
                  matrix(p + "w13"), matrix(p + "w2"))
            for p in (f"layers.{i}." for i in range(cfg.n_layers))
        ]
        if kv_f16 is None:
            # An f32 model is the reference: keep its cache exact too.
            kv_f16 = any(t.dtype != "f32" for t in tensors.values())
        self.cache = _core.KVCache(cfg.n_layers, cfg.n_kv_heads, n_ctx, cfg.head_dim, kv_f16)
        self.freqs = rope_frequencies(cfg)
        self.rope_table = rope_rows(self.freqs, np.arange(n_ctx))

        d, qd, kvd = cfg.dim, cfg.q_dim, cfg.kv_dim
        B = n_batch
        self.x = np.zeros((B, d), np.float32)  # the residual stream
        self.xb = np.zeros((B, d), np.float32)  # normalised input of a block
        self.qkv = np.zeros((B, qd + 2 * kvd), np.float32)
        self.att = np.zeros((B, qd), np.float32)
        self.gu = np.zeros((B, 2 * cfg.ffn_dim), np.float32)
        self.hb = np.zeros((B, cfg.ffn_dim), np.float32)
        # Logits of one token; all_logits passes get a [n_batch, vocab] buffer when first asked.
        self.logits = np.zeros((1, cfg.vocab_size), np.float32)
        self.all_logits = None
        self.tokens = np.zeros(B, np.int32)
        self.pos = np.zeros(B, np.int32)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self._plans = {}

    def forward(self, tokens, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Runs up to n_batch tokens at positions pos0.. and returns logits: of the last token
        ([n_vocab]) or of every token ([n, n_vocab]). The KV cache keeps their keys/values."""
        n = len(tokens)
        assert 0 < n <= self.n_batch and 0 <= pos0 and pos0 + n <= self.n_ctx
        self.tokens[:n] = tokens
        if n == 1:
            self.pos[0] = pos0
        else:
            self.pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        key = (n, all_logits)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._record(n, all_logits)
            if len(self._plans) >= 8:  # prompts of many lengths: keep the decode plan, drop the rest
                self._plans = {k: p for k, p in self._plans.items() if k[0] == 1}
            self._plans[key] = plan
        self.backend.run(plan)
        return self.all_logits[:n] if all_logits else self.logits[0]

    def _record(self, n: int, all_logits: bool):
        plan = _core.Plan()
        self.backend.record(plan)
        try:
            self._decoder(n, all_logits)
        finally:
            self.backend.stop()
        return plan

    def _decoder(self, n: int, all_logits: bool) -> None:
        """The ops of a forward pass over n tokens (recorded, not run, when this is called)."""
        cfg, b, cache = self.cfg, self.backend, self.cache
        qd, kvd = cfg.q_dim, cfg.kv_dim
        tok, pos, x, xb, att, gu, hb = (self.tokens[:n], self.pos[:n], self.x[:n], self.xb[:n], self.att[:n],
                                        self.gu[:n], self.hb[:n])
        qkv = self.qkv[:n]
        q, k, v = qkv[:, :qd], qkv[:, qd:qd + kvd], qkv[:, qd + kvd:]
        qk = qkv[:, :qd + kvd]  # q and k heads side by side: one rope call for both

        b.embed(self.tok_embeddings, tok, x)
        for i, L in enumerate(self.layers):
            # attention
            b.rmsnorm(x, L.attention_norm, cfg.norm_eps, xb)
            b.matmul(L.wqkv, xb, qkv)
            b.rope(qk, cfg.n_heads + cfg.n_kv_heads, cfg.head_dim, pos, self.rope_table)
            b.kv_store(cache, i, k, v, pos)
            b.attention(cache, i, q, pos, cfg.n_heads, self.scale, att)
            b.matmul(L.wo, att, x, True)
            # feed-forward (SwiGLU)
            b.rmsnorm(x, L.ffn_norm, cfg.norm_eps, xb)
            b.matmul(L.w13, xb, gu)
            b.silu_mul(gu, hb)
            b.matmul(L.w2, hb, x, True)

        if all_logits:
            if self.all_logits is None:
                self.all_logits = np.zeros((self.n_batch, cfg.vocab_size), np.float32)
            b.rmsnorm(x, self.norm, cfg.norm_eps, xb)
            b.matmul(self.output, xb, self.all_logits[:n])
        else:
            b.rmsnorm(x[n - 1:n], self.norm, cfg.norm_eps, self.xb[:1])
            b.matmul(self.output, self.xb[:1], self.logits)

    def shift(self, keep: int, discard: int, used: int) -> None:
        """Context shift: forget cache positions [keep, keep+discard), move the rest down."""
        rot = rope_rows(self.freqs, np.array([-discard]))[0].reshape(-1)
        self.backend.kv_shift(self.cache, keep, discard, used, np.ascontiguousarray(rot))

    def close(self):
        self._plans = {}
        self.tok_embeddings = self.output = None
        self.layers = []
        self.norm = None
