"""Lazily readable tensors backed by checkpoint files.

A converter pass reads each weight a block of rows at a time, so no tensor here ever holds
more than the rows asked for, and no file is read (or mapped) as a whole: converting a 7B
model must not need memory the size of the checkpoint.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import numpy as np

from llamacpu.errors import CheckpointError

# Source storage types we can convert, with their size in bytes.
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}

# The numpy type of the raw bits; bf16 is read as uint16 and widened by hand.
_RAW = {"f32": "f4", "f16": "f2", "bf16": "u2"}


def _prod(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen raw source values (already in native byte order) to a new float32 array."""
    if dtype == "bf16":
        # bfloat16 is the high half of a float32: shift the bits into place.
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class SourceFile:
    """An open checkpoint file read by absolute offsets, shared by the tensors it holds."""

    def __init__(self, path: str):
        self.path = str(path)
        self._f = open(self.path, "rb")
        self.size = os.fstat(self._f.fileno()).st_size
        # Without positional reads, seek+readinto must not interleave between threads.
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """Exactly nbytes from offset, as a new uint8 array; a short file is a CheckpointError."""
        if self._f.closed:
            raise CheckpointError(f"{self.path}: read after the checkpoint was closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CheckpointError(
                f"{self.path}: data at bytes {offset}..{offset + nbytes} lies past the end of the "
                f"file ({self.size} bytes); the file is truncated or damaged"
            )
        buf = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(buf)
        done = 0
        try:
            if hasattr(os, "preadv"):
                fd = self._f.fileno()
                while done < nbytes:
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if n <= 0:
                        break
                    done += n
            else:
                with self._lock:
                    self._f.seek(offset + done)
                    while done < nbytes:
                        n = self._f.readinto(view[done:])
                        if not n:
                            break
                        done += n
        except OSError as e:
            raise CheckpointError(f"{self.path}: read failed ({e.strerror or e})") from None
        if done != nbytes:
            raise CheckpointError(f"{self.path}: unexpected end of file (truncated?)")
        return buf


class LazyTensor:
    """A named tensor whose rows are read on demand, always returned as float32.

    ``dtype`` is the source storage type ("f32", "f16", "bf16"; anything else marks a
    tensor that cannot be read). For 1-D tensors a "row" is one element.
    """

    name: str
    shape: tuple
    dtype: str
    where: str  # the file (or files) it comes from, for error messages

    def __init__(self, name: str, shape: Sequence[int], dtype: str, where: str):
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.where = where

    @property
    def nrows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_shape(self) -> tuple:
        return self.shape[1:]

    @property
    def numel(self) -> int:
        return _prod(self.shape)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1-1 as a C-contiguous float32 array of shape (r1-r0, *shape[1:])."""
        if not (isinstance(r0, (int, np.integer)) and isinstance(r1, (int, np.integer))
                and 0 <= r0 <= r1 <= self.nrows):
            raise ValueError(f"{self.name}: bad row range {r0}..{r1} for {self.nrows} rows")
        out = self._read_rows(int(r0), int(r1))
        return np.ascontiguousarray(out, dtype=np.float32)

    def read(self) -> np.ndarray:
        """The whole tensor as float32."""
        return self.read_rows(0, self.nrows).reshape(self.shape)

    def _read_rows(self, r0: int, r1: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.dtype}{list(self.shape)}>"


class UnsupportedTensor(LazyTensor):
    """A tensor of a storage type we cannot convert.

    Checkpoints carry tensors nobody needs (``rope.freqs``, integer buffers), so the error is
    deferred until something actually asks for the data.
    """

    def _read_rows(self, r0, r1):
        raise CheckpointError(
            f"{self.where}: tensor {self.name} is stored as {self.dtype}; only float32, "
            "float16 and bfloat16 weights can be converted"
        )


class FileTensor(LazyTensor):
    """A tensor stored in a file, possibly as a strided view of a larger storage.

    ``offset`` is the byte offset of element 0 of the storage, which holds ``storage_numel``
    elements; the tensor starts ``storage_offset`` elements in, with ``strides`` in elements
    (None: C-contiguous).
    """

    def __init__(self, name: str, source: SourceFile, offset: int, shape: Sequence[int],
                 dtype: str, *, storage_numel: Optional[int] = None, storage_offset: int = 0,
                 strides: Optional[Sequence[int]] = None, big_endian: bool = False):
        super().__init__(name, shape, dtype, source.path)
        if dtype not in ITEMSIZE:
            raise ValueError(f"FileTensor cannot hold {dtype}")
        self._source = source
        self._offset = int(offset)
        self._itemsize = ITEMSIZE[dtype]
        self._np_dtype = np.dtype(_RAW[dtype]).newbyteorder(">" if big_endian else "<")
        contiguous = _contiguous_strides(self.shape)
        self._strides = contiguous if strides is None else tuple(int(s) for s in strides)
        self._contiguous = self._strides == contiguous or self.numel <= 1
        self._storage_offset = int(storage_offset)
        if storage_numel is None:
            storage_numel = self._storage_offset + self.numel
        self._storage_numel = int(storage_numel)
        self._check_bounds(self._storage_numel)

    def _check_bounds(self, storage_numel: int) -> None:
        # Python ints do not overflow, so a hostile size or stride cannot wrap round.
        def bad(msg):
            raise CheckpointError(f"{self.where}: tensor {self.name}: {msg}")

        if len(self._strides) != len(self.shape):
            bad(f"{len(self.shape)} dims but {len(self._strides)} strides")
        if any(d < 0 for d in self.shape) or any(s < 0 for s in self._strides):
            bad(f"negative size or stride (size {list(self.shape)}, stride {list(self._strides)})")
        if self._storage_offset < 0 or storage_numel < 0:
            bad("negative storage offset or size")
        if self.numel == 0:
            return
        last = self._storage_offset + sum((d - 1) * s for d, s in zip(self.shape, self._strides))
        if last >= storage_numel:
            bad(f"view (offset {self._storage_offset}, size {list(self.shape)}, stride "
                f"{list(self._strides)}) reaches element {last} of a storage of {storage_numel}")
        end = self._offset + storage_numel * self._itemsize
        if self._offset < 0 or end > self._source.size:
            bad(f"data at bytes {self._offset}..{end} lies past the end of the file "
                f"({self._source.size} bytes); the file is truncated or damaged")

    def _read_rows(self, r0, r1):
        out_shape = (r1 - r0,) + self.row_shape
        if _prod(out_shape) == 0:
            return np.zeros(out_shape, np.float32)
        if self.numel > self._storage_numel - self._storage_offset:
            # Zero or overlapping strides: a few stored bytes would read as any number of
            # elements (a tiny file expanding to terabytes). No checkpoint stores weights so.
            raise CheckpointError(
                f"{self.where}: tensor {self.name}: a view of {self.numel} elements repeats elements of "
                f"its storage of {self._storage_numel} (zero or overlapping strides); weights are not stored so")
        first = self._storage_offset + r0 * self._strides[0] if self.shape else self._storage_offset
        span = 1 + sum((d - 1) * s for d, s in zip(out_shape, self._strides))
        raw = self._source.read(self._offset + first * self._itemsize, span * self._itemsize)
        raw = raw.view(self._np_dtype)
        if not self._contiguous:
            raw = np.lib.stride_tricks.as_strided(
                raw, out_shape, [s * self._itemsize for s in self._strides], writeable=False)
        raw = raw.reshape(out_shape)
        if not self._np_dtype.isnative:
            raw = raw.astype(self._np_dtype.newbyteorder("="))
        return to_float32(raw, self.dtype)


def _contiguous_strides(shape: Sequence[int]) -> tuple:
    strides, n = [], 1
    for d in reversed(shape):
        strides.append(n)
        n *= d
    return tuple(reversed(strides))


class ConcatTensor(LazyTensor):
    """Several tensors joined along dim 0 or 1 (the model-parallel shards of Meta checkpoints)."""

    def __init__(self, name: str, parts: Sequence[LazyTensor], dim: int):
        parts = list(parts)
        where = ", ".join(dict.fromkeys(p.where for p in parts))
        if not parts:
            raise ValueError("ConcatTensor needs at least one part")
        first = parts[0]
        ndim = len(first.shape)
        if dim not in (0, 1) or dim >= ndim:
            raise CheckpointError(f"{where}: cannot join {ndim}-D tensor {name} along dim {dim}")
        for i, p in enumerate(parts):
            rest = p.shape[:dim] + p.shape[dim + 1:]
            if len(p.shape) != ndim or rest != first.shape[:dim] + first.shape[dim + 1:]:
                raise CheckpointError(
                    f"{where}: tensor {name}: shard {i} has shape {list(p.shape)}, which does not "
                    f"join shard 0's {list(first.shape)} along dim {dim}")
        shape = list(first.shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        # Parts of different storage types still read as float32: a GGUF Q4_K_M file keeps
        # attn_v in Q6_K beside Q4_K attn_q/attn_k, and the converter fuses the three.
        dtypes = {p.dtype for p in parts}
        super().__init__(name, shape, first.dtype if len(dtypes) == 1 else "mixed", where)
        self.parts = parts
        self.dim = dim

    def _read_rows(self, r0, r1):
        if self.dim == 1:
            return np.concatenate([p.read_rows(r0, r1) for p in self.parts], axis=1)
        blocks, base = [], 0
        for p in self.parts:
            lo, hi = max(r0, base), min(r1, base + p.nrows)
            if lo < hi:
                blocks.append(p.read_rows(lo - base, hi - base))
            base += p.nrows
        if not blocks:
            return np.zeros((0,) + self.row_shape, np.float32)
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)


class RowPermutedTensor(LazyTensor):
    """A view whose row i is row ``perm[i]`` of another tensor."""

    def __init__(self, name: str, base: LazyTensor, perm: np.ndarray):
        perm = np.asarray(perm, dtype=np.int64)
        if perm.shape != (base.nrows,) or not np.array_equal(np.sort(perm), np.arange(base.nrows)):
            raise ValueError(f"{name}: not a permutation of {base.nrows} rows")
        super().__init__(name, base.shape, base.dtype, base.where)
        self.base = base
        self.perm = perm

    def _read_rows(self, r0, r1):
        if r0 == r1:
            return np.zeros((0,) + self.row_shape, np.float32)
        src = self.perm[r0:r1]
        lo, hi = int(src.min()), int(src.max()) + 1
        # The permutations we use stay within a head, so the span read is about what is asked.
        return self.base.read_rows(lo, hi)[src - lo]


def unrotate_half_perm(n_heads: int, head_dim: int) -> np.ndarray:
    """Rows of a Hugging Face q/k weight in Meta's order.

    HF permutes each head's rows for rotate-half RoPE; Meta's interleaved-pair row
    ``h*hd + 2*p + i`` is HF's row ``h*hd + i*hd/2 + p``.
    """
    within = np.arange(head_dim).reshape(2, head_dim // 2).T.reshape(-1)
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


class TensorFile:
    """The tensors of one opened file, and the file they read from."""

    def __init__(self, path: str, tensors: dict, source: Optional[SourceFile]):
        self.path = str(path)
        self.tensors = tensors
        self._source = source

    def close(self) -> None:
        if self._source is not None:
            self._source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
