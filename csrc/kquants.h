// K-quants (Q4_K, Q6_K): the tile layouts, the per-row arithmetic every kernel path computes,
// and the entry points of the kernels and quantizers (kquants_*.cpp). docs/FORMAT.md describes
// the same bytes.
//
// The numbers stored are GGUF's Q4_K / Q6_K blocks, bit for bit, rearranged into 16-row tiles
// as the block-32 types are (quants.h), so GGUF tensors import without loss and the kernels
// keep the broadcast-activation trick. A tile-superblock is 16 rows x 256 columns; a matrix
// stores all tile-superblocks' quants (tile-major, then super-block order), then all their
// scales in the same order.
//
// Q4_K, per tile-superblock: 2048 bytes of quants + 256 bytes of scales (4.5 bits per weight).
//   quants: 8 sub-blocks of 32 columns, 256 bytes each, each in Q4_0's tile-block layout
//     (vector v of 64 bytes, byte r*4+i: column 4v+i low nibble, column 16+4v+i high nibble);
//     a nibble q of sub-block j stands for d*sc_j*q - dmin*m_j.
//   scales: [0, 32) 16 fp16 d (row r at index r); [32, 64) 16 fp16 dmin; [64, 256) GGUF's 12
//     packed scale bytes, transposed: byte 64 + 16*k + r is byte k of row r. Sub-block j < 4:
//     sc_j = B[j] & 63, m_j = B[j+4] & 63; j >= 4: sc_j = (B[j+4] & 15) | (B[j-4] >> 6) << 4,
//     m_j = (B[j+4] >> 4) | (B[j] >> 6) << 4.
// Q6_K, per tile-superblock: 3072 bytes of quants + 288 bytes of scales (6.5625 bits per weight).
//   quants: 8 sub-blocks of 32 columns, 384 bytes each: 6 vectors of 64 bytes. Vector 3t + k
//     (t = 0, 1: columns 16t..16t+15; k = 0..2), byte r*4+i: the 6-bit q of column 16t + 4k + i
//     in bits 0-5, and bits 2k, 2k+1 of the q of column 16t + 12 + i in bits 6-7 (so three
//     column groups come out with one AND, the fourth from the three top bit pairs). A q of
//     group g (16 columns: 2j low half, 2j+1 high half of sub-block j) stands for
//     d*sc_g*(q-32).
//   scales: [0, 32) 16 fp16 d; [32, 288) 16 groups x 16 rows of int8 sc: byte 32 + 16*g + r.
//
// Activations are the block-32 ActQ8 quantized with one scale per super-block
// (quantize_row_q8 with group kSuperBlock): da is the same for the 8 blocks b = 8s + j of
// super-block s, and s_b is each block's sum of quants. That lets every path sum a whole
// super-block in integers. Per row and token, for each super-block s:
//   Q4_K: isd = sum_j sc_j * dot_j,  ism = sum_j m_j * s_b         dot_j = sum q * a
//         acc = acc + (d_s * da) * float(isd);  acc = acc - (dmin_s * da) * float(ism)
//   Q6_K: isd = sum_j sc_2j * dot_2j + sc_2j+1 * dot_2j+1           dot_g = sum (q-32) * a
//         acc = acc + (d_s * da) * float(isd)
// The integer sums are exact in int32 (Q4_K: |isd| <= 8 * 63 * 32 * 15 * 127 < 2^25,
// |ism| <= 8 * 63 * 32 * 127 < 2^22; Q6_K: |isd| <= 16 * 128 * 16 * 32 * 127 < 2^28); the
// float steps are the same on every path. The SIMD paths fuse each update of acc (fma), so
// they agree bit for bit with each other; the scalar reference rounds the product first.
#pragma once

#include <cstdint>

#include "quants.h"

namespace llamacpu {

struct Matrix;  // backend.h

// ---- layout helpers (static: each translation unit gets its own copy, whatever its flags) ----

// The 6-bit scale and min of sub-block j of row r; b: the 192 transposed scale bytes of a
// Q4_K tile-superblock (its scales + 64).
static inline void q4k_scale_min(const uint8_t* b, int r, int j, int* sc, int* m) {
    auto B = [&](int k) { return int(b[16 * k + r]); };
    if (j < 4) {
        *sc = B(j) & 63;
        *m = B(j + 4) & 63;
    } else {
        *sc = (B(j + 4) & 15) | ((B(j - 4) >> 6) << 4);
        *m = (B(j + 4) >> 4) | ((B(j) >> 6) << 4);
    }
}

// The nibble of row r, column c (0..31) of a sub-block in Q4_0's tile-block layout.
static inline int k_nibble(const uint8_t* sub, int r, int c) {
    const int hi = c >= 16, cc = c - 16 * hi;
    const uint8_t byte = sub[(cc / 4) * 64 + r * 4 + cc % 4];
    return hi ? byte >> 4 : byte & 15;
}

// The 6-bit quant (0..63) of row r, column c of a Q6_K sub-block (384 bytes).
static inline int q6k_quant(const uint8_t* sub, int r, int c) {
    const int t = c / 16, k = (c % 16) / 4, i = c % 4;
    auto byte = [&](int kk) { return int(sub[(3 * t + kk) * 64 + r * 4 + i]); };
    if (k < 3) return byte(k) & 63;
    return (byte(0) >> 6) | ((byte(1) >> 6) << 2) | ((byte(2) >> 6) << 4);
}

// ---- kernels (KernelTable::matmul_q4_k / matmul_q6_k, same contract as matmul_q4_0) -----------

#define LLAMACPU_KQ_DECLARE(prefix)                                                                          \
    void prefix##_matmul_q4_k(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,    \
                              const ActQ8& a, float* out, int64_t ldo, bool accumulate);                     \
    void prefix##_matmul_q6_k(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,    \
                              const ActQ8& a, float* out, int64_t ldo, bool accumulate);

// ActQ8::g for one token (KernelTable::q6k_offsets): the plain definition, and the SIMD ones.
void kq_scalar_q6k_offsets(const int8_t* q, int64_t nb, int32_t* g);
#if defined(LLAMACPU_HAVE_AVX2)
void kq_avx2_q6k_offsets(const int8_t* q, int64_t nb, int32_t* g);
#endif
#if defined(LLAMACPU_HAVE_AVX512)
void kq_avx512_q6k_offsets(const int8_t* q, int64_t nb, int32_t* g);
#endif
#if defined(LLAMACPU_HAVE_AVX512_EMU)
void kq_avx512emu_q6k_offsets(const int8_t* q, int64_t nb, int32_t* g);
#endif

LLAMACPU_KQ_DECLARE(kq_scalar)
#if defined(LLAMACPU_HAVE_AVX2)
LLAMACPU_KQ_DECLARE(kq_avx2)
#endif
#if defined(LLAMACPU_HAVE_AVX512)
LLAMACPU_KQ_DECLARE(kq_avx512)
#endif
#if defined(LLAMACPU_HAVE_AVX512_EMU)
LLAMACPU_KQ_DECLARE(kq_avx512emu)
#endif
#if defined(LLAMACPU_HAVE_NEON)
LLAMACPU_KQ_DECLARE(kq_neon)
#endif
#if defined(LLAMACPU_HAVE_NEON_EMU)
LLAMACPU_KQ_DECLARE(kq_neonemu)
#endif
#undef LLAMACPU_KQ_DECLARE

// ---- quantization (converter side, kquants_quantize.cpp) -------------------------------------

// One super-block row as GGUF stores it: Q4_K {d, dmin, 12 packed scale bytes, 256 nibbles in
// column order}, Q6_K {d, 16 int8 scales, 256 quants 0..63 in column order}. The quantizers
// produce these; pack_k_tiles writes them into the tile layout.
struct Q4KBlock {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t q[256];
};
struct Q6KBlock {
    uint16_t d;
    int8_t scales[16];
    uint8_t q[256];
};

// How a K quantizer picks scales (method: QuantMethod of quantize.h): kQuantRef is llama.cpp's reference rule
// (quantize_row_q4_K_ref / quantize_row_q6_K_ref, byte for byte); kQuantMse searches scales,
// mins and the super-block scales for the least weighted squared error and keeps a
// super-block's result only where it beats the reference's (weights: x^2 + sigma^2, sigma^2
// twice the row's mean square, times importance[column] when importance is not null).
void quantize_row_q4_k(const float* x, int64_t cols, Q4KBlock* out, int32_t method, const float* importance);
void quantize_row_q6_k(const float* x, int64_t cols, Q6KBlock* out, int32_t method, const float* importance);

// Quantizes an n_rows x cols matrix (cols % 256 == 0) into the tile layout: dst receives
// matrix_bytes(dtype, n_rows, cols) bytes. Rows past n_rows in the last tile are zero.
void quantize_k_tiles(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* dst, int32_t method,
                      const float* importance);

// The same, as GGUF's Q4_K (144 bytes) / Q6_K (210 bytes) blocks: n_rows * cols/256 blocks.
void quantize_k_gguf(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* dst, int32_t method,
                     const float* importance);

// Row r of a K-quant matrix as floats, computed as ggml's dequantize_row_q4_K / _q6_K do.
void dequantize_row_kquant(const Matrix& m, int64_t r, float* out);

}  // namespace llamacpu
