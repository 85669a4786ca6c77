// AVX2 + FMA + F16C K-quant kernels (compiled with kernels_avx2.cpp's flags). The per-row
// arithmetic is kquants.h's; each fused step is one fma.
//
// A 16-row tile is two halves of 8 rows, one ymm each (32-bit lane r = row r), and each
// 32-column sub-block is a Q4_0 tile-block: pmaddubsw of the unsigned quants with a broadcast
// 4-byte activation group, summed in int16. The sub-block scale rides on the pmaddwd that
// widens those sums (its second operand holds the scale in both int16 halves of a row's lane),
// so applying it costs nothing, and the super-block's sums add up in int32 (one activation
// scale per super-block, kquants.h). Q4_K's min term is four more pmaddwd per half: pairs of
// sub-blocks' mins against pairs of activation block sums. Scales are decoded for 16 rows at a
// time: for one token once per tile-superblock, for a batch once per tile and call.
//
// Q6_K's 6-bit quants (0..63) times int8 activations overflow int16 after two pmaddubsw, but
// sum (q - 32) * a over a 16-column group does not (8 products of at most 32 * 127 per int16
// lane): the lanes start from -32 * sum(a) and add the raw products with wrap-around, and since
// the true result fits, the wrapped arithmetic gives it exactly.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "prefetch.h"
#include "kquants.h"

namespace llamacpu {
namespace kq_avx2_impl {

#include "simd_x86_common.h"  // bcast4, store_rows8

static inline __m256 load8_f16(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 16 rows' int16 pairs (v, v) per 32-bit lane, rows 0-7 then rows 8-15, from 16 bytes.
static inline void pairs_u8(__m128i v, __m256i* half0, __m256i* half1) {
    *half0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));
    *half1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v));
}
static inline void pairs_i8(__m128i a, __m128i b, __m256i* half0, __m256i* half1) {
    *half0 = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
    *half1 = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
}

// ---- Q4_K ----------------------------------------------------------------------------------

// The 6-bit scales and mins of a tile-superblock's 16 rows, all eight sub-blocks decoded with
// whole-vector operations and stored for the broadcast loads that follow. sc[j]: byte r for
// row r. m[2p .. 2p+1] (32 bytes) for the sub-block pair (2p, 2p+1): m_2p of rows 0-7, m_2p+1 of
// rows 0-7, m_2p of rows 8-15, m_2p+1 of rows 8-15, so one 16-byte load serves one half.
struct alignas(32) Q4KRowBytes {
    uint8_t sc[8][16], m[8][16];
};

static inline void q4k_unpack_scales(const uint8_t* B, Q4KRowBytes* o) {
    auto ld = [&](int k) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + 16 * k)); };
    auto st = [](uint8_t* p, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); };
    // 64-bit quarters (m_2p rows 0-7, rows 8-15, m_2p+1 rows 0-7, rows 8-15) -> the pair order.
    auto st_pair = [&](uint8_t* p, __m256i v) { st(p, _mm256_permute4x64_epi64(v, 0xD8)); };
    const __m256i m63 = _mm256_set1_epi8(63), m15 = _mm256_set1_epi8(15), m48 = _mm256_set1_epi8(48);
    const __m256i b01 = ld(0), b23 = ld(2), b45 = ld(4), b67 = ld(6), b89 = ld(8), b1011 = ld(10);
    st(o->sc[0], _mm256_and_si256(b01, m63));
    st(o->sc[2], _mm256_and_si256(b23, m63));
    st_pair(o->m[0], _mm256_and_si256(b45, m63));
    st_pair(o->m[2], _mm256_and_si256(b67, m63));
    // j >= 4: the top two bits of B[j-4] (scale) and B[j] (min) are bits 4-5.
    auto top = [&](__m256i b) { return _mm256_and_si256(_mm256_srli_epi16(b, 2), m48); };
    st(o->sc[4], _mm256_or_si256(_mm256_and_si256(b89, m15), top(b01)));
    st(o->sc[6], _mm256_or_si256(_mm256_and_si256(b1011, m15), top(b23)));
    st_pair(o->m[4], _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b89, 4), m15), top(b45)));
    st_pair(o->m[6], _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1011, 4), m15), top(b67)));
}

// 16 bytes from memory in both 128-bit lanes. Written as inline asm so that the compiler keeps
// the load-unit broadcast instead of rebuilding the value from a register just stored with a
// lane permute (an ALU op).
static inline __m256i bcast16(const uint8_t* p) {
    __m256i v;
    __asm__("vbroadcasti128 %1, %0" : "=x"(v) : "m"(*reinterpret_cast<const __m128i*>(p)));
    return v;
}

// (m_2p, m_2p+1) as int16 pairs per row lane of half h, from the pair-ordered bytes.
static inline __m256i q4k_min_pairs(const Q4KRowBytes& rb, int p, int h) {
    const __m256i idx = _mm256_setr_epi8(0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1,
                                         4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1);
    return _mm256_shuffle_epi8(bcast16(rb.m[2 * p] + 16 * h), idx);
}

// A super-block's 8 activation block sums as int16 pairs (s_2p, s_2p+1), one int32 per pair:
// the second operands of its min term's four pmaddwd. |s| <= 32 * 127 fits int16.
static inline void q4k_sum_pairs(const int32_t* sums, int32_t* pairs) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(pairs),
                     _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

// acc + (d * da) * float(isd) - (dmin * da) * float(ism): the end of a Q4_K super-block.
static inline __m256 q4k_finish(__m256 acc, __m256 d, __m256 dmin, __m256 da, __m256i isd, __m256i ism) {
    acc = _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(isd), acc);
    return _mm256_fnmadd_ps(_mm256_mul_ps(dmin, da), _mm256_cvtepi32_ps(ism), acc);
}

// One token, NTL tiles (1 or 2), tiles t and t + dt (prefetch.h, for_tile_pairs), both
// halves of each: one pass over their bytes, each activation group broadcast once for all
// 16 * NTL rows.
template <int NTL>
__attribute__((noinline)) static void q4k_tiles_gemv(const uint8_t* quants, const uint8_t* scales, int64_t nsb,
                                                     int64_t t, int64_t dt, const ActQ8& a, float* out,
                                                     int64_t n_rows, bool accumulate) {
    // Row r's lane gets bytes (r, zero, r, zero); -1 selects zero.
    const __m256i pair_idx = _mm256_setr_epi8(0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3, -1,
                                              4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7, -1);
    const __m256i pair_idx_hi = _mm256_setr_epi8(8, -1, 8, -1, 9, -1, 9, -1, 10, -1, 10, -1, 11, -1, 11, -1,
                                                 12, -1, 12, -1, 13, -1, 13, -1, 14, -1, 14, -1, 15, -1, 15, -1);
    __m256 acc[NTL][2];
    for (int u = 0; u < NTL; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
    Q4KRowBytes rb[NTL];
    for (int64_t s = 0; s < nsb; ++s) {
        const uint8_t* ts[NTL];
        const uint8_t* tq[NTL];
        for (int u = 0; u < NTL; ++u) {
            ts[u] = scales + ((t + u * dt) * nsb + s) * kQ4KTileScales;
            tq[u] = quants + ((t + u * dt) * nsb + s) * kQ4KTileQuants;
            q4k_unpack_scales(ts[u] + 64, &rb[u]);
        }
        __m256i isd[NTL][2], ism[NTL][2];
        for (int u = 0; u < NTL; ++u) isd[u][0] = isd[u][1] = ism[u][0] = ism[u][1] = _mm256_setzero_si256();
        alignas(16) int32_t sp[4];
        q4k_sum_pairs(a.s + 8 * s, sp);
        auto sub_block = [&](int j, auto with_min) {
            const int8_t* x = a.q + (s * 8 + j) * kBlock;
            const uint8_t* q[NTL];
            for (int u = 0; u < NTL; ++u) {
                q[u] = tq[u] + 256 * j;
                // The scale stream is left to the hardware prefetcher: prefetching it two
                // super-blocks ahead, which gained 3-5% when passes paired neighbouring tiles,
                // is level with the streams in memory order (Q4_K +0.8% / +2.4% / +0.4%
                // without it).
                prefetch_ahead(q[u], 256);
            }
            __m256i sum[NTL][2];
            q4_tiles_nibble_sums<NTL>(q, x, sum);
            for (int u = 0; u < NTL; ++u) {
                // (sc, sc) pairs of rows 0-7 and 8-15: two in-lane shuffles of the 16 rows' bytes.
                const __m256i sc = bcast16(rb[u].sc[j]);
                isd[u][0] = _mm256_add_epi32(isd[u][0], _mm256_madd_epi16(sum[u][0], _mm256_shuffle_epi8(sc, pair_idx)));
                isd[u][1] = _mm256_add_epi32(isd[u][1], _mm256_madd_epi16(sum[u][1], _mm256_shuffle_epi8(sc, pair_idx_hi)));
                // The min term, one sub-block pair per sub-block of the second half, rather
                // than all four pairs after the last (+1-2% in L2 and from memory; integer
                // sums, so the same result in any order).
                if constexpr (decltype(with_min)::value) {
                    const __m256i sums = _mm256_set1_epi32(sp[j - 4]);
                    ism[u][0] = _mm256_add_epi32(ism[u][0], _mm256_madd_epi16(q4k_min_pairs(rb[u], j - 4, 0), sums));
                    ism[u][1] = _mm256_add_epi32(ism[u][1], _mm256_madd_epi16(q4k_min_pairs(rb[u], j - 4, 1), sums));
                }
            }
        };
        // One loop over all eight with `if (j >= 4)` cost a compare and branch per sub-block
        // and kept the min accumulators live, spilled, throughout: 185 uops per two-tile
        // sub-block in llvm-mca's Zen 3 model, 152 / 179 in the split halves (Q4_0's block:
        // 169). One AVX2 core: +3.0% in L2, +1.4% from memory at 5632 columns.
        for (int j = 0; j < 4; ++j) sub_block(j, std::false_type{});
        for (int j = 4; j < 8; ++j) sub_block(j, std::true_type{});
        const __m256 da = _mm256_set1_ps(a.d[s * 8]);
        for (int u = 0; u < NTL; ++u) {
            acc[u][0] = q4k_finish(acc[u][0], load8_f16(ts[u]), load8_f16(ts[u] + 32), da, isd[u][0], ism[u][0]);
            acc[u][1] = q4k_finish(acc[u][1], load8_f16(ts[u] + 16), load8_f16(ts[u] + 48), da, isd[u][1], ism[u][1]);
        }
    }
    for (int u = 0; u < NTL; ++u) {
        const int64_t n0 = (t + u * dt) * kTileRows;
        store_rows8(out + n0, acc[u][0], n_rows - n0, accumulate);
        store_rows8(out + n0 + 8, acc[u][1], n_rows - n0 - 8, accumulate);
    }
}

// The decoded scales of one half (8 rows) of a tile-superblock, for the batched path: decoded
// once per tile and call, used by every token.
struct Q4KHalf {
    __m256i sc[8];  // (sc_j, sc_j) int16 pairs per row lane
    __m256i m[4];   // (m_2p, m_2p+1) int16 pairs per row lane
    __m256 d, dmin;
};

static inline void q4k_decode(const uint8_t* ts, Q4KHalf* out) {
    Q4KRowBytes rb;
    q4k_unpack_scales(ts + 64, &rb);
    for (int j = 0; j < 8; ++j)
        pairs_u8(_mm_load_si128(reinterpret_cast<const __m128i*>(rb.sc[j])), &out[0].sc[j], &out[1].sc[j]);
    for (int h = 0; h < 2; ++h) {
        for (int p = 0; p < 4; ++p) out[h].m[p] = q4k_min_pairs(rb, p, h);
        out[h].d = load8_f16(ts + 16 * h);
        out[h].dmin = load8_f16(ts + 32 + 16 * h);
    }
}

// NT tokens from tok0, the halves of a tile with rows (nh of them): each weight vector is
// unpacked once for all NT tokens. dec: the tile's decoded scales, [super-block][half]. Per
// (row, token) the arithmetic is the gemv path's, so the batch size never changes a result.
template <int NT>
static void q4k_tokens(const uint8_t* tq, const Q4KHalf* dec, int64_t nsb, const ActQ8& a, int64_t tok0, int nh,
                       __m256 (*acc)[NT]) {
    for (int64_t s = 0; s < nsb; ++s) {
        alignas(16) int32_t sp[NT][4];
        for (int i = 0; i < NT; ++i) q4k_sum_pairs(a.s + (tok0 + i) * a.nb + 8 * s, sp[i]);
        const uint8_t* sq = tq + s * kQ4KTileQuants;
        for (int h = 0; h < nh; ++h) {
            const Q4KHalf& hs = dec[2 * s + h];
            __m256i isd[NT];
            for (int i = 0; i < NT; ++i) isd[i] = _mm256_setzero_si256();
            for (int j = 0; j < 8; ++j) {
                const int8_t* x[NT];
                for (int i = 0; i < NT; ++i) x[i] = a.q + (tok0 + i) * a.ldq + (s * 8 + j) * kBlock;
                __m256i sum[NT];
                q4_half_nibble_sums<NT>(sq + 256 * j + h * 32, x, sum);
                for (int i = 0; i < NT; ++i) isd[i] = _mm256_add_epi32(isd[i], _mm256_madd_epi16(sum[i], hs.sc[j]));
            }
            for (int i = 0; i < NT; ++i) {
                __m256i ism = _mm256_setzero_si256();
                for (int p = 0; p < 4; ++p) ism = _mm256_add_epi32(ism, _mm256_madd_epi16(hs.m[p], _mm256_set1_epi32(sp[i][p])));
                const __m256 da = _mm256_set1_ps(a.d[(tok0 + i) * a.nb + s * 8]);
                acc[h][i] = q4k_finish(acc[h][i], hs.d, hs.dmin, da, isd[i], ism);
            }
        }
    }
}

// ---- Q6_K ----------------------------------------------------------------------------------

// 32 * the sums of the activation pairs each int16 lane of a 16-column group meets: even lanes
// 32 * sum(a[4v], a[4v+1]), odd lanes 32 * sum(a[4v+2], a[4v+3]) over v; low group, high group.
static inline void q6_offsets(const int8_t* x, __m256i* off_lo, __m256i* off_hi) {
    const __m256i t = _mm256_maddubs_epi16(_mm256_set1_epi8(32), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    __m256i u = _mm256_add_epi16(t, _mm256_srli_si256(t, 8));
    u = _mm256_add_epi16(u, _mm256_srli_si256(u, 4));  // dword 0 of each 128-bit lane
    *off_lo = _mm256_permutevar8x32_epi32(u, _mm256_setzero_si256());
    *off_hi = _mm256_permutevar8x32_epi32(u, _mm256_set1_epi32(4));
}

// The fourth column group's 6-bit quants from the top bit pairs of the three stored vectors,
// given their low 6 bits (lo_k = v_k & 63): v_k ^ lo_k keeps bits 6-7 of every byte and nothing
// else, so 16-bit shifts move each byte's pair down without bleeding across bytes, and no mask
// beyond the one already in a register is needed. Bit pairs: v0 -> bits 0-1, v1 -> 2-3, v2 -> 4-5.
static inline __m256i q6_fourth(__m256i v0, __m256i v1, __m256i v2, __m256i lo0, __m256i lo1, __m256i lo2) {
    __m256i r = _mm256_srli_epi16(_mm256_xor_si256(v0, lo0), 2);
    r = _mm256_srli_epi16(_mm256_or_si256(r, _mm256_xor_si256(v1, lo1)), 2);
    return _mm256_srli_epi16(_mm256_or_si256(r, _mm256_xor_si256(v2, lo2)), 2);
}

// The four 6-bit quant vectors (columns 0-3, 4-7, 8-11, 12-15 of a 16-column group, one
// byte per row) of one stored group of three vectors at p (kquants.h): three are the low 6
// bits of the stored vectors, the fourth gathers their top bit pairs.
static inline void q6_unpack(const uint8_t* p, __m256i* q) {
    const __m256i m63 = _mm256_set1_epi8(63);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
    const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128));
    q[0] = _mm256_and_si256(v0, m63);
    q[1] = _mm256_and_si256(v1, m63);
    q[2] = _mm256_and_si256(v2, m63);
    q[3] = q6_fourth(v0, v1, v2, q[0], q[1], q[2]);
}

// The dword each 16-column group's int16 lanes start from, for a whole activation row:
// offs[2b + t] holds the negated (even, odd) pair of q6_offsets for block b, group t, i.e.
// ActQ8::g, which the backend computes once per call (kq_avx2_q6k_offsets) and the tiles only
// broadcast.
static void q6_row_offsets(const int8_t* x, int64_t nb, int32_t* offs) {
    for (int64_t b = 0; b < nb; ++b) {
        __m256i lo, hi;
        q6_offsets(x + b * kBlock, &lo, &hi);
        offs[2 * b] = _mm256_cvtsi256_si32(_mm256_sub_epi16(_mm256_setzero_si256(), lo));
        offs[2 * b + 1] = _mm256_cvtsi256_si32(_mm256_sub_epi16(_mm256_setzero_si256(), hi));
    }
}

// int32 lanes, rows 0-7 in d0 and 8-15 in d1: sc_lo * sum_lo + sc_hi * sum_hi over one Q6_K
// sub-block, sum_lo / sum_hi the dots of its low / high 16 columns with x, each of (q - 32) * a.
// Each activation group is broadcast for each half: sharing it between the halves needs six
// live weight vectors, and the spills cost more than the broadcasts (one load each).
static inline void q6_tile_sub_dots(const uint8_t* sub, const int8_t* x, const int32_t* offs, const uint8_t* sc_lo,
                                    const uint8_t* sc_hi, __m256i* d0, __m256i* d1) {
    const __m256i m63 = _mm256_set1_epi8(63);
    auto ld = [&](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    __m256i sum[2][2];  // [group][half]
    for (int t = 0; t < 2; ++t) {
        const uint8_t* p = sub + 3 * t * 64;
        const int8_t* xt = x + 16 * t;
        // Each stored vector is loaded once, in address order: its low 6 bits meet one
        // activation group and its top bits go into the fourth vector.
        __m256i v[2][3];
        for (int k = 0; k < 3; ++k)
            for (int h = 0; h < 2; ++h) v[h][k] = ld(p + 64 * k + 32 * h);
        for (int h = 0; h < 2; ++h) {
            const __m256i q0 = _mm256_and_si256(v[h][0], m63), q1 = _mm256_and_si256(v[h][1], m63),
                          q2 = _mm256_and_si256(v[h][2], m63);
            __m256i s = _mm256_add_epi16(_mm256_set1_epi32(offs[t]), _mm256_maddubs_epi16(q0, bcast4(xt)));
            running_sum(s);
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q1, bcast4(xt + 4)));
            running_sum(s);
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q2, bcast4(xt + 8)));
            running_sum(s);
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q6_fourth(v[h][0], v[h][1], v[h][2], q0, q1, q2), bcast4(xt + 12)));
            sum[t][h] = s;
        }
    }
    // Each row's int8 scale as the high byte of both int16s of its lane, i.e. 256 * sc: no
    // sign extension needed. |256 * sc * (even + odd)| <= 256 * 128 * 2 * 32512 < 2^31, and
    // the exact shift back by 8 leaves room to add the two groups.
    const __m256i idx0 = _mm256_setr_epi8(-1, 0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3,
                                          -1, 4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7);
    const __m256i idx1 = _mm256_setr_epi8(-1, 8, -1, 8, -1, 9, -1, 9, -1, 10, -1, 10, -1, 11, -1, 11,
                                          -1, 12, -1, 12, -1, 13, -1, 13, -1, 14, -1, 14, -1, 15, -1, 15);
    auto widen = [&](__m256i sum, const uint8_t* sc, __m256i idx) {
        const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
        return _mm256_srai_epi32(_mm256_madd_epi16(sum, _mm256_shuffle_epi8(b, idx)), 8);
    };
    *d0 = _mm256_add_epi32(widen(sum[0][0], sc_lo, idx0), widen(sum[1][0], sc_hi, idx0));
    *d1 = _mm256_add_epi32(widen(sum[0][1], sc_lo, idx1), widen(sum[1][1], sc_hi, idx1));
}

// One token, NTL tiles (1 or 2), tiles t and t + dt, one after the other per sub-block: a
// tile's working set (six weight vectors per activation group) leaves no registers to share
// the broadcasts with a second tile, but two weight streams in flight read memory faster than
// one (one core, bench/kquants_ab.py --regime dram: +4% to +9% at 4096 columns, level at
// 2048, measured with neighbouring tiles paired; level in L2). Kept out of line, as Q4_K's:
// inlined into gemv's pass loop, its register allocation read memory 12-14% slower.
template <int NTL>
__attribute__((noinline)) static void q6k_tiles_gemv(const uint8_t* quants, const uint8_t* scales, int64_t nsb,
                                                     int64_t t, int64_t dt, const ActQ8& a, float* out,
                                                     int64_t n_rows, bool accumulate) {
    __m256 acc[NTL][2];
    for (int u = 0; u < NTL; ++u) acc[u][0] = acc[u][1] = _mm256_setzero_ps();
    for (int64_t s = 0; s < nsb; ++s) {
        const uint8_t* ts[NTL];
        const uint8_t* tq[NTL];
        __m256i isd[NTL][2];
        for (int u = 0; u < NTL; ++u) {
            ts[u] = scales + ((t + u * dt) * nsb + s) * kQ6KTileScales;
            tq[u] = quants + ((t + u * dt) * nsb + s) * kQ6KTileQuants;
            isd[u][0] = isd[u][1] = _mm256_setzero_si256();
        }
        for (int j = 0; j < 8; ++j) {
            const int64_t b = s * 8 + j;
            for (int u = 0; u < NTL; ++u) {
                const uint8_t* sub = tq[u] + 384 * j;
                prefetch_ahead(sub, 384);
                __m256i d0, d1;
                q6_tile_sub_dots(sub, a.q + b * kBlock, a.g + 2 * b, ts[u] + 32 + 16 * (2 * j),
                                 ts[u] + 32 + 16 * (2 * j + 1), &d0, &d1);
                isd[u][0] = _mm256_add_epi32(isd[u][0], d0);
                isd[u][1] = _mm256_add_epi32(isd[u][1], d1);
            }
        }
        const __m256 da = _mm256_set1_ps(a.d[s * 8]);
        for (int u = 0; u < NTL; ++u) {
            acc[u][0] = _mm256_fmadd_ps(_mm256_mul_ps(load8_f16(ts[u]), da), _mm256_cvtepi32_ps(isd[u][0]), acc[u][0]);
            acc[u][1] = _mm256_fmadd_ps(_mm256_mul_ps(load8_f16(ts[u] + 16), da), _mm256_cvtepi32_ps(isd[u][1]), acc[u][1]);
        }
    }
    for (int u = 0; u < NTL; ++u) {
        const int64_t n0 = (t + u * dt) * kTileRows;
        store_rows8(out + n0, acc[u][0], n_rows - n0, accumulate);
        store_rows8(out + n0 + 8, acc[u][1], n_rows - n0 - 8, accumulate);
    }
}

// As Q4KHalf, for Q6_K.
struct Q6KHalf {
    __m256i lo[8], hi[8];  // (sc_2j, sc_2j) and (sc_2j+1, sc_2j+1) int16 pairs per row lane
    __m256 d;
};

static inline void q6k_decode(const uint8_t* ts, Q6KHalf* out) {
    for (int j = 0; j < 8; ++j) {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ts + 32 + 16 * (2 * j)));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ts + 32 + 16 * (2 * j + 1)));
        pairs_i8(lo, lo, &out[0].lo[j], &out[1].lo[j]);
        pairs_i8(hi, hi, &out[0].hi[j], &out[1].hi[j]);
    }
    for (int h = 0; h < 2; ++h) out[h].d = load8_f16(ts + 16 * h);
}

// As q4k_tokens, for Q6_K: per 16-column group the int16 lanes start from the token's
// -32 * sum(a) offsets (ActQ8::g, a.nb * 2 per token) and widen
// with the group's scale.
template <int NT>
static void q6k_tokens(const uint8_t* tq, const Q6KHalf* dec, int64_t nsb, const ActQ8& a,
                       int64_t tok0, int nh, __m256 (*acc)[NT]) {
    for (int64_t s = 0; s < nsb; ++s) {
        int32_t off[NT][16];  // the super-block's offsets, [token][2 * j + t]
        for (int i = 0; i < NT; ++i) std::memcpy(off[i], a.g + (tok0 + i) * 2 * a.nb + 16 * s, sizeof off[i]);
        const uint8_t* sq = tq + s * kQ6KTileQuants;
        for (int h = 0; h < nh; ++h) {
            const Q6KHalf& hs = dec[2 * s + h];
            __m256i dot[NT];
            for (int i = 0; i < NT; ++i) dot[i] = _mm256_setzero_si256();
            for (int j = 0; j < 8; ++j) {
                for (int t = 0; t < 2; ++t) {
                    __m256i q[4];
                    q6_unpack(sq + 384 * j + 3 * t * 64 + h * 32, q);
                    for (int i = 0; i < NT; ++i) {
                        const int8_t* x = a.q + (tok0 + i) * a.ldq + (s * 8 + j) * kBlock + 16 * t;
                        __m256i sum = _mm256_add_epi16(_mm256_maddubs_epi16(q[0], bcast4(x)), _mm256_set1_epi32(off[i][2 * j + t]));
                        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(q[1], bcast4(x + 4)));
                        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(q[2], bcast4(x + 8)));
                        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(q[3], bcast4(x + 12)));
                        dot[i] = _mm256_add_epi32(dot[i], _mm256_madd_epi16(sum, t ? hs.hi[j] : hs.lo[j]));
                        running_sum(dot[i]);
                    }
                }
            }
            for (int i = 0; i < NT; ++i) {
                const __m256 dd = _mm256_mul_ps(hs.d, _mm256_set1_ps(a.d[(tok0 + i) * a.nb + s * 8]));
                acc[h][i] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot[i]), acc[h][i]);
            }
        }
    }
}

// ---- dispatch ------------------------------------------------------------------------------

// NT tokens from tok0 against tile t, the tile's scales already decoded into dec.
template <int32_t kType, int NT, typename Half>
static inline void tile_tokens(const uint8_t* w, const Half* dec, int64_t nsb, int64_t t,
                               const ActQ8& a, int64_t tok0, float* out, int64_t ldo, int64_t n_rows, bool accumulate) {
    const int64_t n0 = t * kTileRows;
    const int nh = n_rows - n0 > 8 ? 2 : 1;
    __m256 acc[2][NT];
    for (int h = 0; h < 2; ++h)
        for (int i = 0; i < NT; ++i) acc[h][i] = _mm256_setzero_ps();
    const uint8_t* tq = w + t * nsb * k_tile_quant_bytes(kType);
    if constexpr (kType == kQ4_K) q4k_tokens<NT>(tq, dec, nsb, a, tok0, nh, acc);
    else q6k_tokens<NT>(tq, dec, nsb, a, tok0, nh, acc);
    for (int h = 0; h < nh; ++h)
        for (int i = 0; i < NT; ++i)
            store_rows8(out + (tok0 + i) * ldo + n0 + 8 * h, acc[h][i], n_rows - n0 - 8 * h, accumulate);
}

// The single-token and batched paths are kept out of each other's functions: compiled as
// one, the compiler's register allocation for the batched loop came out a third slower
// (bench/kquants.py, 16 tokens) after an unrelated change to the single-token loop.

template <int32_t kType>
__attribute__((noinline)) static void gemv(const uint8_t* w, const uint8_t* scales, int64_t n_rows, int64_t nsb,
                                           int64_t tile0, int64_t tile1, const ActQ8& a, float* out, bool accumulate) {
    for_tile_pairs(tile0, tile1, [&](auto n, int64_t t, int64_t dt) {
        if constexpr (kType == kQ4_K) q4k_tiles_gemv<decltype(n)::value>(w, scales, nsb, t, dt, a, out, n_rows, accumulate);
        else q6k_tiles_gemv<decltype(n)::value>(w, scales, nsb, t, dt, a, out, n_rows, accumulate);
    });
}

template <int32_t kType>
__attribute__((noinline)) static void batched(const uint8_t* w, const uint8_t* scales, int64_t n_rows, int64_t nsb,
                                              int64_t tile0, int64_t tile1, const ActQ8& a, float* out, int64_t ldo,
                                              bool accumulate) {
    using Half = std::conditional_t<kType == kQ4_K, Q4KHalf, Q6KHalf>;
    std::vector<Half> dec(size_t(2 * nsb));  // a tile's decoded scales
    for (int64_t t = tile0; t < tile1; ++t) {
        for (int64_t s = 0; s < nsb; ++s) {
            const uint8_t* ts = scales + (t * nsb + s) * k_tile_scale_bytes(kType);
            if constexpr (kType == kQ4_K) q4k_decode(ts, &dec[size_t(2 * s)]);
            else q6k_decode(ts, &dec[size_t(2 * s)]);
        }
        int64_t tok = 0;
        for (; tok + 4 <= a.T; tok += 4) tile_tokens<kType, 4>(w, dec.data(), nsb, t, a, tok, out, ldo, n_rows, accumulate);
        for (; tok < a.T; ++tok) tile_tokens<kType, 1>(w, dec.data(), nsb, t, a, tok, out, ldo, n_rows, accumulate);
    }
}

template <int32_t kType>
static void matmul(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                   float* out, int64_t ldo, bool accumulate) {
    const int64_t nsb = k / kSuperBlock;
    const uint8_t* scales = w + n_tiles(n_rows) * nsb * k_tile_quant_bytes(kType);
    if (a.T == 1) gemv<kType>(w, scales, n_rows, nsb, tile0, tile1, a, out, accumulate);
    else batched<kType>(w, scales, n_rows, nsb, tile0, tile1, a, out, ldo, accumulate);
}

}  // namespace kq_avx2_impl

void kq_avx2_matmul_q4_k(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                         float* out, int64_t ldo, bool accumulate) {
    kq_avx2_impl::matmul<kQ4_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

void kq_avx2_q6k_offsets(const int8_t* q, int64_t nb, int32_t* g) { kq_avx2_impl::q6_row_offsets(q, nb, g); }

void kq_avx2_matmul_q6_k(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                         float* out, int64_t ldo, bool accumulate) {
    kq_avx2_impl::matmul<kQ6_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

}  // namespace llamacpu
