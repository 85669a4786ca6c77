// AVX-512 (F, BW, VL) + VNNI K-quant kernels (compiled with kernels_avx512.cpp's flags). The
// per-row arithmetic is kquants.h's, with the same fused steps as the AVX2 path, so both give
// the same bits.
//
// A 16-row tile is one zmm (lane r = row r). vpdpbusd accumulates the exact int32 dot of each
// row with a broadcast 4-byte activation group, and the super-block's scaled dots add up in
// int32, the activations having one scale per super-block. Q4_K keeps its scales and mins as
// bytes in each row's lane (a 4 x 4 transpose of the stored bytes), so neither needs vpmulld,
// two uops on Intel cores: a sub-block's two half dots, each small enough for int16, ride one
// vpdpwssd against the (scale, scale) pair, and the min term is four vpdpbusd of the mins
// against the activation block sums split into bytes. For Q6_K the dot of the unsigned quants
// starts from -32 * sum(a), which turns it into sum (q-32) * a.
//
// With LLAMACPU_SIMDE this file is built a second time against SIMDe's emulation
// (kquants_avx512_emu.cpp), so the tests run this code on CPUs without AVX-512.
#if defined(LLAMACPU_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
#define KQ_NS kq_avx512emu_impl
#define KQ_FN(name) kq_avx512emu_##name
#else
#include <immintrin.h>
#define KQ_NS kq_avx512_impl
#define KQ_FN(name) kq_avx512_##name
#endif

#include <cstring>
#include <vector>

#include "kernels.h"
#include "prefetch.h"
#include "kquants.h"

namespace llamacpu {
namespace KQ_NS {

#include "simde_avx512_fixups.h"

static inline __m512i bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static inline __m512 load16_f16(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

static inline __m512i load16_i8(const uint8_t* p) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
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

// The 8 column groups of a 4-bit sub-block (Q4_0 layout) as unsigned bytes, group g = columns
// 4g..4g+3 of all 16 rows.
static inline void unpack_nibbles(const uint8_t* sub, __m512i* q) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    for (int v = 0; v < 4; ++v) {
        const __m512i raw = _mm512_loadu_si512(sub + v * 64);
        q[v] = _mm512_and_si512(raw, m4);
        q[4 + v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
    }
}

// (a & mask) | (b & ~mask), one vpternlogd.
static inline __m512i select_bits(__m512i a, __m512i b, __m512i mask) {
    return _mm512_ternarylogic_epi32(a, b, mask, 0xE4);
}

// Q6_K: the 6-bit quants of the 8 column groups (kquants.h): three groups of each 16 columns
// are the low 6 bits of a stored vector, the fourth gathers their top bit pairs.
static inline void unpack_q6(const uint8_t* sub, __m512i* q) {
    const __m512i m63 = _mm512_set1_epi8(63);
    for (int t = 0; t < 2; ++t) {
        __m512i v[3];
        for (int k = 0; k < 3; ++k) {
            v[k] = _mm512_loadu_si512(sub + (3 * t + k) * 64);
            q[4 * t + k] = _mm512_and_si512(v[k], m63);
        }
        // Bits 0-1 from v0 >> 6, 2-3 from v1 >> 4, 4-5 from v2 >> 2: two bitwise selects (the
        // mask picks the first operand) and one AND for the bits the 16-bit shifts drag in.
        const __m512i ab = select_bits(_mm512_srli_epi16(v[0], 6), _mm512_srli_epi16(v[1], 4), _mm512_set1_epi8(0x03));
        q[4 * t + 3] = _mm512_and_si512(select_bits(ab, _mm512_srli_epi16(v[2], 2), _mm512_set1_epi8(0x0f)), m63);
    }
}

// sum over groups [g0, g0 + 4) of q * a, added to init, per row.
static inline __m512i dot4(const __m512i* q, const int8_t* x, int g0, __m512i init) {
    for (int g = g0; g < g0 + 4; ++g) init = _mm512_dpbusd_epi32(init, q[g], bcast4(x + 4 * g));
    return init;
}

// The 4 x 4 byte transpose that turns 128-bit lane j = byte r of sub-block j (j = 0..3, r =
// 0..15) into 32-bit lane r = row r's bytes of sub-blocks 0..3: a dword transpose across the
// lanes, then a byte transpose inside each; neither needs VBMI.
static inline __m512i rows_to_lanes(__m512i v) {
    const __m512i dw = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i by = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(dw, v), by);
}

// A tile-superblock's scales and mins, row r's in 32-bit lane r: byte i of sc[h] is sc_{4h+i},
// of m[h] m_{4h+i}. The decode is bytewise, so transposing the three stored vectors first gives
// the same bytes as transposing the four decoded ones, one transpose fewer.
struct Q4KLanes {
    __m512i sc[2], m[2];
};

static inline void q4k_lanes(const uint8_t* B, Q4KLanes* o) {
    const __m512i b0 = rows_to_lanes(_mm512_loadu_si512(B)), b4 = rows_to_lanes(_mm512_loadu_si512(B + 64));
    const __m512i b8 = rows_to_lanes(_mm512_loadu_si512(B + 128));
    const __m512i m63 = _mm512_set1_epi8(63), m15 = _mm512_set1_epi8(15);
    o->sc[0] = _mm512_and_si512(b0, m63);
    o->m[0] = _mm512_and_si512(b4, m63);
    // j >= 4: low four bits from B[j+4] (scale) or its high nibble (min), bits 4-5 from the top
    // two bits of B[j-4] (scale) or B[j] (min).
    o->sc[1] = _mm512_and_si512(select_bits(b8, _mm512_srli_epi16(b0, 2), m15), m63);
    o->m[1] = _mm512_and_si512(select_bits(_mm512_srli_epi16(b8, 4), _mm512_srli_epi16(b4, 2), m15), m63);
}

// (sc_j, sc_j) as the int16 pair of each row's lane, from q4k_lanes' sc[j / 4] (one pshufb).
static inline __m512i q4k_scale_pairs(const Q4KLanes& l, int j) {
    const char i = char(j % 4), z = char(0x80);  // pshufb: 0x80 gives zero
    const __m128i idx = _mm_setr_epi8(i, z, i, z, char(4 + i), z, char(4 + i), z, char(8 + i), z, char(8 + i), z,
                                      char(12 + i), z, char(12 + i), z);
    return _mm512_shuffle_epi8(l.sc[j / 4], _mm512_broadcast_i32x4(idx));
}

// A super-block's activation block sums s_j split into two signed bytes, s_j = 128 * h_j + l_j
// with l_j in [0, 128) and h_j in [-32, 32] (|s_j| <= 32 * 128): lh[0..7] = l_j, lh[8..15] =
// h_j, so the min term sum_j m_j * s_j is four vpdpbusd of the unsigned mins against them.
static inline void q4k_sum_bytes(const int32_t* sums, int8_t* lh) {
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(s, _mm256_set1_epi32(127))),
                                            _mm256_srai_epi32(s, 7), 1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lh), _mm512_cvtepi32_epi8(both));
}

// q4k_sum_bytes of every token and super-block of a call, computed once for all its tiles:
// out[(tok * nsb + s) * 16 ..].
static void q4k_call_sum_bytes(const ActQ8& a, int64_t nsb, int8_t* out) {
    for (int64_t tok = 0; tok < a.T; ++tok)
        for (int64_t s = 0; s < nsb; ++s) q4k_sum_bytes(a.s + tok * a.nb + s * 8, out + (tok * nsb + s) * 16);
}

// sum_j m_j * s_j per row: the l and h halves of the sums (q4k_sum_bytes) against the mins of
// sub-blocks 0-3 and 4-7 (q4k_lanes' m), exact in int32.
static inline __m512i q4k_min_term(const __m512i* m, const int8_t* lh) {
    const __m512i lo = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), m[0], bcast4(lh)), m[1], bcast4(lh + 4));
    const __m512i hi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), m[0], bcast4(lh + 8)), m[1], bcast4(lh + 12));
    return _mm512_add_epi32(lo, _mm512_slli_epi32(hi, 7));
}

// The batched path's decoded tile-superblock: the scales one per row lane (sc[j]), the mins
// as q4k_lanes gives them.
struct Q4KScales {
    __m512i sc[8], m[2];
    __m512 d, dmin;
};

static inline void q4k_decode(const uint8_t* ts, Q4KScales* out) {
    Q4KLanes ln;
    q4k_lanes(ts + 64, &ln);
    for (int j = 0; j < 8; ++j)
        out->sc[j] = _mm512_and_si512(_mm512_srli_epi32(ln.sc[j / 4], 8 * (j % 4)), _mm512_set1_epi32(0xff));
    out->m[0] = ln.m[0];
    out->m[1] = ln.m[1];
    out->d = load16_f16(ts);
    out->dmin = load16_f16(ts + 32);
}

// acc + (d * da) * float(isd) - (dmin * da) * float(ism): the end of a Q4_K super-block.
static inline __m512 q4k_finish(__m512 acc, __m512 d, __m512 dmin, float da, __m512i isd, __m512i ism) {
    const __m512 vda = _mm512_set1_ps(da);
    acc = _mm512_fmadd_ps(_mm512_mul_ps(d, vda), _mm512_cvtepi32_ps(isd), acc);
    return _mm512_fnmadd_ps(_mm512_mul_ps(dmin, vda), _mm512_cvtepi32_ps(ism), acc);
}

// NT tokens from tok0 against tile t; dec: the tile's decoded scales, one per super-block; lh:
// the call's q4k_call_sum_bytes.
template <int NT>
static void q4k_tile(const uint8_t* quants, const Q4KScales* dec, const int8_t* lh, int64_t nsb, int64_t t,
                     const ActQ8& a, int64_t tok0, float* out, int64_t ldo, int64_t valid, bool accumulate) {
    __m512 acc[NT];
    for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsb; ++s) {
        const Q4KScales& sc = dec[s];
        const uint8_t* tq = quants + (t * nsb + s) * kQ4KTileQuants;
        __m512i isd[NT];
        for (int i = 0; i < NT; ++i) isd[i] = _mm512_setzero_si512();
        for (int j = 0; j < 8; ++j) {
            __m512i q[8];
            unpack_nibbles(tq + 256 * j, q);
            for (int i = 0; i < NT; ++i) {
                const int8_t* x = a.q + (tok0 + i) * a.ldq + (s * 8 + j) * kBlock;
                const __m512i dot = dot4(q, x, 4, dot4(q, x, 0, _mm512_setzero_si512()));
                isd[i] = _mm512_add_epi32(isd[i], _mm512_mullo_epi32(dot, sc.sc[j]));
            }
        }
        for (int i = 0; i < NT; ++i) {
            const int64_t tb = (tok0 + i) * a.nb + s * 8;
            acc[i] = q4k_finish(acc[i], sc.d, sc.dmin, a.d[tb], isd[i], q4k_min_term(sc.m, lh + ((tok0 + i) * nsb + s) * 16));
        }
    }
    for (int i = 0; i < NT; ++i) store_rows16(out + (tok0 + i) * ldo + t * kTileRows, acc[i], valid, accumulate);
}

// One token, NTL tiles (1 or 2), tiles t and t + dt (prefetch.h, for_tile_pairs): one pass
// over both tiles' super-blocks, each weight stream prefetched in memory order. The high
// nibbles are not shifted down: dpbusd of (byte & 0xf0) gives 16 times their dot. Each half's
// dot fits int16 (16 * 15 * 128), so the two go into one lane as an int16 pair, the high one
// by a single left shift (16 * dot << 12 = dot << 16), and one vpdpwssd against (sc_j, sc_j)
// scales and adds both: no vpmulld.
template <int NTL>
__attribute__((noinline)) static void q4k_tiles_gemv(const uint8_t* quants, const uint8_t* scales, const int8_t* lh,
                                                     int64_t nsb, int64_t t, int64_t dt, const ActQ8& a, float* out,
                                                     int64_t n_rows, bool accumulate) {
    const __m512i lo4 = _mm512_set1_epi8(0x0f), hi4 = _mm512_set1_epi8(char(0xf0)), lo16 = _mm512_set1_epi32(0xffff);
    __m512 acc[NTL];
    for (int u = 0; u < NTL; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsb; ++s) {
        const uint8_t* ts[NTL];
        const uint8_t* tq[NTL];
        Q4KLanes ln[NTL];
        __m512i isd[NTL];
        for (int u = 0; u < NTL; ++u) {
            ts[u] = scales + ((t + u * dt) * nsb + s) * kQ4KTileScales;
            tq[u] = quants + ((t + u * dt) * nsb + s) * kQ4KTileQuants;
            q4k_lanes(ts[u] + 64, &ln[u]);
            isd[u] = _mm512_setzero_si512();
        }
        // Unrolled, so that each sub-block's scale pairs come from registers (q4k_scale_pairs);
        // the empty asm keeps the prefetches with their sub-block, where the compiler would
        // otherwise gather all 64 in front of the super-block's work (and one core read Q4_K a
        // third slower from memory). The two tiles meet each activation broadcast together,
        // as Q4_0's do: with a tile at a time, the asm made the second reload all eight, and
        // on a Zen 4 core broadcasts from memory share a pipe with vpdpbusd (Q4_K 7-11% faster
        // from memory for sharing them, level in L2).
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
            const int8_t* x = a.q + (s * 8 + j) * kBlock;
            for (int u = 0; u < NTL; ++u) prefetch_ahead(tq[u] + 256 * j, 256);
            __asm__ volatile("" ::: "memory");
            __m512i dlo[NTL], dhi[NTL];
            for (int u = 0; u < NTL; ++u) dlo[u] = dhi[u] = _mm512_setzero_si512();
            for (int v = 0; v < 4; ++v) {
                const __m512i xl = bcast4(x + 4 * v), xh = bcast4(x + 16 + 4 * v);
                for (int u = 0; u < NTL; ++u) {
                    const __m512i raw = _mm512_loadu_si512(tq[u] + 256 * j + v * 64);
                    dlo[u] = _mm512_dpbusd_epi32(dlo[u], _mm512_and_si512(raw, lo4), xl);
                    dhi[u] = _mm512_dpbusd_epi32(dhi[u], _mm512_and_si512(raw, hi4), xh);
                }
            }
            for (int u = 0; u < NTL; ++u) {
                const __m512i pair = select_bits(dlo[u], _mm512_slli_epi32(dhi[u], 12), lo16);
                isd[u] = _mm512_dpwssd_epi32(isd[u], pair, q4k_scale_pairs(ln[u], j));
            }
        }
        for (int u = 0; u < NTL; ++u)
            acc[u] = q4k_finish(acc[u], load16_f16(ts[u]), load16_f16(ts[u] + 32), a.d[s * 8], isd[u],
                                q4k_min_term(ln[u].m, lh + s * 16));
    }
    for (int u = 0; u < NTL; ++u)
        store_rows16(out + (t + u * dt) * kTileRows, acc[u], n_rows - (t + u * dt) * kTileRows, accumulate);
}

// The -32 * sum(a) start of each 16-column group, for every token of the call: offs[(tok *
// a.nb + b) * 2 + g], the two int16 halves of ActQ8::g added up.
static void q6_offsets(const ActQ8& a, int32_t* offs) {
    for (int64_t i = 0; i < 2 * a.nb * a.T; ++i)
        offs[i] = int32_t(int16_t(uint32_t(a.g[i]) & 0xffff)) + int32_t(int16_t(uint32_t(a.g[i]) >> 16));
}

template <int NT>
static void q6k_tile(const uint8_t* quants, const uint8_t* scales, const int32_t* offs, int64_t nsb, int64_t t,
                     const ActQ8& a, int64_t tok0, float* out, int64_t ldo, int64_t valid, bool accumulate) {
    __m512 acc[NT];
    for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsb; ++s) {
        const uint8_t* ts = scales + (t * nsb + s) * kQ6KTileScales;
        const uint8_t* tq = quants + (t * nsb + s) * kQ6KTileQuants;
        __m512i isd[NT];
        for (int i = 0; i < NT; ++i) isd[i] = _mm512_setzero_si512();
        for (int j = 0; j < 8; ++j) {
            __m512i q[8];
            unpack_q6(tq + 384 * j, q);
            const __m512i sc_lo = load16_i8(ts + 32 + 16 * (2 * j)), sc_hi = load16_i8(ts + 32 + 16 * (2 * j + 1));
            for (int i = 0; i < NT; ++i) {
                const int64_t tb = (tok0 + i) * a.nb + s * 8 + j;
                const int8_t* x = a.q + (tok0 + i) * a.ldq + (s * 8 + j) * kBlock;
                const __m512i lo = dot4(q, x, 0, _mm512_set1_epi32(offs[2 * tb]));
                const __m512i hi = dot4(q, x, 4, _mm512_set1_epi32(offs[2 * tb + 1]));
                const __m512i dot = _mm512_add_epi32(_mm512_mullo_epi32(lo, sc_lo), _mm512_mullo_epi32(hi, sc_hi));
                isd[i] = _mm512_add_epi32(isd[i], dot);
            }
        }
        const __m512 d = load16_f16(ts);
        for (int i = 0; i < NT; ++i) {
            const __m512 dd = _mm512_mul_ps(d, _mm512_set1_ps(a.d[(tok0 + i) * a.nb + s * 8]));
            acc[i] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isd[i]), acc[i]);
        }
    }
    for (int i = 0; i < NT; ++i) store_rows16(out + (tok0 + i) * ldo + t * kTileRows, acc[i], valid, accumulate);
}

// One token, NTL tiles (1 or 2), tiles t and t + dt, as q4k_tiles_gemv; per row the
// arithmetic is q6k_tile's for one token.
template <int NTL>
__attribute__((noinline)) static void q6k_tiles_gemv(const uint8_t* quants, const uint8_t* scales, const int32_t* offs,
                                                     int64_t nsb, int64_t t, int64_t dt, const ActQ8& a, float* out,
                                                     int64_t n_rows, bool accumulate) {
    __m512 acc[NTL];
    for (int u = 0; u < NTL; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsb; ++s) {
        const uint8_t* ts[NTL];
        const uint8_t* tq[NTL];
        __m512i isd[NTL];
        for (int u = 0; u < NTL; ++u) {
            ts[u] = scales + ((t + u * dt) * nsb + s) * kQ6KTileScales;
            tq[u] = quants + ((t + u * dt) * nsb + s) * kQ6KTileQuants;
            isd[u] = _mm512_setzero_si512();
        }
        for (int j = 0; j < 8; ++j) {
            const int64_t tb = s * 8 + j;
            const int8_t* x = a.q + tb * kBlock;
            for (int u = 0; u < NTL; ++u) {
                __m512i q[8];
                prefetch_ahead(tq[u] + 384 * j, 384);
                unpack_q6(tq[u] + 384 * j, q);
                const __m512i sc_lo = load16_i8(ts[u] + 32 + 16 * (2 * j)), sc_hi = load16_i8(ts[u] + 32 + 16 * (2 * j + 1));
                const __m512i lo = dot4(q, x, 0, _mm512_set1_epi32(offs[2 * tb]));
                const __m512i hi = dot4(q, x, 4, _mm512_set1_epi32(offs[2 * tb + 1]));
                isd[u] = _mm512_add_epi32(isd[u], _mm512_add_epi32(_mm512_mullo_epi32(lo, sc_lo), _mm512_mullo_epi32(hi, sc_hi)));
            }
        }
        for (int u = 0; u < NTL; ++u) {
            const __m512 dd = _mm512_mul_ps(load16_f16(ts[u]), _mm512_set1_ps(a.d[s * 8]));
            acc[u] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isd[u]), acc[u]);
        }
    }
    for (int u = 0; u < NTL; ++u)
        store_rows16(out + (t + u * dt) * kTileRows, acc[u], n_rows - (t + u * dt) * kTileRows, accumulate);
}

template <int32_t kType, int NT>
static inline void tile(const uint8_t* w, const uint8_t* scales, const Q4KScales* dec, const int8_t* lh,
                        const int32_t* offs, int64_t nsb, int64_t t, const ActQ8& a, int64_t tok0, float* out,
                        int64_t ldo, int64_t valid, bool accumulate) {
    if (kType == kQ4_K) q4k_tile<NT>(w, dec, lh, nsb, t, a, tok0, out, ldo, valid, accumulate);
    else q6k_tile<NT>(w, scales, offs, nsb, t, a, tok0, out, ldo, valid, accumulate);
}

template <int32_t kType>
static void matmul(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                   float* out, int64_t ldo, bool accumulate) {
    const int64_t nsb = k / kSuperBlock;
    const uint8_t* scales = w + n_tiles(n_rows) * nsb * k_tile_quant_bytes(kType);
    std::vector<int32_t> offs(kType == kQ6_K ? size_t(2 * a.nb * a.T) : 0);
    if (kType == kQ6_K) q6_offsets(a, offs.data());
    std::vector<int8_t> lh(kType == kQ4_K ? size_t(a.T * nsb * 16) : 0);
    if (kType == kQ4_K) q4k_call_sum_bytes(a, nsb, lh.data());
    if (a.T == 1) {
        for_tile_pairs(tile0, tile1, [&](auto n, int64_t t, int64_t dt) {
            constexpr int kNtl = decltype(n)::value;
            if constexpr (kType == kQ4_K) q4k_tiles_gemv<kNtl>(w, scales, lh.data(), nsb, t, dt, a, out, n_rows, accumulate);
            else q6k_tiles_gemv<kNtl>(w, scales, offs.data(), nsb, t, dt, a, out, n_rows, accumulate);
        });
        return;
    }
    // Q4_K: a tile's scales decoded once for all the call's tokens.
    std::vector<Q4KScales> dec(kType == kQ4_K ? size_t(nsb) : 0);
    for (int64_t t = tile0; t < tile1; ++t) {
        if (kType == kQ4_K)
            for (int64_t s = 0; s < nsb; ++s) q4k_decode(scales + (t * nsb + s) * kQ4KTileScales, &dec[size_t(s)]);
        const int64_t valid = n_rows - t * kTileRows;
        int64_t tok = 0;
        for (; tok + 8 <= a.T; tok += 8) tile<kType, 8>(w, scales, dec.data(), lh.data(), offs.data(), nsb, t, a, tok, out, ldo, valid, accumulate);
        for (; tok + 4 <= a.T; tok += 4) tile<kType, 4>(w, scales, dec.data(), lh.data(), offs.data(), nsb, t, a, tok, out, ldo, valid, accumulate);
        for (; tok < a.T; ++tok) tile<kType, 1>(w, scales, dec.data(), lh.data(), offs.data(), nsb, t, a, tok, out, ldo, valid, accumulate);
    }
}

}  // namespace KQ_NS

// ActQ8::g (quants.h) for one token, four 16-column groups per vector: per group, 32 * the
// (even, odd) column pair sums in int16 lanes folded into one dword, negated. The scalar loop
// cost a Q6_K call about 1.2 us at 5632 columns, 5% of a pass over a matrix in L2.
void KQ_FN(q6k_offsets)(const int8_t* q, int64_t nb, int32_t* g) {
    // Each group's four dwords hold (even, odd) int16 partial sums: fold them into its first.
    const __m512i two_away = _mm512_setr_epi32(2, 3, 0, 0, 6, 7, 0, 0, 10, 11, 0, 0, 14, 15, 0, 0);
    const __m512i one_away = _mm512_setr_epi32(1, 0, 0, 0, 5, 0, 0, 0, 9, 0, 0, 0, 13, 0, 0, 0);
    const __m512i first_dwords = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t b = 0; b < nb; b += 2) {
        const bool two = nb - b >= 2;  // two blocks (four groups) left, or one
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
        const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(lo),
            two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock + 32)) : _mm256_setzero_si256(), 1);
        const __m512i t = _mm512_maddubs_epi16(_mm512_set1_epi8(32), x);
        __m512i u = _mm512_add_epi16(t, _mm512_permutexvar_epi32(two_away, t));
        u = _mm512_sub_epi16(_mm512_setzero_si512(), _mm512_add_epi16(u, _mm512_permutexvar_epi32(one_away, u)));
        const __m128i r = _mm512_castsi512_si128(_mm512_permutexvar_epi32(first_dwords, u));
        if (two) _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 2 * b), r);
        else _mm_storel_epi64(reinterpret_cast<__m128i*>(g + 2 * b), r);
    }
}

void KQ_FN(matmul_q4_k)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                        float* out, int64_t ldo, bool accumulate) {
    KQ_NS::matmul<kQ4_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

void KQ_FN(matmul_q6_k)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                        float* out, int64_t ldo, bool accumulate) {
    KQ_NS::matmul<kQ6_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

}  // namespace llamacpu
