"""What quantization cost a converted model: a short probe at convert time.

The same fixed text runs through a float32 conversion of the source weights and through the
converted file; the report is the mean KL divergence KL(float || converted) of the next-token
distributions over the probe's positions, and how often both pick the same top token. The
float32 reference is a real conversion into a temporary file beside the output (the runtime
then computes both sides with the same code), so the probe is skipped when that file would be
large; it never fails a conversion: anything that goes wrong becomes a note in the report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

# A fixed text, story then encyclopedic prose, so that small story models and general
# models both see text they know. The probe scores its first PROBE_TOKENS tokens.
PROBE_TEXT = (
    "Once upon a time, in a small town by the sea, there lived an old clockmaker named Tom. Every "
    "morning he opened his shop, wound the clocks and listened to them tick. One day a little girl "
    "came in with a broken watch. \"Can you fix it?\" she asked. Tom looked at it carefully and smiled. "
    "\"Come back tomorrow,\" he said. The history of timekeeping goes back thousands of years: sundials, "
    "water clocks and pendulums each measured the hours a little better than the one before. In 1656 "
    "Christiaan Huygens built the first pendulum clock, which kept time to within a minute a day."
)
PROBE_TOKENS = 128

# The float32 reference file is skipped above this size (or when disk or memory is short).
MAX_REFERENCE_BYTES = 2 << 30

# Usual (mean KL, top-1 agreement) per storage type: a converted model worse than either is
# flagged. Measured with this probe (bench/QUALITY.md) on stories260K (dim 64: 4 bits hurt it
# most) and SmolLM2-135M-Instruct (mean KL, top-1):
#   f16   2.9e-6, 100%    (SmolLM2 from f32: 4.6e-7, 100%)
#   q8_0  7.1e-4, 100%    SmolLM2 4.7e-3, 93.8%
#   q4_1  0.061, 90.6%    SmolLM2 3.9e-3, 93.8% (its weights came from Q4_1: a lattice q4_1 fits)
#   q4_0  0.095, 86.7%    SmolLM2 0.31, 66.4%
# The bounds are about 3x the worst KL seen and well below the worst top-1 (128 positions make
# top-1 coarse); a broken conversion gives a KL of order 1 nat or more. The K types have no
# measurement here yet, so they are reported without a judgement.
USUAL = {
    "f16": (1e-4, 0.95),
    "q8_0": (0.02, 0.85),
    "q4_1": (0.25, 0.75),
    "q4_0": (1.0, 0.5),
}
_ORDER = ["q4_0", "q4_k", "q4_1", "q6_k", "q8_0", "f16", "f32"]  # least precise first


@dataclass
class ProbeReport:
    fmt: str  # the least precise storage type the conversion produced
    kl: Optional[float] = None
    top1: Optional[float] = None
    positions: int = 0
    seconds: float = 0.0
    skipped: Optional[str] = None  # why no measurement was made

    @property
    def usual(self) -> Optional[tuple]:
        return USUAL.get(self.fmt)

    @property
    def unusual(self) -> bool:
        """True when the measured loss is worse than usual for the format."""
        if self.kl is None or self.usual is None:
            return False
        max_kl, min_top1 = self.usual
        return self.kl > max_kl or self.top1 < min_top1

    def lines(self) -> list:
        """The report for the user, one line each."""
        if self.skipped:
            return [f"quality probe skipped: {self.skipped}"]
        out = [f"quality probe ({self.positions} tokens, {self.seconds:.1f}s): mean KL divergence {self.kl:.3g} nats, "
               f"top-1 agreement {self.top1 * 100:.1f}% against the float32 weights"]
        if self.unusual:
            max_kl, min_top1 = self.usual
            out.append(f"warning: this is more loss than usual for {self.fmt} (usually KL < {max_kl:g}, top-1 >= "
                       f"{min_top1 * 100:.0f}%); check the source weights, or convert with a more precise --dtype")
        return out

    def to_dict(self) -> dict:
        return {"format": self.fmt, "kl": self.kl, "top1": self.top1, "positions": self.positions,
                "seconds": self.seconds, "skipped": self.skipped, "unusual": self.unusual}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> tuple:
    """(mean KL(ref || got) in nats, share of positions with the same argmax) of [n, vocab] logits."""
    p, q = log_softmax(ref), log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(axis=-1)
    top1 = np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)
    return float(max(kl.mean(), 0.0)), float(top1.mean())


def probe_tokens(llm, n: int = PROBE_TOKENS) -> list:
    tok = llm.tokenizer
    ids = tok.encode(PROBE_TEXT, add_bos=bool(tok.add_bos) and tok.bos_id >= 0)
    return ids[:n]


def lossy_format(plans) -> Optional[str]:
    """The least precise type written where the conversion lost precision, or None when every
    weight was copied exactly (float kept at least as precise, quantized blocks carried over)."""
    lost = []
    for plan in plans:
        # A fused tensor may be stored as row segments of different types: judge each.
        for p in plan.segment_plans() if getattr(plan, "segments", ()) else [plan]:
            if p.dtype == "f32" or p.carried:
                continue
            if p.dtype == "f16" and p.parts and all(getattr(x, "dtype", None) == "f16" for x in p.parts):
                continue
            lost.append(p.dtype)
    rank = {t: i for i, t in enumerate(_ORDER)}
    return min(lost, key=lambda t: rank.get(t, -1)) if lost else None


def _reference_room(out_dir: Path, need: int) -> Optional[str]:
    """Why a float32 reference of need bytes should not be written, or None."""
    if need > MAX_REFERENCE_BYTES:
        return f"the float32 reference would take {need / 2**30:.1f} GiB (the probe's limit is " \
               f"{MAX_REFERENCE_BYTES / 2**30:.0f} GiB)"
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        free = None
    if free is not None and free < need * 1.2 + (256 << 20):
        return f"not enough free disk beside the output for a {need / 2**20:.0f} MiB float32 reference"
    from .sysinfo import physical_memory

    mem = physical_memory()
    if mem is not None and need > mem // 3:
        return f"a {need / 2**20:.0f} MiB float32 reference is too large for this machine's memory"
    return None


def probe_conversion(ck, out_path, plans) -> ProbeReport:
    """Measures the converted file at out_path against a float32 conversion of ck. Never
    raises (but for KeyboardInterrupt): the conversion has succeeded whatever happens here."""
    fmt = "?"
    try:
        fmt = lossy_format(plans)
        if fmt is None:
            return ProbeReport("f32", skipped="no weight lost precision (floats kept, or quantized blocks carried "
                                              "over as they were)")
        out_path = Path(out_path)
        need = sum(4 * int(np.prod(p.shape)) for p in plans)
        why = _reference_room(out_path.parent, need)
        if why:
            return ProbeReport(fmt, skipped=why)
        return _measure(ck, out_path, fmt)
    except Exception as e:
        return ProbeReport(fmt, skipped=f"the probe failed ({type(e).__name__}: {e})")


def _measure(ck, out_path: Path, fmt: str) -> ProbeReport:
    from llamacpu.convert import convert_checkpoint

    from .llama import Llama

    t0 = time.monotonic()
    fd, tmp = tempfile.mkstemp(prefix=".llamacpu-probe-", suffix=".bin", dir=out_path.parent)
    os.close(fd)
    try:
        convert_checkpoint(ck, tmp, "f32", progress=False, verify=False)
        with Llama(str(out_path), n_ctx=PROBE_TOKENS) as llm:
            tokens = probe_tokens(llm)
            if len(tokens) < 2:
                return ProbeReport(fmt, skipped="the probe text tokenizes to fewer than 2 tokens")
            got = llm.logits(tokens)
        with Llama(tmp, n_ctx=PROBE_TOKENS) as ref_llm:
            ref = ref_llm.logits(tokens)
        kl, top1 = compare_logits(ref, got)
        return ProbeReport(fmt, kl, top1, len(tokens), time.monotonic() - t0)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
