"""Every kernel on every instruction-set path (ISA) against the scalar reference, and the scalar
reference against independent numpy computations.

Each test runs on all of `_core.usable_isas()`, "scalar" included, and compares with numpy;
where a SIMD path must give the scalar bits, it is also compared with "scalar" directly.

Tolerances. u = 2^-24 is the unit roundoff of float32. Where inputs are chosen so that every
float operation is exact (small integers times powers of two), every path must return the exact
result bit for bit, whatever its summation order: those tests have no tolerance. Elsewhere the
bound is the standard forward error bound of the computation, evaluated per output element
against a float64 reference that uses the same (exactly representable) operands:
  * a dot product of n terms summed in any order, one rounding per product and per add:
    |err| <= (n + 2) u sum|w_i x_i|  (fma only removes roundings, so the bound covers it);
  * quantized matmul: the integer block dots are exact, so only the per-block float work
    rounds: (dw * da) once, the product once, the running sum once per block, so
    |err| <= (n_blocks + 2) u sum_b |dot_b dw_b da_b|. Q4_1 adds a second term per block,
    m_w * (float(sum a) * da), rounded the same way: the sum then has 2 n_blocks terms and
    |err| <= (2 n_blocks + 2) u sum_b (|dot_b dw_b da_b| + |m_b s_b da_b|);
  * element-wise kernels: a few u relative to the magnitudes of the terms, plus the SIMD exp
    (Cephes polynomial, within a few ulp of expf) where the kernel uses it.
These bounds are loose for random data (the real error is about sqrt(n) u) but they are far
below what any indexing, layout or scaling bug produces (an error of the order of one term,
about sum|w x| / n or more).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from conftest import isa_paths

from llamacpu import _core

ISAS = isa_paths()
U = 2.0 ** -24
F32, F16, Q8_0, Q4_0, Q4_1 = _core.F32, _core.F16, _core.Q8_0, _core.Q4_0, _core.Q4_1
DTYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
QUANTIZED = (Q8_0, Q4_0, Q4_1)
QUANTIZED_NAMES = ["q8_0", "q4_0", "q4_1"]
QUANT_BYTES = {Q4_0: 256, Q4_1: 256, Q8_0: 512}  # quants per 16-row x 32-column tile-block (quants.h)
SCALES = {Q4_0: 16, Q4_1: 32, Q8_0: 16}  # fp16 values per tile-block: d, and for Q4_1 then m
TOKEN_COUNTS = (1, 3, 4, 5, 64, 65, 130)  # the backend splits tokens into chunks of 64


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from the test's parameters, so every case has its own fixed data."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ---- numpy re-implementations of the storage formats (quants.h, quantize.cpp) -------------

def np_quantize_q8_0(x: np.ndarray):
    """Weight blocks [..., 32] -> int8 codes, float32 scales; d = amax/127, codes rounded half
    away from zero (lround), all in float32 as quantize.cpp does."""
    amax = np.abs(x).max(-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = (x * inv[..., None]).astype(np.float64)  # the float32 product, then exact rounding
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    return np.clip(q, -127, 127).astype(np.int8), d


def np_quantize_q4_0(x: np.ndarray):
    """Weight blocks [..., 32] -> codes 0..15, float32 scales: llama.cpp's rule d = mx / -8,
    mx the first value of largest magnitude; code = trunc(x/d + 8.5) clamped."""
    idx = np.abs(x).argmax(-1)
    mx = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    d = np.where(mx != 0, mx / np.float32(-8), np.float32(0)).astype(np.float32)  # +0 for a zero block
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = np.trunc(x * inv[..., None] + np.float32(8.5))
    return np.clip(v, 0, 15).astype(np.uint8), d


def np_quantize_q4_1(x: np.ndarray):
    """Weight blocks [..., 32] -> codes 0..15, float32 scales d and mins m: llama.cpp's rule
    d = (max - min) / 15, m = min, code = trunc((x - m)/d + 0.5) clamped, in float32."""
    mn, mx = x.min(-1), x.max(-1)
    d = ((mx - mn) / np.float32(15)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = np.trunc((x - mn[..., None]) * inv[..., None] + np.float32(0.5))
    return np.clip(v, 0, 15).astype(np.uint8), d, mn.astype(np.float32)


def np_quantize(dtype: int, blocks: np.ndarray):
    """(codes, d, m or None) of weight blocks [..., 32]."""
    if dtype == Q8_0:
        return np_quantize_q8_0(blocks) + (None,)
    if dtype == Q4_0:
        return np_quantize_q4_0(blocks) + (None,)
    return np_quantize_q4_1(blocks)


def np_pack_tiles(dtype: int, w: np.ndarray):
    """The file bytes of a quantized matrix, straight from the layout comment in quants.h:
    (quants, scales) as uint8 / uint16 arrays."""
    rows, cols = w.shape
    tiles, nb = -(-rows // 16), cols // 32
    padded = np.zeros((tiles * 16, cols), np.float32)
    padded[:rows] = w  # rows past the matrix are quantized zeros
    blocks = padded.reshape(tiles * 16, nb, 32)
    codes, d, m = np_quantize(dtype, blocks)
    if dtype == Q8_0:
        # [tile, row, block, group g, byte j] -> tile, block, g, row, j: byte r*4+j of vector g.
        quants = codes.view(np.uint8).reshape(tiles, 16, nb, 8, 4).transpose(0, 2, 3, 1, 4)
    else:
        # column = 16*half + 4v + j; byte r*4+j of vector v holds half 0 low, half 1 high.
        c = codes.reshape(tiles, 16, nb, 2, 4, 4).transpose(0, 2, 4, 1, 5, 3)
        quants = c[..., 0] | (c[..., 1] << 4)

    def per_tile_block(v):  # [rows, nb] -> [tile, block, row]
        return v.astype(np.float16).view(np.uint16).reshape(tiles, 16, nb).transpose(0, 2, 1)

    # Per tile-block: the 16 rows' d, then (Q4_1) the 16 rows' m.
    scales = per_tile_block(d) if m is None else np.stack([per_tile_block(d), per_tile_block(m)], axis=2)
    return np.ascontiguousarray(quants).reshape(-1), np.ascontiguousarray(scales).reshape(-1)


def np_unpack_tiles(dtype: int, quants: np.ndarray, scales: np.ndarray, rows: int, cols: int):
    """Inverse of the layout: codes [rows, cols] (signed, weight / d, for Q8_0 and Q4_0; the
    stored nibble 0..15 for Q4_1, weight = d * code + m), the fp16 scales d as float32
    [rows, nb], and the mins m likewise (Q4_1; None otherwise)."""
    tiles, nb = -(-rows // 16), cols // 32
    if dtype == Q8_0:
        q = quants.view(np.int8).reshape(tiles, nb, 8, 16, 4).transpose(0, 3, 1, 2, 4).astype(np.int32)
    else:
        b = quants.reshape(tiles, nb, 4, 16, 4)
        q = np.stack([b & 15, b >> 4], -1).transpose(0, 3, 1, 5, 2, 4).astype(np.int32) - (8 if dtype == Q4_0 else 0)
    q = q.reshape(tiles * 16, cols)[:rows]
    s = scales.view(np.float16).astype(np.float32).reshape(tiles, nb, SCALES[dtype] // 16, 16)
    per_row = s.transpose(0, 3, 1, 2).reshape(tiles * 16, nb, -1)[:rows]  # [row, block, d / m]
    return q, per_row[..., 0], (per_row[..., 1] if dtype == Q4_1 else None)


def core_quantize(dtype: int, w: np.ndarray):
    """The C++ quantizer's bytes for w with llama.cpp's rule ("ref"), the rule the numpy
    quantizers above restate (the default, "mse", searches for the scales of least error)."""
    rows, cols = w.shape
    tiles, nb = -(-rows // 16), cols // 32
    quants = np.zeros(tiles * nb * QUANT_BYTES[dtype], np.uint8)
    scales = np.zeros(tiles * nb * SCALES[dtype], np.uint16)
    _core.quantize_tiles(dtype, np.ascontiguousarray(w, np.float32), quants, scales, "ref")
    return quants, scales


# id(Matrix) -> (Matrix, quants, scales) of every quantized matrix make_matrix built: the
# references read codes and scales from these bytes, not through the kernels' dequantizer.
_STORED: dict = {}


def make_matrix(dtype: int, w: np.ndarray) -> "_core.Matrix":
    """w stored as dtype; the Matrix keeps its buffer alive."""
    rows, cols = w.shape
    if dtype == F32:
        return _core.Matrix(np.ascontiguousarray(w, np.float32), 0, dtype, rows, cols)
    if dtype == F16:
        return _core.Matrix(w.astype(np.float16).view(np.uint16), 0, dtype, rows, cols)
    quants, scales = core_quantize(dtype, w)
    m = _core.Matrix(np.concatenate([quants, scales.view(np.uint8)]), 0, dtype, rows, cols)
    _STORED[id(m)] = (m, quants, scales)  # holding m keeps its id unique
    return m


def stored_parts(m: "_core.Matrix"):
    """(codes, d, m) of a matrix from make_matrix, read from its bytes (np_unpack_tiles)."""
    _, quants, scales = _STORED[id(m)]
    return np_unpack_tiles(m.dtype, quants, scales, m.rows, m.cols)


def weights_of(m: "_core.Matrix") -> np.ndarray:
    """The weights exactly as the kernels see them (dequantized / widened), float64."""
    return np.stack([m.dequantize_row(r) for r in range(m.rows)]).astype(np.float64)


def np_quantize_act(x: np.ndarray, group: int = 32):
    """Activation rows [T, K] -> int8 q, float32 d, int32 s per 32-block: per group of columns
    (32, or 256 for the K-quants) d = amax/127 and q = round-half-even(x * (127/amax)) in
    float32; d repeated per block, s = sum of q per block; a group whose 127/amax is not finite
    (amax == 0 or tiny) is all zeros."""
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    amax = np.abs(x.reshape(t, k // group, group)).max(-1).repeat(group // 32, axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = (np.float32(127) / amax).astype(np.float32)
    inv = np.where(np.isfinite(inv), inv, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    return q.reshape(t, k), d, q.astype(np.int32).sum(-1).astype(np.int32)


# ---- matmul ------------------------------------------------------------------------------

def matmul(backend, m, x, out=None, accumulate=False):
    if out is None:
        out = np.zeros((x.shape[0], m.rows), np.float32)
    backend.matmul(m, x, out, accumulate)
    return out


def matmul_reference(dtype: int, m, x: np.ndarray):
    """(exact result, error bound) per output element, float64, for the operands the kernels
    use: the stored weights, and for quantized weights the int8 activations."""
    if dtype in (F32, F16):
        w = weights_of(m)
        k = x.shape[1]
        x64 = x.astype(np.float64)
        return x64 @ w.T, (k + 2) * U * (np.abs(x64) @ np.abs(w).T)
    q, d, s = np_quantize_act(x)
    t, k = x.shape
    nb = k // 32
    codes, dw, mins = stored_parts(m)
    # Block terms [nb, T, N]: (sum_k code_k q_k) * dw * da, exact in float64 (an integer below
    # 2^16 times an fp16 times a float32 needs at most 51 bits).
    qb = q.reshape(t, nb, 32).transpose(1, 0, 2).astype(np.float64)
    cb = codes.reshape(-1, nb, 32).transpose(1, 2, 0).astype(np.float64)
    da = d.T[:, :, None].astype(np.float64)
    terms = (qb @ cb) * dw.T[:, None, :].astype(np.float64) * da
    if dtype != Q4_1:
        return terms.sum(0), (nb + 2) * U * np.abs(terms).sum(0)
    # Q4_1's second term per block: m * sum(q) * da, exact too.
    min_terms = mins.T[:, None, :].astype(np.float64) * s.T[:, :, None].astype(np.float64) * da
    return (terms + min_terms).sum(0), (2 * nb + 2) * U * (np.abs(terms) + np.abs(min_terms)).sum(0)


def exact_operands(rng, dtype: int, rows: int, k: int, n_tok: int):
    """Weights and activations on which every float operation of every path is exact: small
    integer codes times powers of two, each block holding the code that fixes its scale (so the
    quantizers recover codes and scales exactly). Returns (w, x, exact w @ x.T)."""
    if dtype in (F32, F16):
        w = rng.integers(-8, 9, (rows, k)) * 2.0 ** rng.integers(-2, 1, (rows, 1))
        x = rng.integers(-8, 9, (n_tok, k)).astype(np.float64)
        return w.astype(np.float32), x.astype(np.float32), x @ w.T
    nb = k // 32
    scale = 2.0 ** rng.integers(-4, -2, (rows, nb, 1))
    offset = np.zeros((rows, nb, 1))
    if dtype == Q4_0:
        codes = rng.integers(-8, 8, (rows, nb, 32))
        codes[np.arange(rows)[:, None], np.arange(nb), rng.integers(0, 32, (rows, nb))] = -8
    elif dtype == Q4_1:
        # Codes 0 and 15 both present fix min and max, so d = (max - min) / 15 is the power of
        # two chosen; the min is a small multiple of it.
        codes = rng.integers(0, 16, (rows, nb, 32))
        ends = np.argsort(rng.random((rows, nb, 32)), -1)[..., :2]
        np.put_along_axis(codes, ends[..., :1], 0, -1)
        np.put_along_axis(codes, ends[..., 1:], 15, -1)
        offset = rng.integers(-15, 1, (rows, nb, 1)) * scale
    else:
        codes = rng.integers(-127, 128, (rows, nb, 32))
        codes[np.arange(rows)[:, None], np.arange(nb), rng.integers(0, 32, (rows, nb))] = 127
    w = codes * scale + offset
    a = rng.integers(-127, 128, (n_tok, nb, 32))
    a[np.arange(n_tok)[:, None], np.arange(nb), rng.integers(0, 32, (n_tok, nb))] = -127
    x = a * 2.0 ** rng.integers(-1, 1, (n_tok, nb, 1))
    terms = np.einsum("rbk,tbk->btr", codes * scale, x)  # [nb, T, N]
    if dtype == Q4_1:  # the kernels add the min term after each block's dot term
        min_terms = np.einsum("rb,tb->btr", offset[..., 0], x.sum(-1))
        terms = np.stack([terms, min_terms], 1).reshape(2 * nb, n_tok, rows)
    # Every partial sum must be a float32: below 2^24 units of the smallest scale 2^-5.
    assert np.abs(np.cumsum(terms, 0)).max() < 2 ** 24 * 2.0 ** -5
    return w.reshape(rows, k).astype(np.float32), x.reshape(n_tok, k).astype(np.float32), terms.sum(0)


def ks_for(dtype: int):
    return (32, 64, 256, 1056) if dtype in QUANTIZED else (7, 32, 172, 1056)


MATMUL_SHAPES = [(name, rows, k) for name, dt in DTYPES.items() for rows in (1, 17, 100) for k in ks_for(dt)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,rows,k", MATMUL_SHAPES)
def test_matmul_exact_operands_give_exact_result(isa, dtype, rows, k):
    dt = DTYPES[dtype]
    backend = _core.Backend(1, isa)
    for n_tok in (1, 5, 13):
        w, x, exact = exact_operands(rng_for(dtype, rows, k, n_tok), dt, rows, k, n_tok)
        out = matmul(backend, make_matrix(dt, w), x)
        np.testing.assert_array_equal(out, exact.astype(np.float32), err_msg=f"{isa} {dtype} T={n_tok}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,rows,k", MATMUL_SHAPES)
def test_matmul_random_within_rounding_bound(isa, dtype, rows, k):
    dt = DTYPES[dtype]
    rng = rng_for("rand", dtype, rows, k)
    m = make_matrix(dt, rng.standard_normal((rows, k)).astype(np.float32))
    backend, scalar = _core.Backend(1, isa), _core.Backend(1, "scalar")
    for n_tok in (1, 13):
        x = (rng.standard_normal((n_tok, k)) * rng.uniform(0.1, 10, (n_tok, 1))).astype(np.float32)
        ref, bound = matmul_reference(dt, m, x)
        out = matmul(backend, m, x)
        assert np.all(np.abs(out - ref) <= bound), f"{isa} {dtype} T={n_tok}: max excess {np.max(np.abs(out - ref) - bound)}"
        # Both within the bound of the same exact value: within twice of each other.
        assert np.all(np.abs(out - matmul(scalar, m, x)) <= 2 * bound)


def batch_case(dtype: str, rows: int = 23):
    """A matrix with a partial last tile and 130 tokens of activations."""
    dt = DTYPES[dtype]
    rng = rng_for("batch", dtype, rows)
    k = 64 if dt in QUANTIZED else 172
    m = make_matrix(dt, rng.standard_normal((rows, k)).astype(np.float32))
    return m, rng.standard_normal((max(TOKEN_COUNTS), k)).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_result_independent_of_batch_and_threads(isa, dtype):
    m, x = batch_case(dtype)
    full = matmul(_core.Backend(1, isa), m, x)
    ref, bound = matmul_reference(DTYPES[dtype], m, x)
    assert np.all(np.abs(full - ref) <= bound)
    one = _core.Backend(1, isa)
    for n_tok in TOKEN_COUNTS:
        np.testing.assert_array_equal(matmul(one, m, x[:n_tok]), full[:n_tok], err_msg=f"batch of {n_tok}")
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(matmul(one, m, x[t:t + 1])[0], full[t], err_msg=f"token {t} alone")
    np.testing.assert_array_equal(matmul(_core.Backend(2, isa), m, x), full, err_msg="2 threads")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_token_tile_ranges_cover_every_row_once(isa, dtype):
    # 37 tiles: one thread takes them as one range (18 two-tile passes and one tile alone), two
    # threads as claims of shrinking size starting anywhere, odd and even. Every row must come
    # out exactly as the batched path computes it.
    dt = DTYPES[dtype]
    rng = rng_for("ranges", dtype)
    rows, k = 37 * 16 - 5, 256
    m = make_matrix(dt, rng.standard_normal((rows, k)).astype(np.float32))
    x = rng.standard_normal((2, k)).astype(np.float32)
    full = matmul(_core.Backend(1, isa), m, x)
    for threads in (1, 2):
        backend = _core.Backend(threads, isa)
        for t in range(2):
            np.testing.assert_array_equal(matmul(backend, m, x[t:t + 1])[0], full[t], err_msg=f"{threads} threads")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_accumulate_adds_to_output(isa, dtype):
    m, x = batch_case(dtype)
    backend = _core.Backend(2, isa)
    for n_tok in (1, 5, 130):
        base = rng_for("acc", dtype, n_tok).standard_normal((n_tok, m.rows)).astype(np.float32)
        fresh = matmul(backend, m, x[:n_tok])
        out = matmul(backend, m, x[:n_tok], out=base.copy(), accumulate=True)
        # The kernels add their finished sum to the output: one float32 addition.
        np.testing.assert_array_equal(out, base + fresh)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 9, 15, 16, 23, 33])
def test_matmul_strided_views(isa, dtype, rows):
    # Every remainder class of the 8- and 16-row stores: a write past the last row shows up
    # in the sentinel columns.
    m, x = batch_case(dtype, rows)
    backend = _core.Backend(2, isa)
    for n_tok in (1, 5, 65):
        want = matmul(backend, m, x[:n_tok])
        wide_x = np.full((n_tok, x.shape[1] + 13), np.nan, np.float32)
        wide_x[:, 5:5 + x.shape[1]] = x[:n_tok]
        wide_out = np.full((n_tok, m.rows + 7), -7.0, np.float32)
        out = wide_out[:, 3:3 + m.rows]
        backend.matmul(m, wide_x[:, 5:5 + x.shape[1]], out, False)
        np.testing.assert_array_equal(out, want)
        # Nothing written outside the view (padding rows of the last tile included).
        assert np.all(wide_out[:, :3] == -7.0) and np.all(wide_out[:, 3 + m.rows:] == -7.0)


# ---- quantization and the file format ----------------------------------------------------

def layout_matrix(rng) -> np.ndarray:
    """37 rows (a partial third tile) x 96 columns, with a zero row, a row whose largest value
    is positive and one whose largest is negative, exact ties for rounding, and wide scales."""
    w = (rng.standard_normal((37, 96)) * 10.0 ** rng.uniform(-2, 3, (37, 1))).astype(np.float32)
    w[3] = 0
    w[5, :32] = np.linspace(-1, 3, 32)
    w[6, :32] = np.linspace(-3, 1, 32)
    w[7, :32] = np.linspace(-2, 2, 32)
    w[7, 2], w[7, 9] = -3, 3  # two values of largest magnitude: Q4_0 takes the first
    w[8, :32] = 127
    w[8, 1:6] = (2.5, -2.5, 0.5, -0.5, 126.5)  # d = 1: x/d is exactly k + 1/2
    w[9, :32] = np.arange(32) % 16
    w[9, 2:6] = (0.5, 7.5, 14.5, 3.5)  # Q4_1: min 0, max 15, so d = 1 and these are ties
    return w


@pytest.mark.parametrize("dtype", QUANTIZED_NAMES)
def test_quantize_tiles_matches_layout_byte_for_byte(dtype):
    dt = DTYPES[dtype]
    w = layout_matrix(rng_for("layout", dtype))
    quants, scales = core_quantize(dt, w)
    want_q, want_s = np_pack_tiles(dt, w)
    np.testing.assert_array_equal(quants, want_q)
    np.testing.assert_array_equal(scales, want_s)
    # The padding rows 37..47 of the last tile hold quantized zeros: code 0 (Q8_0, and Q4_1
    # whose zero block has min 0 and d 0: byte 0x00) or nibble 8 (Q4_0, byte 0x88), scale +0.
    q, d, m = np_unpack_tiles(dt, quants, scales, 48, 96)
    assert np.all(q[37:] == 0) and np.all(d[37:].view(np.uint32) == 0)
    assert m is None or np.all(m[37:].view(np.uint32) == 0)
    padding = quants.reshape(3, 3, 4, 16, 4)[2, :, :, 5:] if dt != Q8_0 else None
    assert padding is None or np.all(padding == (0x88 if dt == Q4_0 else 0x00))
    assert _core.matrix_bytes(dt, 37, 96) == quants.nbytes + scales.nbytes


@pytest.mark.parametrize("dtype", QUANTIZED_NAMES)
def test_gguf_block_packing_matches_quantize_tiles(dtype):
    """convert/tiles.py repacks GGUF's blocks (codes and fp16 scales as the file holds them)
    into the tile layout without requantizing: from the same codes and scales it must write
    exactly the bytes of the C++ quantizer."""
    from llamacpu.convert.tiles import pack_q4, pack_q8

    dt = DTYPES[dtype]
    w = layout_matrix(rng_for("pack", dtype))
    codes, d, m = np_quantize(dt, w.reshape(37, 3, 32))
    codes = codes.reshape(37, 96)
    d16 = d.astype(np.float16).view(np.uint16)
    if dt == Q8_0:
        got_q, got_s = pack_q8(codes, d16)
    else:
        got_q, got_s = pack_q4(codes, d16, None if m is None else m.astype(np.float16).view(np.uint16))
    quants, scales = core_quantize(dt, w)
    assert got_q == quants.tobytes()
    assert got_s == scales.tobytes()


@pytest.mark.parametrize("dtype", QUANTIZED_NAMES)
def test_dequantize_row_reads_the_layout(dtype):
    dt = DTYPES[dtype]
    w = layout_matrix(rng_for("deq", dtype))
    quants, scales = core_quantize(dt, w)
    mat = _core.Matrix(np.concatenate([quants, scales.view(np.uint8)]), 0, dt, *w.shape)
    q, d, m = np_unpack_tiles(dt, quants, scales, *w.shape)
    want = (np.repeat(d, 32, axis=1) * q).astype(np.float32)  # exact: fp16 times a small integer
    if m is not None:
        want = want + np.repeat(m, 32, axis=1)  # one float32 rounding, as d * q + m
    np.testing.assert_array_equal(weights_of(mat).astype(np.float32), want)


@pytest.mark.parametrize("dtype", QUANTIZED_NAMES)
def test_quantize_round_trip_error_bound(dtype):
    """Q8_0: |x - x'| <= d/2 per block. Q4_0 (d = mx/-8, codes -8..7): d/2, except values of
    the sign opposite to mx beyond 7.5 d, which clamp to code 7: error up to d (llama.cpp
    behaves the same). Q4_1 (d = (max - min)/15, codes 0..15 from min): d/2. All also carry
    the fp16 rounding of d, times the code, and Q4_1 that of the min."""
    dt = DTYPES[dtype]
    rng = rng_for("roundtrip", dtype)
    # Magnitudes 1e-2 .. 1e3 keep every fp16 scale a normal number.
    w = (rng.standard_normal((50, 256)) * 10.0 ** rng.uniform(-2, 3, (50, 1))).astype(np.float32)
    m = make_matrix(dt, w)
    err = np.abs(weights_of(m) - w).reshape(50, 8, 32)
    blocks = w.reshape(50, 8, 32).astype(np.float64)
    if dt == Q8_0:
        d = np.abs(blocks).max(-1, keepdims=True) / 127
        allowed = d / 2 * (1 + 1e-5) + 127 * np.abs(d - d.astype(np.float16))
    elif dt == Q4_1:
        mn = blocks.min(-1, keepdims=True)
        d = (blocks.max(-1, keepdims=True) - mn) / 15
        allowed = d / 2 * (1 + 1e-5) + 15 * np.abs(d - d.astype(np.float16)) + np.abs(mn - mn.astype(np.float16))
    else:
        idx = np.abs(blocks).argmax(-1)[..., None]
        d = np.take_along_axis(blocks, idx, -1) / -8  # signed
        ratio = blocks / d
        allowed = np.where(ratio > 7.5, np.abs(d), np.abs(d) / 2) * (1 + 1e-5)
        allowed = allowed + 8 * np.abs(d - d.astype(np.float16))
    assert np.all(err <= allowed), f"max excess {np.max(err - allowed)}"
    # The bound is attained up to rounding: the test is not vacuous.
    assert np.max(err / allowed) > 0.9


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_row_q8_bitwise(isa):
    rng = rng_for("actq", isa)
    x = (rng.standard_normal(32 * 40) * 10.0 ** rng.uniform(-3, 3, (40, 1)).repeat(32)).astype(np.float32)
    x[32:64] = 0  # an all-zero block
    x[64:96] = 127
    x[64:72] = (2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5)  # scale 1: exact halves, to even
    x[96:128] = rng.standard_normal(32) * 1e-38  # 127/amax overflows: the block quantizes to 0
    x[128:160] = rng.standard_normal(32) * 1e-36  # just inside the finite range
    x[160:192] = np.float32(1e-45) * rng.integers(-3, 4, 32)  # subnormal
    q, d, s = _core.Kernels(isa).quantize_row_q8(x)
    wq, wd, ws = np_quantize_act(x[None])
    np.testing.assert_array_equal(q, wq[0])
    np.testing.assert_array_equal(d, wd[0])
    np.testing.assert_array_equal(s, ws[0])
    assert list(q[64:72]) == [2, -2, 0, 0, 2, -2, 126, -126]
    assert np.all(q[96:128] == 0) and s[3] == 0
    if isa != "scalar":
        sq, sd, ss = _core.Kernels("scalar").quantize_row_q8(x)
        np.testing.assert_array_equal(q, sq)
        np.testing.assert_array_equal(d, sd)
        np.testing.assert_array_equal(s, ss)


@pytest.mark.parametrize("isa", ISAS)
def test_q6k_offsets(isa):
    """ActQ8::g: per 16-column group, -32 x the sums of the column pairs (4v, 4v+1) and
    (4v+2, 4v+3) as two int16 halves of an int32, including the extremes +-127."""
    rng = rng_for("q6koff", isa)
    q = rng.integers(-127, 128, 32 * 24).astype(np.int8)
    if not _core.Kernels(isa).q6k_reads_offsets:
        # scalar, NEON: their Q6_K kernels start from zero, and the backend leaves g unset.
        with pytest.raises(ValueError, match="does not read them"):
            _core.Kernels(isa).q6k_offsets(q)
        return
    q[:32], q[32:64] = 127, -127  # |32 * 8 * 127| = 32512: the largest magnitude, still an int16
    g = _core.Kernels(isa).q6k_offsets(q)
    groups = q.astype(np.int32).reshape(-1, 4, 4)  # [group][v][column in the 4-byte group]
    even = -32 * (groups[:, :, 0] + groups[:, :, 1]).sum(axis=1)
    odd = -32 * (groups[:, :, 2] + groups[:, :, 3]).sum(axis=1)
    want = (even.astype(np.int16).view(np.uint16).astype(np.uint32) |
            (odd.astype(np.int16).view(np.uint16).astype(np.uint32) << 16)).view(np.int32)
    np.testing.assert_array_equal(g, want)
    assert g[0] == np.int32(np.uint32(np.uint16(np.int16(-32512))) * 0x10001)
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.Kernels(isa).q6k_offsets(q[:40])


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_row_q8_super_block_groups(isa):
    """group=256 (the K-quants' activations): one amax per 256 columns, d repeated per block."""
    rng = rng_for("actq256", isa)
    x = (rng.standard_normal(256 * 3) * 10.0 ** rng.uniform(-3, 3, (24, 1)).repeat(32)).astype(np.float32)
    x[256:512] = 0  # an all-zero super-block
    x[512 + 40] = 1000.0  # one large value sets the whole super-block's scale
    q, d, s = _core.Kernels(isa).quantize_row_q8(x, group=256)
    wq, wd, ws = np_quantize_act(x[None], group=256)
    np.testing.assert_array_equal(q, wq[0])
    np.testing.assert_array_equal(d, wd[0])
    np.testing.assert_array_equal(s, ws[0])
    assert np.all(d[16:24] == np.float32(1000.0) / np.float32(127.0)) and q[512 + 40] == 127
    assert np.all(q[256:512] == 0) and np.all(d[8:16] == 0)
    assert len(set(d[:8].tolist())) == 1
    with pytest.raises(ValueError, match="group"):
        _core.Kernels(isa).quantize_row_q8(x[:288], group=256)


# ---- element-wise kernels ----------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 8, 64, 100, 4096])
def test_rmsnorm(isa, n):
    rng = rng_for("rms", n)
    x = (rng.standard_normal((3, n)) * np.array([0.01, 1, 100])[:, None]).astype(np.float32)
    x_wide = np.zeros((3, n + 5), np.float32)
    x_wide[:, :n] = x
    w = rng.uniform(0.5, 2, n).astype(np.float32)
    eps = np.float32(1e-5)
    out = np.zeros((3, n), np.float32)
    _core.Backend(2, isa).rmsnorm(x_wide[:, :n], w, float(eps), out)
    x64 = x.astype(np.float64)
    scale = 1 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + np.float64(eps))
    ref = x64 * scale * w
    # Sum of squares: (n + 1) u relative; mean, eps, sqrt, divide and the two products: < 8 u.
    np.testing.assert_array_less(np.abs(out - ref), (n + 9) * U * np.abs(ref) + 1e-37)


def rope_rows(hd: int, positions) -> np.ndarray:
    """[n, 2, hd] float32 cos2/sin2 rows (KernelTable::rope), theta 10000."""
    freqs = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.asarray(positions, np.float64), freqs)
    t = np.empty((len(ang), 2, hd), np.float32)
    t[:, 0, 0::2] = t[:, 0, 1::2] = np.cos(ang)
    t[:, 1, 0::2], t[:, 1, 1::2] = -np.sin(ang), np.sin(ang)
    return t


def np_rotate(x: np.ndarray, cos2: np.ndarray, sin2: np.ndarray):
    """Rotation of interleaved pairs in float64: (result, sum of |terms| per element)."""
    x = x.astype(np.float64)
    swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    a, b = x * cos2, swapped * sin2
    return a + b, np.abs(a) + np.abs(b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd", [6, 8, 12, 64, 128])
def test_rope(isa, hd):
    rng = rng_for("rope", hd)
    n_heads, positions = 3, np.array([0, 1, 77, 4095], np.int32)
    table = rope_rows(hd, np.arange(4096))
    x = rng.standard_normal((4, n_heads * hd + 5)).astype(np.float32)
    wide = np.zeros((4, x.shape[1] + 3), np.float32)
    wide[:, :x.shape[1]] = x
    _core.Backend(2, isa).rope(wide[:, :x.shape[1]], n_heads, hd, positions, table)
    rows = table[positions]
    heads = x[:, :n_heads * hd].reshape(4, n_heads, hd)
    ref, mag = np_rotate(heads, rows[:, None, 0].astype(np.float64), rows[:, None, 1].astype(np.float64))
    got = wide[:, :n_heads * hd].reshape(4, n_heads, hd)
    # Two products and a sum (or one fma and a product): 3 u of the terms.
    assert np.all(np.abs(got - ref) <= 3 * U * mag)
    np.testing.assert_array_equal(wide[:, n_heads * hd:], np.pad(x[:, n_heads * hd:], ((0, 0), (0, 3))))


def silu_mul_error(isa, gate, up):
    """|kernel - exact| and the allowed error, for gate/up rows [T, n]: exp within 2 ulp
    (4 u), then the add, the divide and the multiply (3 u), rounded up to 8 u relative. Below
    -87.3 the SIMD exp of -g saturates; silu is then below 1e-36 in magnitude, which the
    absolute term covers."""
    out = np.full(gate.shape, np.nan, np.float32)
    _core.Backend(2, isa).silu_mul(np.concatenate([gate, up], 1), out)
    g = gate.astype(np.float64)
    ref = g / (1 + np.exp(-g)) * up
    return np.abs(out - ref), 8 * U * np.abs(ref) + 1e-35


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 2500])
def test_silu_mul(isa, n):
    rng = rng_for("silu", n)
    gate = (rng.standard_normal((2, n)) * 4).astype(np.float32)
    extremes = np.array([80, -80, 100, -100, 88.5, -88.5, 0, -0.0, 1e-30, 20, -20], np.float32)
    gate.reshape(-1)[:len(extremes)] = extremes[:gate.size]
    err, allowed = silu_mul_error(isa, gate, rng.standard_normal((2, n)).astype(np.float32))
    assert np.all(err <= allowed)


@pytest.mark.parametrize("isa", ISAS)
def test_silu_mul_dense_grid(isa):
    # With up = 1 the error is the exp's own (plus 3 roundings) at every reduced argument;
    # measured: 2.5 u on every path.
    gate = np.linspace(-87, 87, 20001, dtype=np.float32)[None]
    err, allowed = silu_mul_error(isa, gate, np.ones_like(gate))
    assert np.all(err <= allowed)


def np_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


SOFTMAX_CASES = {
    "normal": lambda rng, n: rng.standard_normal(n) * 3,
    "wide": lambda rng, n: rng.uniform(-200, 200, n),  # most terms underflow to 0
    "huge": lambda rng, n: rng.uniform(-1e4, 1e4, n),
    "masked": lambda rng, n: np.where(rng.random(n) < 0.3, -np.inf, rng.standard_normal(n)) if n > 1 else np.zeros(1),
    "constant": lambda rng, n: np.full(n, 3.25),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_softmax(isa, case):
    kernels = _core.Kernels(isa)
    for n in (1, 7, 8, 9, 100, 1000):
        x = SOFTMAX_CASES[case](rng_for("softmax", case, n), n).astype(np.float32)
        got = x.copy()
        kernels.softmax(got)
        ref = np_softmax(x)
        # exp within a few ulp, a sum of n terms, one reciprocal and one product: (n + 12) u
        # relative; terms below e^-87 may flush to zero (absolute 2e-38).
        assert np.all(np.abs(got - ref) <= (n + 12) * U * ref + 2e-38), f"n={n}"
        if n == 1:
            assert got[0] == 1.0


def attention_reference(q, k, v, n_rep, scale):
    """(out, bound), float64, for one kv head: q [n_rep*hd], k/v [n_pos, hd] exact values."""
    hd = k.shape[1]
    qh, k, v = q.reshape(n_rep, hd).astype(np.float64), k.astype(np.float64), v.astype(np.float64)
    scale = np.float64(np.float32(scale))
    s = scale * qh @ k.T
    # Score error: the dot (hd + 2) u of sum|q k|, then the scale. A score error e changes
    # each probability by a factor within exp(+-2e).
    err_s = ((hd + 2) * U * scale * (np.abs(qh) @ np.abs(k).T) + U * np.abs(s)).max(-1, keepdims=True)
    p = np_softmax(s)
    mag = p @ np.abs(v)
    n_pos = k.shape[0]
    # Probabilities off by (2 err_s + softmax's (n_pos + 12) u) relative, the weighted sum
    # adds (n_pos + 2) u; doubled for the second-order terms left out.
    bound = 2 * mag * (2 * err_s + (2 * n_pos + 14) * U) + 1e-30
    return (p @ v).reshape(-1), bound.reshape(-1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("hd", [6, 8, 12, 64, 128])
@pytest.mark.parametrize("n_rep", [1, 2, 4, 7])
def test_attention_kernel(isa, kv, hd, n_rep):
    kernels = _core.Kernels(isa)
    for n_pos in (1, 7, 8, 9, 100):
        rng = rng_for("att", kv, hd, n_rep, n_pos)
        q = (rng.standard_normal(n_rep * hd) * 2).astype(np.float32)
        k = rng.standard_normal((n_pos, hd)).astype(np.float32)
        v = rng.standard_normal((n_pos, hd)).astype(np.float32)
        if kv == "f16":
            k, v = k.astype(np.float16), v.astype(np.float16)
            k_arg, v_arg = k.view(np.uint16), v.view(np.uint16)
        else:
            k_arg, v_arg = k, v
        scale = 1 / np.sqrt(hd)
        out = np.full(n_rep * hd, np.nan, np.float32)
        kernels.attention(q, k_arg, v_arg, n_rep, scale, out)
        ref, bound = attention_reference(q, k, v, n_rep, scale)
        assert np.all(np.abs(out - ref) <= bound), f"n_pos={n_pos}: max excess {np.max(np.abs(out - ref) - bound)}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("hd", [12, 64])
def test_attention_head_does_not_depend_on_its_group(isa, kv, hd):
    """The SIMD kernels take query heads through the keys in groups (4, then 2, then 1): each
    head's output is bit for bit what it gets alone."""
    kernels = _core.Kernels(isa)
    rng = rng_for("attgroup", isa, kv, hd)
    n_rep, n_pos = 7, 37
    q = rng.standard_normal(n_rep * hd).astype(np.float32)
    k, v = (rng.standard_normal((n_pos, hd)).astype(np.float32) for _ in range(2))
    if kv == "f16":
        k, v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
    together = np.zeros(n_rep * hd, np.float32)
    kernels.attention(q, k, v, n_rep, 0.3, together)
    for r in range(n_rep):
        alone = np.zeros(hd, np.float32)
        kernels.attention(q[r * hd:(r + 1) * hd].copy(), k, v, 1, 0.3, alone)
        np.testing.assert_array_equal(together[r * hd:(r + 1) * hd], alone, err_msg=f"head {r}")


def fill_cache(backend, cache, rng, n_layers, n_kv, hd, n_pos):
    """Random keys and values stored at positions 0..n_pos-1: ([layer] k, [layer] v), each
    [n_pos, n_kv*hd] float32."""
    ks, vs = [], []
    for layer in range(n_layers):
        k = rng.standard_normal((n_pos, n_kv * hd)).astype(np.float32)
        v = rng.standard_normal((n_pos, n_kv * hd)).astype(np.float32)
        backend.kv_store(cache, layer, k, v, np.arange(n_pos, dtype=np.int32))
        ks.append(k)
        vs.append(v)
    return ks, vs


def as_stored(x: np.ndarray, f16: bool) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32) if f16 else x


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("hd", [8, 64, 128])
@pytest.mark.parametrize("n_rep", [1, 2, 4])
def test_attention_through_cache(isa, f16, hd, n_rep):
    n_kv, n_ctx = 2, 100
    n_heads = n_kv * n_rep
    backend = _core.Backend(1, isa)
    cache = _core.KVCache(2, n_kv, n_ctx, hd, f16)
    rng = rng_for("cache-att", f16, hd, n_rep)
    ks, vs = fill_cache(backend, cache, rng, 2, n_kv, hd, n_ctx)
    pos = np.array([0, 6, 7, 8, 99], np.int32)  # each query sees positions 0..pos: 1, 7, 8, 9, 100
    q = rng.standard_normal((len(pos), n_heads * hd)).astype(np.float32)
    scale = 1 / np.sqrt(hd)
    out = np.full_like(q, np.nan)
    backend.attention(cache, 1, q, pos, n_heads, scale, out)
    kernels = _core.Kernels(isa)
    for h in range(n_kv):
        k = as_stored(ks[1][:, h * hd:(h + 1) * hd], f16)
        v = as_stored(vs[1][:, h * hd:(h + 1) * hd], f16)
        np.testing.assert_array_equal(cache.keys(1, h, n_ctx), k)
        np.testing.assert_array_equal(cache.values(1, h, n_ctx), v)
        for t, p in enumerate(pos):
            # Query heads h*n_rep .. (h+1)*n_rep-1 share kv head h.
            cols = slice(h * n_rep * hd, (h + 1) * n_rep * hd)
            ref, bound = attention_reference(q[t, cols], k[:p + 1], v[:p + 1], n_rep, scale)
            assert np.all(np.abs(out[t, cols] - ref) <= bound), f"kv head {h}, position {p}"
            # The same kernel reached directly gives the same bits.
            direct = np.empty(n_rep * hd, np.float32)
            kv_dtype = np.float16 if f16 else np.float32
            kk, vv = k[:p + 1].astype(kv_dtype), v[:p + 1].astype(kv_dtype)
            kernels.attention(q[t, cols], kk.view(np.uint16) if f16 else kk, vv.view(np.uint16) if f16 else vv,
                              n_rep, scale, direct)
            np.testing.assert_array_equal(out[t, cols], direct)
    out2 = np.full_like(q, np.nan)
    _core.Backend(2, isa).attention(cache, 1, q, pos, n_heads, scale, out2)
    np.testing.assert_array_equal(out2, out)


# ---- embeddings, fp16 conversions, the KV cache ---------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_equals_dequantized_rows(isa, dtype):
    dt = DTYPES[dtype]
    w = rng_for("embed", dtype).standard_normal((37, 96)).astype(np.float32)
    m = make_matrix(dt, w)
    tokens = np.array([0, 36, 5, 5, 16, 17], np.int32)
    wide = np.full((len(tokens), 100), -3.0, np.float32)
    _core.Backend(2, isa).embed(m, tokens, wide[:, 2:98])
    want = weights_of(m).astype(np.float32)[tokens]
    np.testing.assert_array_equal(wide[:, 2:98], want)
    assert np.all(wide[:, :2] == -3.0) and np.all(wide[:, 98:] == -3.0)
    if dt == F32:
        np.testing.assert_array_equal(want, w[tokens])
    if dt == F16:
        np.testing.assert_array_equal(want, w[tokens].astype(np.float16).astype(np.float32))


def assert_same_floats(got: np.ndarray, want: np.ndarray):
    """Bitwise equal, except that any NaN matches any NaN (payloads may differ by path)."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
def test_f16_to_f32_every_bit_pattern(isa):
    # An F16 embedding table holding all 65536 half values, read back through embed.
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    m = _core.Matrix(halves, 0, F16, 64, 1024)
    out = np.empty((64, 1024), np.float32)
    _core.Backend(1, isa).embed(m, np.arange(64, dtype=np.int32), out)
    assert_same_floats(out.reshape(-1), halves.view(np.float16).astype(np.float32))


def f16_rounding_cases(rng) -> np.ndarray:
    """float32 values that probe f32 -> f16 rounding: halfway cases (to even), the overflow
    edge, subnormals, zeros, infinities and a wide random spread."""
    h = rng.integers(0, 0x7C00, 2000).astype(np.uint16)
    below = h.view(np.float16).astype(np.float32).astype(np.float64)
    above = (h + 1).view(np.float16).astype(np.float32).astype(np.float64)
    halfway = ((below + above) / 2).astype(np.float32)  # exact in float32
    special = np.array([65504, 65519.99, 65520, 1e6, np.inf, -np.inf, 0.0, -0.0, 2.0 ** -24, 2.0 ** -25,
                        2.0 ** -25 * 1.0001, 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, 1e-30], np.float32)
    spread = (rng.standard_normal(2000) * 2.0 ** rng.integers(-30, 18, 2000)).astype(np.float32)
    vals = np.concatenate([halfway, -halfway, special, -special, spread])
    return np.resize(vals, (len(vals) + 11) // 12 * 12)  # rows of 12: 8 vector + 4 tail lanes


@pytest.mark.parametrize("isa", ISAS)
def test_f32_to_f16_rounding_in_kv_store(isa):
    vals = f16_rounding_cases(rng_for("f16round"))
    rows = vals.reshape(-1, 12)
    cache = _core.KVCache(1, 1, len(rows), 12, True)
    _core.Backend(1, isa).kv_store(cache, 0, rows, rows[::-1].copy(), np.arange(len(rows), dtype=np.int32))
    with np.errstate(over="ignore"):  # values past 65520 become inf, as intended
        want = rows.astype(np.float16).astype(np.float32)  # numpy rounds half to even, as F16C does
    assert_same_floats(cache.keys(0, 0, len(rows)), want)
    assert_same_floats(cache.values(0, 0, len(rows)), want[::-1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("hd", [6, 8, 64])
def test_kv_shift_rerotates_moved_keys(isa, f16, hd):
    n_layers, n_kv, n_ctx = 2, 2, 40
    keep, discard, used = 4, 10, 30
    backend = _core.Backend(2, isa)
    cache = _core.KVCache(n_layers, n_kv, n_ctx, hd, f16)
    rng = rng_for("shift", f16, hd)
    raw = rng.standard_normal((n_layers, used, n_kv, hd)).astype(np.float32)
    table = rope_rows(hd, np.arange(n_ctx))
    values = []
    for layer in range(n_layers):
        k = raw[layer].reshape(used, -1).copy()
        backend.rope(k, n_kv, hd, np.arange(used, dtype=np.int32), table)
        v = rng.standard_normal((used, n_kv * hd)).astype(np.float32)
        backend.kv_store(cache, layer, k, v, np.arange(used, dtype=np.int32))
        values.append(v)
    before = [[cache.keys(layer, h, used) for h in range(n_kv)] for layer in range(n_layers)]
    rot = rope_rows(hd, [-discard])[0].reshape(-1)
    backend.kv_shift(cache, keep, discard, used, rot)
    moved = slice(keep, used - discard)
    freqs = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(used - discard)[:, None] * freqs  # float64 angles of the new positions
    cos2, sin2 = np.repeat(np.cos(ang), 2, 1), np.repeat(np.sin(ang), 2, 1) * np.tile([-1, 1], hd // 2)
    # f32: two rotations with float32 tables, about 12 u of the pair; f16: two roundings to
    # half precision (2^-11 relative each) dominate.
    rel = 4 * 2.0 ** -11 if f16 else 32 * U
    for layer in range(n_layers):
        for h in range(n_kv):
            keys, vals = cache.keys(layer, h, used), cache.values(layer, h, used)
            np.testing.assert_array_equal(keys[:keep], before[layer][h][:keep])
            src = raw[layer, keep + discard:used, h]
            want, _ = np_rotate(src, cos2[moved], sin2[moved])
            pair = np.repeat(np.abs(src).reshape(len(src), -1, 2).sum(-1), 2, 1)
            assert np.all(np.abs(keys[moved] - want) <= rel * pair + 2.0 ** -23), f"layer {layer} head {h}"
            v = as_stored(values[layer][:, h * hd:(h + 1) * hd], f16)
            np.testing.assert_array_equal(vals[:keep], v[:keep])
            np.testing.assert_array_equal(vals[moved], v[keep + discard:used])


# ---- the ISA list and input validation ---------------------------------------------------------

def test_isa_list():
    assert "scalar" in ISAS
    assert len(set(ISAS)) == len(ISAS)
    assert _core.Backend(1, "auto").name == ISAS[0]
    for isa in ISAS:
        assert _core.Backend(1, isa).name == isa == _core.Kernels(isa).name


@pytest.mark.parametrize("make", [lambda: _core.Backend(1, "mmx"), lambda: _core.Kernels("mmx")])
def test_unknown_isa_names_the_available_ones(make):
    with pytest.raises(ValueError) as e:
        make()
    assert "mmx" in str(e.value)
    for isa in ISAS:
        assert isa in str(e.value)


def bad_calls():
    """(name, call) pairs that must raise ValueError and never reach a kernel."""
    b = _core.Backend(1, "scalar")
    kern = _core.Kernels("scalar")
    w = np.zeros((4, 32), np.float32)
    m = _core.Matrix(w, 0, F32, 4, 32)
    x, out = np.zeros((2, 32), np.float32), np.zeros((2, 4), np.float32)
    ro = np.zeros((2, 4), np.float32)
    ro.flags.writeable = False
    cache = _core.KVCache(1, 2, 8, 4, False)
    kv = np.zeros((1, 8), np.float32)
    pos1 = np.array([0], np.int32)
    table = rope_rows(4, np.arange(8))
    f = np.zeros(8, np.float32)
    return {
        "matmul x float64": lambda: b.matmul(m, x.astype(np.float64), out),
        "matmul x columns": lambda: b.matmul(m, np.zeros((2, 31), np.float32), out),
        "matmul out columns": lambda: b.matmul(m, x, np.zeros((2, 5), np.float32)),
        "matmul rows differ": lambda: b.matmul(m, x, np.zeros((3, 4), np.float32)),
        "matmul out read-only": lambda: b.matmul(m, x, ro),
        "matmul x 3-D": lambda: b.matmul(m, x[None], out),
        "matmul x column stride": lambda: b.matmul(m, np.zeros((2, 64), np.float32)[:, ::2], out),
        "matmul x reversed rows": lambda: b.matmul(m, x[::-1], out),
        "matrix outside buffer": lambda: _core.Matrix(w, 8, F32, 4, 32),
        "matrix negative offset": lambda: _core.Matrix(w, -4, F32, 4, 32),
        "matrix q4 cols": lambda: _core.Matrix(np.zeros(4096, np.uint8), 0, Q4_0, 4, 48),
        "matrix dtype": lambda: _core.Matrix(w, 0, 9, 4, 32),
        "matrix rows": lambda: _core.Matrix(w, 0, F32, -4, 32),
        "dequantize row": lambda: m.dequantize_row(4),
        "rmsnorm weight short": lambda: b.rmsnorm(x, np.zeros(31, np.float32), 1e-5, x.copy()),
        "rmsnorm out shape": lambda: b.rmsnorm(x, np.zeros(32, np.float32), 1e-5, out),
        "rope position high": lambda: b.rope(kv.copy(), 2, 4, np.array([8], np.int32), table),
        "rope position negative": lambda: b.rope(kv.copy(), 2, 4, np.array([-1], np.int32), table),
        "rope positions int64": lambda: b.rope(kv.copy(), 2, 4, np.array([0], np.int64), table),
        "rope positions short": lambda: b.rope(np.zeros((2, 8), np.float32), 2, 4, pos1, table),
        "rope odd head dim": lambda: b.rope(kv.copy(), 2, 3, pos1, rope_rows(4, range(8))[:, :, :3].copy()),
        "rope heads exceed row": lambda: b.rope(kv.copy(), 3, 4, pos1, table),
        "rope heads overflow": lambda: b.rope(kv.copy(), (1 << 62) + 2, 4, pos1, table),
        "rope table shape": lambda: b.rope(kv.copy(), 2, 4, pos1, table.reshape(8, 8)),
        "rope read-only": lambda: b.rope(ro[:1], 1, 4, pos1, table),
        "kv_store position": lambda: b.kv_store(cache, 0, kv, kv, np.array([8], np.int32)),
        "kv_store layer": lambda: b.kv_store(cache, 1, kv, kv, pos1),
        "kv_store shape": lambda: b.kv_store(cache, 0, np.zeros((1, 6), np.float32), kv, pos1),
        "attention position": lambda: b.attention(cache, 0, kv, np.array([9], np.int32), 2, 1.0, kv.copy()),
        "attention negative position": lambda: b.attention(cache, 0, kv, np.array([-1], np.int32), 2, 1.0, kv.copy()),
        "attention heads": lambda: b.attention(cache, 0, kv, pos1, 3, 1.0, kv.copy()),
        "attention heads overflow": lambda: b.attention(cache, 0, kv, pos1, (1 << 62) + 2, 1.0, kv.copy()),
        "attention layer": lambda: b.attention(cache, -1, kv, pos1, 2, 1.0, kv.copy()),
        "silu_mul shape": lambda: b.silu_mul(x, np.zeros((2, 15), np.float32)),
        "embed token high": lambda: b.embed(m, np.array([4], np.int32), np.zeros((1, 32), np.float32)),
        "embed token negative": lambda: b.embed(m, np.array([-1], np.int32), np.zeros((1, 32), np.float32)),
        "embed tokens short": lambda: b.embed(m, np.array([0], np.int32), np.zeros((2, 32), np.float32)),
        "kv_shift range": lambda: b.kv_shift(cache, 4, 5, 8, f),
        "kv_shift used": lambda: b.kv_shift(cache, 0, 1, 9, f),
        "kv_shift overflow": lambda: b.kv_shift(cache, 1 << 62, 1 << 62, 8, f),
        "kv_shift rot short": lambda: b.kv_shift(cache, 0, 1, 8, f[:7]),
        "kvcache zero": lambda: _core.KVCache(1, 0, 8, 4, False),
        "kvcache wraps": lambda: _core.KVCache(1, 1, 1 << 62, 4, False),
        "quantize_row_q8 length": lambda: kern.quantize_row_q8(np.zeros(48, np.float32)),
        "softmax read-only": lambda: kern.softmax(ro[0]),
        "kernel attention f16/f32": lambda: kern.attention(f, np.zeros((2, 8), np.uint16), np.zeros((2, 8), np.float32),
                                                           1, 1.0, f.copy()),
        "kernel attention shape": lambda: kern.attention(f, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32),
                                                         1, 1.0, f.copy()),
        "kernel attention n_rep overflow": lambda: kern.attention(f, np.zeros((2, 4), np.float32),
                                                                  np.zeros((2, 4), np.float32), (1 << 62) + 2, 1.0,
                                                                  f.copy()),
        "kernel attention no positions": lambda: kern.attention(f, np.zeros((0, 8), np.float32),
                                                                np.zeros((0, 8), np.float32), 1, 1.0, f.copy()),
        "quantize_tiles dtype": lambda: _core.quantize_tiles(F32, w, np.zeros(512, np.uint8), np.zeros(16, np.uint16)),
        "quantize_tiles size": lambda: _core.quantize_tiles(Q8_0, w, np.zeros(511, np.uint8), np.zeros(16, np.uint16)),
        "quantize_tiles cols": lambda: _core.quantize_tiles(Q8_0, np.zeros((4, 48), np.float32),
                                                            np.zeros(768, np.uint8), np.zeros(16, np.uint16)),
    }


BAD_CALLS = bad_calls()


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_raises_value_error(name):
    with pytest.raises(ValueError):
        BAD_CALLS[name]()


# ---- software prefetch ------------------------------------------------------------------

_PREFETCH_PROBE = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import kquants
from llamacpu import _core

rng = np.random.default_rng(0)
w = rng.standard_normal((80, 512)).astype(np.float32)  # 5 tiles: two pairs and one alone
x = rng.standard_normal((1, 512)).astype(np.float32)
outs = {}
for isa in _core.usable_isas():
    backend = _core.Backend(1, isa)
    for name, dt in kquants.FORMATS.items():
        m, buf = kquants.make_matrix(dt, w)
        out = np.zeros((1, 80), np.float32)
        backend.matmul(m, x, out)
        outs[isa + "-" + name] = out
np.savez(sys.argv[2], flag=_core.software_prefetch(), **outs)
"""


def test_software_prefetch_follows_the_environment_and_never_changes_a_result(tmp_path):
    """LLAMACPU_PREFETCH=0 / 1, read when the library loads, turns the single-token kernels'
    software prefetch off / on; every path gives the same bits either way."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    got = {}
    for flag in ("0", "1"):
        out = tmp_path / f"prefetch{flag}.npz"
        env = dict(os.environ, LLAMACPU_PREFETCH=flag)
        subprocess.run([sys.executable, "-c", _PREFETCH_PROBE, str(REPO / "bench"), str(out)], env=env, check=True,
                       timeout=120)
        got[flag] = np.load(out)
    assert not got["0"]["flag"] and got["1"]["flag"]
    names = [n for n in got["0"].files if n != "flag"]
    assert len(names) == 5 * len(_core.usable_isas())
    for n in names:
        assert np.isfinite(got["0"][n]).all() and np.abs(got["0"][n]).max() > 0, n
        assert got["0"][n].tobytes() == got["1"][n].tobytes(), n


def test_software_prefetch_choice_is_reported():
    # Off only on AMD's AVX-512 cores (cpu.cpp), unless the environment says otherwise.
    import os

    env = os.environ.get("LLAMACPU_PREFETCH")
    f = _core.cpu_features()
    want = {"0": False, "1": True}.get(env, not (f["vendor"] == "AuthenticAMD" and f["avx512f"]))
    assert _core.software_prefetch() is want
