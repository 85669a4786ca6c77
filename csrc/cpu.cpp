#include "cpu.h"
#include "prefetch.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace llamacpu {

#if defined(__x86_64__) || defined(_M_X64)
static uint64_t xgetbv0() {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (uint64_t(edx) << 32) | eax;
}

static CpuFeatures detect() {
    CpuFeatures f;
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d)) {
        char v[13];
        std::memcpy(v, &b, 4);
        std::memcpy(v + 4, &d, 4);
        std::memcpy(v + 8, &c, 4);
        v[12] = 0;
        f.vendor = v;
    }
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27);
    f.fma = c & (1u << 12);
    f.f16c = c & (1u << 29);
    const bool avx = c & (1u << 28);
    // The OS must save the wide registers on a context switch, or using them corrupts state.
    const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    const bool os_avx = (xcr0 & 0x6) == 0x6;
    const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.avx2 = avx && os_avx && (b & (1u << 5));
        f.avx512f = os_avx512 && (b & (1u << 16));
        f.avx512bw = os_avx512 && (b & (1u << 30));
        f.avx512vl = os_avx512 && (b & (1u << 31));
        f.avx512vnni = os_avx512 && (c & (1u << 11));
    }
    f.fma = f.fma && os_avx;
    f.f16c = f.f16c && os_avx;
    unsigned brand[12];
    if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
        for (unsigned i = 0; i < 3; ++i)
            __get_cpuid(0x80000002 + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2], &brand[4 * i + 3]);
        char s[49];
        std::memcpy(s, brand, 48);
        s[48] = 0;
        f.brand = s;
        while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
    }
    return f;
}
#elif defined(__aarch64__)
static CpuFeatures detect() {
    CpuFeatures f;
    f.neon = true;  // Advanced SIMD is part of every AArch64 CPU
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
    f.dotprod = getauxval(AT_HWCAP) & HWCAP_ASIMDDP;
#endif
    return f;
}
#else
static CpuFeatures detect() { return CpuFeatures(); }
#endif

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

// Software prefetch ahead of the single-token kernels' weight streams read 15-20% more on a
// Zen 3 core (AVX2) and is what the Intel Xeon measurements of the two-tile passes ran with;
// on a Zen 4 core the hardware prefetcher reads faster alone (AVX-512 path, from memory, one
// core: Q4_0 +4-7%, Q4_K +6-8%, Q6_K +27%, Q8_0 +18-28% without it; bench/README.md). AMD's
// AVX-512 cores (Zen 4 and later) therefore go without, every other CPU with it.
// LLAMACPU_PREFETCH=0 or 1, read when the library loads, overrides the choice.
static bool decide_software_prefetch() {
    if (const char* e = std::getenv("LLAMACPU_PREFETCH")) {
        if (std::strcmp(e, "0") == 0) return false;
        if (std::strcmp(e, "1") == 0) return true;
    }
    const CpuFeatures& f = cpu_features();
    return !(f.vendor == "AuthenticAMD" && f.avx512f);
}

bool g_software_prefetch = decide_software_prefetch();

std::vector<const KernelTable*> usable_tables() {
    const CpuFeatures& f = cpu_features();
    std::vector<const KernelTable*> t;
#if defined(LLAMACPU_HAVE_AVX512)
    if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.fma && f.f16c) t.push_back(&kAvx512Kernels);
#endif
#if defined(LLAMACPU_HAVE_AVX2)
    if (f.avx2 && f.fma && f.f16c) t.push_back(&kAvx2Kernels);
#endif
#if defined(LLAMACPU_HAVE_NEON)
    if (f.neon) t.push_back(&kNeonKernels);
#endif
    t.push_back(&kScalarKernels);
#if defined(LLAMACPU_HAVE_AVX512_EMU)
    t.push_back(&kAvx512EmuKernels);
#endif
#if defined(LLAMACPU_HAVE_NEON_EMU)
    t.push_back(&kNeonEmuKernels);
#endif
    (void)f;
    return t;
}

const KernelTable* find_table(const std::string& name) {
    const auto tables = usable_tables();
    if (name.empty() || name == "auto") return tables.front();
    for (const KernelTable* k : tables)
        if (name == k->name) return k;
    return nullptr;
}

}  // namespace llamacpu
