// Token sampling, in the order llama.cpp's default chain applies it: repeat penalty,
// top-k, top-p, min-p, then temperature and a draw. Buffers are kept between calls, so a
// generated token costs no allocation.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace llamacpu {

struct SamplerParams {
    float temperature = 0.8f;  // <= 0: greedy
    int32_t top_k = 40;        // <= 0: off
    float top_p = 0.95f;       // >= 1: off
    float min_p = 0.05f;       // <= 0: off
    float repeat_penalty = 1.1f;  // 1: off
};

class Sampler {
public:
    explicit Sampler(uint64_t seed) : rng_(seed) {}
    void seed(uint64_t s) { rng_.seed(s); }

    // recent: the tokens the repeat penalty applies to (the caller keeps the window).
    int32_t sample(const float* logits, int64_t n_vocab, const SamplerParams& p, const int32_t* recent,
                   int64_t n_recent);

private:
    std::mt19937_64 rng_;
    std::vector<float> logits_;
    std::vector<int32_t> cand_;
    std::vector<float> prob_;
    std::vector<int32_t> recent_;
};

}  // namespace llamacpu
