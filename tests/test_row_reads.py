"""Matrices left in the file and read a row at a time (Matrix.from_file), as the runtime does
for an untied embedding table: the same floats as through the mapping, for every storage
type; bounds and a file that shrinks under a running model give errors, not crashes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from test_kernels import core_quantize
from test_kquants import tiles

from llamacpu import _core

F32, F16 = _core.F32, _core.F16
ROWS, COLS = 37, 512  # three tiles, the last one partial
PAD = 4096 + 64  # the matrix sits at this offset in its file, after unrelated bytes


def stored(dtype: int, rng) -> tuple:
    """(bytes of a [ROWS, COLS] matrix of dtype, the in-memory Matrix over the same bytes)."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if dtype in (_core.Q4_K, _core.Q6_K):
        data = tiles(dtype, w).tobytes()
    elif dtype == F32:
        data = w.tobytes()
    elif dtype == F16:
        data = w.astype(np.float16).tobytes()
    else:
        q, s = core_quantize(dtype, w)
        data = q.tobytes() + s.tobytes()
    return data, _core.Matrix(np.frombuffer(data, np.uint8).copy(), 0, dtype, ROWS, COLS)


ALL = ["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]
DT = {"f32": F32, "f16": F16, "q8_0": _core.Q8_0, "q4_0": _core.Q4_0, "q4_1": _core.Q4_1,
      "q4_k": _core.Q4_K, "q6_k": _core.Q6_K}


def write(tmp_path, data: bytes):
    path = tmp_path / "m.bin"
    path.write_bytes(os.urandom(PAD) + data + os.urandom(100))
    return path


@pytest.mark.parametrize("name", ALL)
def test_rows_from_file_equal_rows_from_memory(tmp_path, name):
    dtype = DT[name]
    data, mem = stored(dtype, np.random.default_rng(len(name) * 7 + dtype))
    path = write(tmp_path, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = _core.Matrix.from_file(fd, PAD, dtype, ROWS, COLS)
    finally:
        os.close(fd)  # the matrix holds a descriptor of its own
    assert not m.in_memory and mem.in_memory
    assert (m.rows, m.cols, m.dtype) == (ROWS, COLS, dtype)
    for r in range(ROWS):
        np.testing.assert_array_equal(m.dequantize_row(r), mem.dequantize_row(r))
    # embed, the op that reads such a matrix, through the backend
    b = _core.Backend(1, "scalar")
    tokens = np.array([36, 0, 17, 16, 15, 36], np.int32)
    got, want = np.zeros((6, COLS), np.float32), np.zeros((6, COLS), np.float32)
    b.embed(m, tokens, got)
    b.embed(mem, tokens, want)
    np.testing.assert_array_equal(got, want)


def test_file_matrix_bounds_and_uses(tmp_path):
    data, _ = stored(_core.Q4_0, np.random.default_rng(1))
    path = write(tmp_path, data)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        fd = f.fileno()
        with pytest.raises(ValueError, match="outside the file"):
            _core.Matrix.from_file(fd, size - len(data) + 1, _core.Q4_0, ROWS, COLS)
        with pytest.raises(ValueError, match="outside the file"):
            _core.Matrix.from_file(fd, -1, _core.Q4_0, ROWS, COLS)
        with pytest.raises(ValueError, match="bad dtype or shape"):
            _core.Matrix.from_file(fd, PAD, _core.Q4_0, ROWS, 48)
        m = _core.Matrix.from_file(fd, PAD, _core.Q4_0, ROWS, COLS)
    with pytest.raises(ValueError, match="not an open regular file"):
        _core.Matrix.from_file(-1, 0, F32, 1, 32)
    b = _core.Backend(1, "scalar")
    with pytest.raises(ValueError, match="not in memory"):
        b.matmul(m, np.zeros((1, COLS), np.float32), np.zeros((1, ROWS), np.float32), False)
    with pytest.raises(ValueError, match="in memory"):
        _core.Matrix.stacked([m, m])
    with pytest.raises(ValueError, match="row out of range"):
        m.dequantize_row(ROWS)


def test_file_shrinking_under_the_matrix_is_an_error(tmp_path):
    data, _ = stored(_core.Q8_0, np.random.default_rng(2))
    path = write(tmp_path, data)
    fd = os.open(path, os.O_RDONLY)
    m = _core.Matrix.from_file(fd, PAD, _core.Q8_0, ROWS, COLS)
    os.close(fd)
    m.dequantize_row(ROWS - 1)
    os.truncate(path, PAD + 100)
    with pytest.raises(RuntimeError, match="cannot read a weight row"):
        m.dequantize_row(ROWS - 1)
    b = _core.Backend(2, "scalar")
    with pytest.raises(RuntimeError, match="cannot read a weight row"):
        b.embed(m, np.array([30], np.int32), np.zeros((1, COLS), np.float32))
