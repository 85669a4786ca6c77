// AVX2 + FMA + F16C kernels (Haswell / Zen and later). Compiled with -mavx2 -mfma -mf16c;
// only reached when cpu.cpp has seen those features.
//
// Quantized matmul: a 16-row tile is handled as two halves of 8 rows, one ymm each. For a
// 4-byte group of activations broadcast to all lanes, pmaddubsw multiplies the unsigned
// weight bytes by the signed activations; for Q4_0 the int16 sums of all 8 groups of a block
// fit (|sum| <= 8*2*15*127 = 30480), so one pmaddwd per block finishes the integer dot.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels.h"
#include "prefetch.h"
#include "kquants.h"

namespace llamacpu {
namespace avx2 {

#include "simd_x86_common.h"

static inline const uint16_t* tile_scales(const uint8_t* w, int64_t ntiles, int64_t nb, int64_t qbytes) {
    return reinterpret_cast<const uint16_t*>(w + ntiles * nb * qbytes);
}

// Q4_0 nibbles stand for q - 8: the dot subtracts 8 * sum(x). Q4_1's stand for q and the min
// term is added in float.
template <int kType>
static inline int32_t q4_corr(int32_t xsum) {
    return kType == kQ4_0 ? 8 * xsum : 0;
}

// Integer dots of one half-tile block (8 rows) with NT tokens' activation blocks, group by
// group: each weight vector is unpacked once and used for every token, and the per-token
// partial sums stay in registers (NT int16/int32 accumulators plus a few temporaries).
template <int kType, int NT>
static inline void half_block_dots(const uint8_t* q, const int8_t* const* x, const int32_t* corr, __m256i* dot) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (kType == kQ8_0) {
        for (int i = 0; i < NT; ++i) dot[i] = _mm256_setzero_si256();
        for (int g = 0; g < 8; ++g) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * 64));
            const __m256i aw = _mm256_abs_epi8(w);
            for (int i = 0; i < NT; ++i) {
                const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(x[i] + 4 * g), w));
                dot[i] = _mm256_add_epi32(dot[i], _mm256_madd_epi16(p, ones));
                running_sum(dot[i]);
            }
        }
        return;
    }
    __m256i s[NT];
    q4_half_nibble_sums<NT>(q, x, s);
    for (int i = 0; i < NT; ++i)
        dot[i] = _mm256_sub_epi32(_mm256_madd_epi16(s[i], ones), _mm256_set1_epi32(corr[i]));
}

// One half (8 rows) of a tile for NT tokens starting at tok0. Per (row, token) the float work
// is one fma per block in block order (two for Q4_1), identical to the NT = 1 case, so batch
// size never changes a result.
template <int kType, int NT>
static inline void tile_half(const uint8_t* quants, const uint16_t* scales, int64_t nb, int64_t t, int h,
                             const ActQ8& a, int64_t tok0, float* out, int64_t ldo, int64_t row_valid,
                             bool accumulate) {
    constexpr int64_t qbytes = kType == kQ8_0 ? kQ8TileBlockQuants : kQ4TileBlockQuants;
    constexpr int64_t sstride = kType == kQ4_1 ? 2 * kTileRows : kTileRows;
    __m256 acc[NT];
    for (int i = 0; i < NT; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* q = quants + (t * nb + b) * qbytes + h * 32;
        const uint16_t* sp = scales + (t * nb + b) * sstride + h * 8;
        const int8_t* x[NT];
        int32_t corr[NT];
        for (int i = 0; i < NT; ++i) {
            x[i] = a.q + (tok0 + i) * a.ldq + b * kBlock;
            corr[i] = q4_corr<kType>(a.s[(tok0 + i) * a.nb + b]);
        }
        __m256i dot[NT];
        half_block_dots<kType, NT>(q, x, corr, dot);
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp)));
        for (int i = 0; i < NT; ++i) {
            const float da = a.d[(tok0 + i) * a.nb + b];
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i]), _mm256_mul_ps(sc, _mm256_set1_ps(da)), acc[i]);
        }
        if (kType == kQ4_1) {
            const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + kTileRows)));
            for (int i = 0; i < NT; ++i) {
                const int64_t tb = (tok0 + i) * a.nb + b;
                acc[i] = _mm256_fmadd_ps(mins, _mm256_set1_ps(float(a.s[tb]) * a.d[tb]), acc[i]);
            }
        }
    }
    for (int i = 0; i < NT; ++i)
        store_rows8(out + (tok0 + i) * ldo + t * kTileRows + h * 8, acc[i], row_valid, accumulate);
}

// Single token, NTL tiles (1 or 2), tiles t and t + dt (prefetch.h, for_tile_pairs): both
// halves of each in one pass over the blocks. Two tiles per pass share each activation
// broadcast and keep two streams of weights in flight: Q4_0 and Q4_1 about 8% faster in cache
// than one tile per pass (four tiles spill). Q8_0, with no nibbles to unpack, is level with
// one tile in cache but reads memory 7-14% faster with two (the streams in memory order;
// paired with neighbouring tiles it had read 5% slower). Per row the arithmetic is the
// one-tile path's.
template <int kType, int NTL>
static inline void tiles_gemv(const uint8_t* quants, const uint16_t* scales, int64_t nb, int64_t t, int64_t dt,
                              const ActQ8& a, float* out, int64_t n_rows, bool accumulate) {
    constexpr int64_t qbytes = kType == kQ8_0 ? kQ8TileBlockQuants : kQ4TileBlockQuants;
    constexpr int64_t sstride = kType == kQ4_1 ? 2 * kTileRows : kTileRows;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NTL][2];
    for (int u = 0; u < NTL; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const int8_t* x = a.q + b * kBlock;
        const uint8_t* q[NTL];
        for (int u = 0; u < NTL; ++u) {
            q[u] = quants + ((t + u * dt) * nb + b) * qbytes;
            // Only the quants: the scale streams, sequential too, are left to the hardware
            // prefetcher (prefetching them 512 bytes ahead: level, Q4_0 -0.3% / +1.6% at 4096
            // / 2048 columns without it).
            prefetch_ahead(q[u], qbytes);
        }
        __m256i d[NTL][2];
        if (kType == kQ8_0) {
            for (int u = 0; u < NTL; ++u) d[u][0] = d[u][1] = _mm256_setzero_si256();
            for (int g = 0; g < 8; ++g) {
                const __m256i xv = bcast4(x + 4 * g);
                for (int u = 0; u < NTL; ++u)
                    for (int h = 0; h < 2; ++h) {
                        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[u] + g * 64 + 32 * h));
                        const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
                        d[u][h] = _mm256_add_epi32(d[u][h], _mm256_madd_epi16(p, ones));
                        running_sum(d[u][h]);
                    }
            }
        } else {
            __m256i s[NTL][2];
            q4_tiles_nibble_sums<NTL>(q, x, s);
            const __m256i c = _mm256_set1_epi32(q4_corr<kType>(a.s[b]));
            for (int u = 0; u < NTL; ++u)
                for (int h = 0; h < 2; ++h) d[u][h] = _mm256_sub_epi32(_mm256_madd_epi16(s[u][h], ones), c);
        }
        const __m256 da = _mm256_set1_ps(a.d[b]);
        for (int u = 0; u < NTL; ++u) {
            const uint16_t* sp = scales + ((t + u * dt) * nb + b) * sstride;
            for (int h = 0; h < 2; ++h) {
                const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + 8 * h)));
                acc[u][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[u][h]), _mm256_mul_ps(sc, da), acc[u][h]);
            }
            if (kType == kQ4_1) {
                const __m256 sa = _mm256_set1_ps(float(a.s[b]) * a.d[b]);
                for (int h = 0; h < 2; ++h) {
                    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + 16 + 8 * h)));
                    acc[u][h] = _mm256_fmadd_ps(m, sa, acc[u][h]);
                }
            }
        }
    }
    for (int u = 0; u < NTL; ++u) {
        const int64_t n0 = (t + u * dt) * kTileRows;
        store_rows8(out + n0, acc[u][0], n_rows - n0, accumulate);
        store_rows8(out + n0 + 8, acc[u][1], n_rows - n0 - 8, accumulate);
    }
}

// The single-token and batched paths are kept out of each other's functions, as in
// kquants_avx2.cpp: with the two-tile Q8_0 pass inlined beside it, the batched Q8_0 loop's
// register allocation came out 29% slower (bench/kquants_ab.py --tokens 16, in L2).
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
        for (int h = 0; h < 2; ++h) {
            const int64_t valid = n_rows - (t * kTileRows + h * 8);
            if (valid <= 0) break;
            int64_t tok = 0;
            for (; tok + 4 <= a.T; tok += 4) tile_half<kType, 4>(w, scales, nb, t, h, a, tok, out, ldo, valid, accumulate);
            for (; tok < a.T; ++tok) tile_half<kType, 1>(w, scales, nb, t, h, a, tok, out, ldo, valid, accumulate);
        }
    }
}

template <int kType>
static void matmul_q(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                     const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    const int64_t nb = k / kBlock;
    const uint16_t* scales = tile_scales(w, n_tiles(n_rows), nb, tile_block_quant_bytes(kType));
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

}  // namespace avx2

const KernelTable kAvx2Kernels = {
    "avx2",
    avx2::matmul_q4_0,
    avx2::matmul_q8_0,
    avx2::matmul_q4_1,
    avx2::matmul_f16,
    avx2::matmul_f32,
    avx2::quantize_row_q8_avx2,
    avx2::rmsnorm_avx2,
    avx2::rope_avx2,
    avx2::silu_mul_avx2,
    avx2::softmax_avx2,
    avx2::attention_avx2,
    avx2::f16_to_f32_avx2,
    avx2::f32_to_f16_avx2,
    kq_avx2_matmul_q4_k,
    kq_avx2_matmul_q6_k,
    kq_avx2_q6k_offsets,
};

}  // namespace llamacpu
