// CPU feature detection and the choice of kernel table.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace llamacpu {

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false;
    bool neon = false, dotprod = false;
    std::string brand, vendor;  // vendor: CPUID's 12-character id (x86), e.g. "AuthenticAMD"
};

const CpuFeatures& cpu_features();

// Kernel tables this build has and this CPU can run, best first; "scalar" is always last.
// Emulated tables (built only for tests) are listed after it.
std::vector<const KernelTable*> usable_tables();

// The best usable table, or the one named (as in LLAMACPU_ISA); nullptr when the name is
// unknown or not usable here.
const KernelTable* find_table(const std::string& name);

}  // namespace llamacpu
