// Weight quantization into the tile layouts (run by the converter) and row dequantization
// (embedding lookups, tests). Plain scalar code: it runs once per model, not per token.
#include "quantize.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <cerrno>

#include "kquants.h"

namespace llamacpu {

// ---- the reference rules (llama.cpp's quantize_row_*_ref) ---------------------------------
// Kept byte for byte: the tests check the tile layout against numpy copies of these rules,
// and the error-minimising search below never does worse than them.

// Q4_0: the scale maps the value of largest magnitude to -8, so that end of the range is used
// exactly.
static void quantize_block_q4_0(const float* x, uint8_t* q, uint16_t* d_out) {
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < kBlock; ++i) {
        if (std::fabs(x[i]) > amax) {
            amax = std::fabs(x[i]);
            mx = x[i];
        }
    }
    const float d = mx != 0.0f ? mx / -8.0f : 0.0f;  // +0, not -0, for an all-zero block
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < kBlock; ++i) {
        const int v = int(x[i] * id + 8.5f);
        q[i] = uint8_t(v < 0 ? 0 : v > 15 ? 15 : v);
    }
    *d_out = fp32_to_fp16(d);
}

// Q4_1: 16 steps from the block's min to its max.
static void quantize_block_q4_1(const float* x, uint8_t* q, uint16_t* d_out, uint16_t* m_out) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < kBlock; ++i) {
        mn = std::fmin(mn, x[i]);
        mx = std::fmax(mx, x[i]);
    }
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < kBlock; ++i) {
        const int v = int((x[i] - mn) * id + 0.5f);
        q[i] = uint8_t(v < 0 ? 0 : v > 15 ? 15 : v);
    }
    *d_out = fp32_to_fp16(d);
    *m_out = fp32_to_fp16(mn);
}

// Q8_0: amax maps to 127, codes rounded half away from zero.
static void quantize_block_q8_0(const float* x, int8_t* q, uint16_t* d_out) {
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < kBlock; ++i) {
        const int v = int(std::lround(x[i] * id));
        q[i] = int8_t(v < -127 ? -127 : v > 127 ? 127 : v);
    }
    *d_out = fp32_to_fp16(d);
}

// ---- error-minimising scales ---------------------------------------------------------------
// The max-abs rule spends the whole grid on the block's largest value; a slightly smaller or
// larger step usually fits the other 31 values better. Each block tries a fan of candidate
// steps around the max-abs one (llama.cpp's make_qx_quants / make_qkx2_quants idea): round
// with the candidate, then take the least-squares scale (and min) for those codes, keep the
// best. The winner's scale is rounded to fp16 as stored and the codes are re-rounded against
// that stored scale; the result replaces the reference rule's only if its weighted squared
// error is lower, so no block gets worse.
//
// Every loop below is element-wise over the 32 values of a block, which the compiler
// vectorises, and sums are taken in a fixed order (sum32), so every machine gets the same
// bytes.

// Round to nearest, ties to even, for |v| < 2^22: plain float arithmetic, so it vectorises
// (std::nearbyint is a library call on baseline x86-64).
static inline float round_near(float v) { return (v + 12582912.0f) - 12582912.0f; }

static inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

// A 4-lane vector (GCC and Clang): the vectoriser turns a scalar sum into shuffles and
// scalar adds, so the 32 values are summed as 8 vectors, then the lanes in a fixed order.
typedef float F4 __attribute__((vector_size(16)));

static inline float sum32(const float* p) {
    F4 a, b;
    std::memcpy(&a, p, sizeof a);
    for (int i = 4; i < kBlock; i += 4) {
        std::memcpy(&b, p + i, sizeof b);
        a += b;
    }
    return (a[0] + a[2]) + (a[1] + a[3]);
}

// Importance of each weight in a block for the fit. Without activation statistics every
// column is equally likely to meet a large activation, so what is left to weigh is the value
// itself: w = rms(row) + |x|, the no-imatrix weighting of llama.cpp's K-quants with the row's
// rms in place of the super-block's. Large values count a little more than in a plain squared
// error, which protects the outliers that a 4-bit grid rounds worst. Measured on SmolLM2 with
// wikitext-2 (bench/QUALITY.md), this beat unweighted, rms^2 + x^2, |x| and block-rms + |x|.
static void block_weights(const float* x, float rms, float* w) {
    for (int i = 0; i < kBlock; ++i) w[i] = rms + std::fabs(x[i]);
}

// Sum of w*(x - y)^2 over a block, y the decoded values.
static float weighted_error(const float* x, const float* y, const float* w) {
    float e[kBlock];
    for (int i = 0; i < kBlock; ++i) e[i] = w[i] * (x[i] - y[i]) * (x[i] - y[i]);
    return sum32(e);
}

// The least-squares step d of a symmetric grid (codes lo..hi, value d*code) among candidate
// inverse steps (base + k*step) / ref, k = -n..n; 0 when no candidate has a non-zero code.
static float search_symmetric(const float* x, const float* w, float ref, float base, float step, int n, float lo,
                              float hi) {
    float wx[kBlock], xl[kBlock], ll[kBlock];
    for (int i = 0; i < kBlock; ++i) wx[i] = w[i] * x[i];
    float best_d = 0.0f, best_gain = 0.0f;  // gain = (sum w x l)^2 / sum w l^2: error removed
    for (int k = -n; k <= n; ++k) {
        const float iscale = (base + step * float(k)) / ref;
        for (int i = 0; i < kBlock; ++i) {
            const float l = clampf(round_near(x[i] * iscale), lo, hi);
            xl[i] = wx[i] * l;
            ll[i] = w[i] * l * l;
        }
        const float sxl = sum32(xl), sll = sum32(ll);
        if (sll > 0.0f && sxl * sxl > best_gain * sll) {
            best_gain = sxl * sxl / sll;
            best_d = sxl / sll;
        }
    }
    return best_d;
}

// Codes of x on the grid d*code (code lo..hi) for the stored fp16 d, and the decoded values.
static uint16_t round_to_grid(const float* x, float d, float lo, float hi, float* code, float* y) {
    const uint16_t d16 = fp32_to_fp16(d);
    const float df = fp16_to_fp32(d16);
    const float id = df != 0.0f ? 1.0f / df : 0.0f;
    for (int i = 0; i < kBlock; ++i) {
        code[i] = clampf(round_near(x[i] * id), lo, hi);
        y[i] = df * code[i];
    }
    return d16;
}

// Below this magnitude a block is left to the reference rule: 1/amax would overflow.
constexpr float kTinyBlock = 1e-30f;

static void quantize_block_q4_0_mse(const float* x, const float* w, uint8_t* q, uint16_t* d_out) {
    quantize_block_q4_0(x, q, d_out);
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < kBlock; ++i) {
        if (std::fabs(x[i]) > amax) {
            amax = std::fabs(x[i]);
            mx = x[i];
        }
    }
    if (amax < kTinyBlock) return;
    float y[kBlock], code[kBlock];
    const float dr = fp16_to_fp32(*d_out);
    for (int i = 0; i < kBlock; ++i) y[i] = dr * float(int(q[i]) - 8);
    const float err_ref = weighted_error(x, y, w);
    // The largest value goes to the -8 end, which has no +8 twin: 11 steps from mx/-6 to
    // mx/-10 (21 finer ones gain 0.05% of RMSE on SmolLM2 for twice the time). Steps past
    // mx/-8 clip the largest values; on 4 bits that pays (SmolLM2's perplexity is worse when
    // they are not tried).
    const float d = search_symmetric(x, w, -mx, 8.0f, 0.4f, 5, -8.0f, 7.0f);
    if (d == 0.0f) return;
    const uint16_t d16 = round_to_grid(x, d, -8.0f, 7.0f, code, y);
    if (weighted_error(x, y, w) < err_ref) {
        for (int i = 0; i < kBlock; ++i) q[i] = uint8_t(int(code[i]) + 8);
        *d_out = d16;
    }
}

static void quantize_block_q8_0_mse(const float* x, const float* w, int8_t* q, uint16_t* d_out) {
    quantize_block_q8_0(x, q, d_out);
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    if (amax < kTinyBlock) return;
    float y[kBlock], code[kBlock];
    const float dr = fp16_to_fp32(*d_out);
    for (int i = 0; i < kBlock; ++i) y[i] = dr * float(q[i]);
    const float err_ref = weighted_error(x, y, w);
    // 11 steps from amax/117 to amax/127, none finer: on 8 bits, clipping the largest values
    // to fit the rest better lowers the RMSE but raised SmolLM2's perplexity.
    const float d = search_symmetric(x, w, amax, 122.0f, 1.0f, 5, -127.0f, 127.0f);
    if (d == 0.0f) return;
    const uint16_t d16 = round_to_grid(x, d, -127.0f, 127.0f, code, y);
    if (weighted_error(x, y, w) < err_ref) {
        for (int i = 0; i < kBlock; ++i) q[i] = int8_t(code[i]);
        *d_out = d16;
    }
}

// Q4_1: 11 candidate steps (max - min)/(15 + k/5), k = -5..5, from the block's min; for each,
// the weighted least-squares (d, m) of the codes it gives.
static void quantize_block_q4_1_mse(const float* x, const float* w, uint8_t* q, uint16_t* d_out, uint16_t* m_out) {
    quantize_block_q4_1(x, q, d_out, m_out);
    float mn = x[0], mx = x[0];
    for (int i = 1; i < kBlock; ++i) {
        mn = std::fmin(mn, x[i]);
        mx = std::fmax(mx, x[i]);
    }
    if (mx - mn < kTinyBlock) return;
    float y[kBlock];
    const float dr = fp16_to_fp32(*d_out), mr = fp16_to_fp32(*m_out);
    for (int i = 0; i < kBlock; ++i) y[i] = dr * float(q[i]) + mr;
    const float err_ref = weighted_error(x, y, w);
    float wx[kBlock], wl[kBlock], wll[kBlock], wxl[kBlock];
    for (int i = 0; i < kBlock; ++i) wx[i] = w[i] * x[i];
    const float sw = sum32(w), swx = sum32(wx);
    float best_d = 0.0f, best_m = 0.0f, best_gain = -INFINITY;
    for (int k = -5; k <= 5; ++k) {
        const float iscale = (15.0f + 0.2f * float(k)) / (mx - mn);
        for (int i = 0; i < kBlock; ++i) {
            const float l = clampf(round_near((x[i] - mn) * iscale), 0.0f, 15.0f);
            wl[i] = w[i] * l;
            wll[i] = w[i] * l * l;
            wxl[i] = wx[i] * l;
        }
        const float l1 = sum32(wl), l2 = sum32(wll), xl = sum32(wxl);
        const float det = sw * l2 - l1 * l1;
        if (!(det > 0.0f)) continue;
        const float d = (sw * xl - swx * l1) / det;
        const float m = (l2 * swx - l1 * xl) / det;
        // At the least-squares (d, m) the error is sum w x^2 - (d xl + m swx): the larger
        // the gain, the smaller the error.
        const float gain = d * xl + m * swx;
        if (gain > best_gain) {
            best_gain = gain;
            best_d = d;
            best_m = m;
        }
    }
    if (!(best_d > 0.0f)) return;
    const uint16_t d16 = fp32_to_fp16(best_d), m16 = fp32_to_fp16(best_m);
    const float df = fp16_to_fp32(d16), mf = fp16_to_fp32(m16);
    const float id = df != 0.0f ? 1.0f / df : 0.0f;
    uint8_t code[kBlock];
    for (int i = 0; i < kBlock; ++i) {
        const float l = clampf(round_near((x[i] - mf) * id), 0.0f, 15.0f);
        code[i] = uint8_t(l);
        y[i] = df * l + mf;
    }
    if (weighted_error(x, y, w) < err_ref) {
        std::memcpy(q, code, kBlock);
        *d_out = d16;
        *m_out = m16;
    }
}

void quantize_tiles(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* quants,
                    uint16_t* scales, int32_t method) {
    const int64_t nb = cols / kBlock;
    const int64_t tiles = n_tiles(n_rows);
    const int64_t qbytes = tile_block_quant_bytes(dtype);
    const int64_t sstride = tile_block_scale_bytes(dtype) / 2;
    const bool mse = method == kQuantMse;
    std::memset(quants, 0, size_t(tiles * nb * qbytes));
    const float zeros[kBlock] = {};
    float w[kBlock];
    for (int64_t t = 0; t < tiles; ++t) {
        for (int r = 0; r < kTileRows; ++r) {
            const int64_t row = t * kTileRows + r;
            const float* xr = row < n_rows ? src + row * cols : nullptr;
            float rms = 0.0f;
            if (mse && xr) {
                double s2 = 0.0;
                for (int64_t c = 0; c < cols; ++c) s2 += double(xr[c]) * xr[c];
                rms = float(std::sqrt(s2 / double(cols)));
            }
            for (int64_t b = 0; b < nb; ++b) {
                const float* x = xr ? xr + b * kBlock : zeros;
                uint8_t* tb = quants + (t * nb + b) * qbytes;
                uint16_t* d = scales + (t * nb + b) * sstride + r;
                if (mse) block_weights(x, rms, w);
                if (dtype == kQ4_0 || dtype == kQ4_1) {
                    uint8_t q[kBlock];
                    if (dtype == kQ4_0) {
                        mse ? quantize_block_q4_0_mse(x, w, q, d) : quantize_block_q4_0(x, q, d);
                    } else {
                        mse ? quantize_block_q4_1_mse(x, w, q, d, d + kTileRows)
                            : quantize_block_q4_1(x, q, d, d + kTileRows);
                    }
                    for (int c = 0; c < kBlock; ++c) {
                        const int hi = c >= 16, cc = c - 16 * hi;
                        uint8_t& byte = tb[(cc / 4) * 64 + r * 4 + cc % 4];
                        byte |= hi ? uint8_t(q[c] << 4) : q[c];
                    }
                } else {
                    int8_t q[kBlock];
                    mse ? quantize_block_q8_0_mse(x, w, q, d) : quantize_block_q8_0(x, q, d);
                    for (int c = 0; c < kBlock; ++c) tb[(c / 4) * 64 + r * 4 + c % 4] = uint8_t(q[c]);
                }
            }
        }
    }
}

void dequantize_row(const Matrix& m, int64_t row, float* out) {
    if (is_kquant(m.dtype)) return dequantize_row_kquant(m, row, out);
    switch (m.dtype) {
        case kF32:
            std::memcpy(out, m.data + row * m.cols * 4, size_t(m.cols) * 4);
            return;
        case kF16: {
            const uint16_t* p = reinterpret_cast<const uint16_t*>(m.data) + row * m.cols;
            for (int64_t i = 0; i < m.cols; ++i) out[i] = fp16_to_fp32(p[i]);
            return;
        }
        default: break;
    }
    const int64_t nb = m.cols / kBlock, qbytes = tile_block_quant_bytes(m.dtype);
    const int64_t sstride = tile_block_scale_bytes(m.dtype) / 2;
    const int64_t t = row / kTileRows, r = row % kTileRows;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(m.data + n_tiles(m.rows) * nb * qbytes);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tb = m.data + (t * nb + b) * qbytes;
        const uint16_t* sp = scales + (t * nb + b) * sstride;
        const float d = fp16_to_fp32(sp[r]);
        const float mn = m.dtype == kQ4_1 ? fp16_to_fp32(sp[kTileRows + r]) : 0.0f;
        for (int c = 0; c < kBlock; ++c) {
            if (m.dtype == kQ8_0) {
                out[b * kBlock + c] = d * float(int8_t(tb[(c / 4) * 64 + r * 4 + c % 4]));
                continue;
            }
            const int hi = c >= 16, cc = c - 16 * hi;
            const uint8_t byte = tb[(cc / 4) * 64 + r * 4 + cc % 4];
            const int q = hi ? byte >> 4 : byte & 0x0f;
            out[b * kBlock + c] = m.dtype == kQ4_0 ? d * float(q - 8) : d * float(q) + mn;
        }
    }
}

namespace {

void pread_all(int fd, uint8_t* dst, int64_t len, int64_t off) {
    while (len > 0) {
        const ssize_t n = ::pread(fd, dst, size_t(len), off_t(off));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) throw std::runtime_error("model file: cannot read a weight row (file truncated or removed while in use?)");
        dst += n;
        off += n;
        len -= n;
    }
}

}  // namespace

void read_row(const Matrix& m, int64_t r, float* out, std::vector<uint8_t>& scratch) {
    if (m.data) return dequantize_row(m, r, out);
    if (m.dtype == kF32 || m.dtype == kF16) {
        const int64_t es = m.dtype == kF32 ? 4 : 2, len = m.cols * es;
        scratch.resize(size_t(len));
        pread_all(m.fd, scratch.data(), len, m.file_offset + r * len);
        Matrix row = m;
        row.rows = 1;
        row.data = scratch.data();
        return dequantize_row(row, 0, out);
    }
    // A quantized row lives in its 16-row tile: the tile's quants (one contiguous run) and its
    // scales (another). Read both into a one-tile matrix of the same layout.
    int64_t nb, qb, sb;
    if (is_kquant(m.dtype)) {
        nb = m.cols / kSuperBlock, qb = k_tile_quant_bytes(m.dtype), sb = k_tile_scale_bytes(m.dtype);
    } else {
        nb = m.cols / kBlock, qb = tile_block_quant_bytes(m.dtype), sb = tile_block_scale_bytes(m.dtype);
    }
    const int64_t t = r / kTileRows, tiles = n_tiles(m.rows);
    scratch.resize(size_t(nb * (qb + sb)));
    pread_all(m.fd, scratch.data(), nb * qb, m.file_offset + t * nb * qb);
    pread_all(m.fd, scratch.data() + nb * qb, nb * sb, m.file_offset + tiles * nb * qb + t * nb * sb);
    Matrix tile = m;
    tile.rows = kTileRows;
    tile.data = scratch.data();
    dequantize_row(tile, r % kTileRows, out);
}

}  // namespace llamacpu
