"""K-quants (Q4_K, Q6_K): the kernels on every instruction-set path, the quantizers, the tile
layout against its numpy packers, and GGUF Q4_K / Q6_K blocks carried into a model without loss.

The kernels' arithmetic (csrc/kquants.h), per row and token and for each super-block s of 8
sub-blocks j, with one activation scale da per super-block and block sums s_j:
    Q4_K: acc += (d_s * da) * float(sum_j sc_j * dot_j)  -  (dmin_s * da) * float(sum_j m_j * s_j)
    Q6_K: acc += (d_s * da) * float(sum_j sc_2j * dot_2j + sc_2j+1 * dot_2j+1)
Integer sums are exact, so the error comes from the float steps: a few roundings per
super-block term and one per sum along any path to the result. The bound
(20 + 2 n_superblocks) u sum |term| (u = 2^-24, terms the separate scale and min products)
covers every path; a wrong layout or scale is off by the order of a whole term.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from conftest import isa_paths
from test_kernels import np_quantize_act  # the activation quantizer, as the kernels do it

from llamacpu import _core
from llamacpu.convert.gguf import dequantize_blocks, k_block_fields
from llamacpu.convert.tiles import pack_q4_k, pack_q6_k
from llamacpu.fileformat import tensor_bytes

ISAS = isa_paths()
U = 2.0 ** -24
KTYPES = {"q4_k": _core.Q4_K, "q6_k": _core.Q6_K}
GGML = {_core.Q4_K: ("Q4_K", 144), _core.Q6_K: ("Q6_K", 210)}


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(("kq",) + key).encode()))


# ---- the formats in numpy --------------------------------------------------------------------

def q4k_scales_mins(scales: np.ndarray) -> tuple:
    """GGUF's 12 packed bytes [..., 12] -> 6-bit scales and mins [..., 8] (ggml's get_scale_min_k4)."""
    b = scales.astype(np.int32)
    sc = np.concatenate([b[..., 0:4] & 63, (b[..., 8:12] & 15) | ((b[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, mn


def q4k_pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The inverse: 6-bit scales and mins [..., 8] -> GGUF's 12 bytes."""
    out = np.zeros(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return out


def gguf_blocks(dt: int, w: np.ndarray, method: str = "mse") -> tuple:
    """(raw GGUF blocks [rows * cols/256, block bytes], their fields) of w quantized by llamacpu."""
    name, size = GGML[dt]
    raw = _core.quantize_k_gguf(dt, np.ascontiguousarray(w, np.float32), method).reshape(-1, size)
    return raw, k_block_fields(name, raw, w.shape[0])


def pack(dt: int, f: dict) -> np.ndarray:
    """The tile bytes of a matrix given by GGUF fields, from the numpy packers."""
    qs, sc = pack_q4_k(f["q"], f["d"], f["dmin"], f["scales"]) if dt == _core.Q4_K else pack_q6_k(f["q"], f["d"], f["scales"])
    return np.frombuffer(qs + sc, np.uint8).copy()


def tiles(dt: int, w: np.ndarray, method: str = "mse") -> np.ndarray:
    buf = np.zeros(_core.matrix_bytes(dt, *w.shape), np.uint8)
    _core.quantize_k_tiles(dt, np.ascontiguousarray(w, np.float32), buf, method)
    return buf


def reference(dt: int, f: dict, x: np.ndarray) -> tuple:
    """(exact result [T, rows], error bound) of the kernels' arithmetic in float64, from the
    GGUF fields f and the activations as the kernels quantize them (one scale per 256)."""
    q, da, s = np_quantize_act(x, group=256)
    n, k = f["q"].shape
    nsb, t = k // 256, x.shape[0]
    d = f["d"].view(np.float16).astype(np.float64)  # [n, nsb]
    qa = q.reshape(t, nsb, 8, 32).astype(np.int64)
    da = da.reshape(t, nsb, 8).astype(np.float64)
    assert np.all(da == da[..., :1])
    da = da[:, None, :, 0]  # [t, 1, nsb]
    if dt == _core.Q4_K:
        sc, mn = q4k_scales_mins(f["scales"])  # [n, nsb, 8]
        dot = np.einsum("nsjc,tsjc->tnsj", f["q"].reshape(n, nsb, 8, 32).astype(np.int64), qa)
        scale = (sc[None] * dot).sum(-1) * da * d[None]
        dmin = f["dmin"].view(np.float16).astype(np.float64)
        mins = (mn[None] * s.reshape(t, 1, nsb, 8)).sum(-1) * da * dmin[None]
        exact = scale.sum(2) - mins.sum(2)
        magnitude = np.abs(scale).sum(2) + np.abs(mins).sum(2)
    else:
        w = f["q"].reshape(n, nsb, 16, 16).astype(np.int64) - 32
        dot = np.einsum("nsgc,tsgc->tnsg", w, qa.reshape(t, nsb, 16, 16))
        terms = (f["scales"][None].astype(np.int64) * dot).sum(-1) * da * d[None]
        exact, magnitude = terms.sum(2), np.abs(terms).sum(2)
    return exact, (20 + 2 * nsb) * U * magnitude


def matmul(backend, m, x, out=None, accumulate=False):
    if out is None:
        out = np.zeros((x.shape[0], m.rows), np.float32)
    backend.matmul(m, x, out, accumulate)
    return out


# ---- kernels ---------------------------------------------------------------------------------

def exact_case(rng, dt: int, rows: int, n_tok: int):
    """Fields and activations on which every float step of every path is exact: powers of two
    for d, dmin and the activation scales, small integer scales; returns (fields, x, result)."""
    k = 256
    f = {"d": np.full((rows, 1), np.float16(2.0 ** -4)).view(np.uint16)}
    if dt == _core.Q4_K:
        f["q"] = rng.integers(0, 16, (rows, k)).astype(np.uint8)
        f["dmin"] = f["d"].copy()
        f["scales"] = q4k_pack_scales(rng.integers(0, 8, (rows, 1, 8)), rng.integers(0, 16, (rows, 1, 8)))
    else:
        f["q"] = rng.integers(0, 64, (rows, k)).astype(np.uint8)
        f["scales"] = rng.integers(-3, 4, (rows, 1, 16)).astype(np.int8)
    a = rng.integers(-127, 128, (n_tok, 8, 32))
    a[np.arange(n_tok)[:, None], np.arange(8), rng.integers(0, 32, (n_tok, 8))] = -127  # amax: da a power of two
    x = (a * 2.0 ** rng.integers(-1, 1, (n_tok, 8, 1))).reshape(n_tok, k).astype(np.float32)
    exact, magnitude = reference(dt, f, x)
    # Every partial sum is a multiple of 2^-5 (da * d) below 2^24 of them: exact in float32.
    assert magnitude.max() / (20 + 2) / U < 2 ** 24 * 2.0 ** -5
    return f, x, exact


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", KTYPES)
def test_exact_operands_give_exact_result(isa, dtype):
    dt = KTYPES[dtype]
    backend = _core.Backend(1, isa)
    for rows, n_tok in ((1, 1), (19, 5), (40, 13)):
        f, x, exact = exact_case(rng_for("exact", dtype, rows, n_tok), dt, rows, n_tok)
        m = _core.Matrix(pack(dt, f), 0, dt, rows, 256)
        np.testing.assert_array_equal(matmul(backend, m, x), exact.astype(np.float32), err_msg=f"{isa} T={n_tok}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", KTYPES)
@pytest.mark.parametrize("rows,k", [(1, 256), (17, 512), (33, 1536)])
def test_random_within_rounding_bound(isa, dtype, rows, k):
    dt = KTYPES[dtype]
    rng = rng_for("rand", dtype, rows, k)
    w = (rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-2, 1, (rows, 1))).astype(np.float32)
    raw, f = gguf_blocks(dt, w)
    m = _core.Matrix(tiles(dt, w), 0, dt, rows, k)
    backend, scalar = _core.Backend(1, isa), _core.Backend(1, "scalar")
    for n_tok in (1, 6):
        x = (rng.standard_normal((n_tok, k)) * rng.uniform(0.1, 10, (n_tok, 1))).astype(np.float32)
        exact, bound = reference(dt, f, x)
        got = matmul(backend, m, x)
        assert np.all(np.abs(got - exact) <= bound), f"{isa} T={n_tok}: max excess {np.max(np.abs(got - exact) - bound)}"
        assert np.all(np.abs(got - matmul(scalar, m, x)) <= 2 * bound)


def k_matrix(dt: int, rows: int, k: int, key) -> tuple:
    rng = rng_for(*key)
    buf = tiles(dt, rng.standard_normal((rows, k)).astype(np.float32))
    return _core.Matrix(buf, 0, dt, rows, k), rng.standard_normal((130, k)).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", KTYPES)
def test_result_independent_of_batch_threads_and_views(isa, dtype):
    dt = KTYPES[dtype]
    m, x = k_matrix(dt, 23, 512, ("batch", dtype))  # a partial second tile
    one, two = _core.Backend(1, isa), _core.Backend(2, isa)
    full = matmul(one, m, x)
    for n_tok in (1, 3, 4, 5, 64, 65):
        np.testing.assert_array_equal(matmul(one, m, x[:n_tok]), full[:n_tok], err_msg=f"batch of {n_tok}")
    for t in (0, 1, 77, 129):
        np.testing.assert_array_equal(matmul(one, m, x[t:t + 1])[0], full[t], err_msg=f"token {t} alone")
    np.testing.assert_array_equal(matmul(two, m, x), full, err_msg="2 threads")
    base = rng_for("acc", dtype).standard_normal(full.shape).astype(np.float32)
    np.testing.assert_array_equal(matmul(two, m, x, out=base.copy(), accumulate=True), base + full)
    # Strided views: nothing written outside the view, padding rows of the last tile included.
    wide_out = np.full((9, m.rows + 7), -7.0, np.float32)
    two.matmul(m, x[:9], wide_out[:, 3:3 + m.rows], False)
    np.testing.assert_array_equal(wide_out[:, 3:3 + m.rows], full[:9])
    assert np.all(wide_out[:, :3] == -7.0) and np.all(wide_out[:, 3 + m.rows:] == -7.0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", KTYPES)
def test_single_token_tile_ranges_cover_every_row_once(isa, dtype):
    # As in test_kernels: 37 tiles as one range and as two threads' claims of every size.
    dt = KTYPES[dtype]
    m, x = k_matrix(dt, 37 * 16 - 5, 256, ("ranges", dtype))
    full = matmul(_core.Backend(1, isa), m, x[:2])
    for threads in (1, 2):
        backend = _core.Backend(threads, isa)
        for t in range(2):
            np.testing.assert_array_equal(matmul(backend, m, x[t:t + 1])[0], full[t], err_msg=f"{threads} threads")


@pytest.mark.parametrize("isa", ISAS)
def test_simd_paths_agree_bitwise_where_fused(isa):
    """AVX2 and NEON fuse every multiply-add of the same arithmetic: the same bits."""
    fused = [p for p in ("avx2", "avx512", "neon", "neon-emu") if p in ISAS]
    if isa not in fused or len(fused) < 2:
        pytest.skip("needs two fused paths")
    for dtype, dt in KTYPES.items():
        m, x = k_matrix(dt, 40, 768, ("fused", dtype))
        for n_tok in (1, 7):
            np.testing.assert_array_equal(matmul(_core.Backend(1, isa), m, x[:n_tok]),
                                          matmul(_core.Backend(1, fused[0]), m, x[:n_tok]), err_msg=dtype)


def test_stacked_matrix_is_its_segments_in_row_order():
    rng = rng_for("stacked")
    k = 512
    w = [rng.standard_normal((r, k)).astype(np.float32) for r in (40, 24, 5)]
    parts = [_core.Matrix(tiles(_core.Q4_K, w[0]), 0, _core.Q4_K, 40, k),
             _core.Matrix(tiles(_core.Q6_K, w[1]), 0, _core.Q6_K, 24, k),
             _core.Matrix(w[2].astype(np.float16).view(np.uint16), 0, _core.F16, 5, k)]
    m = _core.Matrix.stacked(parts)
    assert (m.rows, m.cols, m.dtype) == (69, k, -1)
    assert m.parts == [(40, _core.Q4_K), (24, _core.Q6_K), (5, _core.F16)]
    x = rng.standard_normal((7, k)).astype(np.float32)
    b = _core.Backend(2)
    want = np.concatenate([matmul(b, p, x) for p in parts], axis=1)
    np.testing.assert_array_equal(matmul(b, m, x), want)
    np.testing.assert_array_equal(m.dequantize_row(45), parts[1].dequantize_row(5))
    with pytest.raises(ValueError):
        b.embed(m, np.array([0], np.int32), np.zeros((1, k), np.float32))
    with pytest.raises(ValueError):
        _core.Matrix.stacked([parts[0], _core.Matrix(tiles(_core.Q4_K, w[0][:, :256]), 0, _core.Q4_K, 40, 256)])
    with pytest.raises(ValueError):
        _core.Matrix.stacked([m, parts[0]])


# ---- layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", KTYPES)
@pytest.mark.parametrize("method", ["ref", "mse"])
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_tiles_match_numpy_packing_byte_for_byte(dtype, method, rows):
    dt = KTYPES[dtype]
    rng = rng_for("pack", dtype, method, rows)
    w = (rng.standard_normal((rows, 512)) * 10.0 ** rng.uniform(-2, 2, (rows, 1))).astype(np.float32)
    w[0, :256] = 0  # an all-zero super-block
    got = tiles(dt, w, method)
    _, f = gguf_blocks(dt, w, method)
    np.testing.assert_array_equal(got, pack(dt, f))
    assert got.nbytes == _core.matrix_bytes(dt, rows, 512) == tensor_bytes(dtype, (rows, 512))
    # Padding rows of the last tile are zero bytes, which stand for zero weights.
    m = _core.Matrix(got, 0, dt, -(-rows // 16) * 16, 512)
    assert all(np.all(m.dequantize_row(r) == 0) for r in range(rows, -(-rows // 16) * 16))


@pytest.mark.parametrize("dtype", KTYPES)
def test_dequantize_row_is_ggml_dequantization(dtype):
    """Matrix.dequantize_row (embedding lookups) gives ggml's values of the same blocks, bitwise."""
    dt = KTYPES[dtype]
    rng = rng_for("deq", dtype)
    w = (rng.standard_normal((21, 768)) * 10.0 ** rng.uniform(-3, 2, (21, 1))).astype(np.float32)
    raw, _ = gguf_blocks(dt, w)
    m = _core.Matrix(tiles(dt, w), 0, dt, 21, 768)
    want = dequantize_blocks(GGML[dt][0], raw).reshape(21, 768)
    got = np.stack([m.dequantize_row(r) for r in range(21)])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", KTYPES)
def test_shapes_need_whole_super_blocks(dtype):
    dt = KTYPES[dtype]
    assert _core.matrix_bytes(dt, 16, 288) == -1 and _core.matrix_bytes(dt, 17, 256) > 0
    with pytest.raises(ValueError):
        tensor_bytes(dtype, (16, 288))
    with pytest.raises(ValueError):
        _core.Matrix(np.zeros(1 << 16, np.uint8), 0, dt, 16, 288)
    with pytest.raises(ValueError):
        _core.quantize_k_tiles(dt, np.zeros((4, 288), np.float32), np.zeros(4096, np.uint8))
    with pytest.raises(ValueError):  # the output's size must match
        _core.quantize_k_tiles(dt, np.zeros((4, 256), np.float32), np.zeros(100, np.uint8))
    with pytest.raises(ValueError):
        _core.quantize_k_gguf(_core.Q4_0, np.zeros((4, 256), np.float32))


# ---- quantizers ------------------------------------------------------------------------------

def weight_sets():
    """Weights with the shapes and statistics quantizers meet: Gaussian rows of TinyLlama's widths,
    heavy tails, outliers, wide dynamic range between rows, all-positive rows, sparse rows."""
    rng = rng_for("weights")
    yield "gaussian 2048", rng.standard_normal((24, 2048)).astype(np.float32) * 0.02
    yield "gaussian 5632", rng.standard_normal((8, 5632)).astype(np.float32) * 0.02
    yield "student-t", rng.standard_t(3, (24, 1024)).astype(np.float32)
    w = rng.standard_normal((16, 1024)).astype(np.float32)
    w[np.arange(16), rng.integers(0, 1024, 16)] *= 40  # one outlier per row
    yield "outliers", w
    yield "wide range", (rng.standard_normal((24, 1024)) * 10.0 ** rng.uniform(-3, 2, (24, 1))).astype(np.float32)
    yield "positive", np.abs(rng.standard_normal((8, 1024))).astype(np.float32)
    yield "sparse", (rng.standard_normal((8, 1024)) * (rng.random((8, 1024)) < 0.1)).astype(np.float32)


def decoded(dt, w, method):
    m = _core.Matrix(tiles(dt, w, method), 0, dt, *w.shape)
    return np.stack([m.dequantize_row(r) for r in range(w.shape[0])]).astype(np.float64)


@pytest.mark.parametrize("dtype", KTYPES)
def test_mse_search_never_worse_than_reference_rule(dtype):
    """Per super-block the weighted squared error (weights x^2 + 2 mean(x^2) of the row, the
    quantizer's objective) is never above llama.cpp's rule's. The plain squared error is lower
    too on zero-centred weights (what models hold); on all-positive rows, where the weighting
    favours the large values, it may end up a little above."""
    dt = KTYPES[dtype]
    gains = []
    for name, w in weight_sets():
        x = w.astype(np.float64)
        weight = x * x + 2 * (x * x).mean(1, keepdims=True)
        err = {}
        for method in ("ref", "mse"):
            e = (decoded(dt, w, method) - x) ** 2
            err[method] = ((e * weight).reshape(len(w), -1, 256).sum(-1), e.sum())
        # float32 sums inside the quantizer: allow their rounding, nothing more.
        assert np.all(err["mse"][0] <= err["ref"][0] * (1 + 1e-5)), name
        assert err["mse"][1] < err["ref"][1] * (1.01 if name == "positive" else 1.0), name
        gains.append(err["mse"][0].sum() / err["ref"][0].sum())
    assert np.mean(gains) < 0.95  # the search finds real improvements, not ties


def test_quantizers_on_degenerate_rows():
    w = np.zeros((6, 512), np.float32)
    w[1] = 1.0  # constant
    w[2, 7] = -3.0  # a single value
    w[3] = np.linspace(-1e-3, 1e-3, 512)  # small (far smaller underflows the fp16 super-block scales)
    w[4] = np.linspace(-300.0, 300.0, 512)  # large
    w[5, ::2] = 0.5  # two levels
    for dt in KTYPES.values():
        for method in ("ref", "mse"):
            y = decoded(dt, w, method)
            assert np.isfinite(y).all()
            assert np.all(y[0] == 0)
            rel = np.abs(y - w).max(1) / np.maximum(np.abs(w).max(1), 1e-30)
            assert np.all(rel[1:] < 0.07), (dt, method, rel)


def ggml_library():
    """llama.cpp's libggml-base (LLAMACPU_GGML_LIB, or the llama_cpp package's), or None."""
    path = os.environ.get("LLAMACPU_GGML_LIB")
    if not path:
        try:
            import llama_cpp
        except ImportError:
            return None
        from pathlib import Path

        libs = sorted(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so*"))
        path = str(libs[0]) if libs else None
    return path


@pytest.mark.parametrize("dtype", KTYPES)
def test_reference_rule_is_llama_cpp_byte_for_byte(dtype):
    """Method "ref" writes the bytes llama.cpp's quantize_row_q4_K_ref / _q6_K_ref write (what
    `llama-quantize Q4_K_M` does without an imatrix)."""
    import ctypes

    path = ggml_library()
    if path is None:
        pytest.skip("llama.cpp's libggml-base not found (set LLAMACPU_GGML_LIB)")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    dt = KTYPES[dtype]
    ggml_type = {_core.Q4_K: 12, _core.Q6_K: 14}[dt]
    for name, w in weight_sets():
        raw, _ = gguf_blocks(dt, w, "ref")
        theirs = np.zeros_like(raw)
        lib.ggml_quantize_chunk(ggml_type, w.ctypes.data, theirs.ctypes.data, 0, w.shape[0], w.shape[1], None)
        np.testing.assert_array_equal(raw, theirs, err_msg=name)


# ---- GGUF Q4_K / Q6_K models and the converter -----------------------------------------------

# A small LLaMA whose widths are whole super-blocks: dim 256, ffn 512, 3 layers, 4 heads of 64
# (2 kv heads), vocab 512 (stories260K's tokenizer), untied output.
SMALL = dict(dim=256, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512)
# GGUF types of a llama.cpp Q4_K_M-like file, with layer 0's v and up rows in Q6_K so that both
# fused tensors hold parts of different types.
GGUF_TYPES = {"token_embd": "Q4_K", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q4_K",
              "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
LAYER0_TYPES = {"attn_v": "Q6_K", "ffn_up": "Q6_K"}


def small_weights(rng) -> dict:
    """{gguf name: float32 array} of a random model whose logits are well spread."""
    d, f, hd = SMALL["dim"], SMALL["ffn_dim"], SMALL["dim"] // SMALL["n_heads"]
    kv = SMALL["n_kv_heads"] * hd
    w = {"token_embd.weight": rng.standard_normal((SMALL["vocab_size"], d)),
         "output.weight": rng.standard_normal((SMALL["vocab_size"], d)) * 2 / np.sqrt(d),
         "output_norm.weight": 1 + 0.1 * rng.standard_normal(d)}
    for i in range(SMALL["n_layers"]):
        p = f"blk.{i}."
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv, d)), ("attn_v", (kv, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (f, d)), ("ffn_up", (f, d)), ("ffn_down", (d, f))):
            w[p + name + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        w[p + "attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(d)
        w[p + "ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(d)
    return {k: v.astype(np.float32) for k, v in w.items()}


def ggml_type_of(name: str) -> str:
    if name.endswith("norm.weight"):
        return "F32"
    kind = name.split(".")[-2]
    return (LAYER0_TYPES.get(kind) if name.startswith("blk.0.") else None) or GGUF_TYPES[kind]


def write_small_gguf(path, weights: dict, quantize: bool) -> dict:
    """The model as a GGUF: K-quant blocks from llamacpu's quantizer (quantize) or F32; returns
    {name: raw blocks} of the quantized tensors."""
    gguf = pytest.importorskip("gguf")
    from conftest import asset
    from test_gguf import add_spm_tokenizer

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(SMALL["dim"])
    w.add_block_count(SMALL["n_layers"])
    w.add_feed_forward_length(SMALL["ffn_dim"])
    w.add_head_count(SMALL["n_heads"])
    w.add_head_count_kv(SMALL["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(SMALL["vocab_size"])
    add_spm_tokenizer(w, asset("stories260K/meta/tokenizer.model").read_bytes())
    raw = {}
    for name, a in weights.items():
        kind = ggml_type_of(name)
        if quantize and kind != "F32":
            dt = _core.Q4_K if kind == "Q4_K" else _core.Q6_K
            raw[name] = _core.quantize_k_gguf(dt, a)
            w.add_tensor(name, raw[name], raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """{"k": K-quant GGUF, "float": F32 GGUF of the K tensors' dequantized values, "blocks": raw
    blocks, "weights": the float weights}."""
    d = tmp_path_factory.mktemp("kgguf")
    weights = small_weights(rng_for("small model"))
    blocks = write_small_gguf(d / "k.gguf", weights, quantize=True)
    deq = {n: (dequantize_blocks(ggml_type_of(n), blocks[n].reshape(-1, GGML[_core.Q4_K if ggml_type_of(n) == "Q4_K" else _core.Q6_K][1])).reshape(a.shape)
               if n in blocks else a) for n, a in weights.items()}
    write_small_gguf(d / "float.gguf", deq, quantize=False)
    return {"k": d / "k.gguf", "float": d / "float.gguf", "blocks": blocks, "weights": weights, "dir": d}


def convert(src, out, dtype):
    from llamacpu.convert import convert_checkpoint, open_source

    with open_source(src) as ck:
        return convert_checkpoint(ck, out, dtype, progress=False, verify=False)


TOKENS = [1, 403, 407, 261, 378, 300, 42, 500, 7, 260]


def logits(path):
    from llamacpu import Llama

    with Llama(str(path), n_threads=1) as llm:
        return llm.logits(TOKENS)


def test_gguf_k_blocks_carried_bit_for_bit(small_models):
    from llamacpu.convert.gguf import open_gguf
    from llamacpu.fileformat import MappedModelFile

    out = small_models["dir"] / "carried.bin"
    info = convert(small_models["k"], out, None)
    assert set(info["types"]) == {"q4_k", "q6_k", "f32"}
    mf = MappedModelFile(out)
    try:
        t = mf.meta.tensors
        assert (t["tok_embeddings"].dtype, t["output"].dtype, t["layers.1.wqkv"].dtype) == ("q4_k", "q6_k", "q4_k")
        # Layer 0's fused tensors keep each part's own type, as row segments.
        assert [s[:2] for s in t["layers.0.wqkv"].segments] == [(256 + 128, "q4_k"), (128, "q6_k")]
        assert [s[:2] for s in t["layers.0.w13"].segments] == [(512, "q4_k"), (512, "q6_k")]
        with open_gguf(small_models["k"]) as ck:
            def stored(rows, dt, off, parts):
                fields = [ck.tensors[p].read_blocks(0, ck.tensors[p].nrows) for p in parts]
                f = {key: np.concatenate([x[key] for x in fields]) for key in fields[0]}
                want = pack(KTYPES[dt], f)
                np.testing.assert_array_equal(np.frombuffer(mf.mm, np.uint8, want.nbytes, off), want)

            wqkv = t["layers.0.wqkv"].segments
            stored(*wqkv[0], ["layers.0.wq", "layers.0.wk"])
            stored(*wqkv[1], ["layers.0.wv"])
            stored(t["layers.2.w2"].shape[0], "q6_k", t["layers.2.w2"].offset, ["layers.2.w2"])
            stored(t["output"].shape[0], "q6_k", t["output"].offset, ["output"])
    finally:
        mf.close()


def test_gguf_k_model_logits_match_float_reference(small_models):
    """The carried-over K-quant model against the same weights in float32 (the dequantized
    blocks): only the 8-bit quantization of the activations differs."""
    k_file, f_file = small_models["dir"] / "carried-l.bin", small_models["dir"] / "float-l.bin"
    convert(small_models["k"], k_file, None)
    convert(small_models["float"], f_file, "f32")
    got, ref = logits(k_file), logits(f_file)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_convert_q4_k_m_follows_llama_cpp_mix(small_models):
    from llamacpu.convert.writer import q4_k_m_type, use_more_bits
    from llamacpu.fileformat import MappedModelFile

    # llama.cpp's layers with more bits (its S-Q4_K_M and 7B Q4_K_M files).
    assert [i for i in range(22) if use_more_bits(i, 22)] == [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                                30, 31]
    out = small_models["dir"] / "q4km.bin"
    convert(small_models["float"], out, "q4_k_m")
    mf = MappedModelFile(out)
    try:
        t = mf.meta.tensors
        n = SMALL["n_layers"]
        assert t["tok_embeddings"].dtype == "q4_k" and t["output"].dtype == "q6_k"
        for i in range(n):
            v, down = q4_k_m_type("attn_v", i, n), q4_k_m_type("ffn_down", i, n)
            assert t[f"layers.{i}.w2"].dtype == down
            wqkv = t[f"layers.{i}.wqkv"]
            assert (wqkv.dtype == "q4_k") if v == "q4_k" else [s[:2] for s in wqkv.segments] == [(384, "q4_k"), (128, "q6_k")]
            assert t[f"layers.{i}.wo"].dtype == t[f"layers.{i}.w13"].dtype == "q4_k"
        assert use_more_bits(2, n) and not use_more_bits(0, n)
        weights = sum(ti.shape[0] * ti.shape[1] for ti in t.values() if len(ti.shape) == 2)
        bits = 8 * sum(ti.size for ti in t.values() if len(ti.shape) == 2)
        assert bits / weights < 5.0  # q4_k (4.5) with a few q6_k (6.5625) tensors
    finally:
        mf.close()
    got, ref = logits(out), logits(small_models["dir"] / "float-l.bin")
    assert np.abs(got - ref).max() < 0.15 * np.abs(ref).max()


def test_q4_k_m_falls_back_where_rows_are_not_whole_super_blocks(tmp_path):
    """stories260K (widths 64 and 172): q4_k's rows fall back to q4_1, q6_k's to q8_0, and rows
    not a multiple of 32 to f16, as llama.cpp's Q4_K_M falls back (to its Q5_0 / Q8_0 / F16)."""
    from conftest import asset
    from llamacpu import Llama
    from llamacpu.convert import convert_checkpoint, open_checkpoint
    from llamacpu.fileformat import MappedModelFile

    out = tmp_path / "s.bin"
    with open_checkpoint(asset("stories260K/meta")) as ck:
        convert_checkpoint(ck, out, "q4_k_m", progress=False, verify=False)
    mf = MappedModelFile(out)
    try:
        t = mf.meta.tensors
        assert t["tok_embeddings"].dtype == "q8_0"  # tied output: q6_k's fallback
        assert t["layers.0.w13"].dtype == "q4_1" and t["layers.0.w2"].dtype == "f16"  # 172 columns
        assert t["layers.4.wqkv"].segments is not None  # last layer: v in q6_k -> q8_0, q and k q4_1
    finally:
        mf.close()
    with Llama(str(out), n_threads=1) as llm:
        assert np.isfinite(llm.logits([1, 403, 407])).all()


def test_segment_metadata_is_checked():
    from llamacpu.fileformat import segment_layout

    layout, total = segment_layout([[32, "q4_k"], [16, "q6_k"]], (48, 256))
    assert [(r, d, o) for r, d, o, _ in layout] == [(32, "q4_k", 0), (16, "q6_k", 2 * 2304)]
    assert total == 2 * 2304 + 3360
    for bad in ([[32, "q4_k"]], [[32, "q4_k"], [8, "q6_k"]], [[32, "q4_k"], [16, "mixed"]], [[32, "q4_k"], [16, "q9"]],
                [[32, "q4_k"], [16]], [[32, "q4_k"], [-16, "q6_k"], [32, "f16"]], "q4_k", [[48, "q4_k"]] * 17):
        with pytest.raises(ValueError):
            segment_layout(bad, (48, 256))


@pytest.mark.parametrize("dtype", KTYPES)
def test_importance_weights_the_error_per_column(dtype):
    """Columns marked important (an activation-statistics vector, like llama.cpp's imatrix) end up
    with less error, paid for by the others."""
    dt = KTYPES[dtype]
    w = rng_for("importance", dtype).standard_normal((32, 512)).astype(np.float32)
    imp = np.ones(512, np.float32)
    imp[::8] = 50.0
    plain = np.abs(decoded(dt, w, "mse") - w) ** 2
    buf = np.zeros(_core.matrix_bytes(dt, *w.shape), np.uint8)
    _core.quantize_k_tiles(dt, w, buf, "mse", imp)
    m = _core.Matrix(buf, 0, dt, *w.shape)
    weighted = np.abs(np.stack([m.dequantize_row(r) for r in range(32)]) - w) ** 2
    assert weighted[:, ::8].sum() < 0.8 * plain[:, ::8].sum()
    assert weighted.sum() > plain.sum()
    with pytest.raises(ValueError):
        _core.quantize_k_tiles(dt, w, buf, "mse", imp[:100])


def test_scale_search_writes_the_same_bytes_on_every_isa(tmp_path):
    """The converter's scale search runs an AVX2 build where the CPU has AVX2 and the baseline
    build under LLAMACPU_ISA=scalar: the same bytes either way (a file converted on one
    machine is the file converted on another)."""
    import subprocess
    import sys

    rng = rng_for("search-isa")
    # Gaussian rows, rows with outliers, and a row of tiny values (fp16 subnormal scales).
    w = rng.standard_normal((40, 512)).astype(np.float32)
    w[3, ::37] *= 40.0
    w[7] *= 1e-6
    imp = rng.uniform(0.1, 4.0, 512).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "imp.npy", imp)
    script = (
        "import sys, numpy as np\n"
        "from llamacpu import _core\n"
        "w, imp = np.load(sys.argv[1]), np.load(sys.argv[2])\n"
        "out = []\n"
        "for dt in (_core.Q4_K, _core.Q6_K):\n"
        "    for method, im in (('mse', None), ('mse', imp), ('ref', None)):\n"
        "        buf = np.zeros(_core.matrix_bytes(dt, *w.shape), np.uint8)\n"
        "        _core.quantize_k_tiles(dt, w, buf, method, im)\n"
        "        out.append(buf)\n"
        "        out.append(_core.quantize_k_gguf(dt, w, method, im).reshape(-1))\n"
        "np.save(sys.argv[3], np.concatenate(out))\n"
    )
    results = {}
    for isa in ("scalar", "auto"):
        env = dict(os.environ, LLAMACPU_ISA=isa)
        out = tmp_path / f"{isa}.npy"
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.npy"), str(tmp_path / "imp.npy"), str(out)],
                       env=env, check=True)
        results[isa] = np.load(out)
    np.testing.assert_array_equal(results["scalar"], results["auto"])
