// Stand-ins for what SIMDe (0.7.4) lacks or does differently in its NEON emulation, for the
// emulated NEON builds that let the tests run these kernels on x86. Included inside each
// unit's own namespace, after SIMDe's headers; needs <cmath>.
#if defined(LLAMACPU_SIMDE)
// SIMDe 0.7.4 has no vdivq_f32 or vcvtnq_s32_f32, and on a CPU without FMA its vfmaq_f32
// rounds twice (multiply, then add). These stand-ins work lane by lane with the rounding of
// the real instructions, so the emulated path computes the same bits as the native one.
static inline float32x4_t emu_vfmaq_f32(float32x4_t acc, float32x4_t b, float32x4_t c) {
    float r[4], x[4], y[4];
    vst1q_f32(r, acc);
    vst1q_f32(x, b);
    vst1q_f32(y, c);
    for (int i = 0; i < 4; ++i) r[i] = std::fma(x[i], y[i], r[i]);
    return vld1q_f32(r);
}
static inline float32x4_t emu_vdivq_f32(float32x4_t a, float32x4_t b) {
    float x[4], y[4];
    vst1q_f32(x, a);
    vst1q_f32(y, b);
    for (int i = 0; i < 4; ++i) x[i] /= y[i];
    return vld1q_f32(x);
}
static inline int32x4_t emu_vcvtnq_s32_f32(float32x4_t a) {
    float x[4];
    int32_t r[4];
    vst1q_f32(x, a);
    for (int i = 0; i < 4; ++i) r[i] = int32_t(std::nearbyint(x[i]));  // fcvtns: half to even
    return vld1q_s32(r);
}
#undef vfmaq_f32
#define vfmaq_f32 emu_vfmaq_f32
#define vdivq_f32 emu_vdivq_f32
#define vcvtnq_s32_f32 emu_vcvtnq_s32_f32
#endif
