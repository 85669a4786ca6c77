"""An independent reference LLaMA forward pass in numpy, for the tests.

It reads the Hugging Face layout of a checkpoint (model.safetensors + config.json) and follows
the Hugging Face conventions on purpose: q/k rows stay as stored (permuted) and RoPE rotates
halves ([x0..x_{d/2-1}] against [x_{d/2}..x_{d-1}]). llamacpu converts the Meta layout and
rotates interleaved pairs, so agreement between the two means both the converter's handling
of the layouts and the kernels are right. Nothing here imports llamacpu.

All arithmetic is float64: the reference should be far more exact than what it checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# stories260K's greedy output from BOS alone, 64 tokens, no repeat penalty, as Hugging Face
# transformers computes it in float32 (tests/data/README.md).
STORIES_GREEDY_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                       "park. One day, she saw a big, red ball. She wanted to play with it, but it was too "
                       "high.\nLily")


class ReferenceLlama:
    def __init__(self, hf_dir):
        from safetensors.numpy import load_file

        hf_dir = Path(hf_dir)
        cfg = json.loads((hf_dir / "config.json").read_text())
        self.dim = cfg["hidden_size"]
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv_heads = cfg.get("num_key_value_heads", self.n_heads)
        self.head_dim = cfg.get("head_dim") or self.dim // self.n_heads
        self.eps = cfg["rms_norm_eps"]
        self.theta = cfg.get("rope_theta", 10000.0)
        self.vocab = cfg["vocab_size"]
        w = {k: v.astype(np.float64) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
        self.w = w
        self.embed = w["model.embed_tokens.weight"]
        tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in w
        self.lm_head = self.embed if tied else w["lm_head.weight"]

    # ---- pieces -----------------------------------------------------------------

    def rmsnorm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions):
        """Hugging Face rotate-half RoPE on x [n, heads, head_dim]."""
        hd = self.head_dim
        inv_freq = 1.0 / (self.theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        ang = np.outer(positions, inv_freq)  # [n, hd/2]
        emb = np.concatenate([ang, ang], axis=-1)  # [n, hd]
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
        half = hd // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(self, x, layer, positions):
        p = f"model.layers.{layer}.self_attn."
        n, hd = x.shape[0], self.head_dim
        q = (x @ self.w[p + "q_proj.weight"].T).reshape(n, self.n_heads, hd)
        k = (x @ self.w[p + "k_proj.weight"].T).reshape(n, self.n_kv_heads, hd)
        v = (x @ self.w[p + "v_proj.weight"].T).reshape(n, self.n_kv_heads, hd)
        q, k = self.rope(q, positions), self.rope(k, positions)
        group = self.n_heads // self.n_kv_heads
        k = np.repeat(k, group, axis=1)  # grouped-query attention: each kv head serves `group` q heads
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        causal = np.triu(np.ones((n, n), dtype=bool), k=1)
        scores = np.where(causal[None], -np.inf, scores)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(n, self.n_heads * hd)
        return out @ self.w[p + "o_proj.weight"].T

    def mlp(self, x, layer):
        p = f"model.layers.{layer}.mlp."
        gate = x @ self.w[p + "gate_proj.weight"].T
        up = x @ self.w[p + "up_proj.weight"].T
        silu = gate / (1.0 + np.exp(-gate))
        return (silu * up) @ self.w[p + "down_proj.weight"].T

    # ---- the model --------------------------------------------------------------

    def logits(self, token_ids) -> np.ndarray:
        """Logits at every position of token_ids (from an empty context): [n, vocab] float64."""
        ids = np.asarray(token_ids, dtype=np.int64)
        positions = np.arange(len(ids), dtype=np.float64)
        h = self.embed[ids]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            h = h + self.attention(self.rmsnorm(h, self.w[p + "input_layernorm.weight"]), i, positions)
            h = h + self.mlp(self.rmsnorm(h, self.w[p + "post_attention_layernorm.weight"]), i)
        h = self.rmsnorm(h, self.w["model.norm.weight"])
        return h @ self.lm_head.T

    def greedy(self, prompt_ids, n_new: int, stop_ids=()) -> list:
        """Greedy continuation (no repeat penalty), recomputing the whole sequence each step:
        slow but free of any cache logic."""
        ids = list(prompt_ids)
        out = []
        for _ in range(n_new):
            tok = int(np.argmax(self.logits(ids)[-1]))
            out.append(tok)
            if tok in stop_ids:
                break
            ids.append(tok)
        return out


_CACHE: dict = {}


def stories_hf_dir() -> Path:
    from conftest import asset

    return asset("stories260K/hf")


def reference_model(hf_dir=None) -> ReferenceLlama:
    """The reference model of hf_dir (default: stories260K), built once per process."""
    hf_dir = Path(hf_dir or stories_hf_dir()).resolve()
    key = str(hf_dir)
    if key not in _CACHE:
        _CACHE[key] = ReferenceLlama(hf_dir)
    return _CACHE[key]


_LOGITS: dict = {}


def reference_logits(token_ids, hf_dir=None) -> np.ndarray:
    """[n, vocab] float64 logits of token_ids under the reference model (default stories260K).
    Remembered per token list: many tests compare against the same few prompts. Read-only."""
    model = reference_model(hf_dir)
    key = (id(model), tuple(int(t) for t in token_ids))
    if key not in _LOGITS:
        out = model.logits(key[1])
        out.flags.writeable = False
        _LOGITS[key] = out
    return _LOGITS[key]


def reference_greedy(prompt_ids, n_new: int, stop_ids=(), hf_dir=None) -> list:
    """Greedy token ids after prompt_ids under the reference model (default stories260K)."""
    return reference_model(hf_dir).greedy(prompt_ids, n_new, stop_ids)
