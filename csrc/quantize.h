// Converter-side quantization into the tile layouts of quants.h.
#pragma once

#include <cstdint>

#include "backend.h"
#include "quants.h"

namespace llamacpu {

// Quantizes the n_rows x cols float matrix src (cols % 32 == 0) into whole tiles: quants
// receives n_tiles(n_rows) * (cols/32) tile-blocks of quants, scales their fp16 scales.
// Rows past n_rows in the last tile are zero.
void quantize_tiles(int32_t dtype, const float* src, int64_t n_rows, int64_t cols, uint8_t* quants, uint16_t* scales);

}  // namespace llamacpu
