// The kernel table: every hot loop of the decoder, once per instruction set.
//
// kernels_scalar.cpp is the reference for all of them; each SIMD translation unit
// (kernels_avx2.cpp, kernels_avx512.cpp, kernels_neon.cpp) is compiled with its own target
// flags and fills the same table. cpu.cpp picks one table at run time, so a build never
// executes an instruction its CPU lacks. Kernels work on a range of rows or tiles; the
// backend (ops.cpp) splits work across threads and never relies on how a kernel sums
// internally, except that each output element is computed by one kernel call alone, so
// results do not depend on the thread count or the batch size.
#pragma once

#include <cstdint>
#include <type_traits>

#include "quants.h"

namespace llamacpu {

// Query heads that the SIMD attention kernels take through the keys and values together (one
// load of each key or value vector serves all of them), and so the scores they keep at once.
constexpr int64_t kAttentionHeadGroup = 4;

// Calls group(g, r) over n_rep query heads in groups of kAttentionHeadGroup, then 2, then 1:
// g an std::integral_constant holding the group's size, r its first head.
template <class Group>
inline void for_attention_head_groups(int64_t n_rep, Group&& group) {
    static_assert(kAttentionHeadGroup == 4, "the groups below");
    int64_t r = 0;
    for (; r + 4 <= n_rep; r += 4) group(std::integral_constant<int, 4>{}, r);
    for (; r + 2 <= n_rep; r += 2) group(std::integral_constant<int, 2>{}, r);
    for (; r < n_rep; ++r) group(std::integral_constant<int, 1>{}, r);
}

struct KernelTable {
    const char* name;

    // out[t*ldo + n] (+)= sum_k W[n,k] * x[t,k] for the rows of tiles [tile0, tile1) that are
    // < n_rows, for every token t < a.T. W is a Q4_0 / Q8_0 / Q4_1 tiled matrix (quants.h).
    // Per row and token: acc += float(int dot) * (d_w * d_a) per block, in block order, with
    // one fused multiply-add (and for Q4_1 a second: acc += m_w * (float(sum a) * d_a)).
    void (*matmul_q4_0)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate);
    void (*matmul_q8_0)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate);
    void (*matmul_q4_1)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate);

    // The same for plain row-major F16 / F32 matrices, rows [row0, row1), float activations
    // x[t*ldx + k] for t < n_tok.
    void (*matmul_f16)(const uint16_t* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                       int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate);
    void (*matmul_f32)(const float* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                       int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate);

    // One row of activations to int8 blocks of 32 (k % group == 0): per group of `group`
    // columns (32, or kSuperBlock for the K-quant matmuls) d = max|x|/127 and q = round(x/d);
    // per block of 32, d (the group's, repeated) and s = sum of q.
    void (*quantize_row_q8)(const float* x, int64_t k, int64_t group, int8_t* q, float* d, int32_t* s);

    // out = x / sqrt(mean(x^2) + eps) * w, one row.
    void (*rmsnorm)(const float* x, const float* w, int64_t n, float eps, float* out);

    // Rotates interleaved pairs (x[2i], x[2i+1]) of each of n_heads heads of size hd, in place:
    // x' = x * cos2 + swap_pairs(x) * sin2, with cos2 = [c0,c0,c1,c1,...] and
    // sin2 = [-s0,s0,-s1,s1,...] for this position (hd floats each).
    void (*rope)(float* x, int64_t n_heads, int64_t hd, const float* cos2, const float* sin2);

    // out = silu(gate) * up.
    void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);

    // In-place softmax of x[0..n).
    void (*softmax)(float* x, int64_t n);

    // Attention of n_rep query heads (q: n_rep*hd floats) that share one key/value head over
    // positions [0, n_pos): keys and values are rows of hd elements, f32 (kv_f16 = false) or
    // f16. scores: scratch of at least kAttentionHeadGroup * n_pos floats. out: n_rep*hd floats.
    void (*attention)(const float* q, const void* k, const void* v, bool kv_f16, int64_t n_pos,
                      int64_t hd, int64_t n_rep, float scale, float* scores, float* out);

    // Conversions used for the KV cache and embeddings.
    void (*f16_to_f32)(const uint16_t* x, float* y, int64_t n);
    void (*f32_to_f16)(const float* x, uint16_t* y, int64_t n);

    // Q4_K / Q6_K tiled matrices (kquants.h), the contract of matmul_q4_0 with activations
    // quantized per super-block (quantize_row_q8 with group kSuperBlock); the kernels live in
    // kquants_*.cpp and compute the per-row arithmetic kquants.h defines.
    void (*matmul_q4_k)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate);
    void (*matmul_q6_k)(const uint8_t* w, int64_t n_rows, int64_t k, int64_t tile0, int64_t tile1,
                        const ActQ8& a, float* out, int64_t ldo, bool accumulate);

    // One token's row of ActQ8::g from its quantized activations (nb blocks of 32); nullptr
    // where matmul_q6_k does not read ActQ8::g, and the backend then leaves it unset.
    void (*q6k_offsets)(const int8_t* q, int64_t nb, int32_t* g);
};

extern const KernelTable kScalarKernels;
#if defined(LLAMACPU_HAVE_AVX2)
extern const KernelTable kAvx2Kernels;
#endif
#if defined(LLAMACPU_HAVE_AVX512)
extern const KernelTable kAvx512Kernels;
#endif
#if defined(LLAMACPU_HAVE_NEON)
extern const KernelTable kNeonKernels;
#endif
#if defined(LLAMACPU_HAVE_AVX512_EMU)
extern const KernelTable kAvx512EmuKernels;
#endif
#if defined(LLAMACPU_HAVE_NEON_EMU)
extern const KernelTable kNeonEmuKernels;
#endif

}  // namespace llamacpu
