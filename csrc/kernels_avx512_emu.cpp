// The AVX-512 kernels built against SIMDe's emulation, for tests on CPUs without AVX-512
// (a separate file so that it does not inherit kernels_avx512.cpp's target flags).
#define LLAMACPU_SIMDE
#include "kernels_avx512.cpp"
