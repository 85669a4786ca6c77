"""Reading GGUF files (llama.cpp's model format) as a converter source.

The parser is written here from the format description, without the ``gguf`` package: the
header, every metadata value type (nested arrays included), the tensor directory and the
aligned data section. The file is treated as hostile: each count, length and offset is a
Python int (no overflow), checked against a cap and against the bytes actually left in the
file before anything is allocated, and anything wrong is one ModelFileError line naming the
file. Files that are well formed but hold something llamacpu cannot run (another
architecture, a tensor type we cannot decode, partial rotary embeddings) raise
CheckpointError instead.

Tensors come out under the canonical names of convert/checkpoint.py, row-major (GGUF lists
dimensions innermost first, so ne=[K, N] is an [N, K] matrix) and readable a block of rows
at a time as float32, dequantized exactly as ggml does. GGUF "llama" q/k rows are already in
Meta's interleaved-pair RoPE order (llama.cpp's converter permutes Hugging Face weights back),
which is our runtime's order, so no permutation is applied.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from llamacpu.errors import CheckpointError, LlamaCPUError, ModelFileError, ModelNotFoundError

from .checkpoint import (Checkpoint, _check_present, _check_shapes, _make_config, _ordered,
                         _split_layer)
from .tensor import LazyTensor, SourceFile

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Caps on what a header may claim. Real files sit far below each; the caps keep a hostile
# file from making the parser allocate or loop without bound before the file-size checks.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 64 << 20
MAX_ARRAY_LEN = 1 << 24
MAX_ARRAY_DEPTH = 4
MAX_NAME_BYTES = 1 << 10
MAX_DIMS = 4
MAX_DIM = 1 << 40
MAX_NUMEL = 1 << 42
MAX_ALIGNMENT = 1 << 20

# Metadata value types: id -> (name, struct format, size); strings and arrays are special.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, \
    _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {
    _UINT8: ("uint8", "<B"), _INT8: ("int8", "<b"), _UINT16: ("uint16", "<H"),
    _INT16: ("int16", "<h"), _UINT32: ("uint32", "<I"), _INT32: ("int32", "<i"),
    _FLOAT32: ("float32", "<f"), _BOOL: ("bool", "<B"), _UINT64: ("uint64", "<Q"),
    _INT64: ("int64", "<q"), _FLOAT64: ("float64", "<d"),
}
_INT_TYPES = {_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _UINT64, _INT64}
_FLOAT_TYPES = {_FLOAT32, _FLOAT64}
_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, _STRING: "string", _ARRAY: "array"}

# ggml tensor types: id -> (name, elements per block, bytes per block). Every type ggml has
# defined is named, so that an error can say which one a file uses; the ones we can decode
# are in _DEQUANT below.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
_REMOVED_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
                  36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}

# GGUF tensor names of a LLaMA model -> canonical names.
_GLOBAL = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm",
           "output.weight": "output"}
_LAYER = {
    "attn_norm.weight": "attention_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w1", "ffn_down.weight": "w2", "ffn_up.weight": "w3",
}
# Precomputed RoPE frequency factors (LLaMA-3.1 style scaling); turned into rope_scaling.
_ROPE_FREQS = "rope_freqs.weight"

# Rope scaling kinds the runtime implements (src/llamacpu/model.py rope_frequencies).
_RUNTIME_ROPE_KINDS = ("linear", "llama3")


# ----------------------------------------------------------------------------- dequantizers
#
# Each takes the raw blocks as uint8 [n_blocks, bytes per block] and returns float32
# [n_blocks, elements per block], with the float32 operations of ggml-quants.c's
# dequantize_row_* in the same order, so results agree bit for bit.


def _f16(raw: np.ndarray) -> np.ndarray:
    """fp16 fields (uint8 [..., 2]) as float32 [..., 1]."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Packed 4-bit quants [n, 16] -> [n, 32]: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q4_0_q(b):
    return _nibbles(b[:, 2:18])


def _deq_q4_0(b):
    d = _f16(b[:, 0:2])
    return (_q4_0_q(b).astype(np.int8) - np.int8(8)).astype(np.float32) * d


def _deq_q4_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:20]).astype(np.float32) * d + m


def _q5_high(qh_raw: np.ndarray) -> np.ndarray:
    """The fifth bits of a Q5 block (uint32 little endian) as 0/16 per element [n, 32]."""
    qh = np.ascontiguousarray(qh_raw).view("<u4").astype(np.uint32)
    bits = (qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    return (bits << np.uint32(4)).astype(np.uint8)


def _deq_q5_0(b):
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 6:22]) | _q5_high(b[:, 2:6])
    return (q.astype(np.int8) - np.int8(16)).astype(np.float32) * d


def _deq_q5_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:24]) | _q5_high(b[:, 4:8])
    return q.astype(np.float32) * d + m


def _deq_q8_0(b):
    d = _f16(b[:, 0:2])
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.float32) * d


def _k_scales(s: np.ndarray) -> tuple:
    """The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K block (ggml's get_scale_min_k4)."""
    s = s.astype(np.uint8)
    lo = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return np.concatenate([lo[0], hi_sc], axis=1), np.concatenate([lo[1], hi_m], axis=1)


def _k_quant_4bit(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low bits [n, 128] -> [n, 8, 32]: 64-element chunks take low then high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, 8, 32)


def _deq_k_min(b, q):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    d1 = (d * sc.astype(np.float32))[:, :, None]
    m1 = (dmin * m.astype(np.float32))[:, :, None]
    return (d1 * q.astype(np.float32) - m1).reshape(b.shape[0], 256)


def _deq_q4_k(b):
    return _deq_k_min(b, _k_quant_4bit(b[:, 16:144]))


def _deq_q5_k(b):
    n = b.shape[0]
    qh = b[:, 16:48]
    # Sub-block j takes bit j of each qh byte as its fifth bit.
    high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    return _deq_k_min(b, _k_quant_4bit(b[:, 48:176]) | (high << np.uint8(4)))


def _q6_k_quants(b: np.ndarray) -> np.ndarray:
    """The 6-bit quants (0..63) of Q6_K blocks [n, 210] in column order: uint8 [n, 256]."""
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    # Each 128-element half uses 64 bytes of ql and 32 of qh: element 32*k + l (k = 0..3)
    # takes low nibble (k < 2) or high nibble (k >= 2) of ql[l + 32*(k % 2)] and bits
    # 2k..2k+1 of qh[l].
    ql = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, 2, 4, 32)
    qh = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(3)).reshape(n, 2, 4, 32)
    return (ql | (qh << np.uint8(4))).reshape(n, 256)


def _deq_q6_k(b):
    n = b.shape[0]
    sc = b[:, 192:208].view(np.int8)
    d = _f16(b[:, 208:210])
    q = _q6_k_quants(b).astype(np.int8) - np.int8(32)
    scale = (d * sc.astype(np.float32)).reshape(n, 16, 1)
    return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


def k_block_fields(ggml_type: str, b: np.ndarray, n_rows: int) -> dict:
    """The stored values of Q4_K / Q6_K blocks b (uint8 [n_rows * blocks per row, 144 or 210])
    as GGUFTensor.read_blocks gives them."""
    nb = b.shape[0] // n_rows

    def fp16_bits(lo):
        return np.ascontiguousarray(b[:, lo:lo + 2]).view("<u2").astype(np.uint16).reshape(n_rows, nb)

    if ggml_type == "Q4_K":
        return {"q": _k_quant_4bit(b[:, 16:144]).reshape(n_rows, nb * 256), "d": fp16_bits(0), "dmin": fp16_bits(2),
                "scales": np.ascontiguousarray(b[:, 4:16]).reshape(n_rows, nb, 12)}
    return {"q": _q6_k_quants(b).reshape(n_rows, nb * 256), "d": fp16_bits(208),
            "scales": np.ascontiguousarray(b[:, 192:208]).view(np.int8).reshape(n_rows, nb, 16)}


def _deq_f32(b):
    return np.ascontiguousarray(b).view("<f4").astype(np.float32)


def _deq_f16(b):
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _deq_bf16(b):
    return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16).view(np.float32)


_DEQUANT = {
    "F32": _deq_f32, "F16": _deq_f16, "BF16": _deq_bf16, "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1,
    "Q5_0": _deq_q5_0, "Q5_1": _deq_q5_1, "Q8_0": _deq_q8_0, "Q4_K": _deq_q4_k,
    "Q5_K": _deq_q5_k, "Q6_K": _deq_q6_k,
}
SUPPORTED_TYPES = tuple(_DEQUANT)


def dequantize_blocks(ggml_type: str, raw: np.ndarray) -> np.ndarray:
    """Raw blocks (uint8 [n_blocks, block bytes]) of a ggml type as float32 [n_blocks, block]."""
    return _DEQUANT[ggml_type](raw)


# ----------------------------------------------------------------------------- tensors


class GGUFTensor(LazyTensor):
    """A tensor in a GGUF file, read as float32 rows.

    ``dtype`` is the lower-case ggml type ("q4_1"), ``ggml_type`` its ggml name ("Q4_1").
    For Q4_0, Q4_1, Q8_0, Q4_K and Q6_K, ``read_blocks`` also gives the stored values without
    loss.
    """

    def __init__(self, name: str, source: SourceFile, offset: int, shape: tuple, ggml_type: str,
                 block: int, block_bytes: int):
        super().__init__(name, shape, ggml_type.lower(), source.path)
        self.ggml_type = ggml_type
        self.offset = offset  # of the first block, from the start of the file
        self.nbytes = self.numel // block * block_bytes
        self._source = source
        self._block = block
        self._block_bytes = block_bytes

    @property
    def _row_elems(self) -> int:
        return math.prod(self.shape[1:])

    def _raw_blocks(self, e0: int, e1: int) -> np.ndarray:
        """Elements e0..e1-1 (both multiples of the block) as uint8 [n_blocks, block bytes]."""
        b0, b1 = e0 // self._block, e1 // self._block
        raw = self._source.read(self.offset + b0 * self._block_bytes, (b1 - b0) * self._block_bytes)
        return raw.reshape(b1 - b0, self._block_bytes)

    def _read_rows(self, r0: int, r1: int) -> np.ndarray:
        # Damaged scales (fp16 Inf or NaN) give NaN, which the converter reports as one error
        # naming the tensor; numpy's warnings about it would only add stray lines.
        with np.errstate(invalid="ignore", over="ignore"):
            return self._decode_rows(r0, r1)

    def _decode_rows(self, r0: int, r1: int) -> np.ndarray:
        if len(self.shape) == 1:
            # A 1-D tensor's rows are its elements: decode the blocks around them.
            e0 = r0 // self._block * self._block
            e1 = -(-r1 // self._block) * self._block
            if r0 == r1:
                return np.zeros(0, np.float32)
            return _DEQUANT[self.ggml_type](self._raw_blocks(e0, e1)).reshape(-1)[r0 - e0:r1 - e0]
        k = self._row_elems
        out_shape = (r1 - r0,) + self.row_shape
        if r0 == r1:
            return np.zeros(out_shape, np.float32)
        vals = _DEQUANT[self.ggml_type](self._raw_blocks(r0 * k, r1 * k))
        return vals.reshape(out_shape)

    def read_blocks(self, r0: int, r1: int) -> dict:
        """Rows r0..r1-1 of a 2-D Q4_0/Q4_1/Q8_0/Q4_K/Q6_K tensor as the stored values, losslessly.

        Q4_0: {"q": uint8 [n, K] in 0..15 (the quant of each column), "d": uint16 [n, K/32]
        (fp16 bits of each block's scale)}; Q4_1 adds "m" (fp16 bits of each block's min);
        Q8_0: {"q": int8 [n, K], "d"}.
        Q4_K: {"q": uint8 [n, K] in 0..15, "d", "dmin": uint16 [n, K/256] (fp16 bits),
        "scales": uint8 [n, K/256, 12] (the packed 6-bit scales and mins as stored)}.
        Q6_K: {"q": uint8 [n, K] in 0..63, "d": uint16 [n, K/256], "scales": int8 [n, K/256, 16]}.
        """
        if self.ggml_type not in ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K") or len(self.shape) != 2:
            raise ValueError(f"{self.name}: read_blocks needs a 2-D Q4_0, Q4_1, Q8_0, Q4_K or Q6_K "
                             f"tensor, not {self.ggml_type}{list(self.shape)}")
        if not (isinstance(r0, (int, np.integer)) and isinstance(r1, (int, np.integer))
                and 0 <= r0 <= r1 <= self.nrows):
            raise ValueError(f"{self.name}: bad row range {r0}..{r1} for {self.nrows} rows")
        n, k = int(r1 - r0), self.shape[1]
        nb = k // self._block
        b = self._raw_blocks(int(r0) * k, int(r1) * k)

        def fp16_bits(lo):
            return np.ascontiguousarray(b[:, lo:lo + 2]).view("<u2").astype(np.uint16).reshape(n, nb)

        if self.ggml_type in ("Q4_K", "Q6_K"):
            return k_block_fields(self.ggml_type, b, n)
        if self.ggml_type == "Q8_0":
            q = np.ascontiguousarray(b[:, 2:34]).view(np.int8).reshape(n, k)
            return {"q": q, "d": fp16_bits(0)}
        first = 2 if self.ggml_type == "Q4_0" else 4
        out = {"q": _nibbles(b[:, first:first + 16]).reshape(n, k), "d": fp16_bits(0)}
        if self.ggml_type == "Q4_1":
            out["m"] = fp16_bits(2)
        return out


class GGUFFile:
    """A parsed GGUF file: version, metadata, tensors (by GGUF name), and the open file."""

    def __init__(self, path: str, version: int, metadata: dict, types: dict, tensors: dict,
                 source: SourceFile):
        self.path = path
        self.version = version
        self.metadata = metadata  # key -> value (int, float, bool, str, list, numpy array)
        self.types = types  # key -> value type id (arrays: (_ARRAY, element type))
        self.tensors = tensors
        self._source = source

    def close(self) -> None:
        self._source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- parsing


class _Cursor:
    """Sequential little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, msg: str):
        raise ModelFileError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                      f"{self.size - self.pos} left")

    def unpack(self, fmt: str, size: int, what: str):
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def count(self, what: str, cap: int, min_item_bytes: int) -> int:
        """A u64 count of items that each take at least min_item_bytes of the file."""
        n = self.u64(what)
        if n > cap:
            self.fail(f"{what} is {n}, more than the limit of {cap}")
        if n * min_item_bytes > self.size - self.pos:
            self.fail(f"{what} is {n}, but only {self.size - self.pos} bytes are left in the file")
        return n

    def raw_string(self, what: str, cap: int) -> bytes:
        n = self.u64(f"length of {what}")
        if n > cap:
            self.fail(f"{what} claims {n} bytes, more than the limit of {cap}")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def string(self, what: str, cap: int = MAX_STRING_BYTES) -> str:
        raw = self.raw_string(what, cap)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")


def _read_value(c: _Cursor, vtype: int, key: str, depth: int = 0):
    """One metadata value of type vtype; returns (value, type id)."""
    if vtype in _SCALARS:
        name, fmt = _SCALARS[vtype]
        v = c.unpack(fmt, struct.calcsize(fmt), f"value of {key}")
        if vtype == _FLOAT32:
            # The shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06.
            v = float(str(np.float32(v)))
        if vtype == _BOOL:
            if v > 1:
                c.fail(f"{key}: bool value {v} is neither 0 nor 1")
            v = bool(v)
        return v, vtype
    if vtype == _STRING:
        return c.string(f"value of {key}"), vtype
    if vtype != _ARRAY:
        c.fail(f"{key}: unknown metadata value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        c.fail(f"{key}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
    etype = c.u32(f"element type of {key}")
    if etype in _SCALARS:
        fmt = _SCALARS[etype][1]
        size = struct.calcsize(fmt)
        n = c.count(f"length of array {key}", MAX_ARRAY_LEN, size)
        arr = np.frombuffer(c.buf, dtype=np.dtype(fmt), count=n, offset=c.pos).copy()
        c.pos += n * size
        if etype == _BOOL:
            if n and arr.max() > 1:
                c.fail(f"{key}: bool array holds a value that is neither 0 nor 1")
            arr = arr.astype(bool)
        return arr, (_ARRAY, etype)
    if etype == _STRING:
        n = c.count(f"length of array {key}", MAX_ARRAY_LEN, 8)
        return _string_array(c, n, key), (_ARRAY, etype)
    if etype == _ARRAY:
        n = c.count(f"length of array {key}", MAX_ARRAY_LEN, 12)
        return [_read_value(c, _ARRAY, f"{key}[{i}]", depth + 1)[0] for i in range(n)], (_ARRAY, etype)
    c.fail(f"{key}: unknown array element type {etype}")


_U64 = struct.Struct("<Q")


def _string_array(c: _Cursor, n: int, key: str) -> list:
    """n strings: _Cursor.string's checks in one tight loop (vocabularies have 100k+)."""
    buf, pos, size, out = c.buf, c.pos, c.size, []
    unpack = _U64.unpack_from
    for i in range(n):
        if size - pos < 8:
            c.pos = pos
            c.need(8, f"length of element {i} of {key}")
        m = unpack(buf, pos)[0]
        pos += 8
        if m > size - pos or m > MAX_STRING_BYTES:
            c.pos = pos
            c.fail(f"element {i} of {key} claims {m} bytes, but only {size - pos} are left "
                   "(truncated?)")
        try:
            out.append(buf[pos:pos + m].decode("utf-8"))
        except UnicodeDecodeError:
            c.fail(f"element {i} of {key} is not valid UTF-8")
        pos += m
    c.pos = pos
    return out


def _parse(buf, path: str, source: SourceFile) -> GGUFFile:
    c = _Cursor(buf, path)
    c.need(4, "magic")
    if bytes(buf[0:4]) != MAGIC:
        c.fail(f"not a GGUF file (starts with {bytes(buf[0:4])!r}, not {MAGIC!r})")
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version == 1:
            c.fail("GGUF version 1 is too old; only versions 2 and 3 are read (re-convert the "
                   "model with a current llama.cpp)")
        if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
            c.fail("big-endian GGUF files are not supported")
        c.fail(f"unsupported GGUF version {version} (only 2 and 3 are read)")
    # A tensor info takes at least 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 + 8 bytes.
    n_tensors = c.count("tensor count", MAX_TENSORS, 32)
    # A key/value takes at least 8 (key length) + 1 (key) + 4 (type) + 1 (value) bytes.
    n_kv = c.count("metadata key/value count", MAX_KV, 14)

    metadata, types = {}, {}
    for i in range(n_kv):
        key = c.string(f"key of metadata entry {i}", MAX_KEY_BYTES)
        if not key:
            c.fail(f"metadata entry {i} has an empty key")
        if key in metadata:
            c.fail(f"metadata key {key} appears twice")
        vtype = c.u32(f"value type of {key}")
        metadata[key], types[key] = _read_value(c, vtype, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if types["general.alignment"] != _UINT32 or not 0 < alignment <= MAX_ALIGNMENT \
                or alignment & (alignment - 1):
            c.fail(f"general.alignment must be a uint32 power of two up to {MAX_ALIGNMENT}, got "
                   f"{alignment!r}")

    infos = []
    seen = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}", MAX_NAME_BYTES)
        if name in seen:
            c.fail(f"tensor {name} appears twice")
        seen.add(name)
        n_dims = c.u32(f"dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [c.u64(f"dimension {d} of tensor {name}") for d in range(n_dims)]
        ttype = c.u32(f"type of tensor {name}")
        offset = c.u64(f"offset of tensor {name}")
        infos.append((name, ne, ttype, offset))

    data_start = -(-c.pos // alignment) * alignment
    if n_tensors and data_start > c.size:
        c.fail(f"the data section would start at byte {data_start}, past the end of the file "
               f"({c.size} bytes)")
    data_size = c.size - data_start
    tensors = {}
    for name, ne, ttype, offset in infos:
        tensors[name] = _make_tensor(c, source, name, ne, ttype, offset, alignment, data_start,
                                     data_size)
    return GGUFFile(path, version, metadata, types, tensors, source)


def _make_tensor(c: _Cursor, source: SourceFile, name: str, ne: list, ttype: int, offset: int,
                 alignment: int, data_start: int, data_size: int) -> GGUFTensor:
    if ttype not in GGML_TYPES:
        what = f"{_REMOVED_TYPES[ttype]} (a type ggml no longer has)" if ttype in _REMOVED_TYPES \
            else f"unknown type {ttype}"
        c.fail(f"tensor {name} has {what}")
    tname, block, block_bytes = GGML_TYPES[ttype]
    if tname not in _DEQUANT:
        raise CheckpointError(f"{c.path}: tensor {name} is stored as {tname}, which llamacpu cannot "
                              f"convert (supported: {', '.join(SUPPORTED_TYPES)})")
    dims = ", ".join(map(str, ne))
    if any(d < 1 or d > MAX_DIM for d in ne):
        c.fail(f"tensor {name} has dimensions [{dims}]: each must be between 1 and {MAX_DIM}")
    numel = math.prod(ne)
    if numel > MAX_NUMEL:
        c.fail(f"tensor {name} has dimensions [{dims}]: {numel} elements is more than the limit "
               f"of {MAX_NUMEL}")
    if ne[0] % block:
        c.fail(f"tensor {name} is {tname} with rows of {ne[0]} elements, not a multiple of its "
               f"block of {block}")
    nbytes = numel // block * block_bytes
    if offset % alignment:
        c.fail(f"tensor {name} starts at data offset {offset}, not a multiple of the alignment "
               f"{alignment}")
    if offset + nbytes > data_size:
        c.fail(f"tensor {name} (bytes {offset}..{offset + nbytes} of the data section) lies past "
               f"the end of the file; the data section has {data_size} bytes (truncated?)")
    # GGUF lists dimensions innermost first; ours are outermost first.
    return GGUFTensor(name, source, data_start + offset, tuple(reversed(ne)), tname, block,
                      block_bytes)


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file's header and tensor directory; tensors read lazily from the file."""
    path = str(path)
    try:
        source = SourceFile(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if source.size == 0:
            raise ModelFileError(f"{path}: empty file, not a GGUF file")
        # The header is parsed from a map of the file, so a large vocabulary costs no copy;
        # numeric arrays are copied out of it, so nothing refers to the map once closed.
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, source)
    except BaseException as e:
        source.close()
        if isinstance(e, LlamaCPUError) or not isinstance(e, Exception):
            raise
        if isinstance(e, OSError):
            raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
        raise ModelFileError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- checkpoint


def open_gguf(path) -> Checkpoint:
    """Open a GGUF file of a LLaMA-architecture model as a Checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory")
    gf = read_gguf(path)
    try:
        return _checkpoint(gf)
    except BaseException as e:
        gf.close()
        if isinstance(e, LlamaCPUError) or not isinstance(e, Exception):
            raise
        raise CheckpointError(f"{path}: cannot convert ({type(e).__name__}: {e})") from None


class _Meta:
    """Typed, checked access to a GGUF file's metadata."""

    def __init__(self, gf: GGUFFile):
        self.gf = gf
        self.where = gf.path

    def fail(self, msg):
        raise CheckpointError(f"{self.where}: {msg}")

    def has(self, key) -> bool:
        return key in self.gf.metadata

    def type_name(self, key) -> str:
        t = self.gf.types[key]
        if isinstance(t, tuple):
            return f"array of {_TYPE_NAMES.get(t[1], t[1])}"
        return _TYPE_NAMES.get(t, str(t))

    def integer(self, key, default=None, lo=0, hi=1 << 62):
        if key not in self.gf.metadata:
            if default is None:
                self.fail(f"lacks metadata key {key}")
            return default
        v = self.gf.metadata[key]
        if self.gf.types[key] not in _INT_TYPES:
            self.fail(f"{key} must be an integer, not {self.type_name(key)}")
        if not lo <= v <= hi:
            self.fail(f"{key}={v} is outside [{lo}, {hi}]")
        return int(v)

    def number(self, key, default=None):
        if key not in self.gf.metadata:
            if default is None:
                self.fail(f"lacks metadata key {key}")
            return default
        v = self.gf.metadata[key]
        if self.gf.types[key] not in _FLOAT_TYPES | _INT_TYPES:
            self.fail(f"{key} must be a number, not {self.type_name(key)}")
        if not math.isfinite(v):
            self.fail(f"{key} is {v}")
        return float(v)

    def string(self, key, default=None):
        if key not in self.gf.metadata:
            if default is None:
                self.fail(f"lacks metadata key {key}")
            return default
        if self.gf.types[key] != _STRING:
            self.fail(f"{key} must be a string, not {self.type_name(key)}")
        return self.gf.metadata[key]

    def flag(self, key, default: bool):
        if key not in self.gf.metadata:
            return default
        if self.gf.types[key] != _BOOL:
            self.fail(f"{key} must be a bool, not {self.type_name(key)}")
        return bool(self.gf.metadata[key])

    def array(self, key, elem_types, what: str, required: bool = True):
        """An array whose element type is one of elem_types (ids); None if absent and optional."""
        if key not in self.gf.metadata:
            if required:
                self.fail(f"lacks metadata key {key}")
            return None
        t = self.gf.types[key]
        if not isinstance(t, tuple) or t[1] not in elem_types:
            self.fail(f"{key} must be an array of {what}, not {self.type_name(key)}")
        return self.gf.metadata[key]


def _checkpoint(gf: GGUFFile) -> Checkpoint:
    from .gguf_tokenizer import tokenizer_from_gguf

    md = _Meta(gf)
    where = gf.path
    arch = md.string("general.architecture")
    if arch != "llama":
        md.fail(f"architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    if md.integer(p + "expert_count", default=0) > 0:
        md.fail(f"{p}expert_count={md.integer(p + 'expert_count')}: mixture-of-experts models are not "
                "supported")
    for key in (p + "attention.head_count", p + "attention.head_count_kv", p + "feed_forward_length"):
        if md.has(key) and isinstance(gf.types[key], tuple):
            md.fail(f"{key} is a per-layer array; models with layers of different shapes are not "
                    "supported")

    dim = md.integer(p + "embedding_length", lo=1)
    n_layers = md.integer(p + "block_count", lo=1)
    n_heads = md.integer(p + "attention.head_count", lo=1)
    n_kv_heads = md.integer(p + "attention.head_count_kv", default=n_heads, lo=1)
    ffn_dim = md.integer(p + "feed_forward_length", lo=1)
    head_dim = md.integer(p + "attention.key_length", default=0, lo=1)
    if head_dim:
        v_dim = md.integer(p + "attention.value_length", default=head_dim, lo=1)
        if v_dim != head_dim:
            md.fail(f"{p}attention.key_length={head_dim} but value_length={v_dim}; different "
                    "key and value head sizes are not supported")
    else:
        if dim % n_heads:
            md.fail(f"{p}embedding_length={dim} is not a multiple of {p}attention.head_count={n_heads}")
        head_dim = dim // n_heads
    rot = md.integer(p + "rope.dimension_count", default=head_dim, lo=1)
    if rot != head_dim:
        md.fail(f"{p}rope.dimension_count={rot} but the head size is {head_dim}: partial rotary "
                "embeddings are not supported")

    found, rope_freqs = _canonical(gf)
    tied = "output" not in found
    tok_kind, tok_data, tok_info, n_tokens = tokenizer_from_gguf(md)
    vocab_size = md.integer(p + "vocab_size", default=n_tokens, lo=1)
    if n_tokens > vocab_size:
        md.fail(f"the tokenizer has {n_tokens} tokens but {p}vocab_size is {vocab_size}")

    config = _make_config(where, dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
        vocab_size=vocab_size, head_dim=head_dim,
        norm_eps=md.number(p + "attention.layer_norm_rms_epsilon"),
        rope_theta=md.number(p + "rope.freq_base", default=10000.0),
        max_seq_len=md.integer(p + "context_length", default=2048, lo=1),
        tied_output=tied, rope_scaling=_rope_scaling(md, rope_freqs, head_dim),
        bos_id=tok_info["bos_id"], eos_id=tok_info["eos_id"]))
    present = {int(k.split(".")[1]) for k in found if k.startswith("layers.")}
    if present and max(present) >= n_layers:
        md.fail(f"{p}block_count={n_layers}, but the file has tensors of layer {max(present)}")
    _check_present(found, n_layers, tied, where, _gguf_name)
    _check_shapes(found, config, where)

    chat_template = md.string("tokenizer.chat_template", default="") or None
    counts: dict = {}
    for t in gf.tensors.values():
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    types = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    name = Path(where).name
    if name.lower().endswith(".gguf"):
        name = name[:-5]
    return Checkpoint(config=config, tensors=_ordered(found, config), tokenizer_kind=tok_kind,
                      tokenizer_data=tok_data, source=f"gguf v{gf.version} ({types})", name=name,
                      files=[gf], chat_template=chat_template, tokenizer_info=tok_info)


def _canonical(gf: GGUFFile) -> tuple:
    """({canonical name: tensor}, rope_freqs tensor or None); unknown tensors are refused."""
    found = {}
    rope_freqs = None
    for name, t in gf.tensors.items():
        if name == _ROPE_FREQS:
            rope_freqs = t
            continue
        if name in _GLOBAL:
            found[_GLOBAL[name]] = t
            continue
        layer, rest = _split_layer(name, "blk.")
        if layer is None or rest not in _LAYER:
            raise CheckpointError(f"{gf.path}: unexpected tensor {name} (not a weight of a LLaMA "
                                  "model llamacpu can run)")
        found[f"layers.{layer}.{_LAYER[rest]}"] = t
    return found, rope_freqs


def _gguf_name(canon: str) -> str:
    layer, rest = _split_layer(canon, "layers.")
    if layer is None:
        return next(k for k, v in _GLOBAL.items() if v == canon)
    return f"blk.{layer}." + next(k for k, v in _LAYER.items() if v == rest)


def _rope_scaling(md: _Meta, rope_freqs: Optional[GGUFTensor], head_dim: int) -> Optional[dict]:
    p = "llama.rope.scaling."
    kind = md.string(p + "type", default="none")
    factor = md.number(p + "factor", default=0.0)
    if kind == "none" or (kind == "linear" and factor in (0.0, 1.0)):
        scaling = None
    elif kind == "linear":
        if factor <= 0:
            md.fail(f"{p}factor={factor} must be positive")
        scaling = {"rope_type": "linear", "factor": factor}
    else:
        scaling = {"rope_type": kind, "factor": factor}
        if md.has(p + "original_context_length"):
            scaling["original_max_position_embeddings"] = md.integer(p + "original_context_length", lo=1)
    if rope_freqs is not None:
        if scaling is not None:
            md.fail(f"both {p}type={kind} and a rope_freqs tensor; cannot combine the two")
        scaling = _llama3_scaling(md, rope_freqs, head_dim)
    if scaling is not None and scaling["rope_type"] not in _RUNTIME_ROPE_KINDS:
        md.fail(f"rope scaling {scaling['rope_type']!r} is not supported (only "
                f"{', '.join(_RUNTIME_ROPE_KINDS)})")
    return scaling


# LLaMA-3.x releases' rope scaling, tried first when a file carries rope_freqs.
_LLAMA3_KNOWN = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


def _llama3_factors(theta: float, head_dim: int, factor, low, high, old_ctx) -> np.ndarray:
    # As llama.cpp's convert_hf_to_gguf.py computes rope_freqs from a llama3 rope_scaling.
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


def _llama3_scaling(md: _Meta, rope_freqs: GGUFTensor, head_dim: int) -> Optional[dict]:
    """The rope scaling whose factors are a file's rope_freqs; refuse if none gives them."""
    if rope_freqs.shape != (head_dim // 2,):
        md.fail(f"rope_freqs has shape {list(rope_freqs.shape)}, expected [{head_dim // 2}]")
    got = rope_freqs.read().astype(np.float64)
    if not (np.isfinite(got).all() and (got > 0).all()):
        md.fail("rope_freqs holds values that are not positive numbers")
    theta = md.number("llama.rope.freq_base", default=10000.0)
    factor = float(got.max())
    if np.allclose(got, 1.0, rtol=1e-6):
        return None
    if np.allclose(got, factor, rtol=1e-6):
        return {"rope_type": "linear", "factor": factor}

    def llama3(factor, low, high, old):
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": old}

    candidates = [llama3(*p) for p in _LLAMA3_KNOWN]
    # Only the wavelengths old/high and old/low matter, so low is fixed at 1 and the rest
    # fitted to the factors.
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ones, tops = np.isclose(got, 1.0, rtol=1e-6), np.isclose(got, factor, rtol=1e-6)
    mid = ~ones & ~tops
    if mid.sum() >= 2:
        # Between the plateaus, 1/f is linear in 1/wavelength.
        smooth = (1 / got[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[mid], smooth, 1)
        if a > 0 and b < 0:
            candidates.append(llama3(factor, 1.0, float(1 - 1 / b), float(-a / b)))
    elif not mid.any() and ones.any() and wavelen[ones].max() < wavelen[tops].min():
        # No factor between the plateaus: any boundary in the gap gives the same factors.
        w1, w2 = wavelen[ones].max(), wavelen[tops].min()
        old = w1 + 0.9 * (w2 - w1)
        candidates.append(llama3(factor, 1.0, float((old / w1 + 1) / 2), float(old)))
    for c in candidates:
        args = (c["factor"], c["low_freq_factor"], c["high_freq_factor"],
                c["original_max_position_embeddings"])
        if np.allclose(_llama3_factors(theta, head_dim, *args), got, rtol=1e-4):
            return c
    md.fail("the rope_freqs tensor does not match LLaMA-3 style rope scaling; other per-frequency "
            "rope factors are not supported")


def read_gguf_tokenizer(path) -> tuple:
    """(kind, data, info) of the tokenizer a GGUF file's metadata describes; the file need
    not hold a model (a vocabulary-only GGUF will do)."""
    from .gguf_tokenizer import tokenizer_from_gguf

    with read_gguf(path) as gf:
        kind, data, info, _ = tokenizer_from_gguf(_Meta(gf))
    info["chat_template"] = _Meta(gf).string("tokenizer.chat_template", default="") or None
    return kind, data, info
