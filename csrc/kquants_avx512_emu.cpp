// The AVX-512 K-quant kernels built against SIMDe's emulation, for tests on CPUs without
// AVX-512 (a separate file so that it does not inherit kquants_avx512.cpp's target flags).
#define LLAMACPU_SIMDE
#include "kquants_avx512.cpp"
