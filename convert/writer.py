"""From an opened checkpoint to a llamacpu model file: type choice, fusion, quantization.

Layout work happens here, once, so that loading is a bare mmap: q/k/v are fused into one
matrix per layer (one matmul per token instead of three), as are the gate and up
projections, and quantized weights are written in the 16-row tile layout of
csrc/quants.h.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from llamacpu import _core
from llamacpu.errors import CheckpointError, UsageError
from llamacpu.fileformat import BLOCK, DTYPES, TILE_ROWS, write_model_file

from .tensor import ConcatTensor, LazyTensor

DTYPE_CHOICES = ("q4_0", "q8_0", "f16", "f32")

# Floats per conversion step: large enough to keep the quantizer busy, small enough that a
# 7B conversion needs a few hundred MB at most.
_CHUNK_FLOATS = 8 << 20


@dataclass
class Plan:
    name: str
    dtype: str
    shape: tuple
    source: LazyTensor


def weight_dtype(requested: str, role: str, cols: int) -> str:
    """The storage type of one 2-D weight for a requested model type.

    Rows whose length is not a multiple of the 32-wide block cannot be quantized; they are kept
    in f16 (f32 in an f32 model). The output projection (and the embeddings it is tied to)
    matters most to quality: a 4-bit model keeps it in 8 bits, as llama.cpp keeps it in 6.
    """
    if requested in ("f32", "f16"):
        return requested
    if cols % BLOCK:
        return "f16"
    if requested == "q4_0" and role == "output":
        return "q8_0"
    return requested


def plan_tensors(ck, dtype: str) -> list:
    cfg = ck.config
    t = ck.tensors
    tied = cfg.tied_output
    plans = [Plan("tok_embeddings", weight_dtype(dtype, "output" if tied else "embedding", cfg.dim),
                  tuple(t["tok_embeddings"].shape), t["tok_embeddings"])]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        qkv = ConcatTensor(p + "wqkv", [t[p + "wq"], t[p + "wk"], t[p + "wv"]], 0)
        w13 = ConcatTensor(p + "w13", [t[p + "w1"], t[p + "w3"]], 0)
        for name, src in (("attention_norm", t[p + "attention_norm"]), ("wqkv", qkv), ("wo", t[p + "wo"]),
                          ("ffn_norm", t[p + "ffn_norm"]), ("w13", w13), ("w2", t[p + "w2"])):
            if len(src.shape) == 1:
                plans.append(Plan(p + name, "f32", tuple(src.shape), src))
            else:
                plans.append(Plan(p + name, weight_dtype(dtype, "matmul", src.shape[1]), tuple(src.shape), src))
    plans.append(Plan("norm", "f32", tuple(t["norm"].shape), t["norm"]))
    if not tied:
        plans.append(Plan("output", weight_dtype(dtype, "output", cfg.dim), tuple(t["output"].shape), t["output"]))
    return plans


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: Optional[bool] = None):
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0

    def add(self, n: int, what: str = ""):
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {what[:40]:<40}")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write(f"\r{self.label} done in {time.monotonic() - self.start:.1f}s" + " " * 60 + "\n")
            sys.stderr.flush()


def _rows_checked(src: LazyTensor, name: str, r0: int, r1: int) -> np.ndarray:
    a = src.read_rows(r0, r1)
    if not np.isfinite(a).all():
        bad = int(r0 + np.argwhere(~np.isfinite(a))[0][0])
        raise CheckpointError(f"{src.where}: tensor {src.name} (for {name}) holds NaN or Inf values (row {bad}); "
                              "the checkpoint is damaged")
    return a


def write_tensor(plan: Plan, f, base: int, progress: Progress) -> None:
    rows = plan.shape[0]
    cols = plan.shape[1] if len(plan.shape) == 2 else 1
    step = max(TILE_ROWS, (_CHUNK_FLOATS // cols) // TILE_ROWS * TILE_ROWS)
    if plan.dtype in ("f32", "f16"):
        f.seek(base)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            a = _rows_checked(plan.source, plan.name, r0, r1)
            f.write(np.ascontiguousarray(a, dtype=np.float32 if plan.dtype == "f32" else np.float16).tobytes())
            progress.add((r1 - r0) * cols, plan.name)
        return
    dt = DTYPES[plan.dtype]
    nb = cols // BLOCK
    tiles = (rows + TILE_ROWS - 1) // TILE_ROWS
    qbytes = 256 if plan.dtype == "q4_0" else 512
    scales_base = base + tiles * nb * qbytes
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        a = np.ascontiguousarray(_rows_checked(plan.source, plan.name, r0, r1), dtype=np.float32)
        t0, nt = r0 // TILE_ROWS, (r1 - r0 + TILE_ROWS - 1) // TILE_ROWS
        quants = np.empty(nt * nb * qbytes, np.uint8)
        scales = np.empty(nt * nb * TILE_ROWS, np.uint16)
        _core.quantize_tiles(dt, a, quants, scales)
        f.seek(base + t0 * nb * qbytes)
        f.write(quants.tobytes())
        f.seek(scales_base + t0 * nb * TILE_ROWS * 2)
        f.write(scales.tobytes())
        progress.add((r1 - r0) * cols, plan.name)


def guess_chat_template(ck) -> str:
    """LLaMA-2-chat checkpoints look like base ones; only the folder name tells them apart."""
    name = ck.name.lower()
    return "llama-2" if ("chat" in name or "instruct" in name) else "plain"


def convert_checkpoint(ck, out_path, dtype: str = "q4_0", progress: Optional[bool] = None,
                       chat_template: Optional[str] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Writes ck as a llamacpu file at out_path; returns a summary (sizes, time, types)."""
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    cfg = ck.config
    plans = plan_tensors(ck, dtype)
    by_name = {p.name: p for p in plans}
    total = sum(int(np.prod(p.shape)) for p in plans)
    bar = Progress(total, f"converting to {dtype}", progress)
    meta = {
        "format": "llamacpu",
        "arch": "llama",
        "config": cfg.to_dict(),
        "tokenizer": {"kind": ck.tokenizer_kind},
        "chat_template": chat_template or guess_chat_template(ck),
        "quantization": dtype,
        "source": {"layout": ck.source, "name": ck.name},
    }
    start = time.monotonic()
    size = write_model_file(out_path, meta, [(p.name, p.dtype, p.shape) for p in plans], ck.tokenizer_data,
                            lambda name, f, base: write_tensor(by_name[name], f, base, bar))
    bar.close()
    types = {}
    for p in plans:
        types[p.dtype] = types.get(p.dtype, 0) + 1
    return {"bytes": size, "seconds": time.monotonic() - start, "types": types, "params": total}
