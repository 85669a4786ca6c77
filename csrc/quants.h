// Weight storage formats: the one definition shared by every kernel, the quantizers and
// (through the bindings) the Python file writer. docs/FORMAT.md describes the same bytes.
//
// Quantized matrices are stored in row tiles of 16 rows so that one SIMD register holds one
// 4-byte group of each of the 16 rows: a single broadcast of 4 activation bytes then feeds
// an integer dot product for all 16 rows at once (vpdpbusd / pmaddubsw / sdot), and the
// per-row float accumulators never need a horizontal sum. The layout is fixed at convert
// time, so the runtime maps the file and uses the weights in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace llamacpu {

enum DType : int32_t {
    kF32 = 0,
    kF16 = 1,
    kQ8_0 = 2,  // 8-bit, block 32, fp16 scale per block and row, 16-row tiles
    kQ4_0 = 3,  // 4-bit, block 32, fp16 scale per block and row, 16-row tiles
    kQ4_1 = 4,  // 4-bit, block 32, fp16 scale and fp16 min per block and row, 16-row tiles
    kQ4_K = 5,  // 4-bit, super-block 256 = 8 sub-blocks of 32 with 6-bit scales and mins (GGUF Q4_K)
    kQ6_K = 6,  // 6-bit, super-block 256 = 16 groups of 16 with int8 scales (GGUF Q6_K)
};

constexpr int kBlock = 32;      // weights per quantization block (along a row)
constexpr int kTileRows = 16;   // rows per tile
constexpr int kGroup = 4;       // bytes of one row that sit together in a tile vector

// One tile-block = 16 rows x 32 columns.
//  Q4_0: 256 bytes of quants, as 4 vectors of 64 bytes. In vector v (0..3), byte r*4+j
//        (row r, j 0..3) holds column 4v+j in its low nibble and column 16+4v+j in its
//        high nibble; a nibble q stands for d*(q-8).
//  Q8_0: 512 bytes of quants, as 8 vectors of 64 bytes. In vector g (0..7), byte r*4+j is
//        the int8 of column 4g+j.
//  Q4_1: quants as Q4_0, but a nibble q stands for d*q + m.
//  Q4_0, Q8_0: 16 fp16 scales d (32 bytes), row r's at index r. Q4_1: 16 fp16 scales d, then
//        16 fp16 mins m (64 bytes). All quants of a matrix come first, tile-major then
//        block-major; all scales follow in the same order.
constexpr int kQ4TileBlockQuants = kTileRows * kBlock / 2;  // 256
constexpr int kQ8TileBlockQuants = kTileRows * kBlock;      // 512
constexpr int kTileBlockScales = kTileRows * 2;            // 32
static_assert(kQ4TileBlockQuants == 256, "Q4_0 tile-block quants");
static_assert(kQ8TileBlockQuants == 512, "Q8_0 tile-block quants");
static_assert(kTileBlockScales == 32, "tile-block scales");

// The block-32 types (one scale per 32 weights). The K types below are quantized too, with
// their own layout and helpers: see is_kquant.
inline bool is_quantized(int32_t dt) { return dt == kQ8_0 || dt == kQ4_0 || dt == kQ4_1; }

// K-quants: one tile-superblock = 16 rows x 256 columns. kquants.h has the layout.
constexpr int kSuperBlock = 256;
constexpr int64_t kQ4KTileQuants = 2048, kQ4KTileScales = 256;  // 4.5 bits per weight
constexpr int64_t kQ6KTileQuants = 3072, kQ6KTileScales = 288;  // 6.5625 bits per weight

inline bool is_kquant(int32_t dt) { return dt == kQ4_K || dt == kQ6_K; }

// Bytes of quants, and of scales, per tile-superblock of a K type.
inline int64_t k_tile_quant_bytes(int32_t dt) { return dt == kQ4_K ? kQ4KTileQuants : kQ6KTileQuants; }
inline int64_t k_tile_scale_bytes(int32_t dt) { return dt == kQ4_K ? kQ4KTileScales : kQ6KTileScales; }

inline int64_t n_tiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// Bytes of quants per tile-block for a quantized type.
inline int64_t tile_block_quant_bytes(int32_t dt) {
    return dt == kQ8_0 ? kQ8TileBlockQuants : kQ4TileBlockQuants;
}

// Bytes of scales (and mins) per tile-block.
inline int64_t tile_block_scale_bytes(int32_t dt) { return dt == kQ4_1 ? 2 * kTileBlockScales : kTileBlockScales; }

// Total bytes of a [rows, cols] matrix of type dt, or -1 when the shape is not allowed
// for that type (block-32 types need cols % 32 == 0, K types cols % 256 == 0). Callers check for overflow by
// bounding rows and cols first (both < 2^31 keeps every product below 2^63).
inline int64_t matrix_bytes(int32_t dt, int64_t rows, int64_t cols) {
    if (rows <= 0 || cols <= 0 || rows >= (int64_t(1) << 31) || cols >= (int64_t(1) << 31)) return -1;
    switch (dt) {
        case kF32: return rows * cols * 4;
        case kF16: return rows * cols * 2;
        case kQ8_0:
        case kQ4_0:
        case kQ4_1:
            if (cols % kBlock) return -1;
            return n_tiles(rows) * (cols / kBlock) * (tile_block_quant_bytes(dt) + tile_block_scale_bytes(dt));
        case kQ4_K:
        case kQ6_K:
            if (cols % kSuperBlock) return -1;
            return n_tiles(rows) * (cols / kSuperBlock) * (k_tile_quant_bytes(dt) + k_tile_scale_bytes(dt));
        default: return -1;
    }
}

// ---- fp16 <-> fp32, portable (the SIMD paths use F16C / NEON conversions) -------------

inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; --exp; }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Round to nearest even, as F16C's _mm_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT) does.
inline uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) {  // inf or nan
        return uint16_t(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    }
    if (absx >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // rounds to inf
    if (absx < 0x38800000u) {                                  // subnormal or zero in fp16
        if (absx < 0x33000000u) return uint16_t(sign);
        const uint32_t e = absx >> 23;
        const uint32_t m = (absx & 0x7fffff) | 0x800000;
        const uint32_t shift = 126 - e;  // 14..24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) ++r;
        return uint16_t(sign | r);
    }
    uint32_t r = ((absx >> 13) - (112u << 10));
    const uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
    return uint16_t(sign | r);
}

// ---- quantized activations ------------------------------------------------------------

// The activation quantizer's multiplier 127/amax, or 0 where that is not finite: amax == 0,
// or amax below ~3.7e-37 where the quotient overflows (x * inf would be inf or NaN, and its
// conversion to int differs between instruction sets). Such a block quantizes to zeros.
// Every kernel path calls this one function, so they agree bit for bit.
inline float act_inv_scale(float amax) {
    const float inv = 127.0f / amax;
    return inv <= 3.40282347e+38f ? inv : 0.0f;
}

// Activations for the quantized matmuls: each row of x quantized to int8 per 32-block with
// a float scale, plus the integer sum of each block (Q4_0 weights are stored as q = w/d + 8,
// so the kernels compute sum(q*a) and subtract 8*sum(a); Q4_1 adds m*d_a*sum(a)).
struct ActQ8 {
    const int8_t* q;   // [T][ldq]
    const float* d;    // [T][nb]
    const int32_t* s;  // [T][nb]
    int64_t ldq;
    int64_t nb;
    int64_t T;
    // Q6_K matmuls only (KernelTable::q6k_offsets): per token, for each 16-column group of the
    // row (two per block), the int16 pair that group's lanes start from in the AVX2 kernel:
    // low half -32 * sum_v (a[4v] + a[4v+1]), high half -32 * sum_v (a[4v+2] + a[4v+3]).
    // [T][2 * nb]; the backend fills it once per call, for every thread's share of tiles, on
    // the paths whose Q6_K kernel reads it (AVX2, AVX-512), and leaves it null on the others.
    const int32_t* g = nullptr;
};

}  // namespace llamacpu
