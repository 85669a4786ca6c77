"""The llamacpu model file: one definition for the writer (the converter) and the reader.

Layout (docs/FORMAT.md has the full description):

    offset 0   header, 64 bytes, little endian:
               magic b"LLAMACPU" | u32 version | u32 flags | u64 meta_offset | u64 meta_size
               | u64 data_offset | u64 data_size | 16 zero bytes
    meta       UTF-8 JSON: hyperparameters, tokenizer, chat template, tensor directory
    data       tensors and the tokenizer blob, each at a 64-byte aligned offset relative to
               data_offset (itself a multiple of 4096), in the layouts of csrc/quants.h

Every number read from a file is checked before use: the reader treats the file as hostile.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import ModelConfig
from .errors import ModelFileError, ModelNotFoundError

MAGIC = b"LLAMACPU"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQQ16s")
assert HEADER.size == 64
DATA_ALIGN = 4096
TENSOR_ALIGN = 64
MAX_META_BYTES = 64 << 20
MAX_TENSORS = 1 << 16

# Storage types, with the ids csrc/quants.h uses.
DTYPES = {"f32": 0, "f16": 1, "q8_0": 2, "q4_0": 3, "q4_1": 4, "q4_k": 5, "q6_k": 6}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
TILE_ROWS = 16
BLOCK = 32
SUPER_BLOCK = 256  # the K types' super-block (csrc/kquants.h)
_TILE_BLOCK_BYTES = {"q8_0": 512 + 32, "q4_0": 256 + 32, "q4_1": 256 + 64}
_TILE_SUPER_BLOCK_BYTES = {"q4_k": 2048 + 256, "q6_k": 3072 + 288}
# A fused tensor (q/k/v, gate/up) may store its rows as segments of different types: dtype
# MIXED, and "segments" [[rows, dtype], ...], each a matrix of its own at a 64-byte aligned
# offset inside the tensor's extent.
MIXED = "mixed"
MAX_SEGMENTS = 16


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def tensor_bytes(dtype: str, shape: tuple) -> int:
    """Bytes of a tensor; matches csrc/quants.h matrix_bytes. Raises ValueError if not allowed."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if not shape or len(shape) > 2 or any((not isinstance(d, int)) or isinstance(d, bool) or d <= 0 or d >= 1 << 31 for d in shape):
        raise ValueError(f"bad shape {shape!r}")
    if dtype in ("f32", "f16"):
        n = 1
        for d in shape:
            n *= d
        return n * (4 if dtype == "f32" else 2)
    unit = SUPER_BLOCK if dtype in _TILE_SUPER_BLOCK_BYTES else BLOCK
    if len(shape) != 2 or shape[1] % unit:
        raise ValueError(f"{dtype} needs a 2-D shape with a multiple of {unit} columns, got {shape}")
    rows, cols = shape
    tiles = (rows + TILE_ROWS - 1) // TILE_ROWS
    per_unit = _TILE_SUPER_BLOCK_BYTES[dtype] if unit == SUPER_BLOCK else _TILE_BLOCK_BYTES[dtype]
    return tiles * (cols // unit) * per_unit


def segment_layout(segments, shape) -> tuple:
    """([(rows, dtype, offset within the tensor, bytes)], total bytes) of a tensor stored as row
    segments [(rows, dtype), ...]. Raises ValueError if they do not make up the shape."""
    if not isinstance(segments, (list, tuple)) or not 2 <= len(segments) <= MAX_SEGMENTS:
        raise ValueError(f"segments must be a list of 2 to {MAX_SEGMENTS} [rows, dtype] pairs")
    if not shape or len(shape) != 2:
        raise ValueError(f"a segmented tensor must be 2-D, got {shape!r}")
    out, off, total_rows = [], 0, 0
    for seg in segments:
        if not isinstance(seg, (list, tuple)) or len(seg) != 2:
            raise ValueError("each segment must be [rows, dtype]")
        rows, dtype = seg
        if dtype == MIXED or not isinstance(dtype, str):
            raise ValueError(f"bad segment type {dtype!r}")
        size = tensor_bytes(dtype, (rows, shape[1]))  # checks rows and dtype too
        off = align(off, TENSOR_ALIGN)
        out.append((rows, dtype, off, size))
        off += size
        total_rows += rows
    if total_rows != shape[0]:
        raise ValueError(f"segments hold {total_rows} rows, the shape {list(shape)} needs {shape[0]}")
    return out, off


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    offset: int  # absolute, in the file
    size: int
    segments: Optional[tuple] = None  # dtype MIXED: ((rows, dtype, absolute offset), ...)


@dataclass
class ModelMeta:
    """What the metadata says, checked."""

    config: ModelConfig
    tensors: dict  # name -> TensorInfo
    tokenizer: dict  # kind, offset (absolute), size, and tokenizer-specific fields
    chat_template: Optional[str]
    extra: dict  # the rest of the JSON (source, quantization, ...)


def pack_header(meta_size: int, data_offset: int, data_size: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, HEADER.size, meta_size, data_offset, data_size, b"\0" * 16)


def _fail(path, msg):
    raise ModelFileError(f"{path}: {msg}")


def parse(buf, path: str, file_size: int) -> ModelMeta:
    """Checks the header and metadata of a mapped model file; returns the directory."""
    if file_size < HEADER.size:
        _fail(path, f"too small to be a llamacpu model file ({file_size} bytes)")
    magic, version, flags, meta_off, meta_size, data_off, data_size, _ = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        _fail(path, _not_ours(bytes(buf[:16])))
    if version != VERSION:
        _fail(path, f"file format version {version} is not supported (this llamacpu reads version {VERSION})")
    if meta_off != HEADER.size or meta_size == 0 or meta_size > MAX_META_BYTES:
        _fail(path, "damaged header (metadata location)")
    if meta_off + meta_size > file_size:
        _fail(path, "truncated (metadata runs past the end of the file)")
    if data_off % DATA_ALIGN or data_off < meta_off + meta_size or data_off > file_size or data_size > file_size - data_off:
        _fail(path, "truncated or damaged (data section outside the file)")
    try:
        meta = json.loads(bytes(buf[meta_off:meta_off + meta_size]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: [[[[...
        _fail(path, f"damaged metadata ({type(e).__name__})")
    if not isinstance(meta, dict):
        _fail(path, "damaged metadata (not an object)")

    def section(key, kind):
        v = meta.get(key)
        if not isinstance(v, kind):
            _fail(path, f"damaged metadata ({key!r} missing or of the wrong type)")
        return v

    config = ModelConfig.from_dict(section("config", dict), where=str(path))

    def extent(entry, what):
        off, size = entry.get("offset"), entry.get("size")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, size)):
            _fail(path, f"damaged metadata ({what}: bad offset or size)")
        if off % TENSOR_ALIGN or off > data_size or size > data_size - off:
            _fail(path, f"truncated or damaged ({what} lies outside the data section)")
        return data_off + off, size

    tensors = {}
    entries = section("tensors", list)
    if len(entries) > MAX_TENSORS:
        _fail(path, "damaged metadata (too many tensors)")
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("dtype"), str):
            _fail(path, "damaged metadata (bad tensor entry)")
        name, dtype = e["name"], e["dtype"]
        shape = e.get("shape")
        if not isinstance(shape, list):
            _fail(path, f"damaged metadata (tensor {name!r} has no shape)")
        shape = tuple(shape)
        layout = None
        try:
            if dtype == MIXED:
                layout, want = segment_layout(e.get("segments"), shape)
            else:
                want = tensor_bytes(dtype, shape)
        except ValueError as err:
            _fail(path, f"damaged metadata (tensor {name!r}: {err})")
        off, size = extent(e, f"tensor {name!r}")
        if size != want:
            _fail(path, f"damaged metadata (tensor {name!r} has {size} bytes, its shape needs {want})")
        if name in tensors:
            _fail(path, f"damaged metadata (tensor {name!r} listed twice)")
        segments = tuple((rows, dt, off + o) for rows, dt, o, _ in layout) if layout else None
        tensors[name] = TensorInfo(name, dtype, shape, off, size, segments)

    tok = dict(section("tokenizer", dict))
    if not isinstance(tok.get("kind"), str):
        _fail(path, "damaged metadata (tokenizer kind)")
    tok["offset"], tok["size"] = extent(tok, "tokenizer")
    _check_disjoint(path, list(tensors.values()), tok)
    template = meta.get("chat_template")
    if template is not None and not isinstance(template, str):
        _fail(path, "damaged metadata (chat_template)")
    extra = {k: v for k, v in meta.items() if k not in ("config", "tensors", "tokenizer", "chat_template")}
    return ModelMeta(config, tensors, tok, template, extra)


def _not_ours(head: bytes) -> str:
    """Why a file is not a llamacpu model file, naming what it looks like instead."""
    if head[:4] == b"GGUF":
        return "is a GGUF file; convert it first: llamacpu convert MODEL.gguf OUT.bin"
    if head[:4] == b"PK\x03\x04":
        return ("is a zip archive (a PyTorch checkpoint?), not a llamacpu model file; convert the "
                "checkpoint folder with `llamacpu convert`")
    if len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 1 << 30:
        return ("is a safetensors file, not a llamacpu model file; convert the checkpoint folder "
                "with `llamacpu convert`")
    if head[:1] == b"\x80":
        return "is a pickle (a legacy PyTorch checkpoint?), not a llamacpu model file"
    return "not a llamacpu model file (bad magic)"


def _check_disjoint(path, tensors: list, tok: dict) -> None:
    """The writer lays tensors and the tokenizer out one after the other. Overlapping extents
    would let a small file claim a huge model (every layer on the same bytes), and with it a
    KV cache and buffers of any size."""
    spans = sorted([(t.offset, t.size, f"tensor {t.name!r}") for t in tensors]
                   + [(tok["offset"], tok["size"], "the tokenizer")])
    for (a_off, a_size, a), (b_off, _, b) in zip(spans, spans[1:]):
        if b_off < a_off + a_size:
            _fail(path, f"damaged metadata ({b} overlaps {a})")


def expected_tensors(cfg: ModelConfig) -> dict:
    """Name -> shape of every tensor a model file must hold for this config."""
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    shapes = {"tok_embeddings": (v, d), "norm": (d,)}
    if not cfg.tied_output:
        shapes["output"] = (v, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm"] = (d,)
        shapes[p + "wqkv"] = (cfg.q_dim + 2 * cfg.kv_dim, d)
        shapes[p + "wo"] = (d, cfg.q_dim)
        shapes[p + "ffn_norm"] = (d,)
        shapes[p + "w13"] = (2 * f, d)
        shapes[p + "w2"] = (d, f)
    return shapes


class MappedModelFile:
    """A model file mapped read-only; weights are used in place from the mapping."""

    def __init__(self, path):
        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise ModelNotFoundError(f"{path}: no such file")
        if p.is_dir():
            raise ModelFileError(f"{path}: is a folder, not a model file (convert a checkpoint folder with `llamacpu convert`)")
        try:
            # Non-blocking, so that a FIFO given as the model cannot hang the open.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise ModelNotFoundError(f"{path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                _fail(path, "not a regular file")
            size = st.st_size
            if size < HEADER.size:
                _fail(path, f"too small to be a llamacpu model file ({size} bytes)")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            os.close(fd)
            raise ModelFileError(f"{path}: cannot map ({e.strerror})") from None
        # Kept open: tensors read by rows instead of through the mapping (model.py) use it.
        self.fd = fd
        # Transparent huge pages where the kernel offers them for files: pages read in through
        # this mapping arrive as 2 MiB folios mapped by single entries, so token generation
        # streams the weights without a TLB miss every 4 KiB (and the hardware prefetcher is
        # not stopped at each 4 KiB boundary). Pages already cached stay as they are.
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        self.size = size
        try:
            self.meta = parse(self.mm, self.path, size)
            self._check_shapes()
        except BaseException:
            self.mm.close()
            os.close(fd)
            raise

    def _check_shapes(self):
        want = expected_tensors(self.meta.config)
        have = self.meta.tensors
        for name, shape in want.items():
            if name not in have:
                _fail(self.path, f"tensor {name!r} is missing")
            if have[name].shape != shape:
                _fail(self.path, f"tensor {name!r} has shape {list(have[name].shape)}, the hyperparameters need {list(shape)}")
            if len(shape) == 1 and have[name].dtype != "f32":
                _fail(self.path, f"tensor {name!r} must be f32")
        unknown = set(have) - set(want)
        if unknown:
            _fail(self.path, f"unexpected tensor {sorted(unknown)[0]!r}")

    def blob(self, offset: int, size: int) -> bytes:
        return bytes(self.mm[offset:offset + size])

    def close(self):
        try:
            self.mm.close()
        except BufferError:
            # Some view is still alive; the mapping goes when the last one does.
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_model_file(out_path, meta: dict, tensors: list, tokenizer_blob: bytes, fill, progress=None):
    """Writes a model file atomically (a temporary file renamed into place when complete).

    meta: the JSON-able metadata without "tensors"; tensors: [(name, dtype, shape)] in file
    order, or (name, MIXED, shape, [(rows, dtype), ...]) for a tensor stored as row segments
    (segment_layout places them); fill(name, f, base_offset) writes that tensor's bytes into the open file f at
    base_offset (absolute) and may report progress. On any error or interruption the
    temporary file is removed and an existing out_path is left untouched.
    """
    import tempfile

    out_path = Path(out_path)
    parent = out_path.parent if str(out_path.parent) else Path(".")
    if not parent.is_dir():
        raise ModelNotFoundError(f"{out_path}: folder {parent} does not exist")
    if out_path.is_dir():
        raise ModelFileError(f"{out_path}: is a folder; give a file name for the output")

    entries, off = [], 0
    for name, dtype, shape, *segments in tensors:
        entry = {"name": name, "dtype": dtype, "shape": list(shape), "offset": off}
        if dtype == MIXED:
            entry["segments"] = [[rows, dt] for rows, dt in segments[0]]
            size = segment_layout(entry["segments"], tuple(shape))[1]
        else:
            size = tensor_bytes(dtype, tuple(shape))
        entries.append(dict(entry, size=size))
        off = align(off + size, TENSOR_ALIGN)
    tok_off = off
    data_size = tok_off + len(tokenizer_blob)
    full = dict(meta)
    full["tensors"] = entries
    full["tokenizer"] = dict(meta["tokenizer"], offset=tok_off, size=len(tokenizer_blob))
    meta_bytes = json.dumps(full, separators=(",", ":"), sort_keys=False).encode("utf-8")
    data_off = align(HEADER.size + len(meta_bytes), DATA_ALIGN)

    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=str(parent))
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(pack_header(len(meta_bytes), data_off, data_size))
            f.write(meta_bytes)
            f.truncate(data_off + data_size)
            for e in entries:
                fill(e["name"], f, data_off + e["offset"])
            f.seek(data_off + tok_off)
            f.write(tokenizer_blob)
            f.flush()
            os.fsync(f.fileno())
            # Out of the page cache now that it is on disk: pages cached by these writes are
            # small, and a model mapped over small pages streams its weights ~10-15% slower
            # than one whose first load reads it in as 2 MiB pages (MappedModelFile).
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return data_off + data_size
