// Stand-ins for the AVX-512 conversions SIMDe (0.7) does not provide, lane by lane with the
// same rounding, for the emulated AVX-512 builds that let the tests run these kernels on a CPU
// without AVX-512. Included inside each unit's own namespace, after SIMDe's headers.
#if defined(LLAMACPU_SIMDE)
static inline __m512 emu_cvtepi32_ps(__m512i v) {
    int32_t a[16];
    float f[16];
    _mm512_storeu_si512(a, v);
    for (int i = 0; i < 16; ++i) f[i] = float(a[i]);
    return _mm512_loadu_ps(f);
}
static inline __m512 emu_cvtph_ps(__m256i h) {
    uint16_t a[16];
    float f[16];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), h);
    for (int i = 0; i < 16; ++i) f[i] = fp16_to_fp32(a[i]);
    return _mm512_loadu_ps(f);
}
template <typename T>
static inline __m512i emu_widen_bytes(__m128i v) {
    T b[16];
    int32_t a[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(b), v);
    for (int i = 0; i < 16; ++i) a[i] = b[i];
    return _mm512_loadu_si512(a);
}
static inline __m512i emu_srai_epi32(__m512i v, int n) {
    int32_t a[16];
    _mm512_storeu_si512(a, v);
    for (int i = 0; i < 16; ++i) a[i] >>= n;  // arithmetic, as vpsrad
    return _mm512_loadu_si512(a);
}
static inline __m128i emu_cvtepi32_epi8(__m512i v) {
    int32_t a[16];
    int8_t b[16];
    _mm512_storeu_si512(a, v);
    for (int i = 0; i < 16; ++i) b[i] = int8_t(uint32_t(a[i]) & 0xff);  // truncates, as vpmovdb
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
}
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
#define _mm512_cvtepi32_epi8 emu_cvtepi32_epi8
#define _mm512_cvtph_ps emu_cvtph_ps
#define _mm512_cvtepu8_epi32 emu_widen_bytes<uint8_t>
#define _mm512_cvtepi8_epi32 emu_widen_bytes<int8_t>
#define _mm512_srai_epi32 emu_srai_epi32
#endif
