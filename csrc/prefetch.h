// Software prefetch for the single-token GEMV kernels.
//
// Generating a token streams every weight from memory with only a few integer ops per byte in
// between, and the hardware prefetcher alone keeps too few loads in flight: asking for the
// bytes kPrefetchBytes ahead of those about to be used brings a core to about the read
// bandwidth (+15-20% GB/s on one AVX2 core here, bench/kquants.py). Prefetches never fault, so
// running past the end of a matrix is harmless.
#pragma once

#include <cstdint>

namespace llamacpu {

constexpr int64_t kPrefetchBytes = 1024;

// n: the bytes at p the caller is about to use, a multiple of 64.
static inline void prefetch_ahead(const uint8_t* p, int64_t n) {
    for (int64_t l = 0; l < n; l += 64) __builtin_prefetch(p + kPrefetchBytes + l);
}

}  // namespace llamacpu
