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
from .tiles import pack_q4, pack_q8

QUANT_BYTES = {"q4_0": 256, "q4_1": 256, "q8_0": 512}
SCALE_BYTES = {"q4_0": 32, "q4_1": 64, "q8_0": 32}

DTYPE_CHOICES = ("q4_0", "q4_1", "q8_0", "f16", "f32")

# Source (GGUF) types the runtime computes with directly: carried over bit for bit.
NATIVE = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
# The rest are dequantized and stored in the nearest type of at least their precision.
NEAREST = {"BF16": "f16", "Q4_K": "q4_1", "Q5_0": "q8_0", "Q5_1": "q8_0", "Q5_K": "q8_0", "Q6_K": "q8_0",
           "Q8_K": "q8_0", "Q2_K": "q4_1", "Q3_K": "q4_1"}
_PRECISION = ["q4_0", "q4_1", "q8_0", "f16", "f32"]

# Floats per conversion step: large enough to keep the quantizer busy, small enough that a
# 7B conversion needs a few hundred MB at most.
_CHUNK_FLOATS = 8 << 20


@dataclass
class Plan:
    name: str
    dtype: str
    shape: tuple
    source: LazyTensor  # float rows
    parts: tuple = ()  # the source tensors stacked by rows, for carrying quantized blocks over

    @property
    def carried(self) -> bool:
        """True when every part already holds blocks of this plan's type."""
        return bool(self.parts) and self.dtype in ("q4_0", "q4_1", "q8_0") and all(
            getattr(p, "ggml_type", None) == self.dtype.upper() for p in self.parts)


def weight_dtype(requested, role: str, cols: int, parts=()) -> str:
    """The storage type of one 2-D weight for a requested model type.

    requested None keeps a GGUF tensor's own type where the runtime has kernels for it (the
    most precise of them for a fused tensor whose parts differ), and means q4_0 for a float
    checkpoint. Rows whose length is not a multiple of the 32-wide block cannot be quantized;
    they are kept in f16 (f32 in an f32 model). The output projection (and the embeddings it
    is tied to) matters most to quality: a 4-bit model keeps it in 8 bits, as llama.cpp keeps
    it in 6.
    """
    if requested is None:
        kinds = [getattr(p, "ggml_type", None) for p in parts]
        if parts and all(kinds):
            mapped = [NATIVE.get(k) or NEAREST.get(k, "q8_0") for k in kinds]
            requested = max(mapped, key=_PRECISION.index)
            return "f16" if cols % BLOCK and requested not in ("f32", "f16") else requested
        requested = "q4_0"
    if requested in ("f32", "f16"):
        return requested
    if cols % BLOCK:
        return "f16"
    if requested in ("q4_0", "q4_1") and role == "output":
        return "q8_0"
    return requested


def plan_tensors(ck, dtype: str) -> list:
    cfg = ck.config
    t = ck.tensors

    def weight(name, role, parts):
        src = parts[0] if len(parts) == 1 else ConcatTensor(name, parts, 0)
        if len(src.shape) == 1:
            return Plan(name, "f32", tuple(src.shape), src)
        return Plan(name, weight_dtype(dtype, role, src.shape[1], parts), tuple(src.shape), src, tuple(parts))

    emb_role = "output" if cfg.tied_output else "embedding"
    plans = [weight("tok_embeddings", emb_role, [t["tok_embeddings"]])]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for name, parts in (("attention_norm", ["attention_norm"]), ("wqkv", ["wq", "wk", "wv"]), ("wo", ["wo"]),
                            ("ffn_norm", ["ffn_norm"]), ("w13", ["w1", "w3"]), ("w2", ["w2"])):
            plans.append(weight(p + name, "matmul", [t[p + x] for x in parts]))
    plans.append(weight("norm", "norm", [t["norm"]]))
    if not cfg.tied_output:
        plans.append(weight("output", "output", [t["output"]]))
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
    qbytes = QUANT_BYTES[plan.dtype]
    sbytes = SCALE_BYTES[plan.dtype]
    scales_base = base + tiles * nb * qbytes
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        t0, nt = r0 // TILE_ROWS, (r1 - r0 + TILE_ROWS - 1) // TILE_ROWS
        if plan.carried:
            quants, scales = _carried_blocks(plan, r0, r1)
        else:
            a = np.ascontiguousarray(_rows_checked(plan.source, plan.name, r0, r1), dtype=np.float32)
            q = np.empty(nt * nb * qbytes, np.uint8)
            sc = np.empty(nt * nb * sbytes // 2, np.uint16)
            _core.quantize_tiles(dt, a, q, sc)
            quants, scales = q.tobytes(), sc.tobytes()
        f.seek(base + t0 * nb * qbytes)
        f.write(quants)
        f.seek(scales_base + t0 * nb * sbytes)
        f.write(scales)
        progress.add((r1 - r0) * cols, plan.name)


def _carried_blocks(plan: Plan, r0: int, r1: int) -> tuple:
    """Rows r0..r1 of the stacked parts, as stored blocks, packed into tiles."""
    pieces, base = [], 0
    for p in plan.parts:
        a, b = max(r0, base), min(r1, base + p.shape[0])
        if a < b:
            pieces.append(p.read_blocks(a - base, b - base))
        base += p.shape[0]
    blocks = {k: np.concatenate([x[k] for x in pieces]) for k in pieces[0]}
    d = blocks["d"]
    if not np.isfinite(d.view(np.float16)).all() or ("m" in blocks and not np.isfinite(blocks["m"].view(np.float16)).all()):
        raise CheckpointError(f"{plan.parts[0].where}: tensor {plan.name} holds NaN or Inf scales; the file is damaged")
    if plan.dtype == "q8_0":
        return pack_q8(blocks["q"], d)
    return pack_q4(blocks["q"], d, blocks.get("m"))


def guess_chat_template(ck) -> str:
    """LLaMA-2-chat checkpoints look like base ones; only the folder name tells them apart."""
    name = ck.name.lower()
    return "llama-2" if ("chat" in name or "instruct" in name) else "plain"


def convert_checkpoint(ck, out_path, dtype: Optional[str] = None, progress: Optional[bool] = None,
                       chat_template: Optional[str] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Writes ck as a llamacpu file at out_path; returns a summary (sizes, time, types).

    dtype None: q4_0 for a float checkpoint; a GGUF file's own types where possible."""
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    cfg = ck.config
    plans = plan_tensors(ck, dtype)
    by_name = {p.name: p for p in plans}
    total = sum(int(np.prod(p.shape)) for p in plans)
    label = dtype or ("q4_0" if not any(p.parts and getattr(p.parts[0], "ggml_type", None) for p in plans)
                      else "source types")
    bar = Progress(total, f"converting ({label})", progress)
    tok_info = {k: v for k, v in getattr(ck, "tokenizer_info", {}).items()
                if k not in ("kind", "offset", "size", "summary")}
    # Build the runtime's tokenizer once: it proves the tokenizer loads, and its summary spares
    # every later load a scan of the vocabulary.
    from llamacpu.tokenizer import load_tokenizer

    tok = load_tokenizer(ck.tokenizer_kind, ck.tokenizer_data, str(getattr(ck, "name", "checkpoint")), tok_info)
    if tok.n_vocab > cfg.vocab_size:
        raise CheckpointError(f"{ck.name}: the tokenizer has {tok.n_vocab} tokens but the model only {cfg.vocab_size}")
    tok_info["summary"] = tok.summary()
    meta = {
        "format": "llamacpu",
        "arch": "llama",
        "config": cfg.to_dict(),
        "tokenizer": dict(tok_info, kind=ck.tokenizer_kind),
        "chat_template": chat_template or getattr(ck, "chat_template", None) or guess_chat_template(ck),
        "quantization": label,
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
