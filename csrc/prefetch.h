// Software prefetch and stream order for the single-token GEMV kernels.
//
// Generating a token streams every weight from memory with only a few integer ops per byte in
// between, and on a Zen 3 core the hardware prefetcher alone kept too few loads in flight:
// asking for the bytes kPrefetchBytes ahead of those about to be used read 15-20% more there
// (one AVX2 core, bench/kquants.py). A Zen 4 core's prefetcher reads faster without that help,
// so the choice is made per CPU when the library loads (cpu.cpp). Prefetches never fault, so
// running past the end of a matrix is harmless.
#pragma once

#include <cstdint>
#include <type_traits>

namespace llamacpu {

constexpr int64_t kPrefetchBytes = 1024;

// Set once when the library loads, by CPU (cpu.cpp, decide_software_prefetch): off where the
// hardware prefetcher reads faster alone.
extern bool g_software_prefetch;

// n: the bytes at p the caller is about to use, a multiple of 64.
static inline void prefetch_ahead(const uint8_t* p, int64_t n) {
    if (!g_software_prefetch) return;
    for (int64_t l = 0; l < n; l += 64) __builtin_prefetch(p + kPrefetchBytes + l);
}

// The two-tile passes of a single-token GEMV over a task's tiles [tile0, tile1): calls
// pass(kTwo, t, dt) for tiles t and t + dt, pairing tile0 + i with tile0 + i + half, so that
// each of the two weight streams walks its half of the range in memory order from pass to
// pass (a matrix stores its tiles one after another) and the plain prefetch past a tile's end
// lands on that stream's next tile; an odd tile left over comes last, alone (pass(kOne, t,
// 1)). The first argument's type carries the tile count as a constant (decltype(n)::value),
// for the passes' templates. Pairing neighbours (t, t + 1) instead started both streams somewhere new every
// pass: with the halves one core read Q6_K about 10% faster from memory (14-18% at 2048
// columns), Q4_K 2-9% and Q4_0 3-6% (bench/kquants_ab.py --regime dram), and Q8_0 gained
// 7-14% from two tiles per pass, which had cost it 5% with neighbours paired. The AVX-512
// passes, one tile at a time before, gained 16-40% per format on an Intel Xeon core from the
// same pairing and are level to 9% ahead on a Zen 4 core.
template <class Pass>
static inline void for_tile_pairs(int64_t tile0, int64_t tile1, Pass&& pass) {
    constexpr std::integral_constant<int, 2> kTwo{};
    constexpr std::integral_constant<int, 1> kOne{};
    const int64_t half = (tile1 - tile0) / 2;
    for (int64_t i = 0; i < half; ++i) pass(kTwo, tile0 + i, half);
    if ((tile1 - tile0) % 2) pass(kOne, tile1 - 1, int64_t(1));
}

}  // namespace llamacpu
