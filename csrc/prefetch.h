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

// The same for a pass over ntl tiles side by side (tiles of tile_bytes each from base, p in
// tile `tile`), one stream per tile: past the end of its tile a stream goes on in the tile ntl
// on (the next pass's stream), not in the next tile, which this pass is reading already.
// Asking for the next tile instead left every pass but the first to start one stream from
// memory: one core read Q4_0 5-7% and Q4_K 6-12% slower from memory at 4096 columns, and 9% /
// 20% slower at 2048, where a tile is shorter (bench/kquants_ab.py --regime dram). n and
// ahead must not straddle a tile's end.
static inline void prefetch_ahead_in_pass(const uint8_t* p, int64_t n, const uint8_t* base, int64_t tile_bytes,
                                          int64_t tile, int ntl, int64_t ahead = kPrefetchBytes) {
    const uint8_t* a = p + ahead;
    if (a >= base + (tile + 1) * tile_bytes) a += (ntl - 1) * tile_bytes;
    for (int64_t l = 0; l < n; l += 64) __builtin_prefetch(a + l);
}

}  // namespace llamacpu
