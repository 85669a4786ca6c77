"""Sampling options, checked once per call; the sampling itself runs in C++ (csrc/sampler.cpp)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: Optional[int] = None

    @classmethod
    def checked(cls, temperature, top_k, top_p, min_p, repeat_penalty, seed) -> "SamplingParams":
        def num(name, v, lo, hi):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise UsageError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
            return float(v)

        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
        return cls(
            temperature=num("temperature", temperature, 0.0, 100.0),
            top_k=min(top_k, 1 << 30),
            top_p=num("top_p", top_p, 0.0, 1.0),
            min_p=num("min_p", min_p, 0.0, 1.0),
            repeat_penalty=num("repeat_penalty", repeat_penalty, 0.01, 100.0),
            seed=None if seed is None else seed & ((1 << 64) - 1),
        )
