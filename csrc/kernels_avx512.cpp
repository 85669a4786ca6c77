// AVX-512 (F, BW, VL) + VNNI kernels (Ice Lake / Zen 4 and later). Compiled with the
// matching -m flags; only reached when cpu.cpp has seen every one of those features.
//
// A 16-row tile is exactly one zmm of 16 int32 lanes, and vpdpbusd multiplies the unsigned
// weight bytes by a 4-byte activation group broadcast to every lane, so one instruction
// advances the dot products of all 16 rows by 4 columns. Per row the float work is the same
// as the AVX2 path (one fma per block with the same operands), so both give the same bits.
// One token takes two tiles per pass, each stream in memory order (prefetch.h); a batch takes
// a tile at a time, each weight vector unpacked once for up to 8 tokens.
// The element-wise kernels reuse the AVX2 code (simd_x86_common.h).
//
// With LLAMACPU_SIMDE this file is built a second time against SIMDe's portable emulation
// of the intrinsics, so the tests can run this code on a CPU without AVX-512.
#if defined(LLAMACPU_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
#define LLAMACPU_NS avx512emu
#define LLAMACPU_TABLE kAvx512EmuKernels
#define LLAMACPU_KQ(name) kq_avx512emu_##name
#define LLAMACPU_TABLE_NAME "avx512-emu"
#else
#include <immintrin.h>
#define LLAMACPU_NS avx512
#define LLAMACPU_TABLE kAvx512Kernels
#define LLAMACPU_KQ(name) kq_avx512_##name
#define LLAMACPU_TABLE_NAME "avx512"
#endif

#include <cmath>
#include <cstring>

#include "kernels.h"
#include "prefetch.h"
#include "kquants.h"

namespace llamacpu {
namespace LLAMACPU_NS {

#include "simd_x86_common.h"

#include "simde_avx512_fixups.h"

static inline __m512i bcast4z(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// The 8 weight vectors of one tile-block as unsigned bytes, in group order 0..7. The high
// nibbles stay in place (16 times their value): block_dot shifts their dot down once, which
// costs one shift instead of four.
template <int kType>
static inline void unpack_block(const uint8_t* q, __m512i* wv) {
    if (kType != kQ8_0) {
        const __m512i lo4 = _mm512_set1_epi8(0x0f), hi4 = _mm512_set1_epi8(char(0xf0));
        for (int v = 0; v < 4; ++v) {
            const __m512i raw = _mm512_loadu_si512(q + v * 64);
            wv[v] = _mm512_and_si512(raw, lo4);
            wv[4 + v] = _mm512_and_si512(raw, hi4);
        }
    } else {
        // int8 w + 128 as unsigned; the matching correction is 128 * sum(activations).
        const __m512i flip = _mm512_set1_epi8(char(0x80));
        for (int g = 0; g < 8; ++g) wv[g] = _mm512_xor_si512(_mm512_loadu_si512(q + g * 64), flip);
    }
}

// Lane r: the exact integer dot of row r with the activation block.
template <int kType>
static inline __m512i block_dot(const __m512i* wv, const int8_t* x, int32_t xsum) {
    __m512i acc = _mm512_setzero_si512();
    if (kType != kQ8_0) {
        // wv[v]: low nibbles, columns 4v..; wv[4+v]: 16 x high nibbles, columns 16+4v.. (an
        // exact multiple of 16, so the shift is exact); two independent chains.
        __m512i hi = _mm512_setzero_si512();
        for (int v = 0; v < 4; ++v) {
            acc = _mm512_dpbusd_epi32(acc, wv[v], bcast4z(x + 4 * v));
            hi = _mm512_dpbusd_epi32(hi, wv[4 + v], bcast4z(x + 16 + 4 * v));
        }
        acc = _mm512_add_epi32(acc, _mm512_srai_epi32(hi, 4));
    } else {
        for (int g = 0; g < 8; ++g) acc = _mm512_dpbusd_epi32(acc, wv[g], bcast4z(x + 4 * g));
    }
    // Q4_0 nibbles stand for q - 8, Q8_0 bytes were flipped to w + 128; Q4_1's min term is
    // added in float.
    const int32_t corr = kType == kQ4_0 ? 8 * xsum : kType == kQ8_0 ? 128 * xsum : 0;
    return _mm512_sub_epi32(acc, _mm512_set1_epi32(corr));
}

static inline void store_rows16(float* o, __m512 v, int64_t valid, bool accumulate) {
    if (valid >= 16) {
        if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(o));
        _mm512_storeu_ps(o, v);
        return;
    }
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, v);
    for (int64_t i = 0; i < valid; ++i) o[i] = accumulate ? o[i] + tmp[i] : tmp[i];
}

template <int kType, int NT>
static inline void tile_tokens(const uint8_t* quants, const uint16_t* scales, int64_t nb, int64_t t,
                               const ActQ8& a, int64_t tok0, float* out, int64_t ldo, int64_t valid,
                               bool accumulate) {
    constexpr int64_t qbytes = kType == kQ8_0 ? kQ8TileBlockQuants : kQ4TileBlockQuants;
    constexpr int64_t sstride = kType == kQ4_1 ? 2 * kTileRows : kTileRows;
    __m512 acc[NT];
    for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m512i wv[8];
        unpack_block<kType>(quants + (t * nb + b) * qbytes, wv);
        const uint16_t* sp = scales + (t * nb + b) * sstride;
        const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)));
        __m512 mins = _mm512_setzero_ps();
        if (kType == kQ4_1) mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + kTileRows)));
        for (int i = 0; i < NT; ++i) {
            const int64_t tok = tok0 + i;
            const int32_t xsum = a.s[tok * a.nb + b];
            const float da = a.d[tok * a.nb + b];
            const __m512i dot = block_dot<kType>(wv, a.q + tok * a.ldq + b * kBlock, xsum);
            const __m512 scale = _mm512_mul_ps(sc, _mm512_set1_ps(da));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i]);
            if (kType == kQ4_1) acc[i] = _mm512_fmadd_ps(mins, _mm512_set1_ps(float(xsum) * da), acc[i]);
        }
    }
    for (int i = 0; i < NT; ++i) store_rows16(out + (tok0 + i) * ldo + t * kTileRows, acc[i], valid, accumulate);
}

// Single token, NTL tiles (1 or 2), tiles t and t + dt (prefetch.h, for_tile_pairs): one pass
// over the blocks of both, each tile's weight stream prefetched in memory order. Per row the
// arithmetic is tile_tokens' for one token.
template <int kType, int NTL>
static inline void tiles_gemv(const uint8_t* quants, const uint16_t* scales, int64_t nb, int64_t t, int64_t dt,
                              const ActQ8& a, float* out, int64_t n_rows, bool accumulate) {
    constexpr int64_t qbytes = kType == kQ8_0 ? kQ8TileBlockQuants : kQ4TileBlockQuants;
    constexpr int64_t sstride = kType == kQ4_1 ? 2 * kTileRows : kTileRows;
    __m512 acc[NTL];
    for (int u = 0; u < NTL; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const int32_t xsum = a.s[b];
        const __m512 da = _mm512_set1_ps(a.d[b]);
        for (int u = 0; u < NTL; ++u) {
            const uint8_t* q = quants + ((t + u * dt) * nb + b) * qbytes;
            prefetch_ahead(q, qbytes);
            __m512i wv[8];
            unpack_block<kType>(q, wv);
            const uint16_t* sp = scales + ((t + u * dt) * nb + b) * sstride;
            const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)));
            const __m512i dot = block_dot<kType>(wv, a.q + b * kBlock, xsum);
            acc[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, da), acc[u]);
            if (kType == kQ4_1) {
                const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + kTileRows)));
                acc[u] = _mm512_fmadd_ps(mins, _mm512_set1_ps(float(xsum) * a.d[b]), acc[u]);
            }
        }
    }
    for (int u = 0; u < NTL; ++u)
        store_rows16(out + (t + u * dt) * kTileRows, acc[u], n_rows - (t + u * dt) * kTileRows, accumulate);
}

// As in kernels_avx2.cpp, the single-token and batched loops live in separate functions, so
// that neither's register allocation is made for the other.
template <int kType>
__attribute__((noinline)) static void gemv_q(const uint8_t* w, const uint16_t* scales, int64_t n_rows, int64_t nb,
                                             int64_t tile0, int64_t tile1, const ActQ8& a, float* out, bool accumulate) {
    for_tile_pairs(tile0, tile1, [&](auto n, int64_t t, int64_t dt) {
        tiles_gemv<kType, decltype(n)::value>(w, scales, nb, t, dt, a, out, n_rows, accumulate);
    });
}

template <int kType>
__attribute__((noinline)) static void batched_q(const uint8_t* w, const uint16_t* scales, int64_t n_rows, int64_t nb,
                                                int64_t tile0, int64_t tile1, const ActQ8& a, float* out, int64_t ldo,
                                                bool accumulate) {
    for (int64_t t = tile0; t < tile1; ++t) {
        const int64_t valid = n_rows - t * kTileRows;
        int64_t tok = 0;
        for (; tok + 8 <= a.T; tok += 8) tile_tokens<kType, 8>(w, scales, nb, t, a, tok, out, ldo, valid, accumulate);
        for (; tok + 4 <= a.T; tok += 4) tile_tokens<kType, 4>(w, scales, nb, t, a, tok, out, ldo, valid, accumulate);
        for (; tok < a.T; ++tok) tile_tokens<kType, 1>(w, scales, nb, t, a, tok, out, ldo, valid, accumulate);
    }
}

template <int kType>
static void matmul_q(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                     const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    const int64_t nb = k / kBlock;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(w + n_tiles(n_rows) * nb * tile_block_quant_bytes(kType));
    if (a.T == 1) gemv_q<kType>(w, scales, n_rows, nb, tile0, tile1, a, out, accumulate);
    else batched_q<kType>(w, scales, n_rows, nb, tile0, tile1, a, out, ldo, accumulate);
}

static void matmul_q4_0(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    matmul_q<kQ4_0>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

static void matmul_q8_0(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    matmul_q<kQ8_0>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

static void matmul_q4_1(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    matmul_q<kQ4_1>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

static void matmul_f16(const uint16_t* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                       int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    matmul_float_avx2(w, k, row0, row1, x, ldx, n_tok, out, ldo, accumulate);
}

static void matmul_f32(const float* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                       int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    matmul_float_avx2(w, k, row0, row1, x, ldx, n_tok, out, ldo, accumulate);
}

}  // namespace LLAMACPU_NS

const KernelTable LLAMACPU_TABLE = {
    LLAMACPU_TABLE_NAME,
    LLAMACPU_NS::matmul_q4_0,
    LLAMACPU_NS::matmul_q8_0,
    LLAMACPU_NS::matmul_q4_1,
    LLAMACPU_NS::matmul_f16,
    LLAMACPU_NS::matmul_f32,
    LLAMACPU_NS::quantize_row_q8_avx2,
    LLAMACPU_NS::rmsnorm_avx2,
    LLAMACPU_NS::rope_avx2,
    LLAMACPU_NS::silu_mul_avx2,
    LLAMACPU_NS::softmax_avx2,
    LLAMACPU_NS::attention_avx2,
    LLAMACPU_NS::f16_to_f32_avx2,
    LLAMACPU_NS::f32_to_f16_avx2,
    LLAMACPU_KQ(matmul_q4_k),
    LLAMACPU_KQ(matmul_q6_k),
    LLAMACPU_KQ(q6k_offsets),
};

}  // namespace llamacpu
