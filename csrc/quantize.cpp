// Weight quantization into the tile layouts (run by the converter) and row dequantization
// (embedding lookups, tests). Plain scalar code: it runs once per model, not per token.
#include "quantize.h"

#include <cmath>
#include <cstring>

namespace llamacpu {

// Q4_0 as llama.cpp's reference quantizer defines it: the scale maps the value of largest
// magnitude to -8, so that end of the range is used exactly.
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

// Q4_1 as llama.cpp's reference quantizer defines it: 16 steps from the block's min to max.
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

void quantize_tiles(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* quants,
                    uint16_t* scales) {
    const int64_t nb = cols / kBlock;
    const int64_t tiles = n_tiles(n_rows);
    const int64_t qbytes = tile_block_quant_bytes(dtype);
    const int64_t sstride = tile_block_scale_bytes(dtype) / 2;
    std::memset(quants, 0, size_t(tiles * nb * qbytes));
    const float zeros[kBlock] = {};
    for (int64_t t = 0; t < tiles; ++t) {
        for (int r = 0; r < kTileRows; ++r) {
            const int64_t row = t * kTileRows + r;
            for (int64_t b = 0; b < nb; ++b) {
                const float* x = row < n_rows ? src + row * cols + b * kBlock : zeros;
                uint8_t* tb = quants + (t * nb + b) * qbytes;
                uint16_t* d = scales + (t * nb + b) * sstride + r;
                if (dtype == kQ4_0 || dtype == kQ4_1) {
                    uint8_t q[kBlock];
                    if (dtype == kQ4_0) {
                        quantize_block_q4_0(x, q, d);
                    } else {
                        quantize_block_q4_1(x, q, d, d + kTileRows);
                    }
                    for (int c = 0; c < kBlock; ++c) {
                        const int hi = c >= 16, cc = c - 16 * hi;
                        uint8_t& byte = tb[(cc / 4) * 64 + r * 4 + cc % 4];
                        byte |= hi ? uint8_t(q[c] << 4) : q[c];
                    }
                } else {
                    int8_t q[kBlock];
                    quantize_block_q8_0(x, q, d);
                    for (int c = 0; c < kBlock; ++c) tb[(c / 4) * 64 + r * 4 + c % 4] = uint8_t(q[c]);
                }
            }
        }
    }
}

void dequantize_row(const Matrix& m, int64_t row, float* out) {
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

}  // namespace llamacpu
