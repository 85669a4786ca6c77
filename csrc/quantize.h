// Converter-side quantization into the tile layouts of quants.h.
#pragma once

#include <cstdint>

#include "backend.h"
#include "quants.h"

namespace llamacpu {

// How quantize_tiles picks each block's scale (and min): kQuantRef is llama.cpp's reference
// rule (max-abs, or min..max for Q4_1); kQuantMse searches for the scale of least squared
// error and is never worse than kQuantRef on a block. Both write the same format.
enum QuantMethod : int32_t { kQuantRef = 0, kQuantMse = 1 };

// Quantizes the n_rows x cols float matrix src (cols % 32 == 0) into whole tiles: quants
// receives n_tiles(n_rows) * (cols/32) tile-blocks of quants, scales their fp16 scales.
// Rows past n_rows in the last tile are zero.
void quantize_tiles(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* quants, uint16_t* scales,
                    int32_t method = kQuantMse);

}  // namespace llamacpu
