// NEON kernels for AArch64, ARMv8.0-A baseline: Advanced SIMD with fp32 fma and the
// fp16 <-> fp32 conversions, no dot-product or fp16-arithmetic extensions. Every AArch64 CPU
// has them, so cpu.cpp needs no feature check beyond the architecture.
//
// Quantized matmul: a 16-row tile is four quarters of 4 rows, and one 16-byte register holds
// one 4-byte group of each row of a quarter (quants.h). The activation group is broadcast to
// the four 32-bit lanes; smull / smull2 form the 16 byte products and pairwise adds reduce
// them to one int32 lane per row. As on x86 the integer dot of every row is exact and the
// float work per row is one fma per block, in block order, with the same operands, so the
// result is bitwise identical to the AVX2 and AVX-512 kernels.
//
// With LLAMACPU_SIMDE this file is built a second time against SIMDe's portable emulation of
// the NEON intrinsics (kernels_neon_emu.cpp), so its logic is tested on x86 too.
#if defined(LLAMACPU_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/arm/neon.h>
#define LLAMACPU_NS neonemu
#define LLAMACPU_TABLE kNeonEmuKernels
#define LLAMACPU_KQ(name) kq_neonemu_##name
#define LLAMACPU_TABLE_NAME "neon-emu"
#else
#include <arm_neon.h>
#define LLAMACPU_NS neon
#define LLAMACPU_TABLE kNeonKernels
#define LLAMACPU_KQ(name) kq_neon_##name
#define LLAMACPU_TABLE_NAME "neon"
#endif

#include <cmath>
#include <cstring>

#include "kernels.h"
#include "kquants.h"

namespace llamacpu {
namespace LLAMACPU_NS {

#include "simde_neon_fixups.h"

// ---- small building blocks --------------------------------------------------------------

static inline int8x16_t bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

// Sum of the 4 lanes as (v0 + v1) + (v2 + v3): the order of faddp, fixed on every path.
static inline float hsum4(float32x4_t v) {
    const float32x4_t p = vpaddq_f32(v, v);
    return vgetq_lane_f32(p, 0) + vgetq_lane_f32(p, 1);
}

// Lane i: the sum of the lanes of the i-th argument, in the order of hsum4.
static inline float32x4_t hsum4x4(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d) {
    return vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d));
}

static inline float32x4_t load4_f16(const uint16_t* p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

static inline void store4_f16(uint16_t* p, float32x4_t v) {
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v)));
}

// e^x: the Cephes range reduction and polynomial of simd_x86_common.h's exp256, operation for
// operation (x86 fnmadd(a, b, c) is vfmaq(c, a, -b)), so both give the same bits.
static inline float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(x, vdupq_n_f32(88.3762626647949f));
    x = vmaxq_f32(x, vdupq_n_f32(-88.3762626647949f));
    const float32x4_t fx = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
    // x - fx*ln2, with ln2 split in two so that the first product is exact.
    x = vfmaq_f32(x, fx, vdupq_n_f32(-0.693359375f));
    x = vfmaq_f32(x, fx, vdupq_n_f32(2.12194440e-4f));
    const float32x4_t z = vmulq_f32(x, x);
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, x);
    y = vfmaq_f32(x, y, z);
    y = vaddq_f32(y, vdupq_n_f32(1.0f));
    // 2^fx built in the exponent field (fx is an integer in [-127, 128]).
    const int32x4_t n = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(n));
}

static inline float exp1(float x) { return vgetq_lane_f32(exp4(vdupq_n_f32(x)), 0); }

// ---- element-wise kernels ---------------------------------------------------------------

static void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        acc = vfmaq_f32(acc, v, v);
    }
    float ss = hsum4(acc);
    for (; i < n; ++i) ss += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(ss / float(n) + eps);
    const float32x4_t vs = vdupq_n_f32(scale);
    for (i = 0; i + 4 <= n; i += 4)
        vst1q_f32(out + i, vmulq_f32(vmulq_f32(vld1q_f32(x + i), vs), vld1q_f32(w + i)));
    for (; i < n; ++i) out[i] = x[i] * scale * w[i];
}

// x' = x * cos2 + swap_pairs(x) * sin2 (see KernelTable::rope); vrev64 swaps each pair.
static void rope(float* x, int64_t n_heads, int64_t hd, const float* cos2, const float* sin2) {
    for (int64_t h = 0; h < n_heads; ++h) {
        float* xh = x + h * hd;
        int64_t i = 0;
        for (; i + 4 <= hd; i += 4) {
            const float32x4_t v = vld1q_f32(xh + i);
            const float32x4_t sw = vrev64q_f32(v);
            vst1q_f32(xh + i, vfmaq_f32(vmulq_f32(v, vld1q_f32(cos2 + i)), sw, vld1q_f32(sin2 + i)));
        }
        for (; i < hd; i += 2) {
            const float x0 = xh[i], x1 = xh[i + 1];
            xh[i] = x0 * cos2[i] + x1 * sin2[i];
            xh[i + 1] = x1 * cos2[i + 1] + x0 * sin2[i + 1];
        }
    }
}

static void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t s = vdivq_f32(g, vaddq_f32(one, exp4(vnegq_f32(g))));
        vst1q_f32(out + i, vmulq_f32(s, vld1q_f32(up + i)));
    }
    for (; i < n; ++i) out[i] = gate[i] / (1.0f + exp1(-gate[i])) * up[i];
}

static void softmax(float* x, int64_t n) {
    float32x4_t vmax = vdupq_n_f32(-INFINITY);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vmax = vmaxq_f32(vmax, vld1q_f32(x + i));
    float mx = vmaxvq_f32(vmax);
    for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
    const float32x4_t vm = vdupq_n_f32(mx);
    float32x4_t vsum = vdupq_n_f32(0.0f);
    for (i = 0; i + 4 <= n; i += 4) {
        const float32x4_t e = exp4(vsubq_f32(vld1q_f32(x + i), vm));
        vst1q_f32(x + i, e);
        vsum = vaddq_f32(vsum, e);
    }
    float sum = hsum4(vsum);
    for (; i < n; ++i) {
        x[i] = exp1(x[i] - mx);
        sum += x[i];
    }
    const float inv = 1.0f / sum;
    const float32x4_t vinv = vdupq_n_f32(inv);
    for (i = 0; i + 4 <= n; i += 4) vst1q_f32(x + i, vmulq_f32(vld1q_f32(x + i), vinv));
    for (; i < n; ++i) x[i] *= inv;
}

// Activation quantization, bit-identical to the scalar reference: the same amax, scale and
// product, and fcvtns rounds half to even like nearbyint.
static void quantize_row_q8(const float* x, int64_t k, int64_t group, int8_t* q, float* d, int32_t* s) {
    float db = 0.0f, id = 0.0f;  // the current group's scale and its inverse
    for (int64_t b = 0; b < k / kBlock; ++b) {
        const float* xb = x + b * kBlock;
        float32x4_t v[8];
        for (int i = 0; i < 8; ++i) v[i] = vld1q_f32(xb + 4 * i);
        if (b * kBlock % group == 0) {  // max is exact: any order gives the scalar amax
            float32x4_t m = vdupq_n_f32(0.0f);
            for (int64_t i = 0; i < group; i += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(xb + i)));
            const float amax = vmaxvq_f32(m);
            db = amax / 127.0f;
            id = act_inv_scale(amax);
        }
        d[b] = db;
        const float32x4_t vid = vdupq_n_f32(id);
        int32x4_t sum = vdupq_n_s32(0);
        int16x4_t q16[8];
        for (int i = 0; i < 8; ++i) {
            const int32x4_t qi = vcvtnq_s32_f32(vmulq_f32(v[i], vid));
            sum = vaddq_s32(sum, qi);
            q16[i] = vmovn_s32(qi);  // |qi| <= 127: narrowing is exact
        }
        for (int h = 0; h < 2; ++h) {
            const int8x8_t lo = vmovn_s16(vcombine_s16(q16[4 * h], q16[4 * h + 1]));
            const int8x8_t hi = vmovn_s16(vcombine_s16(q16[4 * h + 2], q16[4 * h + 3]));
            vst1q_s8(q + b * kBlock + 16 * h, vcombine_s8(lo, hi));
        }
        s[b] = vaddvq_s32(sum);
    }
}

static void f16_to_f32(const uint16_t* x, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, load4_f16(x + i));
    for (; i < n; ++i) y[i] = fp16_to_fp32(x[i]);
}

static void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) store4_f16(y + i, vld1q_f32(x + i));
    for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

// ---- attention --------------------------------------------------------------------------

static inline float32x4_t load4_kv(const void* p, bool f16, int64_t i) {
    if (f16) return load4_f16(static_cast<const uint16_t*>(p) + i);
    return vld1q_f32(static_cast<const float*>(p) + i);
}

static inline float load1_kv(const void* p, bool f16, int64_t i) {
    return f16 ? fp16_to_fp32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

static inline float dot_kv(const float* q, const void* k, bool f16, int64_t base, int64_t hd) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 4 <= hd; i += 4) acc = vfmaq_f32(acc, vld1q_f32(q + i), load4_kv(k, f16, base + i));
    float s = hsum4(acc);
    for (; i < hd; ++i) s += q[i] * load1_kv(k, f16, base + i);
    return s;
}

// Scores of G query heads (qr: G rows of hd floats) against every position, head g's in
// scores[g * n_pos ..], 4 positions at a time when hd % 4 == 0. Each key vector is loaded (and
// converted from f16) once for all G heads, so a long cache leaves L2 once per group rather
// than once per head (the x86 kernels' grouping, simd_x86_common.h). Each score is summed as
// dot_kv sums it, so neither the blocking nor G ever changes a score.
template <int G>
static inline void attention_scores(const float* qr, const void* k, bool kv_f16, int64_t n_pos, int64_t hd,
                                    float scale, float* scores) {
    int64_t j = 0;
    if (hd % 4 == 0) {
        for (; j + 4 <= n_pos; j += 4) {
            float32x4_t acc[G][4];
            for (int g = 0; g < G; ++g)
                for (int p = 0; p < 4; ++p) acc[g][p] = vdupq_n_f32(0.0f);
            for (int64_t i = 0; i < hd; i += 4) {
                float32x4_t kv[4];
                for (int p = 0; p < 4; ++p) kv[p] = load4_kv(k, kv_f16, (j + p) * hd + i);
                for (int g = 0; g < G; ++g) {
                    const float32x4_t qv = vld1q_f32(qr + g * hd + i);
                    for (int p = 0; p < 4; ++p) acc[g][p] = vfmaq_f32(acc[g][p], qv, kv[p]);
                }
            }
            for (int g = 0; g < G; ++g)
                vst1q_f32(scores + g * n_pos + j,
                          vmulq_f32(hsum4x4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), vdupq_n_f32(scale)));
        }
    }
    for (int g = 0; g < G; ++g)
        for (int64_t jj = j; jj < n_pos; ++jj) scores[g * n_pos + jj] = dot_kv(qr + g * hd, k, kv_f16, jj * hd, hd) * scale;
}

// Columns [c0, c0 + 4 C) of o[g][c] = sum_j p[g][j] * v[j][c] for G heads, positions in order;
// each value vector is loaded once for all G heads.
template <int G, int C>
static inline void attention_values_block(const float* scores, const void* v, bool kv_f16, int64_t n_pos,
                                          int64_t hd, int64_t c0, float* o) {
    float32x4_t acc[G][C];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) acc[g][c] = vdupq_n_f32(0.0f);
    for (int64_t j = 0; j < n_pos; ++j) {
        float32x4_t vv[C];
        for (int c = 0; c < C; ++c) vv[c] = load4_kv(v, kv_f16, j * hd + c0 + 4 * c);
        for (int g = 0; g < G; ++g) {
            const float32x4_t p = vdupq_n_f32(scores[g * n_pos + j]);
            for (int c = 0; c < C; ++c) acc[g][c] = vfmaq_f32(acc[g][c], p, vv[c]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) vst1q_f32(o + g * hd + c0 + 4 * c, acc[g][c]);
}

// All columns of G heads: blocks of C vectors, then single vectors, then single columns. Every
// output lane sees the same multiply-adds in the same order whatever the blocking and G. C
// keeps accumulators and value vectors within the 32 registers (16 + 4 for four heads; two
// heads with 8 vectors each spilled).
template <int G>
static inline void attention_values(const float* scores, const void* v, bool kv_f16, int64_t n_pos, int64_t hd,
                                    float* o) {
    constexpr int C = G == 1 ? 8 : 4;
    const int64_t hd4 = hd & ~int64_t(3);
    int64_t c0 = 0;
    for (; c0 + 4 * C <= hd4; c0 += 4 * C) attention_values_block<G, C>(scores, v, kv_f16, n_pos, hd, c0, o);
    for (; c0 < hd4; c0 += 4) attention_values_block<G, 1>(scores, v, kv_f16, n_pos, hd, c0, o);
    for (int g = 0; g < G; ++g)
        for (int64_t c = hd4; c < hd; ++c) {
            float acc = 0.0f;
            for (int64_t j = 0; j < n_pos; ++j) acc += scores[g * n_pos + j] * load1_kv(v, kv_f16, j * hd + c);
            o[g * hd + c] = acc;
        }
}

template <int G>
static inline void attention_group(const float* q, const void* k, const void* v, bool kv_f16, int64_t n_pos,
                                   int64_t hd, float scale, float* scores, float* out) {
    attention_scores<G>(q, k, kv_f16, n_pos, hd, scale, scores);
    for (int g = 0; g < G; ++g) softmax(scores + g * n_pos, n_pos);
    attention_values<G>(scores, v, kv_f16, n_pos, hd, out);
}

// Query heads in groups of kAttentionHeadGroup, then 2, then 1 (see attention_scores).
static void attention(const float* q, const void* k, const void* v, bool kv_f16, int64_t n_pos, int64_t hd,
                      int64_t n_rep, float scale, float* scores, float* out) {
    for_attention_head_groups(n_rep, [&](auto g, int64_t r) {
        attention_group<decltype(g)::value>(q + r * hd, k, v, kv_f16, n_pos, hd, scale, scores, out + r * hd);
    });
}

// ---- float matmuls (F16 / F32 weights, f32 activations) ---------------------------------

template <typename W>
static inline float32x4_t load4_w(const W* p) {
    if constexpr (sizeof(W) == 2) return load4_f16(reinterpret_cast<const uint16_t*>(p));
    else return vld1q_f32(reinterpret_cast<const float*>(p));
}

template <typename W>
static inline float load1_w(const W* p) {
    if constexpr (sizeof(W) == 2) return fp16_to_fp32(*p);
    else return *p;
}

// NR rows x NT tokens; each (row, token) is one 4-lane accumulator over k in order, then
// hsum4, then the k % 4 tail: the same arithmetic whatever NR and NT.
template <typename W, int NR, int NT>
static inline void matmul_float_block(const W* w, int64_t k, int64_t n0, const float* x, int64_t ldx,
                                      int64_t t0, float* out, int64_t ldo, bool accumulate) {
    float32x4_t acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = vdupq_n_f32(0.0f);
    const int64_t k4 = k & ~int64_t(3);
    for (int64_t i = 0; i < k4; i += 4) {
        float32x4_t xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = vld1q_f32(x + (t0 + t) * ldx + i);
        for (int r = 0; r < NR; ++r) {
            const float32x4_t wv = load4_w(w + (n0 + r) * k + i);
            for (int t = 0; t < NT; ++t) acc[r][t] = vfmaq_f32(acc[r][t], wv, xv[t]);
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int t = 0; t < NT; ++t) {
            float s = hsum4(acc[r][t]);
            const W* wr = w + (n0 + r) * k;
            const float* xr = x + (t0 + t) * ldx;
            for (int64_t i = k4; i < k; ++i) s += load1_w(wr + i) * xr[i];
            float* o = out + (t0 + t) * ldo + n0 + r;
            *o = accumulate ? *o + s : s;
        }
    }
}

template <typename W>
static inline void matmul_float(const W* w, int64_t k, int64_t row0, int64_t row1, const float* x, int64_t ldx,
                                int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    if (n_tok == 1) {
        int64_t n = row0;
        for (; n + 4 <= row1; n += 4) matmul_float_block<W, 4, 1>(w, k, n, x, ldx, 0, out, ldo, accumulate);
        for (; n < row1; ++n) matmul_float_block<W, 1, 1>(w, k, n, x, ldx, 0, out, ldo, accumulate);
        return;
    }
    int64_t n = row0;
    for (; n + 2 <= row1; n += 2) {
        int64_t t = 0;
        for (; t + 4 <= n_tok; t += 4) matmul_float_block<W, 2, 4>(w, k, n, x, ldx, t, out, ldo, accumulate);
        for (; t < n_tok; ++t) matmul_float_block<W, 2, 1>(w, k, n, x, ldx, t, out, ldo, accumulate);
    }
    for (; n < row1; ++n) {
        int64_t t = 0;
        for (; t + 4 <= n_tok; t += 4) matmul_float_block<W, 1, 4>(w, k, n, x, ldx, t, out, ldo, accumulate);
        for (; t < n_tok; ++t) matmul_float_block<W, 1, 1>(w, k, n, x, ldx, t, out, ldo, accumulate);
    }
}

static void matmul_f16(const uint16_t* w, int64_t k, int64_t row0, int64_t row1, const float* x, int64_t ldx,
                       int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    matmul_float(w, k, row0, row1, x, ldx, n_tok, out, ldo, accumulate);
}

static void matmul_f32(const float* w, int64_t k, int64_t row0, int64_t row1, const float* x, int64_t ldx,
                       int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    matmul_float(w, k, row0, row1, x, ldx, n_tok, out, ldo, accumulate);
}

// ---- quantized matmuls ------------------------------------------------------------------

// The 8 weight vectors of quarter qq (rows 4qq..4qq+3) of one tile-block, as int8 in column
// group order: wv[g] holds columns 4g..4g+3 of the four rows.
template <int kType>
static inline void load_quarter(const uint8_t* tb, int qq, int8x16_t* wv) {
    if (kType != kQ8_0) {
        const uint8x16_t m4 = vdupq_n_u8(0x0f);
        for (int v = 0; v < 4; ++v) {
            const uint8x16_t raw = vld1q_u8(tb + v * 64 + qq * 16);
            wv[v] = vreinterpretq_s8_u8(vandq_u8(raw, m4));       // columns 4v..: low nibbles
            wv[4 + v] = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));  // columns 16+4v..: high nibbles
        }
    } else {
        for (int g = 0; g < 8; ++g) wv[g] = vreinterpretq_s8_u8(vld1q_u8(tb + g * 64 + qq * 16));
    }
}

// Lane r: the exact integer dot of row r of a quarter with one activation block x. smull
// multiplies rows 0-1 (low 8 bytes), smull2 rows 2-3, lane by lane against the broadcast.
template <int kType>
static inline int32x4_t quarter_dot(const int8x16_t* wv, const int8_t* x, int32_t xsum) {
    if (kType != kQ8_0) {
        // Nibble products are at most 15*128, so int16 sums of 16 of them (30720) cannot
        // overflow: the 8 groups accumulate in int16 and widen once.
        int16x8_t s = vdupq_n_s16(0);
        for (int g = 0; g < 8; ++g) {
            const int8x16_t xa = bcast4(x + 4 * g);
            const int16x8_t p01 = vmull_s8(vget_low_s8(wv[g]), vget_low_s8(xa));
            const int16x8_t p23 = vmull_high_s8(wv[g], xa);
            s = vaddq_s16(s, vpaddq_s16(p01, p23));  // lanes: row 0 x2, row 1 x2, row 2 x2, row 3 x2
        }
        // A Q4_0 nibble q stands for q - 8; Q4_1's min term is added in float.
        return vsubq_s32(vpaddlq_s16(s), vdupq_n_s32(kType == kQ4_0 ? 8 * xsum : 0));
    } else {
        // int8 products reach 2^14, so even a pair may overflow int16: widen while adding.
        int32x4_t s01 = vdupq_n_s32(0), s23 = vdupq_n_s32(0);
        for (int g = 0; g < 8; ++g) {
            const int8x16_t xa = bcast4(x + 4 * g);
            s01 = vpadalq_s16(s01, vmull_s8(vget_low_s8(wv[g]), vget_low_s8(xa)));
            s23 = vpadalq_s16(s23, vmull_high_s8(wv[g], xa));
        }
        return vpaddq_s32(s01, s23);
    }
}

// Stores the 4 row results of one quarter for one token, skipping padding rows.
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

// NQ quarters of tile t from quarter q0, for NT tokens from tok0: each block's quarter
// weights are unpacked once and used for all NT tokens. Per (row, token) the float work is
// one fma per block in block order, whatever NQ and NT, so batching never changes a result.
template <int kType, int NQ, int NT>
static inline void tile_rows(const uint8_t* quants, const uint16_t* scales, int64_t nb, int64_t t, int q0,
                             const ActQ8& a, int64_t tok0, float* out, int64_t ldo, int64_t n_rows,
                             bool accumulate) {
    constexpr int64_t qbytes = kType == kQ8_0 ? kQ8TileBlockQuants : kQ4TileBlockQuants;
    constexpr int64_t sstride = kType == kQ4_1 ? 2 * kTileRows : kTileRows;
    float32x4_t acc[NQ][NT];
    for (int qi = 0; qi < NQ; ++qi)
        for (int i = 0; i < NT; ++i) acc[qi][i] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tb = quants + (t * nb + b) * qbytes;
        const uint16_t* sp = scales + (t * nb + b) * sstride;
        for (int qi = 0; qi < NQ; ++qi) {
            const int qq = q0 + qi;
            int8x16_t wv[8];
            load_quarter<kType>(tb, qq, wv);
            const float32x4_t sw = load4_f16(sp + 4 * qq);
            const float32x4_t mins = kType == kQ4_1 ? load4_f16(sp + kTileRows + 4 * qq) : vdupq_n_f32(0.0f);
            for (int i = 0; i < NT; ++i) {
                const int64_t tok = tok0 + i;
                const int32_t xsum = a.s[tok * a.nb + b];
                const float da = a.d[tok * a.nb + b];
                const int32x4_t dot = quarter_dot<kType>(wv, a.q + tok * a.ldq + b * kBlock, xsum);
                const float32x4_t scale = vmulq_f32(sw, vdupq_n_f32(da));
                acc[qi][i] = vfmaq_f32(acc[qi][i], vcvtq_f32_s32(dot), scale);
                if (kType == kQ4_1) acc[qi][i] = vfmaq_f32(acc[qi][i], mins, vdupq_n_f32(float(xsum) * da));
            }
        }
    }
    for (int qi = 0; qi < NQ; ++qi) {
        const int64_t n0 = t * kTileRows + 4 * (q0 + qi);
        for (int i = 0; i < NT; ++i) store_rows4(out + (tok0 + i) * ldo + n0, acc[qi][i], n_rows - n0, accumulate);
    }
}

template <int kType>
static void matmul_q(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                     float* out, int64_t ldo, bool accumulate) {
    const int64_t nb = k / kBlock;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(w + n_tiles(n_rows) * nb * tile_block_quant_bytes(kType));
    for (int64_t t = tile0; t < tile1; ++t) {
        if (a.T == 1) {  // one pass over the tile's bytes, all four quarters
            tile_rows<kType, 4, 1>(w, scales, nb, t, 0, a, 0, out, ldo, n_rows, accumulate);
            continue;
        }
        for (int qq = 0; qq < 4 && t * kTileRows + 4 * qq < n_rows; ++qq) {
            int64_t tok = 0;
            for (; tok + 4 <= a.T; tok += 4)
                tile_rows<kType, 1, 4>(w, scales, nb, t, qq, a, tok, out, ldo, n_rows, accumulate);
            for (; tok < a.T; ++tok)
                tile_rows<kType, 1, 1>(w, scales, nb, t, qq, a, tok, out, ldo, n_rows, accumulate);
        }
    }
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

}  // namespace LLAMACPU_NS

const KernelTable LLAMACPU_TABLE = {
    LLAMACPU_TABLE_NAME,
    LLAMACPU_NS::matmul_q4_0,
    LLAMACPU_NS::matmul_q8_0,
    LLAMACPU_NS::matmul_q4_1,
    LLAMACPU_NS::matmul_f16,
    LLAMACPU_NS::matmul_f32,
    LLAMACPU_NS::quantize_row_q8,
    LLAMACPU_NS::rmsnorm,
    LLAMACPU_NS::rope,
    LLAMACPU_NS::silu_mul,
    LLAMACPU_NS::softmax,
    LLAMACPU_NS::attention,
    LLAMACPU_NS::f16_to_f32,
    LLAMACPU_NS::f32_to_f16,
    LLAMACPU_KQ(matmul_q4_k),
    LLAMACPU_KQ(matmul_q6_k),
    nullptr,  // matmul_q6_k does not read ActQ8::g
};

}  // namespace llamacpu
