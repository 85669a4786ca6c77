// Scalar reference kernels: plain C++, the definition every SIMD path is tested against,
// and the path taken on a CPU with none of the SIMD extensions. Written for clarity.
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "kquants.h"

namespace llamacpu {
namespace scalar {

static inline int q4_at(const uint8_t* tb, int r, int col) {
    // tb: one Q4_0 tile-block (256 bytes); see quants.h for the layout.
    const int hi = col >= 16;
    const int c = col - 16 * hi;
    const uint8_t byte = tb[(c / 4) * 64 + r * 4 + (c % 4)];
    return hi ? (byte >> 4) : (byte & 0x0f);
}

static inline int q8_at(const uint8_t* tb, int r, int col) {
    return int8_t(tb[(col / 4) * 64 + r * 4 + (col % 4)]);
}

template <int kType>
static void matmul_q(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                     const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    const int64_t nb = k / kBlock;
    const int64_t ntiles = n_tiles(n_rows);
    const int64_t qbytes = tile_block_quant_bytes(kType);
    const int64_t sstride = tile_block_scale_bytes(kType) / 2;  // fp16 values per tile-block
    const uint8_t* quants = w;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(w + ntiles * nb * qbytes);
    for (int64_t t = tile0; t < tile1; ++t) {
        for (int r = 0; r < kTileRows; ++r) {
            const int64_t n = t * kTileRows + r;
            if (n >= n_rows) break;
            for (int64_t tok = 0; tok < a.T; ++tok) {
                const int8_t* aq = a.q + tok * a.ldq;
                float acc = 0.0f;
                for (int64_t b = 0; b < nb; ++b) {
                    const uint8_t* tb = quants + (t * nb + b) * qbytes;
                    int32_t dot = 0;
                    for (int col = 0; col < kBlock; ++col) {
                        const int q = kType == kQ8_0 ? q8_at(tb, r, col) : q4_at(tb, r, col);
                        dot += q * aq[b * kBlock + col];
                    }
                    if (kType == kQ4_0) dot -= 8 * a.s[tok * a.nb + b];
                    const uint16_t* sp = scales + (t * nb + b) * sstride;
                    const float da = a.d[tok * a.nb + b];
                    acc += float(dot) * (fp16_to_fp32(sp[r]) * da);
                    if (kType == kQ4_1) acc += fp16_to_fp32(sp[kTileRows + r]) * (float(a.s[tok * a.nb + b]) * da);
                }
                float* o = out + tok * ldo + n;
                *o = accumulate ? *o + acc : acc;
            }
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

template <typename W>
static void matmul_float(const W* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                         int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    for (int64_t n = row0; n < row1; ++n) {
        const W* wr = w + n * k;
        for (int64_t t = 0; t < n_tok; ++t) {
            const float* xr = x + t * ldx;
            float acc = 0.0f;
            for (int64_t i = 0; i < k; ++i) {
                float wi;
                if constexpr (sizeof(W) == 2) wi = fp16_to_fp32(wr[i]); else wi = wr[i];
                acc += wi * xr[i];
            }
            float* o = out + t * ldo + n;
            *o = accumulate ? *o + acc : acc;
        }
    }
}

static void matmul_f16(const uint16_t* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                       int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    matmul_float(w, k, row0, row1, x, ldx, n_tok, out, ldo, accumulate);
}

static void matmul_f32(const float* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                       int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
    matmul_float(w, k, row0, row1, x, ldx, n_tok, out, ldo, accumulate);
}

static void quantize_row_q8(const float* x, int64_t k, int64_t group, int8_t* q, float* d, int32_t* s) {
    float db = 0.0f, id = 0.0f;  // the current group's scale and its inverse
    for (int64_t b = 0; b < k / kBlock; ++b) {
        const float* xb = x + b * kBlock;
        if (b * kBlock % group == 0) {
            float amax = 0.0f;
            for (int64_t i = 0; i < group; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
            db = amax / 127.0f;
            id = act_inv_scale(amax);
        }
        int32_t sum = 0;
        for (int i = 0; i < kBlock; ++i) {
            // nearbyint: round half to even, as the SIMD conversions do. NaN or Inf in the
            // activations (a damaged model) gives -128 as on x86 SIMD, without the undefined
            // float-to-int conversion.
            const float r = std::nearbyint(xb[i] * id);
            const int v = r >= -128.0f && r <= 127.0f ? int(r) : -128;
            q[b * kBlock + i] = int8_t(v);
            sum += v;
        }
        d[b] = db;
        s[b] = sum;
    }
}

static void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(ss / float(n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

static void rope(float* x, int64_t n_heads, int64_t hd, const float* cos2, const float* sin2) {
    for (int64_t h = 0; h < n_heads; ++h) {
        float* xh = x + h * hd;
        for (int64_t i = 0; i < hd; i += 2) {
            const float x0 = xh[i], x1 = xh[i + 1];
            xh[i] = x0 * cos2[i] + x1 * sin2[i];
            xh[i + 1] = x1 * cos2[i + 1] + x0 * sin2[i + 1];
        }
    }
}

static void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

static void softmax(float* x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) mx = std::fmax(mx, x[i]);
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - mx);
        sum += x[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

static inline float kv_at(const void* p, bool f16, int64_t i) {
    return f16 ? fp16_to_fp32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

static void attention(const float* q, const void* k, const void* v, bool kv_f16, int64_t n_pos,
                      int64_t hd, int64_t n_rep, float scale, float* scores, float* out) {
    for (int64_t r = 0; r < n_rep; ++r) {
        const float* qr = q + r * hd;
        for (int64_t j = 0; j < n_pos; ++j) {
            float dot = 0.0f;
            for (int64_t i = 0; i < hd; ++i) dot += qr[i] * kv_at(k, kv_f16, j * hd + i);
            scores[j] = dot * scale;
        }
        softmax(scores, n_pos);
        float* o = out + r * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] = 0.0f;
        for (int64_t j = 0; j < n_pos; ++j)
            for (int64_t i = 0; i < hd; ++i) o[i] += scores[j] * kv_at(v, kv_f16, j * hd + i);
    }
}

static void f16_to_f32(const uint16_t* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(x[i]);
}

static void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

}  // namespace scalar

const KernelTable kScalarKernels = {
    "scalar",
    scalar::matmul_q4_0,
    scalar::matmul_q8_0,
    scalar::matmul_q4_1,
    scalar::matmul_f16,
    scalar::matmul_f32,
    scalar::quantize_row_q8,
    scalar::rmsnorm,
    scalar::rope,
    scalar::silu_mul,
    scalar::softmax,
    scalar::attention,
    scalar::f16_to_f32,
    scalar::f32_to_f16,
    kq_scalar_matmul_q4_k,
    kq_scalar_matmul_q6_k,
    nullptr,  // matmul_q6_k does not read ActQ8::g; kq_scalar_q6k_offsets is the reference of the tables that do
};

}  // namespace llamacpu
