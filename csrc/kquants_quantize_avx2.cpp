// The K-quant scale search of kquants_quantize.cpp compiled with AVX2 (its own unit, so the
// flags never reach code that runs on an older CPU); quantize_row_q4_k / _q6_k call it only
// after checking the CPU.
#define LLAMACPU_KQ_SEARCH_NS kq_search_avx2
#define LLAMACPU_KQ_SEARCH_AVX2
#include "kquants_quantize.cpp"
