#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace llamacpu {

int32_t Sampler::sample(const float* in, int64_t n_vocab, const SamplerParams& p, const int32_t* recent,
                        int64_t n_recent) {
    logits_.assign(in, in + n_vocab);
    float* l = logits_.data();
    // Weights damaged in the file can make logits NaN. NaN breaks the ordering std::sort and
    // the heap rely on (undefined behaviour, possibly reading out of bounds): it ranks last.
    for (int64_t i = 0; i < n_vocab; ++i)
        if (std::isnan(l[i])) l[i] = -INFINITY;

    // Repeat penalty as in llama.cpp: each distinct recent token once; positive logits are
    // divided, negative ones multiplied, so the token always becomes less likely.
    if (p.repeat_penalty != 1.0f && n_recent > 0) {
        recent_.assign(recent, recent + n_recent);
        std::sort(recent_.begin(), recent_.end());
        recent_.erase(std::unique(recent_.begin(), recent_.end()), recent_.end());
        for (int32_t t : recent_) {
            if (t < 0 || t >= n_vocab) continue;
            l[t] = l[t] > 0.0f ? l[t] / p.repeat_penalty : l[t] * p.repeat_penalty;
        }
    }

    // Greedy: the first index of the largest logit.
    int32_t best = 0;
    for (int64_t i = 1; i < n_vocab; ++i)
        if (l[i] > l[best]) best = int32_t(i);
    const float mx = l[best];
    // Greedy too when no logit is finite enough to weigh against it (+inf, or all -inf).
    if (p.temperature <= 0.0f || !std::isfinite(mx)) return best;

    // Order: larger logit first, then smaller index, so ties never depend on the algorithm.
    auto before = [l](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };

    // top-k: keep the k best with a small heap (one comparison for most tokens).
    cand_.clear();
    double z = 0.0;  // normaliser of the distribution top-p sees
    if (p.top_k > 0 && p.top_k < n_vocab) {
        for (int64_t i = 0; i < n_vocab; ++i) {
            const int32_t t = int32_t(i);
            if (int64_t(cand_.size()) < p.top_k) {
                cand_.push_back(t);
                std::push_heap(cand_.begin(), cand_.end(), before);
            } else if (before(t, cand_.front())) {
                std::pop_heap(cand_.begin(), cand_.end(), before);
                cand_.back() = t;
                std::push_heap(cand_.begin(), cand_.end(), before);
            }
        }
        for (int32_t t : cand_) z += std::exp(double(l[t] - mx));
    } else {
        cand_.resize(size_t(n_vocab));
        for (int64_t i = 0; i < n_vocab; ++i) {
            cand_[size_t(i)] = int32_t(i);
            z += std::exp(double(l[i] - mx));
        }
    }

    // min-p keeps tokens with prob >= min_p * max prob, i.e. logit >= max + log(min_p). Applied
    // before sorting: the tokens it drops come after every kept one in the top-p walk, so
    // dropping them first gives the same set as llama.cpp's top-p-then-min-p.
    if (p.min_p > 0.0f && p.min_p <= 1.0f) {
        const float thr = mx + std::log(p.min_p);
        cand_.erase(std::remove_if(cand_.begin(), cand_.end(), [&](int32_t t) { return l[t] < thr; }), cand_.end());
    }
    std::sort(cand_.begin(), cand_.end(), before);

    if (p.top_p < 1.0f) {
        double cum = 0.0;
        size_t keep = cand_.size();
        for (size_t i = 0; i < cand_.size(); ++i) {
            cum += std::exp(double(l[cand_[i]] - mx)) / z;
            if (cum >= p.top_p) {
                keep = i + 1;
                break;
            }
        }
        cand_.resize(keep);
    }

    // Temperature on the survivors, then a draw.
    prob_.resize(cand_.size());
    double total = 0.0;
    for (size_t i = 0; i < cand_.size(); ++i) {
        prob_[i] = float(std::exp(double(l[cand_[i]] - mx) / p.temperature));
        total += prob_[i];
    }
    const double u = double(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
    double acc = 0.0;
    for (size_t i = 0; i < cand_.size(); ++i) {
        acc += prob_[i];
        if (u < acc) return cand_[i];
    }
    return cand_.back();
}

}  // namespace llamacpu
