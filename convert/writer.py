"""From an opened checkpoint to a llamacpu model file: type choice, fusion, quantization.

Layout work happens here, once, so that loading is a bare mmap: q/k/v are fused into one
matrix per layer (one matmul per token instead of three), as are the gate and up
projections, and quantized weights are written in the 16-row tile layout of
csrc/quants.h.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from llamacpu import _core
from llamacpu.errors import CheckpointError, UsageError
from llamacpu.fileformat import BLOCK, DTYPES, MIXED, SUPER_BLOCK, TILE_ROWS, segment_layout, write_model_file

from .tensor import ConcatTensor, LazyTensor
from .tiles import pack_q4, pack_q4_k, pack_q6_k, pack_q8

# Bytes per tile-block (16 rows x 32 columns) of the block-32 types, and per tile-superblock
# (16 rows x 256 columns) of the K types: quants, scales.
QUANT_BYTES = {"q4_0": 256, "q4_1": 256, "q8_0": 512, "q4_k": 2048, "q6_k": 3072}
SCALE_BYTES = {"q4_0": 32, "q4_1": 64, "q8_0": 32, "q4_k": 256, "q6_k": 288}
K_TYPES = ("q4_k", "q6_k")

# q4_k_m: llama.cpp's Q4_K_M mix (q4_k, with q6_k where llama.cpp spends more bits).
DTYPE_CHOICES = ("q4_0", "q4_1", "q8_0", "q4_k_m", "q4_k", "q6_k", "f16", "f32")

# Source (GGUF) types the runtime computes with directly: carried over bit for bit.
NATIVE = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k",
          "Q6_K": "q6_k"}
# The rest are dequantized and stored in the nearest type of at least their precision.
NEAREST = {"BF16": "f16", "Q5_0": "q8_0", "Q5_1": "q8_0", "Q5_K": "q6_k", "Q8_K": "q8_0", "Q2_K": "q4_k",
           "Q3_K": "q4_k"}
_PRECISION = ["q4_0", "q4_k", "q4_1", "q6_k", "q8_0", "f16", "f32"]
# Rows whose length is not a multiple of the K types' 256-wide super-block take the nearest
# block-32 type instead, as llama.cpp falls back (it has a 5-bit Q5_0 for Q4_K; q4_1 is what we
# have between 4.5 and 8.5 bits per weight).
K_FALLBACK = {"q4_k": "q4_1", "q6_k": "q8_0"}

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
    method: str = "mse"  # how quantize_tiles picks scales: "mse" (least error) or "ref" (llama.cpp's rule)
    # dtype MIXED: the rows as segments of whole parts, [(n_parts, dtype), ...] in row order.
    segments: tuple = ()

    @property
    def carried(self) -> bool:
        """True when every part already holds blocks of the type it is stored in."""
        if self.segments:
            return all(p.carried for p in self.segment_plans())
        return bool(self.parts) and self.dtype in ("q4_0", "q4_1", "q8_0", "q4_k", "q6_k") and all(
            getattr(p, "ggml_type", None) == self.dtype.upper() for p in self.parts)

    @property
    def dtypes(self) -> list:
        """The storage types of the tensor's rows: one, or one per segment."""
        return [dt for _, dt in self.segments] if self.segments else [self.dtype]

    def segment_plans(self) -> list:
        """One plan per row segment, over that segment's parts."""
        out, i = [], 0
        for n, dt in self.segments:
            parts = self.parts[i:i + n]
            src = parts[0] if n == 1 else ConcatTensor(self.name, list(parts), 0)
            out.append(Plan(self.name, dt, tuple(src.shape), src, tuple(parts), self.method))
            i += n
        return out


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits in Q4_K_M: the
    first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_type(role: str, layer: int, n_layers: int) -> str:
    """The type llama.cpp's Q4_K_M gives a LLaMA weight (llama_tensor_get_type): q6_k for the
    output projection (and the embeddings tied to it), and attn_v and ffn_down of the layers of
    use_more_bits; q4_k for the rest, untied embeddings included."""
    if role == "output" or (role in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers)):
        return "q6_k"
    return "q4_k"


def _storable(dtype: str, cols: int) -> str:
    """dtype, or what can hold rows of cols values when it cannot."""
    if dtype in K_TYPES and cols % SUPER_BLOCK:
        dtype = K_FALLBACK[dtype]
    if dtype not in ("f32", "f16") and cols % BLOCK:
        return "f16"
    return dtype


def weight_dtype(requested, role: str, cols: int, parts=(), layer: int = 0, n_layers: int = 1) -> str:
    """The storage type of one 2-D weight (or one part of a fused one) for a requested model type.

    requested None keeps a GGUF tensor's own type where the runtime has kernels for it (else
    the nearest of at least its precision), and means q4_0 for a float checkpoint. Rows
    whose length is not a multiple of the 32-wide block cannot be quantized; they are kept in
    f16 (f32 in an f32 model); rows not a multiple of the K types' 256 take K_FALLBACK. The
    output projection (and the embeddings it is tied to) matters most to quality: a 4-bit
    model keeps it in 8 bits (6 for the K types), as llama.cpp keeps it in 6. role: "output",
    "embedding", "attn_v", "ffn_down" or "matmul"; layer / n_layers place it for q4_k_m.
    """
    if requested is None:
        kinds = [getattr(p, "ggml_type", None) for p in parts]
        if parts and all(kinds):
            mapped = [NATIVE.get(k) or NEAREST.get(k, "q8_0") for k in kinds]
            return _storable(max(mapped, key=_PRECISION.index), cols)
        requested = "q4_0"
    if requested == "q4_k_m":
        requested = q4_k_m_type(role, layer, n_layers)
    if requested in ("f32", "f16"):
        return requested
    if cols % BLOCK:
        return "f16"
    if role == "output" and requested in ("q4_0", "q4_1", "q4_k"):
        requested = "q6_k" if requested == "q4_k" else "q8_0"
    return _storable(requested, cols)


def plan_tensors(ck, dtype: str) -> list:
    cfg = ck.config
    t = ck.tensors

    def weight(name, parts, roles, layer=0):
        src = parts[0] if len(parts) == 1 else ConcatTensor(name, parts, 0)
        if len(src.shape) == 1:
            return Plan(name, "f32", tuple(src.shape), src)
        cols = src.shape[1]
        # Each part's own type; a fused tensor whose parts differ keeps them as row segments
        # (adjacent parts of one type together), so that each part is stored as it should be:
        # GGUF blocks carried over unchanged, or q4_k_m's v rows in q6_k next to q4_k q and k.
        # Parts whose blocks can be carried over stay apart from parts of the same type that
        # must be quantized.
        kinds = [weight_dtype(dtype, role, cols, (p,), layer, cfg.n_layers) for p, role in zip(parts, roles)]
        keys = [(kind, NATIVE.get(getattr(p, "ggml_type", None)) == kind) for p, kind in zip(parts, kinds)]
        segments = []
        for i, key in enumerate(keys):
            if i and keys[i - 1] == key:
                segments[-1][0] += 1
            else:
                segments.append([1, key[0]])
        if len(segments) == 1:
            return Plan(name, kinds[0], tuple(src.shape), src, tuple(parts))
        return Plan(name, MIXED, tuple(src.shape), src, tuple(parts), segments=tuple(map(tuple, segments)))

    emb_role = "output" if cfg.tied_output else "embedding"
    plans = [weight("tok_embeddings", [t["tok_embeddings"]], [emb_role])]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for name, parts, roles in (("attention_norm", ["attention_norm"], ["norm"]),
                                   ("wqkv", ["wq", "wk", "wv"], ["matmul", "matmul", "attn_v"]),
                                   ("wo", ["wo"], ["matmul"]), ("ffn_norm", ["ffn_norm"], ["norm"]),
                                   ("w13", ["w1", "w3"], ["matmul", "matmul"]), ("w2", ["w2"], ["ffn_down"])):
            plans.append(weight(p + name, [t[p + x] for x in parts], roles, i))
    plans.append(weight("norm", [t["norm"]], ["norm"]))
    if not cfg.tied_output:
        plans.append(weight("output", [t["output"]], ["output"]))
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
        t, bad = _origin(src, int(r0 + np.argwhere(~np.isfinite(a))[0][0]))
        raise CheckpointError(f"{t.where}: tensor {t.name} (for {name}) holds NaN or Inf values (row {bad}); "
                              "the checkpoint is damaged")
    return a


def _origin(t: LazyTensor, row: int) -> tuple:
    """The source tensor and row that row `row` of a fused or permuted tensor comes from, so
    that an error names what the checkpoint calls it (not "layers.2.w13")."""
    if isinstance(t, ConcatTensor) and t.dim == 0:
        for p in t.parts:
            if row < p.nrows:
                return _origin(p, row)
            row -= p.nrows
    perm = getattr(t, "perm", None)
    if perm is not None and hasattr(t, "base"):
        return _origin(t.base, int(perm[row]))
    return t, row


def write_tensor(plan: Plan, f, base: int, progress: Progress) -> None:
    if plan.segments:
        subs = plan.segment_plans()
        layout, _ = segment_layout([[sp.shape[0], sp.dtype] for sp in subs], plan.shape)
        for sp, (_, _, offset, _) in zip(subs, layout):
            write_tensor(sp, f, base + offset, progress)
        return
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
    nb = cols // (SUPER_BLOCK if plan.dtype in K_TYPES else BLOCK)  # tile-blocks or tile-superblocks per tile
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
            if plan.dtype in K_TYPES:
                quants, scales = _quantize_k(dt, a, nb, qbytes, plan.method)
            else:
                quants, scales = _quantize(dt, a, nb, qbytes, sbytes, plan.method)
        f.seek(base + t0 * nb * qbytes)
        f.write(quants)
        f.seek(scales_base + t0 * nb * sbytes)
        f.write(scales)
        progress.add((r1 - r0) * cols, plan.name)


_POOL = None


def _pool() -> tuple:
    """(executor, workers): one thread per CPU this process may use, made on first use."""
    global _POOL
    if _POOL is None:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        n = max(1, n)
        _POOL = (ThreadPoolExecutor(n, thread_name_prefix="llamacpu-quantize"), n)
    return _POOL


def _quantize(dt: int, a: np.ndarray, nb: int, qbytes: int, sbytes: int, method: str) -> tuple:
    """Rows a quantized into tiles, (quants, scales) bytes. The scale search costs several
    times a file write, so whole tiles go to every CPU (quantize_tiles releases the GIL); each
    block depends only on its row, so the bytes are the same for any split."""
    nt = (a.shape[0] + TILE_ROWS - 1) // TILE_ROWS
    q = np.empty(nt * nb * qbytes, np.uint8)
    sc = np.empty(nt * nb * sbytes // 2, np.uint16)
    pool, workers = _pool()
    per = -(-nt // workers)
    jobs = [(a[t0 * TILE_ROWS:(t0 + per) * TILE_ROWS], q[t0 * nb * qbytes:(t0 + per) * nb * qbytes],
             sc[t0 * nb * sbytes // 2:(t0 + per) * nb * sbytes // 2]) for t0 in range(0, nt, per)]
    for f in [pool.submit(_core.quantize_tiles, dt, *job, method) for job in jobs]:
        f.result()
    return q.tobytes(), sc.tobytes()


def _quantize_k(dt: int, a: np.ndarray, nsb: int, qbytes: int, method: str) -> tuple:
    """Rows a quantized into K-quant tiles, (quants, scales) bytes: whole tiles to every CPU, as
    _quantize does (quantize_k_tiles releases the GIL; rows are independent)."""
    rows, cols = a.shape
    nt = (rows + TILE_ROWS - 1) // TILE_ROWS
    pool, workers = _pool()
    per = -(-nt // workers)
    parts = [a[t0 * TILE_ROWS:(t0 + per) * TILE_ROWS] for t0 in range(0, nt, per)]
    bufs = [np.empty(_core.matrix_bytes(dt, part.shape[0], cols), np.uint8) for part in parts]
    for f in [pool.submit(_core.quantize_k_tiles, dt, part, buf, method) for part, buf in zip(parts, bufs)]:
        f.result()
    # Each buffer is its tiles' quants, then their scales.
    cut = [-(-part.shape[0] // TILE_ROWS) * nsb * qbytes for part in parts]
    return (b"".join(buf[:c].tobytes() for buf, c in zip(bufs, cut)),
            b"".join(buf[c:].tobytes() for buf, c in zip(bufs, cut)))


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
    if not all(np.isfinite(blocks[k].view(np.float16)).all() for k in ("d", "m", "dmin") if k in blocks):
        raise CheckpointError(f"{plan.parts[0].where}: tensor {plan.name} holds NaN or Inf scales; the file is damaged")
    if plan.dtype == "q8_0":
        return pack_q8(blocks["q"], d)
    if plan.dtype == "q4_k":
        return pack_q4_k(blocks["q"], d, blocks["dmin"], blocks["scales"])
    if plan.dtype == "q6_k":
        return pack_q6_k(blocks["q"], d, blocks["scales"])
    return pack_q4(blocks["q"], d, blocks.get("m"))


def guess_chat_template(ck) -> str:
    """LLaMA-2-chat checkpoints look like base ones; only the folder name tells them apart."""
    name = ck.name.lower()
    return "llama-2" if ("chat" in name or "instruct" in name) else "plain"


def convert_checkpoint(ck, out_path, dtype: Optional[str] = None, progress: Optional[bool] = None,
                       chat_template: Optional[str] = None, log: Callable[[str], None] = lambda s: None,
                       verify: bool = True, quantizer: str = "mse") -> dict:
    """Writes ck as a llamacpu file at out_path; returns a summary (sizes, time, types).

    dtype None: q4_0 for a float checkpoint; a GGUF file's own types where possible.
    verify: measure what the conversion lost with a short probe (llamacpu.quality); the
    summary's "quality" is its report. quantizer: "mse" (scales of least error) or "ref"."""
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if quantizer not in ("mse", "ref"):
        raise UsageError(f"unknown quantizer {quantizer!r}; choose mse or ref")
    cfg = ck.config
    plans = plan_tensors(ck, dtype)
    for p in plans:
        p.method = quantizer
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
    entries = [(p.name, p.dtype, p.shape) + ((tuple((sp.shape[0], sp.dtype) for sp in p.segment_plans()),)
                                             if p.segments else ()) for p in plans]
    size = write_model_file(out_path, meta, entries, ck.tokenizer_data,
                            lambda name, f, base: write_tensor(by_name[name], f, base, bar))
    bar.close()
    types = {}
    for p in plans:
        for dt in p.dtypes:
            types[dt] = types.get(dt, 0) + 1
    info = {"bytes": size, "seconds": time.monotonic() - start, "types": types, "params": total}
    if verify:
        from llamacpu.quality import probe_conversion

        info["quality"] = probe_conversion(ck, out_path, plans)
    return info
