// The CPU backend: splits each op into tasks for the thread pool and runs the kernels of the
// table chosen at start-up. Every task writes a disjoint set of output elements and computes
// each of them whole, so the result is the same for any thread count.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include "backend.h"

namespace llamacpu {

// The cache comes from anonymous pages, zero-filled by the OS on first touch: a long context
// costs memory only as it fills, and the pages are page-aligned.
struct MapHeader {
    size_t len;
};

void KVCache::Free::operator()(uint8_t* p) const {
    if (!p) return;
    uint8_t* base = p - 4096;
    munmap(base, reinterpret_cast<MapHeader*>(base)->len);
}

static uint8_t* alloc_zeroed(int64_t bytes) {
    const size_t len = size_t(bytes) + 4096;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    reinterpret_cast<MapHeader*>(p)->len = len;
    return static_cast<uint8_t*>(p) + 4096;
}

KVCache::KVCache(int64_t n_layers_, int64_t n_kv_heads_, int64_t n_ctx_, int64_t head_dim_, bool f16_)
    : n_layers(n_layers_), n_kv_heads(n_kv_heads_), n_ctx(n_ctx_), head_dim(head_dim_), f16(f16_),
      slab_bytes_(n_ctx_ * head_dim_ * (f16_ ? 2 : 4)) {
    const int64_t total = slab_bytes_ * n_layers * n_kv_heads;
    k_.reset(alloc_zeroed(total));
    v_.reset(alloc_zeroed(total));
}

namespace {

// Tokens per matmul task: the quantized activations of one chunk stay in L2 while every
// weight tile of the task passes over them.
constexpr int64_t kTokChunk = 64;

// Below this much work (roughly: multiply-adds or elements touched) an op runs on the calling
// thread: waking the pool would cost more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

class CpuBackend final : public Backend {
public:
    CpuBackend(int n_threads, const KernelTable* k) : pool_(n_threads), k_(k) {}

    // Runs fn(task, thread) for every task, on the pool when there is enough work for it.
    template <typename F>
    void par(int64_t n_tasks, int64_t work, F&& fn) {
        if (work < kMinParallelWork || n_tasks <= 1 || pool_.size() == 1) {
            for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
        } else {
            pool_.run(n_tasks, fn);
        }
    }

    const char* name() const override { return k_->name; }
    int n_threads() const override { return pool_.size(); }

    void matmul(const Matrix& w, const float* x, int64_t n_tok, int64_t ldx, float* out, int64_t ldo,
                bool accumulate) override {
        if (is_quantized(w.dtype) || is_kquant(w.dtype)) {
            matmul_quantized(w, x, n_tok, ldx, out, ldo, accumulate);
        } else {
            matmul_float(w, x, n_tok, ldx, out, ldo, accumulate);
        }
    }

    void rmsnorm(const float* x, int64_t n_tok, int64_t ldx, const float* w, int64_t n, float eps, float* out,
                 int64_t ldo) override {
        par(n_tok, n_tok * n, [&](int64_t t, int) { k_->rmsnorm(x + t * ldx, w, n, eps, out + t * ldo); });
    }

    void rope(float* x, int64_t n_tok, int64_t ldx, int64_t n_heads, int64_t hd, const int32_t* pos,
              const float* table) override {
        par(n_tok, n_tok * n_heads * hd, [&](int64_t t, int) {
            const float* row = table + int64_t(pos[t]) * 2 * hd;
            k_->rope(x + t * ldx, n_heads, hd, row, row + hd);
        });
    }

    void kv_store(KVCache& c, int64_t layer, const float* k, int64_t ldk, const float* v, int64_t ldv,
                  int64_t n_tok, const int32_t* pos) override {
        const int64_t hd = c.head_dim;
        for (int64_t t = 0; t < n_tok; ++t) {
            for (int64_t h = 0; h < c.n_kv_heads; ++h) {
                store_row(c, c.k(layer, h, pos[t]), k + t * ldk + h * hd);
                store_row(c, c.v(layer, h, pos[t]), v + t * ldv + h * hd);
            }
        }
    }

    void attention(KVCache& c, int64_t layer, const float* q, int64_t ldq, int64_t n_tok, const int32_t* pos,
                   int64_t n_heads, float scale, float* out, int64_t ldo) override {
        const int64_t hd = c.head_dim;
        const int64_t n_rep = n_heads / c.n_kv_heads;
        const int64_t per_thread = kAttentionHeadGroup * c.n_ctx;
        scratch_scores_.resize(size_t(pool_.size() * per_thread));
        float* scores = scratch_scores_.data();
        int64_t work = 0;
        for (int64_t t = 0; t < n_tok; ++t) work += (int64_t(pos[t]) + 1) * hd * n_heads;
        par(n_tok * c.n_kv_heads, work, [&](int64_t task, int thread) {
            const int64_t t = task / c.n_kv_heads, h = task % c.n_kv_heads;
            const int64_t off = h * n_rep * hd;
            k_->attention(q + t * ldq + off, c.k(layer, h, 0), c.v(layer, h, 0), c.f16, int64_t(pos[t]) + 1, hd,
                          n_rep, scale, scores + thread * per_thread, out + t * ldo + off);
        });
    }

    void silu_mul(const float* gu, int64_t n_tok, int64_t ldgu, int64_t n, float* out, int64_t ldo) override {
        // Split long rows too, so a single token still uses every thread.
        const int64_t chunk = 1024;
        const int64_t per_row = (n + chunk - 1) / chunk;
        par(n_tok * per_row, n_tok * n * 8, [&](int64_t task, int) {
            const int64_t t = task / per_row, i0 = (task % per_row) * chunk;
            const int64_t len = std::min(chunk, n - i0);
            k_->silu_mul(gu + t * ldgu + i0, gu + t * ldgu + n + i0, out + t * ldo + i0, len);
        });
    }

    void embed(const Matrix& m, const int32_t* tokens, int64_t n_tok, float* out, int64_t ldo) override {
        for (int64_t t = 0; t < n_tok; ++t) {
            if (m.data && m.dtype == kF16) {  // the SIMD conversion straight from the mapping
                k_->f16_to_f32(reinterpret_cast<const uint16_t*>(m.data) + int64_t(tokens[t]) * m.cols, out + t * ldo,
                               m.cols);
            } else {
                read_row(m, tokens[t], out + t * ldo, row_scratch_);
            }
        }
    }

    void kv_shift(KVCache& c, int64_t keep, int64_t discard, int64_t used, const float* rot) override {
        const int64_t hd = c.head_dim, es = c.elem_size();
        pool_.run(c.n_layers * c.n_kv_heads, [&](int64_t task, int) {
            const int64_t layer = task / c.n_kv_heads, h = task % c.n_kv_heads;
            std::vector<float> tmp(static_cast<size_t>(hd));
            for (int64_t p = keep + discard; p < used; ++p) {
                uint8_t* kd = c.k(layer, h, p - discard);
                std::memmove(c.v(layer, h, p - discard), c.v(layer, h, p), size_t(hd * es));
                if (c.f16) {
                    k_->f16_to_f32(reinterpret_cast<const uint16_t*>(c.k(layer, h, p)), tmp.data(), hd);
                } else {
                    std::memcpy(tmp.data(), c.k(layer, h, p), size_t(hd * 4));
                }
                k_->rope(tmp.data(), 1, hd, rot, rot + hd);
                store_row(c, kd, tmp.data());
            }
        });
    }

private:
    void store_row(KVCache& c, uint8_t* dst, const float* src) {
        if (c.f16) {
            k_->f32_to_f16(src, reinterpret_cast<uint16_t*>(dst), c.head_dim);
        } else {
            std::memcpy(dst, src, size_t(c.head_dim) * 4);
        }
    }

    void matmul_quantized(const Matrix& w, const float* x, int64_t n_tok, int64_t ldx, float* out, int64_t ldo,
                          bool accumulate) {
        const int64_t k = w.cols, nb = k / kBlock;
        act_q_.resize(size_t(n_tok * k));
        act_d_.resize(size_t(n_tok * nb));
        act_s_.resize(size_t(n_tok * nb));
        int8_t* aq = act_q_.data();
        float* ad = act_d_.data();
        int32_t* as = act_s_.data();
        // The K-quant kernels sum a whole super-block in integers, so their activations share
        // one scale per super-block (kquants.h).
        const int64_t group = is_kquant(w.dtype) ? kSuperBlock : kBlock;
        // Q6_K's group offsets (ActQ8::g) come with the activations, once per call rather than
        // once per task: a task of a few tiles would otherwise spend a sizeable share of its
        // time recomputing them for all of its tokens.
        int32_t* ag = nullptr;
        if (w.dtype == kQ6_K && k_->q6k_offsets) {
            act_g_.resize(size_t(n_tok * 2 * nb));
            ag = act_g_.data();
        }
        auto quantize = [&](int64_t t) {
            k_->quantize_row_q8(x + t * ldx, k, group, aq + t * k, ad + t * nb, as + t * nb);
            if (ag) k_->q6k_offsets(aq + t * k, nb, ag + t * 2 * nb);
        };
        if (n_tok == 1) {
            quantize(0);
        } else {
            par(n_tok, n_tok * k, [&](int64_t t, int) { quantize(t); });
        }
        const int64_t tiles = n_tiles(w.rows);
        auto fn = w.dtype == kQ4_0 ? k_->matmul_q4_0 : w.dtype == kQ4_1 ? k_->matmul_q4_1 : k_->matmul_q8_0;
        if (is_kquant(w.dtype)) fn = w.dtype == kQ4_K ? k_->matmul_q4_k : k_->matmul_q6_k;
        if (n_tok == 1 && pool_.size() > 1 && w.rows * k >= kMinParallelWork) {
            // One token (generation): guided self-scheduling. Each claim takes a share of the
            // tiles still left, so claims start large and end at one tile, and the threads
            // finish within a tile of each other instead of within one fixed-size task.
            const ActQ8 a{aq, ad, as, k, nb, 1, ag};
            std::atomic<int64_t> next{0};
            const int64_t div = 2 * int64_t(pool_.size());
            pool_.run(pool_.size(), [&](int64_t, int) {
                for (;;) {
                    int64_t t0 = next.load(std::memory_order_relaxed), n;
                    do {
                        if (t0 >= tiles) return;
                        n = std::max<int64_t>(1, (tiles - t0) / div);
                    } while (!next.compare_exchange_weak(t0, t0 + n, std::memory_order_relaxed));
                    fn(w.data, w.rows, k, t0, t0 + n, a, out, ldo, accumulate);
                }
            });
            return;
        }
        const int64_t tok_chunks = (n_tok + kTokChunk - 1) / kTokChunk;
        // Enough tasks per thread that a slow core sheds work, few enough that claiming one is
        // noise next to running it.
        const int64_t want = int64_t(pool_.size()) * 8;
        const int64_t tiles_per_task = std::max<int64_t>(1, tiles * tok_chunks / want);
        const int64_t tile_tasks = (tiles + tiles_per_task - 1) / tiles_per_task;
        par(tile_tasks * tok_chunks, w.rows * k * n_tok, [&](int64_t task, int) {
            const int64_t tc = task / tile_tasks, tt = task % tile_tasks;
            const int64_t tok0 = tc * kTokChunk, ntok = std::min(kTokChunk, n_tok - tok0);
            const int64_t t0 = tt * tiles_per_task, t1 = std::min(tiles, t0 + tiles_per_task);
            const ActQ8 a{aq + tok0 * k, ad + tok0 * nb, as + tok0 * nb, k, nb, ntok, ag ? ag + tok0 * 2 * nb : nullptr};
            fn(w.data, w.rows, k, t0, t1, a, out + tok0 * ldo, ldo, accumulate);
        });
    }

    void matmul_float(const Matrix& w, const float* x, int64_t n_tok, int64_t ldx, float* out, int64_t ldo,
                      bool accumulate) {
        const int64_t rows = w.rows;
        const int64_t tok_chunks = (n_tok + kTokChunk - 1) / kTokChunk;
        const int64_t want = int64_t(pool_.size()) * 8;
        const int64_t rows_per_task = std::max<int64_t>(4, rows * tok_chunks / want);
        const int64_t row_tasks = (rows + rows_per_task - 1) / rows_per_task;
        par(row_tasks * tok_chunks, rows * w.cols * n_tok, [&](int64_t task, int) {
            const int64_t tc = task / row_tasks, rt = task % row_tasks;
            const int64_t tok0 = tc * kTokChunk, ntok = std::min(kTokChunk, n_tok - tok0);
            const int64_t r0 = rt * rows_per_task, r1 = std::min(rows, r0 + rows_per_task);
            if (w.dtype == kF16) {
                k_->matmul_f16(reinterpret_cast<const uint16_t*>(w.data), w.cols, r0, r1, x + tok0 * ldx, ldx, ntok,
                               out + tok0 * ldo, ldo, accumulate);
            } else {
                k_->matmul_f32(reinterpret_cast<const float*>(w.data), w.cols, r0, r1, x + tok0 * ldx, ldx, ntok,
                               out + tok0 * ldo, ldo, accumulate);
            }
        });
    }

    ThreadPool pool_;
    const KernelTable* k_;
    std::vector<int8_t> act_q_;
    std::vector<float> act_d_;
    std::vector<int32_t> act_s_;
    std::vector<int32_t> act_g_;  // Q6_K: ActQ8::g
    std::vector<float> scratch_scores_;
    std::vector<uint8_t> row_scratch_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int n_threads, const KernelTable* kernels) {
    return std::unique_ptr<Backend>(new CpuBackend(n_threads, kernels));
}

}  // namespace llamacpu
