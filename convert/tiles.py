"""Packing already-quantized blocks (from GGUF files) into the 16-row tile layouts.

GGUF's Q4_0, Q4_1 and Q8_0 blocks hold the same numbers as llamacpu's formats of the same
name, only in another order, so they are carried over bit for bit: no dequantization, no
second rounding. The layout is documented in docs/FORMAT.md and csrc/quants.h; the tests
check these numpy packers byte for byte against the C++ quantizer's output.
"""

from __future__ import annotations

import numpy as np

from llamacpu.fileformat import BLOCK, TILE_ROWS


def _pad_rows(a: np.ndarray, fill=0) -> np.ndarray:
    n = a.shape[0]
    tiles = (n + TILE_ROWS - 1) // TILE_ROWS
    if tiles * TILE_ROWS == n:
        return a
    pad = np.full((tiles * TILE_ROWS - n,) + a.shape[1:], fill, a.dtype)
    return np.concatenate([a, pad])


def _scales(s: np.ndarray) -> np.ndarray:
    """[rows, nb] -> tile-major, block-major groups of 16 (one per tile row)."""
    s = _pad_rows(s)
    t = s.shape[0] // TILE_ROWS
    return s.reshape(t, TILE_ROWS, -1).transpose(0, 2, 1)  # [tile, block, row]


def pack_q4(q: np.ndarray, d: np.ndarray, m: np.ndarray = None) -> tuple:
    """q: uint8 [rows, cols] of nibble values 0..15; d (and m for Q4_1): uint16 fp16 bits
    [rows, cols/32]. Returns (quants, scales) bytes of the tiles these rows fill."""
    rows, cols = q.shape
    nb = cols // BLOCK
    # Padding rows hold zeros: nibble 8 in Q4_0 (it stands for q-8), 0 in Q4_1 (d*q+m).
    qq = _pad_rows(q.astype(np.uint8, copy=False), 8 if m is None else 0).reshape(-1, TILE_ROWS, nb, 2, 4, 4)
    packed = qq[:, :, :, 0] | (qq[:, :, :, 1] << 4)  # [t, r, b, v, j]
    quants = packed.transpose(0, 2, 3, 1, 4)  # [t, b, v, r, j]
    scales = _scales(d.astype(np.uint16, copy=False))
    if m is not None:
        scales = np.stack([scales, _scales(m.astype(np.uint16, copy=False))], axis=2)  # [t, b, 2, r]
    return np.ascontiguousarray(quants).tobytes(), np.ascontiguousarray(scales).tobytes()


def pack_q8(q: np.ndarray, d: np.ndarray) -> tuple:
    """q: int8 [rows, cols]; d: uint16 fp16 bits [rows, cols/32]."""
    rows, cols = q.shape
    nb = cols // BLOCK
    qq = _pad_rows(q.astype(np.int8, copy=False)).reshape(-1, TILE_ROWS, nb, 8, 4)  # [t, r, b, g, j]
    quants = qq.transpose(0, 2, 3, 1, 4)  # [t, b, g, r, j]
    return np.ascontiguousarray(quants).tobytes(), np.ascontiguousarray(_scales(d.astype(np.uint16))).tobytes()
