// K-quant quantizers (converter side) and row dequantization.
//
// kQuantRef ports llama.cpp's quantize_row_q4_K_ref / quantize_row_q6_K_ref operation for
// operation (what `llama-quantize Q4_K_M` runs without an imatrix), so its bytes match
// llama.cpp's. kQuantMse searches each super-block for the scales of least weighted squared
// error, and keeps its result only where that error is below the reference's, so no
// super-block gets worse:
//   1. each sub-block (Q4_K: 32 weights, scale and min; Q6_K: 16 weights, signed scale) gets
//      its least-squares fit among a fan of candidate steps;
//   2. the super-block scale(s) that round those fits to 6 / 8 bits are chosen among
//      candidates by the error of the whole super-block, quants re-rounded for each;
//   3. each sub-block's integer scale (and min) is refitted to its quants and tried one step
//      either side, twice; then d (and dmin) are refitted to the whole super-block.
// Weights: importance (per column, 1 if none) times x^2 + sigma^2, sigma^2 twice the row's mean
// square (llama.cpp's sigma2 for Q4_K with an imatrix): without activation statistics every
// weight of a row is equally likely to meet a large activation, and large weights matter a
// little more. On Gaussian and on real weights this lowers both the weighted and the plain
// squared error below the reference's.
//
// Plain scalar code over fixed lanes (no reassociation needed to vectorise), so every machine
// writes the same bytes. It runs once per model, not per token.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend.h"
#include "cpu.h"
#include "kquants.h"
#include "quantize.h"

#ifndef LLAMACPU_KQ_SEARCH_NS
#define LLAMACPU_KQ_SEARCH_NS kq_search_base
#endif

namespace llamacpu {
// The search (everything up to the public entry points) is compiled twice: here for the
// baseline ISA and in kquants_quantize_avx2.cpp with AVX2 enabled, which runs its 8-lane loops
// at full width. Neither contracts a multiply-add (-ffp-contract=off) nor reassociates, so
// both write the same bytes; the AVX2 build is just faster.
namespace LLAMACPU_KQ_SEARCH_NS {

// llama.cpp's nearest_int: round half to even for |v| < 2^22.
inline int nearest_int(float v) {
    const float r = v + 12582912.0f;
    int32_t i;
    std::memcpy(&i, &r, 4);
    return (i & 0x007fffff) - 0x00400000;
}

inline float roundf_even(float v) { return (v + 12582912.0f) - 12582912.0f; }
inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }
inline float fp16_round(float v) { return fp16_to_fp32(fp32_to_fp16(v)); }

constexpr float kGroupMaxEps = 1e-15f;  // llama.cpp's GROUP_MAX_EPS

// ================================================================ llama.cpp reference rules

float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep, bool use_mad) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = uint8_t(l < 0 ? 0 : l > nmax ? nmax : l);
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            Laux[i] = uint8_t(l);
            const float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? std::fabs(diff) : diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// make_qx_quants with rmse_type 1 and no quant weights (weights x^2), as Q6_K's reference uses.
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < kGroupMaxEps) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = int8_t(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = int8_t(nmax + (l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

void q4k_pack_scales(const uint8_t* ls, const uint8_t* lm, uint8_t* scales) {
    std::memset(scales, 0, 12);
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            scales[j] = ls[j];
            scales[j + 4] = lm[j];
        } else {
            scales[j + 4] = uint8_t((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            scales[j - 4] |= uint8_t((ls[j] >> 4) << 6);
            scales[j] |= uint8_t((lm[j] >> 4) << 6);
        }
    }
}

void q4k_unpack_scales(const uint8_t* scales, uint8_t* ls, uint8_t* lm) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            ls[j] = scales[j] & 63;
            lm[j] = scales[j + 4] & 63;
        } else {
            ls[j] = uint8_t((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4));
            lm[j] = uint8_t((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
        }
    }
}

void q4k_ref(const float* x, Q4KBlock* y) {
    uint8_t L[256], Laux[32];
    float weights[32], mins[8], scales[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = std::sqrt(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20, false);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
        // uint8_t, then the cap: as llama.cpp (a negative fit wraps and is capped at 63).
        const uint8_t a = uint8_t(nearest_int(inv_scale * scales[j]));
        const uint8_t b = uint8_t(nearest_int(inv_min * mins[j]));
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
    }
    q4k_pack_scales(ls, lm, y->scales);
    y->d = fp32_to_fp16(max_scale / 63.f);
    y->dmin = fp32_to_fp16(max_min / 63.f);
    for (int j = 0; j < 8; ++j) {
        const float d = fp16_to_fp32(y->d) * ls[j];
        if (!d) continue;
        const float dm = fp16_to_fp32(y->dmin) * lm[j];
        for (int ii = 0; ii < 32; ++ii) {
            const int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = uint8_t(l < 0 ? 0 : l > 15 ? 15 : l);
        }
    }
    std::memcpy(y->q, L, 256);
}

void q6k_ref(const float* x, Q6KBlock* y) {
    int8_t L[256];
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
        scales[ib] = scale;
        const float abs_scale = std::fabs(scale);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if (max_abs_scale < kGroupMaxEps) {
        std::memset(y, 0, sizeof *y);  // as llama.cpp: every byte zero (d = 0)
        return;
    }
    const float iscale = -128.f / max_scale;
    y->d = fp32_to_fp16(1 / iscale);
    for (int ib = 0; ib < 16; ++ib) {
        const int v = nearest_int(iscale * scales[ib]);
        y->scales[ib] = int8_t(v < 127 ? v : 127);
    }
    for (int j = 0; j < 16; ++j) {
        const float d = fp16_to_fp32(y->d) * y->scales[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = l < -32 ? -32 : l > 31 ? 31 : l;
            L[16 * j + ii] = int8_t(l + 32);
        }
    }
    for (int i = 0; i < 256; ++i) y->q[i] = uint8_t(L[i]);
}

// ================================================================ least-squares search

// Sum over lanes in a fixed order.
inline float lane_sum(const float* a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

// Weighted squared error of a Q4_K sub-block (32 values) for step D and offset M (value
// D*q - M), its quants rounded to the nearest; writes them to q when given.
float q4k_sub_error(const float* x, const float* w, float D, float M, uint8_t* q) {
    // Multiplying by 1/D instead of dividing may round a tie the other way: harmless, as the
    // error is measured for the quants actually chosen.
    const float iD = D != 0.0f ? 1.0f / D : 0.0f;
    float l[32], acc[8] = {};
    for (int i = 0; i < 32; i += 8)
        for (int k = 0; k < 8; ++k) {
            l[i + k] = clampf(roundf_even((x[i + k] + M) * iD), 0.0f, 15.0f);
            const float e = D * l[i + k] - M - x[i + k];
            acc[k] += w[i + k] * e * e;
        }
    if (q)
        for (int i = 0; i < 32; ++i) q[i] = uint8_t(l[i]);
    return lane_sum(acc);
}

// The least-squares (scale, offset) of a 32-value sub-block with values scale*l - offset,
// offset >= 0 (a min at or below zero, as the format's unsigned m requires), among candidate
// steps (15 + k/10) / (max - min), k = -10..10.
void q4k_fit_sub(const float* x, const float* w, float* scale, float* offset) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < 32; ++i) {
        mn = std::fmin(mn, x[i]);
        mx = std::fmax(mx, x[i]);
    }
    if (mn > 0) mn = 0;
    *scale = 0.0f;
    *offset = -mn;
    if (!(mx > mn)) return;
    float sw_l[8] = {}, swx_l[8] = {};
    for (int i = 0; i < 32; i += 8)
        for (int k = 0; k < 8; ++k) {
            sw_l[k] += w[i + k];
            swx_l[k] += w[i + k] * x[i + k];
        }
    const float sw = lane_sum(sw_l), swx = lane_sum(swx_l);
    float best = INFINITY;
    for (int step = -10; step <= 10; ++step) {
        const float iscale = (15.0f + 0.1f * float(step)) / (mx - mn);
        float l[32];
        float sl_l[8] = {}, sll_l[8] = {}, sxl_l[8] = {};
        for (int i = 0; i < 32; i += 8)
            for (int k = 0; k < 8; ++k) {
                const float li = clampf(roundf_even(iscale * (x[i + k] - mn)), 0.0f, 15.0f);
                l[i + k] = li;
                sl_l[k] += w[i + k] * li;
                sll_l[k] += w[i + k] * li * li;
                sxl_l[k] += w[i + k] * li * x[i + k];
            }
        const float sl = lane_sum(sl_l), sll = lane_sum(sll_l), sxl = lane_sum(sxl_l);
        const float D = sw * sll - sl * sl;
        if (!(D > 0)) continue;
        float s = (sw * sxl - swx * sl) / D;
        float m = (sll * swx - sl * sxl) / D;  // the min (value = s*l + m)
        if (m > 0) {
            m = 0;
            s = sxl / sll;
        }
        if (!(s > 0)) continue;
        float acc[8] = {};
        for (int i = 0; i < 32; i += 8)
            for (int k = 0; k < 8; ++k) {
                const float e = s * l[i + k] + m - x[i + k];
                acc[k] += w[i + k] * e * e;
            }
        const float err = lane_sum(acc);
        if (err < best) {
            best = err;
            *scale = s;
            *offset = -m;
        }
    }
}

struct Q4KState {
    float d, dmin;  // fp16-exact
    uint8_t ls[8], lm[8];
};

float q4k_error(const float* x, const float* w, const Q4KState& s, uint8_t* q) {
    float err = 0.0f;
    for (int j = 0; j < 8; ++j)
        err += q4k_sub_error(x + 32 * j, w + 32 * j, s.d * s.ls[j], s.dmin * s.lm[j], q ? q + 32 * j : nullptr);
    return err;
}

// Integer scales of the fits for super-block scales d and dmin (both fp16-exact).
Q4KState q4k_round_scales(const float* scale, const float* offset, float d, float dmin) {
    Q4KState s{d, dmin, {}, {}};
    for (int j = 0; j < 8; ++j) {
        s.ls[j] = uint8_t(d > 0 ? clampf(roundf_even(scale[j] / d), 0.0f, 63.0f) : 0.0f);
        s.lm[j] = uint8_t(dmin > 0 ? clampf(roundf_even(offset[j] / dmin), 0.0f, 63.0f) : 0.0f);
    }
    return s;
}

// Refits sub-block j's integer scale and min to its current quants (weighted least squares
// of x = a*q - b), then keeps the best of the rounded fit and its neighbours.
void q4k_refit_sub(const float* x, const float* w, Q4KState& s, int j, float& err_j) {
    uint8_t q[32];
    q4k_sub_error(x, w, s.d * s.ls[j], s.dmin * s.lm[j], q);
    float sw = 0, sq = 0, sqq = 0, sx = 0, sxq = 0;
    for (int i = 0; i < 32; ++i) {
        sw += w[i];
        sq += w[i] * q[i];
        sqq += w[i] * q[i] * q[i];
        sx += w[i] * x[i];
        sxq += w[i] * x[i] * q[i];
    }
    const float det = sw * sqq - sq * sq;
    if (!(det > 0) || !(s.d > 0)) return;
    const float a = (sw * sxq - sx * sq) / det;  // step
    const float b = (sq * sxq - sqq * sx) / det;  // offset (value a*q - b)
    const int ls0 = int(clampf(roundf_even(a / s.d), 0.0f, 63.0f));
    const int lm0 = s.dmin > 0 ? int(clampf(roundf_even(b / s.dmin), 0.0f, 63.0f)) : 0;
    for (int dl = -1; dl <= 1; ++dl) {
        for (int dm = -1; dm <= 1; ++dm) {
            const int ls = ls0 + dl, lm = lm0 + dm;
            if (ls < 0 || ls > 63 || lm < 0 || lm > 63 || (lm && !(s.dmin > 0))) continue;
            const float e = q4k_sub_error(x, w, s.d * ls, s.dmin * lm, nullptr);
            if (e < err_j) {
                err_j = e;
                s.ls[j] = uint8_t(ls);
                s.lm[j] = uint8_t(lm);
            }
        }
    }
}

// Weighted least-squares d and dmin for fixed integer scales and quants: x = d*(ls*q) - dmin*lm.
bool q4k_refit_super(const float* x, const float* w, const Q4KState& s, const uint8_t* q, float* d, float* dmin) {
    double saa = 0, sab = 0, sbb = 0, sxa = 0, sxb = 0;
    for (int i = 0; i < 256; ++i) {
        const double av = double(s.ls[i / 32]) * q[i], bv = -double(s.lm[i / 32]);
        saa += w[i] * av * av;
        sab += w[i] * av * bv;
        sbb += w[i] * bv * bv;
        sxa += w[i] * x[i] * av;
        sxb += w[i] * x[i] * bv;
    }
    const double det = saa * sbb - sab * sab;
    if (det > 0) {
        *d = float((sxa * sbb - sxb * sab) / det);
        *dmin = float((saa * sxb - sab * sxa) / det);
    } else if (saa > 0) {
        *d = float(sxa / saa);
        *dmin = s.dmin;
    } else {
        return false;
    }
    return *d > 0 && *dmin >= 0;
}

void q4k_mse(const float* x, const float* w, Q4KBlock* y) {
    float scale[8], offset[8];
    float max_scale = 0, max_off = 0;
    for (int j = 0; j < 8; ++j) {
        q4k_fit_sub(x + 32 * j, w + 32 * j, &scale[j], &offset[j]);
        max_scale = std::fmax(max_scale, scale[j]);
        max_off = std::fmax(max_off, offset[j]);
    }
    if (!(max_scale > 0)) return;  // the reference's result stands
    // Super-block scales: the max/63 rule and steps around it, d first, then dmin.
    Q4KState best{};
    float best_err = INFINITY;
    const float dmin0 = fp16_round(max_off / 63.0f);
    for (int k = -2; k <= 2; ++k) {
        const float d = fp16_round(max_scale / (63.0f + 3.0f * float(k)));
        if (!(d > 0)) continue;
        const Q4KState s = q4k_round_scales(scale, offset, d, dmin0);
        const float e = q4k_error(x, w, s, nullptr);
        if (e < best_err) {
            best_err = e;
            best = s;
        }
    }
    if (max_off > 0) {
        for (int k = -2; k <= 2; ++k) {
            if (k == 0) continue;
            const float dmin = fp16_round(max_off / (63.0f + 3.0f * float(k)));
            const Q4KState s = q4k_round_scales(scale, offset, best.d, dmin);
            const float e = q4k_error(x, w, s, nullptr);
            if (e < best_err) {
                best_err = e;
                best = s;
            }
        }
    }
    if (!(best_err < INFINITY)) return;
    for (int pass = 0; pass < 2; ++pass) {
        for (int j = 0; j < 8; ++j) {
            float ej = q4k_sub_error(x + 32 * j, w + 32 * j, best.d * best.ls[j], best.dmin * best.lm[j], nullptr);
            q4k_refit_sub(x + 32 * j, w + 32 * j, best, j, ej);
        }
        uint8_t q[256];
        best_err = q4k_error(x, w, best, q);
        float d, dmin;
        if (q4k_refit_super(x, w, best, q, &d, &dmin)) {
            Q4KState s = best;
            s.d = fp16_round(d);
            s.dmin = fp16_round(dmin);
            if (s.d > 0 && s.d <= 65504.0f && s.dmin <= 65504.0f) {
                const float e = q4k_error(x, w, s, nullptr);
                if (e < best_err) {
                    best_err = e;
                    best = s;
                }
            }
        }
    }
    // Keep it only if it beats what y holds (the reference's block).
    Q4KState ref{fp16_to_fp32(y->d), fp16_to_fp32(y->dmin), {}, {}};
    q4k_unpack_scales(y->scales, ref.ls, ref.lm);
    float ref_err = 0.0f;
    for (int j = 0; j < 8; ++j) {
        float acc[8] = {};
        const float D = ref.d * ref.ls[j], M = ref.dmin * ref.lm[j];
        for (int i = 0; i < 32; ++i) {
            const float e = D * float(y->q[32 * j + i]) - M - x[32 * j + i];
            acc[i % 8] += w[32 * j + i] * e * e;
        }
        ref_err += lane_sum(acc);
    }
    if (!(best_err < ref_err)) return;
    y->d = fp32_to_fp16(best.d);
    y->dmin = fp32_to_fp16(best.dmin);
    q4k_pack_scales(best.ls, best.lm, y->scales);
    q4k_error(x, w, best, y->q);
}

// ---- Q6_K ----

// Weighted squared error of a 16-value group for step D (value D*(q-32)); quants to q.
float q6k_group_error(const float* x, const float* w, float D, uint8_t* q) {
    const float iD = D != 0.0f ? 1.0f / D : 0.0f;  // see q4k_sub_error
    float l[16], acc[8] = {};
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 8; ++k) {
            l[i + k] = clampf(roundf_even(x[i + k] * iD), -32.0f, 31.0f);
            const float e = D * l[i + k] - x[i + k];
            acc[k] += w[i + k] * e * e;
        }
    if (q)
        for (int i = 0; i < 16; ++i) q[i] = uint8_t(int(l[i]) + 32);
    return lane_sum(acc);
}

// The least-squares step of a group among candidate steps max / -(32 + 0.3k), k = -4..4
// (max: the value of largest magnitude, which goes to the -32 end that has no +32 twin), and
// the opposite-signed steps max / (31 + 0.3k).
float q6k_fit_group(const float* x, const float* w) {
    float amax = 0, mx = 0;
    for (int i = 0; i < 16; ++i)
        if (std::fabs(x[i]) > amax) {
            amax = std::fabs(x[i]);
            mx = x[i];
        }
    if (amax < kGroupMaxEps) return 0.0f;
    float best_d = 0.0f, best_gain = 0.0f;  // gain (sum w x l)^2 / sum w l^2: error removed
    for (int side = 0; side < 2; ++side) {
        for (int k = -4; k <= 4; ++k) {
            const float iscale = side == 0 ? -(32.0f + 0.3f * float(k)) / mx : (31.0f + 0.3f * float(k)) / mx;
            float sxl_l[8] = {}, sll_l[8] = {};
            for (int i = 0; i < 16; i += 8)
                for (int j = 0; j < 8; ++j) {
                    const float l = clampf(roundf_even(x[i + j] * iscale), -32.0f, 31.0f);
                    sxl_l[j] += w[i + j] * x[i + j] * l;
                    sll_l[j] += w[i + j] * l * l;
                }
            const float xl = lane_sum(sxl_l), ll = lane_sum(sll_l);
            if (ll > 0 && xl * xl > best_gain * ll) {
                best_gain = xl * xl / ll;
                best_d = xl / ll;
            }
        }
    }
    return best_d;
}

struct Q6KState {
    float d;
    int8_t sc[16];
};

float q6k_error(const float* x, const float* w, const Q6KState& s, uint8_t* q) {
    float err = 0.0f;
    for (int g = 0; g < 16; ++g) err += q6k_group_error(x + 16 * g, w + 16 * g, s.d * s.sc[g], q ? q + 16 * g : nullptr);
    return err;
}

void q6k_mse(const float* x, const float* w, Q6KBlock* y) {
    float step[16];
    float max_abs = 0, max_step = 0;
    for (int g = 0; g < 16; ++g) {
        step[g] = q6k_fit_group(x + 16 * g, w + 16 * g);
        if (std::fabs(step[g]) > max_abs) {
            max_abs = std::fabs(step[g]);
            max_step = step[g];
        }
    }
    if (max_abs < kGroupMaxEps) return;
    Q6KState best{};
    float best_err = INFINITY;
    // d maps the largest step to -128 (the reference's rule), or to 127, or steps near those.
    for (int side = 0; side < 2; ++side) {
        for (int k = -3; k <= 3; ++k) {
            const float d = fp16_round(side == 0 ? max_step / -(128.0f + 2.0f * float(k)) : max_step / (127.0f + 2.0f * float(k)));
            if (d == 0.0f || !std::isfinite(d)) continue;
            Q6KState s{d, {}};
            for (int g = 0; g < 16; ++g) s.sc[g] = int8_t(clampf(roundf_even(step[g] / d), -128.0f, 127.0f));
            const float e = q6k_error(x, w, s, nullptr);
            if (e < best_err) {
                best_err = e;
                best = s;
            }
        }
    }
    if (!(best_err < INFINITY)) return;
    for (int pass = 0; pass < 2; ++pass) {
        uint8_t q[256];
        for (int g = 0; g < 16; ++g) {
            const float* xg = x + 16 * g;
            const float* wg = w + 16 * g;
            float eg = q6k_group_error(xg, wg, best.d * best.sc[g], q);
            float sxl = 0, sll = 0;
            for (int i = 0; i < 16; ++i) {
                const float l = float(int(q[i]) - 32);
                sxl += wg[i] * xg[i] * l;
                sll += wg[i] * l * l;
            }
            if (!(sll > 0)) continue;
            const int sc0 = int(clampf(roundf_even(sxl / sll / best.d), -128.0f, 127.0f));
            for (int ds = -1; ds <= 1; ++ds) {
                const int sc = sc0 + ds;
                if (sc < -128 || sc > 127) continue;
                const float e = q6k_group_error(xg, wg, best.d * sc, nullptr);
                if (e < eg) {
                    eg = e;
                    best.sc[g] = int8_t(sc);
                }
            }
        }
        best_err = q6k_error(x, w, best, q);
        double saa = 0, sxa = 0;
        for (int i = 0; i < 256; ++i) {
            const double a = double(best.sc[i / 16]) * (int(q[i]) - 32);
            saa += w[i] * a * a;
            sxa += w[i] * x[i] * a;
        }
        if (saa > 0) {
            Q6KState s = best;
            s.d = fp16_round(float(sxa / saa));
            if (s.d != 0.0f && std::fabs(s.d) <= 65504.0f) {
                const float e = q6k_error(x, w, s, nullptr);
                if (e < best_err) {
                    best_err = e;
                    best = s;
                }
            }
        }
    }
    float ref_err = 0.0f;
    const float dr = fp16_to_fp32(y->d);
    for (int g = 0; g < 16; ++g) {
        float acc[8] = {};
        for (int i = 0; i < 16; ++i) {
            const float e = dr * y->scales[g] * float(int(y->q[16 * g + i]) - 32) - x[16 * g + i];
            acc[i % 8] += w[16 * g + i] * e * e;
        }
        ref_err += lane_sum(acc);
    }
    if (!(best_err < ref_err)) return;
    y->d = fp32_to_fp16(best.d);
    std::memcpy(y->scales, best.sc, 16);
    q6k_error(x, w, best, y->q);
}

// Weights of one row: importance times x^2 + twice the mean square of the row.
void row_weights(const float* x, int64_t cols, const float* importance, float* w) {
    double ss = 0;
    for (int64_t i = 0; i < cols; ++i) ss += double(x[i]) * x[i];
    const float sigma2 = float(2.0 * ss / double(cols));
    for (int64_t i = 0; i < cols; ++i) w[i] = (importance ? importance[i] : 1.0f) * (sigma2 + x[i] * x[i]);
}

// ================================================================ tile packing

// Q4_K: sub-block j's nibbles into Q4_0's tile-block layout at row r; scales transposed.
void pack_q4k(const Q4KBlock& b, int r, uint8_t* tq, uint8_t* ts) {
    for (int j = 0; j < 8; ++j) {
        uint8_t* sub = tq + 256 * j;
        for (int c = 0; c < 32; ++c) {
            const int hi = c >= 16, cc = c - 16 * hi;
            uint8_t& byte = sub[(cc / 4) * 64 + r * 4 + cc % 4];
            byte = uint8_t(hi ? (byte & 0x0F) | (b.q[32 * j + c] << 4) : (byte & 0xF0) | b.q[32 * j + c]);
        }
    }
    std::memcpy(ts + 2 * r, &b.d, 2);
    std::memcpy(ts + 32 + 2 * r, &b.dmin, 2);
    for (int k = 0; k < 12; ++k) ts[64 + 16 * k + r] = b.scales[k];
}

void pack_q6k(const Q6KBlock& b, int r, uint8_t* tq, uint8_t* ts) {
    for (int j = 0; j < 8; ++j) {
        uint8_t* sub = tq + 384 * j;
        const uint8_t* q = b.q + 32 * j;
        for (int t = 0; t < 2; ++t)
            for (int k = 0; k < 3; ++k)
                for (int i = 0; i < 4; ++i) {
                    const int c = 16 * t + 4 * k + i;
                    const int spread = (q[16 * t + 12 + i] >> (2 * k)) & 3;
                    sub[(3 * t + k) * 64 + r * 4 + i] = uint8_t(q[c] | (spread << 6));
                }
    }
    std::memcpy(ts + 2 * r, &b.d, 2);
    for (int g = 0; g < 16; ++g) ts[32 + 16 * g + r] = uint8_t(b.scales[g]);
}

void row_q4_k(const float* x, int64_t cols, Q4KBlock* out, int32_t method, const float* importance) {
    std::vector<float> w;
    if (method != kQuantRef) {
        w.resize(size_t(cols));
        row_weights(x, cols, importance, w.data());
    }
    for (int64_t s = 0; s < cols / kSuperBlock; ++s) {
        q4k_ref(x + s * kSuperBlock, &out[s]);
        if (method != kQuantRef) q4k_mse(x + s * kSuperBlock, w.data() + s * kSuperBlock, &out[s]);
    }
}

void row_q6_k(const float* x, int64_t cols, Q6KBlock* out, int32_t method, const float* importance) {
    std::vector<float> w;
    if (method != kQuantRef) {
        w.resize(size_t(cols));
        row_weights(x, cols, importance, w.data());
    }
    for (int64_t s = 0; s < cols / kSuperBlock; ++s) {
        q6k_ref(x + s * kSuperBlock, &out[s]);
        if (method != kQuantRef) q6k_mse(x + s * kSuperBlock, w.data() + s * kSuperBlock, &out[s]);
    }
}

}  // namespace LLAMACPU_KQ_SEARCH_NS

#ifndef LLAMACPU_KQ_SEARCH_AVX2  // the public entry points, once

#if defined(LLAMACPU_HAVE_AVX2)
namespace kq_search_avx2 {
void row_q4_k(const float* x, int64_t cols, Q4KBlock* out, int32_t method, const float* importance);
void row_q6_k(const float* x, int64_t cols, Q6KBlock* out, int32_t method, const float* importance);
}  // namespace kq_search_avx2
#endif

namespace {

// The AVX2 build of the search where the CPU has AVX2, unless LLAMACPU_ISA=scalar asks for
// the baseline (the tests compare the two byte for byte).
bool search_avx2() {
#if defined(LLAMACPU_HAVE_AVX2)
    const char* isa = std::getenv("LLAMACPU_ISA");
    return cpu_features().avx2 && !(isa && std::strcmp(isa, "scalar") == 0);
#else
    return false;
#endif
}

using kq_search_base::pack_q4k;
using kq_search_base::pack_q6k;

}  // namespace

// ================================================================ public entry points

void quantize_row_q4_k(const float* x, int64_t cols, Q4KBlock* out, int32_t method, const float* importance) {
#if defined(LLAMACPU_HAVE_AVX2)
    if (search_avx2()) return kq_search_avx2::row_q4_k(x, cols, out, method, importance);
#endif
    kq_search_base::row_q4_k(x, cols, out, method, importance);
}

void quantize_row_q6_k(const float* x, int64_t cols, Q6KBlock* out, int32_t method, const float* importance) {
#if defined(LLAMACPU_HAVE_AVX2)
    if (search_avx2()) return kq_search_avx2::row_q6_k(x, cols, out, method, importance);
#endif
    kq_search_base::row_q6_k(x, cols, out, method, importance);
}

void quantize_k_tiles(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* dst, int32_t method,
                      const float* importance) {
    const int64_t nsb = cols / kSuperBlock, tiles = n_tiles(n_rows);
    const int64_t qb = k_tile_quant_bytes(dtype), sb = k_tile_scale_bytes(dtype);
    std::memset(dst, 0, size_t(tiles * nsb * (qb + sb)));
    uint8_t* quants = dst;
    uint8_t* scales = dst + tiles * nsb * qb;
    const std::vector<float> zeros(size_t(cols), 0.0f);
    std::vector<Q4KBlock> b4(dtype == kQ4_K ? size_t(nsb) : 0);
    std::vector<Q6KBlock> b6(dtype == kQ6_K ? size_t(nsb) : 0);
    for (int64_t row = 0; row < tiles * kTileRows; ++row) {
        const float* x = row < n_rows ? src + row * cols : zeros.data();
        const int64_t t = row / kTileRows;
        const int r = int(row % kTileRows);
        if (dtype == kQ4_K) quantize_row_q4_k(x, cols, b4.data(), method, importance);
        else quantize_row_q6_k(x, cols, b6.data(), method, importance);
        for (int64_t s = 0; s < nsb; ++s) {
            uint8_t* tq = quants + (t * nsb + s) * qb;
            uint8_t* ts = scales + (t * nsb + s) * sb;
            if (dtype == kQ4_K) pack_q4k(b4[size_t(s)], r, tq, ts);
            else pack_q6k(b6[size_t(s)], r, tq, ts);
        }
    }
}

// GGUF's byte order: Q4_K {d, dmin, scales[12], qs[128]}, qs[32c + l] holding columns 64c + l
// (low nibble) and 64c + 32 + l (high); Q6_K {ql[128], qh[64], scales[16], d}, per 128-column
// half: ql[l] columns l (low nibble) and l + 64 (high), ql[l + 32] columns l + 32 and l + 96,
// qh[l] the top bits of columns l, l + 32, l + 64, l + 96 at bits 0, 2, 4, 6.
static void q4k_to_gguf(const Q4KBlock& b, uint8_t* o) {
    std::memcpy(o, &b.d, 2);
    std::memcpy(o + 2, &b.dmin, 2);
    std::memcpy(o + 4, b.scales, 12);
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) o[16 + 32 * c + l] = uint8_t(b.q[64 * c + l] | (b.q[64 * c + 32 + l] << 4));
}

static void q6k_to_gguf(const Q6KBlock& b, uint8_t* o) {
    uint8_t* ql = o;
    uint8_t* qh = o + 128;
    for (int half = 0; half < 2; ++half) {
        const uint8_t* L = b.q + 128 * half;
        for (int l = 0; l < 32; ++l) {
            ql[64 * half + l] = uint8_t((L[l] & 15) | ((L[l + 64] & 15) << 4));
            ql[64 * half + l + 32] = uint8_t((L[l + 32] & 15) | ((L[l + 96] & 15) << 4));
            qh[32 * half + l] = uint8_t((L[l] >> 4) | ((L[l + 32] >> 4) << 2) | ((L[l + 64] >> 4) << 4) | ((L[l + 96] >> 4) << 6));
        }
    }
    std::memcpy(o + 192, b.scales, 16);
    std::memcpy(o + 208, &b.d, 2);
}

void quantize_k_gguf(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* dst, int32_t method,
                     const float* importance) {
    const int64_t nsb = cols / kSuperBlock;
    const int64_t bytes = dtype == kQ4_K ? 144 : 210;
    std::vector<Q4KBlock> b4(dtype == kQ4_K ? size_t(nsb) : 0);
    std::vector<Q6KBlock> b6(dtype == kQ6_K ? size_t(nsb) : 0);
    for (int64_t row = 0; row < n_rows; ++row) {
        if (dtype == kQ4_K) quantize_row_q4_k(src + row * cols, cols, b4.data(), method, importance);
        else quantize_row_q6_k(src + row * cols, cols, b6.data(), method, importance);
        for (int64_t s = 0; s < nsb; ++s) {
            uint8_t* o = dst + (row * nsb + s) * bytes;
            if (dtype == kQ4_K) q4k_to_gguf(b4[size_t(s)], o);
            else q6k_to_gguf(b6[size_t(s)], o);
        }
    }
}

void dequantize_row_kquant(const Matrix& m, int64_t row, float* out) {
    const int64_t nsb = m.cols / kSuperBlock, tiles = n_tiles(m.rows);
    const int64_t qb = k_tile_quant_bytes(m.dtype), sb = k_tile_scale_bytes(m.dtype);
    const int64_t t = row / kTileRows;
    const int r = int(row % kTileRows);
    for (int64_t s = 0; s < nsb; ++s) {
        const uint8_t* tq = m.data + (t * nsb + s) * qb;
        const uint8_t* ts = m.data + tiles * nsb * qb + (t * nsb + s) * sb;
        uint16_t h;
        std::memcpy(&h, ts + 2 * r, 2);
        const float d = fp16_to_fp32(h);
        float* y = out + s * kSuperBlock;
        if (m.dtype == kQ4_K) {
            std::memcpy(&h, ts + 32 + 2 * r, 2);
            const float dmin = fp16_to_fp32(h);
            for (int j = 0; j < 8; ++j) {
                int sc, mn;
                q4k_scale_min(ts + 64, r, j, &sc, &mn);
                const float d1 = d * float(sc), m1 = dmin * float(mn);
                for (int c = 0; c < 32; ++c) y[32 * j + c] = d1 * float(k_nibble(tq + 256 * j, r, c)) - m1;
            }
        } else {
            for (int j = 0; j < 8; ++j)
                for (int c = 0; c < 32; ++c) {
                    const int8_t sc = int8_t(ts[32 + 16 * (2 * j + c / 16) + r]);
                    y[32 * j + c] = d * float(sc) * float(q6k_quant(tq + 384 * j, r, c) - 32);
                }
        }
    }
}

#endif  // LLAMACPU_KQ_SEARCH_AVX2

}  // namespace llamacpu
