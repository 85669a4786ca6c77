// Helpers shared by the x86 SIMD translation units. Every function here is `static inline`
// and the file is included inside each unit's own namespace, so a helper compiled with
// AVX-512 flags can never be linked into the AVX2 or scalar path.
//
// Expects <immintrin.h> (or SIMDe's emulation of it) to be included already.

// Keeps v a running register through a chain of integer adds. Left alone, GCC reassociates
// the adds into a tree over all the products, computes the products first and spills them:
// that cost the single-token Q6_K 6-13% and Q8_0 7-8% of their reading speed from memory on
// one AVX2 core, and made the 4-bit nibble sums spill too.
static inline void running_sum(__m256i& v) { __asm__("" : "+x"(v)); }
static inline void running_sum(__m256i& a, __m256i& b) { __asm__("" : "+x"(a), "+x"(b)); }

// Keeps v in a register for its uses instead of letting GCC fold its load into each of them as
// a memory operand. SIMDe's emulated vectors are not registers, so there it does nothing.
static inline void keep_in_register(__m256& v) {
#if defined(LLAMACPU_SIMDE)
    (void)v;
#else
    __asm__("" : "+x"(v));
#endif
}

static inline __m256i bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// int16 sums of the 16 nibble-by-activation products of one 4-bit tile block (16 rows x 32
// columns, the Q4_0 / Q4_1 / Q4_K layout: 4 vectors of 64 bytes, rows 0-7 in the first 32 bytes
// of each, low nibbles for columns 4v+j, high for 16+4v+j), for NTL tiles' blocks at q[u]:
// lane pairs of s[u][0] are rows 0-7, of s[u][1] rows 8-15. Each 4-byte activation group is
// broadcast once for all 16 * NTL rows, and the working set stays in registers, so the loops
// around it spill nothing.
template <int NTL>
static inline void q4_tiles_nibble_sums(const uint8_t* const* q, const int8_t* x, __m256i (*s)[2]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int u = 0; u < NTL; ++u) s[u][0] = s[u][1] = _mm256_setzero_si256();
    for (int v = 0; v < 4; ++v) {
        const __m256i xl = bcast4(x + 4 * v), xh = bcast4(x + 16 + 4 * v);
        for (int u = 0; u < NTL; ++u) {
            for (int h = 0; h < 2; ++h) {
                const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[u] + v * 64 + 32 * h));
                s[u][h] = _mm256_add_epi16(s[u][h], _mm256_maddubs_epi16(_mm256_and_si256(r, m4), xl));
                s[u][h] = _mm256_add_epi16(s[u][h], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(r, 4), m4), xh));
            }
            running_sum(s[u][0], s[u][1]);
        }
    }
}

// The same sums for one half (8 rows) of a 4-bit tile block and NT tokens: q is the half's
// first 32 bytes (vector v at q + 64 v), x[i] token i's 32 activations; s[i]'s lane pairs are
// rows 0-7 against token i. Each weight vector is unpacked once for all NT tokens (the batched
// paths of Q4_0 / Q4_1 / Q4_K), and each sum is a running register.
template <int NT>
static inline void q4_half_nibble_sums(const uint8_t* q, const int8_t* const* x, __m256i* s) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int i = 0; i < NT; ++i) s[i] = _mm256_setzero_si256();
    for (int v = 0; v < 4; ++v) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + v * 64));
        const __m256i lo = _mm256_and_si256(raw, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        for (int i = 0; i < NT; ++i) {
            s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(lo, bcast4(x[i] + 4 * v)));
            s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(hi, bcast4(x[i] + 16 + 4 * v)));
            running_sum(s[i]);
        }
    }
}

// Sum of the 8 lanes, in a fixed order.
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

// Lane i of the result is the sum of the lanes of v[i].
static inline __m256 hsum256x8(const __m256* v) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]);
    const __m256 t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]);
    const __m256 t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1);
    const __m256 u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x, Cephes-style range reduction and polynomial; within 2 ulp of expf over the range
// that softmax and SiLU use (inputs below -87 give 0 or a subnormal).
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    fx = _mm256_floor_ps(fx);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, z, x);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i n = _mm256_cvttps_epi32(fx);
    n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

static inline float exp_scalar(float x) {
    return _mm256_cvtss_f32(exp256(_mm256_set1_ps(x)));
}

// x' = x * cos2 + swap_pairs(x) * sin2 (see KernelTable::rope).
static inline void rope_avx2(float* x, int64_t n_heads, int64_t hd, const float* cos2, const float* sin2) {
    for (int64_t h = 0; h < n_heads; ++h) {
        float* xh = x + h * hd;
        int64_t i = 0;
        for (; i + 8 <= hd; i += 8) {
            const __m256 v = _mm256_loadu_ps(xh + i);
            const __m256 sw = _mm256_permute_ps(v, 0xB1);
            const __m256 r = _mm256_fmadd_ps(sw, _mm256_loadu_ps(sin2 + i), _mm256_mul_ps(v, _mm256_loadu_ps(cos2 + i)));
            _mm256_storeu_ps(xh + i, r);
        }
        for (; i < hd; i += 2) {
            const float x0 = xh[i], x1 = xh[i + 1];
            xh[i] = x0 * cos2[i] + x1 * sin2[i];
            xh[i + 1] = x1 * cos2[i + 1] + x0 * sin2[i + 1];
        }
    }
}

static inline void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp256(_mm256_sub_ps(zero, g));
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; ++i) out[i] = gate[i] / (1.0f + exp_scalar(-gate[i])) * up[i];
}

static inline void softmax_avx2(float* x, int64_t n) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float mx = _mm_cvtss_f32(m4);
    for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum256(vsum);
    for (; i < n; ++i) {
        x[i] = exp_scalar(x[i] - mx);
        sum += x[i];
    }
    const float inv = 1.0f / sum;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
    for (; i < n; ++i) x[i] *= inv;
}

static inline __m256 load8_kv(const void* p, bool f16, int64_t i) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

static inline float load1_kv(const void* p, bool f16, int64_t i) {
    return f16 ? fp16_to_fp32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

static inline float dot_kv(const float* q, const void* k, bool f16, int64_t base, int64_t hd) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_kv(k, f16, base + i), acc);
    float s = hsum256(acc);
    for (; i < hd; ++i) s += q[i] * load1_kv(k, f16, base + i);
    return s;
}

// Scores of G query heads (q: G rows of hd floats) against every position, head g's in
// sc[g * n_pos ..]. Each key vector is loaded (and converted from f16) once for all G heads,
// so the keys leave L2 once per group rather than once per head. Positions in whole blocks of
// 8 are reduced with hsum256x8, P = 8 / G of them for each of the G heads per call, the rest one
// by one (dot_kv): each lane of hsum256x8 reduces its own vector by the same tree whatever the
// other seven hold, so a head's scores never depend on G.
template <int G>
static inline void attention_scores_avx2(const float* q, const void* k, bool f16, int64_t n_pos, int64_t hd, float scale,
                                         float* sc) {
    constexpr int P = 8 / G;
    const int64_t n8 = n_pos & ~int64_t(7);
    for (int64_t j = 0; j < n8; j += P) {
        __m256 acc[8];
        for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
            __m256 kv[P];
            for (int p = 0; p < P; ++p) kv[p] = load8_kv(k, f16, (j + p) * hd + i);
            for (int g = 0; g < G; ++g) {
                // One load per query vector: left alone, GCC folds it into each of the P
                // multiply-adds as a memory operand (for groups of 4, ten loads per eight
                // multiply-adds instead of six).
                __m256 qv = _mm256_loadu_ps(q + g * hd + i);
                keep_in_register(qv);
                for (int p = 0; p < P; ++p) acc[g * P + p] = _mm256_fmadd_ps(qv, kv[p], acc[g * P + p]);
            }
        }
        alignas(32) float s[8];  // lane g * P + p: head g, position j + p
        _mm256_store_ps(s, _mm256_mul_ps(hsum256x8(acc), _mm256_set1_ps(scale)));
        for (int g = 0; g < G; ++g)
            for (int p = 0; p < P; ++p) sc[g * n_pos + j + p] = s[g * P + p];
    }
    for (int g = 0; g < G; ++g)
        for (int64_t j = n8; j < n_pos; ++j) sc[g * n_pos + j] = dot_kv(q + g * hd, k, f16, j * hd, hd) * scale;
}

// Accumulator registers of the values pass: 8 of AVX2's 16, 16 of AVX-512's 32 (the AVX-512
// table compiles this file with its flags, so the same loops get the extra registers).
#ifdef __AVX512F__
constexpr int kValueAccs = 16;
#else
constexpr int kValueAccs = 8;
#endif

// Columns [c0, c0 + 8 C) of out[g][c] = sum_j p[g][j] * v[j][c] for G heads, positions in
// order; each value vector is loaded once for all G heads.
template <int G, int C>
static inline void attention_values_block(const float* sc, const void* v, bool f16, int64_t n_pos, int64_t hd,
                                          int64_t c0, float* out) {
    __m256 acc[G * C];
    for (int a = 0; a < G * C; ++a) acc[a] = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < n_pos; ++jj) {
        __m256 vv[C];
        for (int c = 0; c < C; ++c) vv[c] = load8_kv(v, f16, jj * hd + c0 + 8 * c);
        for (int g = 0; g < G; ++g) {
            const __m256 p = _mm256_set1_ps(sc[g * n_pos + jj]);
            for (int c = 0; c < C; ++c) acc[g * C + c] = _mm256_fmadd_ps(p, vv[c], acc[g * C + c]);
        }
    }
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + g * hd + c0 + 8 * c, acc[g * C + c]);
}

// All hd columns (a multiple of 8) in blocks of C vectors, then C / 2, ... 1. Every output lane
// sees the same multiply-adds in the same order whatever the blocking, so the bits do not
// depend on G or on the register count.
template <int G, int C = kValueAccs / G>
static inline void attention_values_avx2(const float* sc, const void* v, bool f16, int64_t n_pos, int64_t hd,
                                         float* out, int64_t c0 = 0) {
    for (; c0 + 8 * C <= hd; c0 += 8 * C) attention_values_block<G, C>(sc, v, f16, n_pos, hd, c0, out);
    if constexpr (C > 1) attention_values_avx2<G, C / 2>(sc, v, f16, n_pos, hd, out, c0);
}

template <int G>
static inline void attention_group_avx2(const float* q, const void* k, const void* v, bool f16, int64_t n_pos,
                                        int64_t hd, float scale, float* scores, float* out) {
    attention_scores_avx2<G>(q, k, f16, n_pos, hd, scale, scores);
    for (int g = 0; g < G; ++g) softmax_avx2(scores + g * n_pos, n_pos);
    attention_values_avx2<G>(scores, v, f16, n_pos, hd, out);
}

// See KernelTable::attention. When hd is a multiple of 8 the heads go through the keys and
// values in groups of kAttentionHeadGroup (then 2, then 1), each key and value vector loaded
// once per group. One head at a time re-read a long cache from L2 for every head, and the
// reading bounded the kernel: with f32 keys and values, twice the bytes, a call took 40%
// longer than with f16. Groups of 8 would need more loads than multiply-adds. Per head, every
// score and output lane sees the same operations in the same order whatever the group, so a
// result never depends on n_rep.
static inline void attention_avx2(const float* q, const void* k, const void* v, bool kv_f16, int64_t n_pos,
                                  int64_t hd, int64_t n_rep, float scale, float* scores, float* out) {
    if (hd % 8 == 0) {
        for_attention_head_groups(n_rep, [&](auto g, int64_t r) {
            attention_group_avx2<decltype(g)::value>(q + r * hd, k, v, kv_f16, n_pos, hd, scale, scores, out + r * hd);
        });
        return;
    }
    const int64_t hd8 = hd & ~int64_t(7);
    for (int64_t r = 0; r < n_rep; ++r) {
        const float* qr = q + r * hd;
        for (int64_t j = 0; j < n_pos; ++j) scores[j] = dot_kv(qr, k, kv_f16, j * hd, hd) * scale;
        softmax_avx2(scores, n_pos);
        float* o = out + r * hd;
        for (int64_t c0 = 0; c0 < hd8; c0 += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t jj = 0; jj < n_pos; ++jj)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[jj]), load8_kv(v, kv_f16, jj * hd + c0), acc);
            _mm256_storeu_ps(o + c0, acc);
        }
        for (int64_t i = hd8; i < hd; ++i) {
            float acc = 0.0f;
            for (int64_t jj = 0; jj < n_pos; ++jj) acc += scores[jj] * load1_kv(v, kv_f16, jj * hd + i);
            o[i] = acc;
        }
    }
}

static inline void rmsnorm_avx2(const float* x, const float* w, int64_t n, float eps, float* out) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum256(acc);
    for (; i < n; ++i) ss += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(ss / float(n) + eps);
    const __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
    for (; i < n; ++i) out[i] = x[i] * scale * w[i];
}

// Activation quantization, bit-identical to the scalar reference: same amax, same scale,
// same product, and cvtps rounds half to even like nearbyint.
static inline void quantize_row_q8_avx2(const float* x, int64_t k, int64_t group, int8_t* q, float* d, int32_t* s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    float db = 0.0f, id = 0.0f;  // the current group's scale and its inverse
    for (int64_t b = 0; b < k / kBlock; ++b) {
        const float* xb = x + b * kBlock;
        if (b * kBlock % group == 0) {
            // max is exact, so any order of the lanes gives the scalar path's amax.
            __m256 m = _mm256_setzero_ps();
            for (int64_t i = 0; i < group; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            db = amax / 127.0f;
            id = act_inv_scale(amax);
        }
        d[b] = db;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i i32[4];
        for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), vid));
        const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        s[b] = _mm_cvtsi128_si32(s4);
        // packs interleave 128-bit lanes; the permute restores column order.
        const __m256i p16a = _mm256_packs_epi32(i32[0], i32[1]);
        const __m256i p16b = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), p8);
    }
}

static inline void f16_to_f32_avx2(const uint16_t* x, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
    for (; i < n; ++i) y[i] = fp16_to_fp32(x[i]);
}

static inline void f32_to_f16_avx2(const float* x, uint16_t* y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

// ---- float matmuls (F16 / F32 weights, f32 activations) ---------------------------------

template <typename W>
static inline __m256 load8_w(const W* p) {
    if constexpr (sizeof(W) == 2) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

template <typename W>
static inline float load1_w(const W* p) {
    if constexpr (sizeof(W) == 2) return fp16_to_fp32(*p);
    else return *p;
}

// NR rows x NT tokens; each (row, token) is one 8-lane accumulator over k in order, then a
// fixed-order horizontal sum, then the k % 8 tail: the same arithmetic whatever NR and NT.
template <typename W, int NR, int NT>
static inline void matmul_float_block(const W* w, int64_t k, int64_t n0, const float* x, int64_t ldx,
                                      int64_t t0, float* out, int64_t ldo, bool accumulate) {
    __m256 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
    const int64_t k8 = k & ~int64_t(7);
    for (int64_t i = 0; i < k8; i += 8) {
        __m256 xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x + (t0 + t) * ldx + i);
        for (int r = 0; r < NR; ++r) {
            const __m256 wv = load8_w(w + (n0 + r) * k + i);
            for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < NR; ++r) {
        for (int t = 0; t < NT; ++t) {
            float s = hsum256(acc[r][t]);
            const W* wr = w + (n0 + r) * k;
            const float* xr = x + (t0 + t) * ldx;
            for (int64_t i = k8; i < k; ++i) s += load1_w(wr + i) * xr[i];
            float* o = out + (t0 + t) * ldo + n0 + r;
            *o = accumulate ? *o + s : s;
        }
    }
}

template <typename W>
static inline void matmul_float_avx2(const W* w, int64_t k, int64_t row0, int64_t row1, const float* x,
                                     int64_t ldx, int64_t n_tok, float* out, int64_t ldo, bool accumulate) {
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

// Stores the 8 row results of one tile half for one token, skipping padding rows.
static inline void store_rows8(float* o, __m256 v, int64_t valid, bool accumulate) {
    if (valid >= 8) {
        if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(o));
        _mm256_storeu_ps(o, v);
        return;
    }
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int64_t i = 0; i < valid; ++i) o[i] = accumulate ? o[i] + tmp[i] : tmp[i];
}
