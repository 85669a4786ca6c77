// The NEON K-quant kernels built against SIMDe's emulation, for tests on CPUs without NEON (a
// separate file so that an Arm build never compiles the emulation).
#define LLAMACPU_SIMDE
#include "kquants_neon.cpp"
