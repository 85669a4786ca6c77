"""Packing already-quantized blocks (from GGUF files) into the 16-row tile layouts.

GGUF's Q4_0, Q4_1, Q8_0, Q4_K and Q6_K blocks hold the same numbers as llamacpu's formats of
the same name, only in another order, so they are carried over bit for bit: no
dequantization, no second rounding. The layout is documented in docs/FORMAT.md, csrc/quants.h
and csrc/kquants.h; the tests check these numpy packers byte for byte against the C++
quantizers' output.
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


# ---- K-quants (csrc/kquants.h): tile-superblocks of 16 rows x 256 columns ------------------

def _per_tile(a: np.ndarray) -> np.ndarray:
    """[rows, nsb, ...] -> [tile, nsb, ..., row] (zero padding rows), for the transposed
    scale planes of a tile-superblock."""
    a = _pad_rows(a)
    t = a.shape[0] // TILE_ROWS
    a = a.reshape((t, TILE_ROWS) + a.shape[1:])
    return np.moveaxis(a, 1, -1)


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """[tile, nsb, ...] -> contiguous uint8 [tile, nsb, bytes]."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], a.shape[1], -1)


def _nibble_tiles(q: np.ndarray) -> np.ndarray:
    """4-bit values [rows, cols] -> [tile, block of 32, 256] bytes in Q4_0's tile-block layout."""
    rows, cols = q.shape
    nb = cols // BLOCK
    qq = _pad_rows(q.astype(np.uint8, copy=False)).reshape(-1, TILE_ROWS, nb, 2, 4, 4)  # [t, r, b, half, v, i]
    packed = qq[:, :, :, 0] | (qq[:, :, :, 1] << 4)  # [t, r, b, v, i]
    return np.ascontiguousarray(packed.transpose(0, 2, 3, 1, 4)).reshape(-1, nb, 256)


def pack_q4_k(q: np.ndarray, d: np.ndarray, dmin: np.ndarray, scales: np.ndarray) -> tuple:
    """GGUF Q4_K fields (GGUFTensor.read_blocks) -> (quants, scales) bytes of the tiles these
    rows fill. q: uint8 [rows, cols] in 0..15; d, dmin: uint16 fp16 bits [rows, cols/256];
    scales: uint8 [rows, cols/256, 12], the packed 6-bit scales and mins as GGUF stores them."""
    quants = _nibble_tiles(q)  # sub-block j of super-block s is block 8s + j: the same order
    sc = np.concatenate([_as_bytes(_per_tile(d.astype(np.uint16, copy=False))),
                         _as_bytes(_per_tile(dmin.astype(np.uint16, copy=False))),
                         _as_bytes(_per_tile(scales.astype(np.uint8, copy=False)))], axis=2)
    return quants.tobytes(), np.ascontiguousarray(sc).tobytes()


def pack_q6_k(q: np.ndarray, d: np.ndarray, scales: np.ndarray) -> tuple:
    """GGUF Q6_K fields -> (quants, scales) bytes. q: uint8 [rows, cols] in 0..63; d: uint16
    fp16 bits [rows, cols/256]; scales: int8 [rows, cols/256, 16]."""
    rows, cols = q.shape
    nb = cols // BLOCK
    # [t, r, b, half t2, group k, i]: column 16*t2 + 4k + i of block b.
    qq = _pad_rows(q.astype(np.uint8, copy=False)).reshape(-1, TILE_ROWS, nb, 2, 4, 4)
    last = qq[:, :, :, :, 3]  # the group spread over the top bits of the other three
    spread = np.stack([(last >> np.uint8(2 * k)) & np.uint8(3) for k in range(3)], axis=4)
    packed = qq[:, :, :, :, :3] | (spread << np.uint8(6))  # [t, r, b, t2, k, i]
    quants = packed.transpose(0, 2, 3, 4, 1, 5)  # [t, b, t2, k, r, i]: vector 3*t2 + k
    sc = np.concatenate([_as_bytes(_per_tile(d.astype(np.uint16, copy=False))),
                         _as_bytes(_per_tile(scales.astype(np.int8, copy=False)))], axis=2)
    return np.ascontiguousarray(quants).tobytes(), np.ascontiguousarray(sc).tobytes()
