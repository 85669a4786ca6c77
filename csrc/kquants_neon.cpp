// NEON K-quant kernels for AArch64 (ARMv8.0-A baseline, as kernels_neon.cpp). The per-row
// arithmetic is kquants.h's, with the same fused steps as the x86 paths, so all agree bit for
// bit.
//
// A 16-row tile is four quarters of 4 rows; one 16-byte register holds a 4-byte group of each
// row of a quarter. smull / smull2 against the broadcast activation group and pairwise adds
// give one int32 lane per row. Q6_K's quants are made signed (q - 32) first: 8 products of at
// most 32 * 127 per int16 lane cannot overflow, so a 16-column group sums in int16. The scaled
// dots of a super-block (and Q4_K's mins times the activation block sums) add up in int32, the
// activations having one scale per super-block.
//
// With LLAMACPU_SIMDE this file is built a second time against SIMDe's emulation
// (kquants_neon_emu.cpp), so its logic is tested on x86 too.
#if defined(LLAMACPU_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/arm/neon.h>
#define KQ_NS kq_neonemu_impl
#define KQ_FN(name) kq_neonemu_##name
#else
#include <arm_neon.h>
#define KQ_NS kq_neon_impl
#define KQ_FN(name) kq_neon_##name
#endif

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "kquants.h"

namespace llamacpu {
namespace KQ_NS {

#include "simde_neon_fixups.h"

static inline int8x16_t bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

static inline float32x4_t load4_f16(const uint8_t* p) {
    uint16_t h[4];
    std::memcpy(h, p, 8);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

static inline void store_rows4(float* o, float32x4_t v, int64_t valid, bool accumulate) {
    if (valid >= 4) {
        if (accumulate) v = vaddq_f32(v, vld1q_f32(o));
        vst1q_f32(o, v);
        return;
    }
    float tmp[4];
    vst1q_f32(tmp, v);
    for (int64_t i = 0; i < valid; ++i) o[i] = accumulate ? o[i] + tmp[i] : tmp[i];
}

// 16 bytes (one per row of a tile) as four int32x4, one per quarter.
static inline void widen_u8(uint8x16_t v, int32x4_t* q) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_u8(vget_high_u8(v));
    q[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo)));
    q[1] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(lo)));
    q[2] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi)));
    q[3] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(hi)));
}

static inline void widen_s8(int8x16_t v, int32x4_t* q) {
    const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_s8(vget_high_s8(v));
    q[0] = vmovl_s16(vget_low_s16(lo));
    q[1] = vmovl_s16(vget_high_s16(lo));
    q[2] = vmovl_s16(vget_low_s16(hi));
    q[3] = vmovl_s16(vget_high_s16(hi));
}

// Lane r: sum over column groups [g0, g0 + n) of w * a for row r of a quarter, where every
// int16 lane's sum of 2n products fits (|w * a| * 2n < 2^15).
static inline int32x4_t quarter_dot(const int8x16_t* wv, const int8_t* x, int g0, int n) {
    int16x8_t s = vdupq_n_s16(0);
    for (int g = g0; g < g0 + n; ++g) {
        const int8x16_t xa = bcast4(x + 4 * g);
        const int16x8_t p01 = vmull_s8(vget_low_s8(wv[g]), vget_low_s8(xa));
        const int16x8_t p23 = vmull_high_s8(wv[g], xa);
        s = vaddq_s16(s, vpaddq_s16(p01, p23));  // lanes: row 0 x2, row 1 x2, row 2 x2, row 3 x2
    }
    return vpaddlq_s16(s);
}

// The 8 column groups of quarter qq of a 4-bit sub-block (Q4_0 layout), as int8 0..15.
static inline void load_nibbles(const uint8_t* sub, int qq, uint8x16_t* q) {
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    for (int v = 0; v < 4; ++v) {
        const uint8x16_t raw = vld1q_u8(sub + v * 64 + qq * 16);
        q[v] = vandq_u8(raw, m4);
        q[4 + v] = vshrq_n_u8(raw, 4);
    }
}

// Q6_K: the quarter's 6-bit quants minus 32, as int8, in column group order (kquants.h:
// three groups of each 16 columns are the low 6 bits of a stored vector, the fourth gathers
// their top bit pairs).
static inline void load_q6(const uint8_t* sub, int qq, int8x16_t* w) {
    const uint8x16_t m63 = vdupq_n_u8(63);
    const int8x16_t off = vdupq_n_s8(32);
    for (int t = 0; t < 2; ++t) {
        uint8x16_t v[3];
        for (int k = 0; k < 3; ++k) {
            v[k] = vld1q_u8(sub + (3 * t + k) * 64 + qq * 16);
            w[4 * t + k] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v[k], m63)), off);
        }
        const uint8x16_t q3 = vorrq_u8(vorrq_u8(vshrq_n_u8(v[0], 6), vshlq_n_u8(vshrq_n_u8(v[1], 6), 2)),
                                       vshlq_n_u8(vshrq_n_u8(v[2], 6), 4));
        w[4 * t + 3] = vsubq_s8(vreinterpretq_s8_u8(q3), off);
    }
}

struct Q4KScales {
    int32x4_t sc[8][4], m[8][4];  // [sub-block][quarter]
    float32x4_t d[4], dmin[4];
};

static inline void q4k_decode(const uint8_t* ts, Q4KScales* out) {
    const uint8_t* B = ts + 64;
    auto row_bytes = [&](int k) { return vld1q_u8(B + 16 * k); };
    const uint8x16_t m63 = vdupq_n_u8(63), m15 = vdupq_n_u8(15);
    for (int j = 0; j < 8; ++j) {
        uint8x16_t sc, mn;
        if (j < 4) {
            sc = vandq_u8(row_bytes(j), m63);
            mn = vandq_u8(row_bytes(j + 4), m63);
        } else {
            sc = vorrq_u8(vandq_u8(row_bytes(j + 4), m15), vshlq_n_u8(vshrq_n_u8(row_bytes(j - 4), 6), 4));
            mn = vorrq_u8(vshrq_n_u8(row_bytes(j + 4), 4), vshlq_n_u8(vshrq_n_u8(row_bytes(j), 6), 4));
        }
        widen_u8(sc, out->sc[j]);
        widen_u8(mn, out->m[j]);
    }
    for (int qq = 0; qq < 4; ++qq) {
        out->d[qq] = load4_f16(ts + 8 * qq);
        out->dmin[qq] = load4_f16(ts + 32 + 8 * qq);
    }
}

// Quarters [q0, q0 + NQ) of tile t for NT tokens from tok0; dec: the tile's decoded scales,
// one per super-block.
template <int NQ, int NT>
static void q4k_tile(const uint8_t* quants, const Q4KScales* dec, int64_t nsb, int64_t t, int q0, const ActQ8& a,
                     int64_t tok0, float* out, int64_t ldo, int64_t n_rows, bool accumulate) {
    float32x4_t acc[NQ][NT];
    for (int qi = 0; qi < NQ; ++qi)
        for (int i = 0; i < NT; ++i) acc[qi][i] = vdupq_n_f32(0.0f);
    for (int64_t s = 0; s < nsb; ++s) {
        const Q4KScales& sc = dec[s];
        const uint8_t* tq = quants + (t * nsb + s) * kQ4KTileQuants;
        for (int qi = 0; qi < NQ; ++qi) {
            const int qq = q0 + qi;
            int32x4_t isd[NT];
            for (int i = 0; i < NT; ++i) isd[i] = vdupq_n_s32(0);
            for (int j = 0; j < 8; ++j) {
                uint8x16_t qv[8];
                load_nibbles(tq + 256 * j, qq, qv);
                int8x16_t wv[8];
                for (int g = 0; g < 8; ++g) wv[g] = vreinterpretq_s8_u8(qv[g]);
                for (int i = 0; i < NT; ++i) {
                    const int8_t* x = a.q + (tok0 + i) * a.ldq + (s * 8 + j) * kBlock;
                    // Nibble products are at most 15 * 128: 16 of them fit an int16 lane.
                    isd[i] = vmlaq_s32(isd[i], quarter_dot(wv, x, 0, 8), sc.sc[j][qq]);
                }
            }
            for (int i = 0; i < NT; ++i) {
                const int64_t tb = (tok0 + i) * a.nb + s * 8;
                int32x4_t ism = vdupq_n_s32(0);
                for (int j = 0; j < 8; ++j) ism = vmlaq_s32(ism, sc.m[j][qq], vdupq_n_s32(a.s[tb + j]));
                const float32x4_t da = vdupq_n_f32(a.d[tb]);
                // acc + (d * da) * float(isd) - (dmin * da) * float(ism), each step fused.
                acc[qi][i] = vfmaq_f32(acc[qi][i], vmulq_f32(sc.d[qq], da), vcvtq_f32_s32(isd[i]));
                acc[qi][i] = vfmaq_f32(acc[qi][i], vnegq_f32(vmulq_f32(sc.dmin[qq], da)), vcvtq_f32_s32(ism));
            }
        }
    }
    for (int qi = 0; qi < NQ; ++qi) {
        const int64_t n0 = t * kTileRows + 4 * (q0 + qi);
        for (int i = 0; i < NT; ++i) store_rows4(out + (tok0 + i) * ldo + n0, acc[qi][i], n_rows - n0, accumulate);
    }
}

struct Q6KScales {
    int32x4_t sc[16][4];  // [group][quarter]
    float32x4_t d[4];
};

static inline void q6k_decode(const uint8_t* ts, Q6KScales* out) {
    for (int g = 0; g < 16; ++g) widen_s8(vld1q_s8(reinterpret_cast<const int8_t*>(ts + 32 + 16 * g)), out->sc[g]);
    for (int qq = 0; qq < 4; ++qq) out->d[qq] = load4_f16(ts + 8 * qq);
}

template <int NQ, int NT>
static void q6k_tile(const uint8_t* quants, const Q6KScales* dec, int64_t nsb, int64_t t, int q0, const ActQ8& a,
                     int64_t tok0, float* out, int64_t ldo, int64_t n_rows, bool accumulate) {
    float32x4_t acc[NQ][NT];
    for (int qi = 0; qi < NQ; ++qi)
        for (int i = 0; i < NT; ++i) acc[qi][i] = vdupq_n_f32(0.0f);
    for (int64_t s = 0; s < nsb; ++s) {
        const uint8_t* tq = quants + (t * nsb + s) * kQ6KTileQuants;
        const auto& sc = dec[s].sc;
        for (int qi = 0; qi < NQ; ++qi) {
            const int qq = q0 + qi;
            int32x4_t isd[NT];
            for (int i = 0; i < NT; ++i) isd[i] = vdupq_n_s32(0);
            for (int j = 0; j < 8; ++j) {
                int8x16_t wv[8];
                load_q6(tq + 384 * j, qq, wv);
                for (int i = 0; i < NT; ++i) {
                    const int8_t* x = a.q + (tok0 + i) * a.ldq + (s * 8 + j) * kBlock;
                    isd[i] = vmlaq_s32(vmlaq_s32(isd[i], quarter_dot(wv, x, 0, 4), sc[2 * j][qq]),
                                       quarter_dot(wv, x, 4, 4), sc[2 * j + 1][qq]);
                }
            }
            for (int i = 0; i < NT; ++i) {
                const float32x4_t dd = vmulq_f32(dec[s].d[qq], vdupq_n_f32(a.d[(tok0 + i) * a.nb + s * 8]));
                acc[qi][i] = vfmaq_f32(acc[qi][i], dd, vcvtq_f32_s32(isd[i]));
            }
        }
    }
    for (int qi = 0; qi < NQ; ++qi) {
        const int64_t n0 = t * kTileRows + 4 * (q0 + qi);
        for (int i = 0; i < NT; ++i) store_rows4(out + (tok0 + i) * ldo + n0, acc[qi][i], n_rows - n0, accumulate);
    }
}

template <int32_t kType, int NQ, int NT, typename Dec>
static inline void tile(const uint8_t* w, const Dec* dec, int64_t nsb, int64_t t, int q0, const ActQ8& a, int64_t tok0,
                        float* out, int64_t ldo, int64_t n_rows, bool accumulate) {
    if constexpr (kType == kQ4_K) q4k_tile<NQ, NT>(w, dec, nsb, t, q0, a, tok0, out, ldo, n_rows, accumulate);
    else q6k_tile<NQ, NT>(w, dec, nsb, t, q0, a, tok0, out, ldo, n_rows, accumulate);
}

template <int32_t kType>
static void matmul(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                   float* out, int64_t ldo, bool accumulate) {
    using Dec = std::conditional_t<kType == kQ4_K, Q4KScales, Q6KScales>;
    const int64_t nsb = k / kSuperBlock;
    const uint8_t* scales = w + n_tiles(n_rows) * nsb * k_tile_quant_bytes(kType);
    std::vector<Dec> dec(static_cast<size_t>(nsb));  // a tile's scales, decoded once for all tokens and quarters
    for (int64_t t = tile0; t < tile1; ++t) {
        for (int64_t s = 0; s < nsb; ++s) {
            const uint8_t* ts = scales + (t * nsb + s) * k_tile_scale_bytes(kType);
            if constexpr (kType == kQ4_K) q4k_decode(ts, &dec[size_t(s)]);
            else q6k_decode(ts, &dec[size_t(s)]);
        }
        if (a.T == 1) {  // one pass over the tile's bytes, all four quarters
            tile<kType, 4, 1>(w, dec.data(), nsb, t, 0, a, 0, out, ldo, n_rows, accumulate);
            continue;
        }
        for (int qq = 0; qq < 4 && t * kTileRows + 4 * qq < n_rows; ++qq) {
            int64_t tok = 0;
            for (; tok + 4 <= a.T; tok += 4)
                tile<kType, 1, 4>(w, dec.data(), nsb, t, qq, a, tok, out, ldo, n_rows, accumulate);
            for (; tok < a.T; ++tok) tile<kType, 1, 1>(w, dec.data(), nsb, t, qq, a, tok, out, ldo, n_rows, accumulate);
        }
    }
}

}  // namespace KQ_NS

void KQ_FN(matmul_q4_k)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                        float* out, int64_t ldo, bool accumulate) {
    KQ_NS::matmul<kQ4_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

void KQ_FN(matmul_q6_k)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                        float* out, int64_t ldo, bool accumulate) {
    KQ_NS::matmul<kQ6_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

}  // namespace llamacpu
