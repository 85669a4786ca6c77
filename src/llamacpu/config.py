"""Hyperparameters of a LLaMA-family decoder, shared by the converter and the runtime."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ModelFileError

# Upper bounds for values read from files. Real models sit far below them; the bounds exist
# so a damaged or hostile file cannot make the runtime allocate absurd amounts of memory.
MAX_DIM = 1 << 16
# Real heads are 64 to 256 wide; the bound keeps the RoPE table (n_ctx x head_dim) small.
MAX_HEAD_DIM = 1 << 10
MAX_LAYERS = 1 << 10
MAX_HEADS = 1 << 10
MAX_VOCAB = 1 << 22
MAX_CTX = 1 << 22


@dataclass
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tied_output: bool = False
    # Optional rope scaling, as a plain dict in Hugging Face's form (e.g. {"rope_type": "llama3",
    # "factor": 8.0, ...}); None for plain RoPE.
    rope_scaling: Optional[dict] = None
    # Token ids the tokenizer does not carry itself.
    bos_id: int = 1
    eos_id: int = 2
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads if self.n_heads else 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def validate(self, where: str = "model") -> "ModelConfig":
        """Check every value is in range and consistent; raise ModelFileError naming the field."""

        def bad(msg):
            raise ModelFileError(f"{where}: {msg}")

        def int_in(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(f"{name} must be an integer, got {v!r}")
            if not lo <= v <= hi:
                bad(f"{name}={v} is outside [{lo}, {hi}]")

        int_in("dim", 1, MAX_DIM)
        int_in("n_layers", 1, MAX_LAYERS)
        int_in("n_heads", 1, MAX_HEADS)
        int_in("n_kv_heads", 1, MAX_HEADS)
        int_in("head_dim", 2, MAX_HEAD_DIM)
        int_in("ffn_dim", 1, 1 << 20)
        int_in("vocab_size", 1, MAX_VOCAB)
        int_in("max_seq_len", 1, MAX_CTX)
        int_in("bos_id", -1, MAX_VOCAB)
        int_in("eos_id", -1, MAX_VOCAB)
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and v < 1e12):
                bad(f"{name} must be a positive number, got {v!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            bad("rope_scaling must be an object or null")
        self._validate_rope_scaling(bad)
        return self

    def _validate_rope_scaling(self, bad) -> None:
        """The fields the runtime reads (model.rope_frequencies) for the kinds it applies; a
        string or a zero there would fail or turn every position into NaN at load."""
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        fields = {"linear": {"factor": 1.0},
                  "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}.get(kind, {})
        for name, default in fields.items():
            v = rs.get(name, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e12:
                bad(f"rope_scaling {name} must be a positive number, got {v!r}")
        if kind == "llama3" and not rs.get("low_freq_factor", 1.0) < rs.get("high_freq_factor", 4.0):
            bad("rope_scaling low_freq_factor must be smaller than high_freq_factor")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ModelFileError(f"{where}: hyperparameters are not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size") if n not in d]
        if missing:
            raise ModelFileError(f"{where}: hyperparameters lack {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in names}
        try:
            cfg = cls(**kw)
        except (TypeError, ZeroDivisionError) as e:
            raise ModelFileError(f"{where}: bad hyperparameters ({e})") from None
        return cfg.validate(where)
