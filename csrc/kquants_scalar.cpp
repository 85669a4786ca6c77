// Scalar reference kernels for the K-quants: the per-row arithmetic of kquants.h written out
// plainly (products and sums rounded separately), the definition the SIMD paths are tested
// against and the path of a CPU without SIMD.
#include <cstring>

#include "kernels.h"
#include "kquants.h"

namespace llamacpu {
namespace kq_scalar_impl {

struct Tiles {
    const uint8_t* quants;
    const uint8_t* scales;
    int64_t nsb;  // super-blocks per row
};

static inline Tiles tiles_of(int32_t type, const uint8_t* w, int64_t n_rows, int64_t k) {
    const int64_t nsb = k / kSuperBlock;
    return {w, w + n_tiles(n_rows) * nsb * k_tile_quant_bytes(type), nsb};
}

static inline float fp16_at(const uint8_t* p, int i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    return fp16_to_fp32(h);
}

// Adds row r of tile-superblock (t, s) times one token's activations to acc. da: the
// super-block's activation scale (one per super-block, kquants.h).
static void q4k_superblock(const Tiles& w, int64_t t, int64_t s, int r, const ActQ8& a, int64_t tok, float& acc) {
    const uint8_t* tq = w.quants + (t * w.nsb + s) * kQ4KTileQuants;
    const uint8_t* ts = w.scales + (t * w.nsb + s) * kQ4KTileScales;
    int32_t isd = 0, ism = 0;
    for (int j = 0; j < 8; ++j) {
        const int64_t b = s * 8 + j;
        const int8_t* x = a.q + tok * a.ldq + b * kBlock;
        int32_t dot = 0;
        for (int c = 0; c < kBlock; ++c) dot += k_nibble(tq + 256 * j, r, c) * x[c];
        int sc, m;
        q4k_scale_min(ts + 64, r, j, &sc, &m);
        isd += sc * dot;
        ism += m * a.s[tok * a.nb + b];
    }
    const float da = a.d[tok * a.nb + s * 8];
    acc = acc + (fp16_at(ts, r) * da) * float(isd);
    acc = acc - (fp16_at(ts, kTileRows + r) * da) * float(ism);
}

static void q6k_superblock(const Tiles& w, int64_t t, int64_t s, int r, const ActQ8& a, int64_t tok, float& acc) {
    const uint8_t* tq = w.quants + (t * w.nsb + s) * kQ6KTileQuants;
    const uint8_t* ts = w.scales + (t * w.nsb + s) * kQ6KTileScales;
    const int8_t* sc = reinterpret_cast<const int8_t*>(ts + 32);
    int32_t isd = 0;
    for (int j = 0; j < 8; ++j) {
        const int8_t* x = a.q + tok * a.ldq + (s * 8 + j) * kBlock;
        int32_t dot[2] = {0, 0};
        for (int c = 0; c < kBlock; ++c) dot[c / 16] += (q6k_quant(tq + 384 * j, r, c) - 32) * x[c];
        isd += sc[16 * (2 * j) + r] * dot[0] + sc[16 * (2 * j + 1) + r] * dot[1];
    }
    acc = acc + (fp16_at(ts, r) * a.d[tok * a.nb + s * 8]) * float(isd);
}

template <int32_t kType>
static void matmul(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1, const ActQ8& a,
                   float* out, int64_t ldo, bool accumulate) {
    const Tiles tiles = tiles_of(kType, w, n_rows, k);
    for (int64_t t = tile0; t < tile1; ++t) {
        for (int r = 0; r < kTileRows; ++r) {
            const int64_t n = t * kTileRows + r;
            if (n >= n_rows) break;
            for (int64_t tok = 0; tok < a.T; ++tok) {
                float acc = 0.0f;
                for (int64_t s = 0; s < tiles.nsb; ++s) {
                    if (kType == kQ4_K) q4k_superblock(tiles, t, s, r, a, tok, acc);
                    else q6k_superblock(tiles, t, s, r, a, tok, acc);
                }
                float* o = out + tok * ldo + n;
                *o = accumulate ? *o + acc : acc;
            }
        }
    }
}

}  // namespace kq_scalar_impl

void kq_scalar_matmul_q4_k(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                           const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    kq_scalar_impl::matmul<kQ4_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

void kq_scalar_matmul_q6_k(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                           const ActQ8& a, float* out, int64_t ldo, bool accumulate) {
    kq_scalar_impl::matmul<kQ6_K>(w, n_rows, k, tile0, tile1, a, out, ldo, accumulate);
}

void kq_scalar_q6k_offsets(const int8_t* q, int64_t nb, int32_t* g) {
    for (int64_t b = 0; b < 2 * nb; ++b) {
        const int8_t* x = q + 16 * b;
        int32_t even = 0, odd = 0;
        for (int v = 0; v < 4; ++v) {
            even += x[4 * v] + x[4 * v + 1];
            odd += x[4 * v + 2] + x[4 * v + 3];
        }
        g[b] = int32_t(uint32_t(uint16_t(-32 * even)) | uint32_t(uint16_t(-32 * odd)) << 16);
    }
}

}  // namespace llamacpu
