// The op set of the decoder, behind one small interface so that another backend (CUDA) can
// provide the same ops. Tensors are plain pointers with a row stride ("ld", in elements);
// the bindings check shapes and strides before anything here runs.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"
#include "threadpool.h"

namespace llamacpu {

// A weight matrix [rows, cols] viewing memory owned elsewhere (the model file's mapping),
// or, when data is null and fd is set, stored in that file at file_offset and read a row at
// a time (an embedding table: a mapping would keep every page a token ever touched, and the
// pages around it, in the process's resident memory).
struct Matrix {
    int32_t dtype = kF32;
    int64_t rows = 0, cols = 0;
    const uint8_t* data = nullptr;
    int fd = -1;
    int64_t file_offset = 0;
};

// Keys and values of every layer, [layer][kv_head][pos][head_dim], f16 or f32. Each
// attention task reads one contiguous [pos][head_dim] slab.
class KVCache {
public:
    KVCache(int64_t n_layers, int64_t n_kv_heads, int64_t n_ctx, int64_t head_dim, bool f16);
    int64_t n_layers, n_kv_heads, n_ctx, head_dim;
    bool f16;
    int64_t elem_size() const { return f16 ? 2 : 4; }
    uint8_t* k(int64_t layer, int64_t head, int64_t pos) { return at(k_.get(), layer, head, pos); }
    uint8_t* v(int64_t layer, int64_t head, int64_t pos) { return at(v_.get(), layer, head, pos); }
    int64_t bytes() const { return 2 * slab_bytes_ * n_layers * n_kv_heads; }

private:
    uint8_t* at(uint8_t* base, int64_t layer, int64_t head, int64_t pos) {
        return base + (layer * n_kv_heads + head) * slab_bytes_ + pos * head_dim * elem_size();
    }
    struct Free { void operator()(uint8_t* p) const; };
    int64_t slab_bytes_;
    std::unique_ptr<uint8_t, Free> k_, v_;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;
    virtual int n_threads() const = 0;

    // out[t, :rows] (+)= W x[t, :cols] for t < n_tok.
    virtual void matmul(const Matrix& w, const float* x, int64_t n_tok, int64_t ldx, float* out, int64_t ldo,
                        bool accumulate) = 0;
    virtual void rmsnorm(const float* x, int64_t n_tok, int64_t ldx, const float* w, int64_t n, float eps,
                         float* out, int64_t ldo) = 0;
    // Rotates the first n_heads*head_dim values of each row by the position's row of the
    // table (table: [n_table][2][head_dim], cos2 then sin2; see KernelTable::rope).
    virtual void rope(float* x, int64_t n_tok, int64_t ldx, int64_t n_heads, int64_t head_dim, const int32_t* pos,
                      const float* table) = 0;
    virtual void kv_store(KVCache& cache, int64_t layer, const float* k, int64_t ldk, const float* v, int64_t ldv,
                          int64_t n_tok, const int32_t* pos) = 0;
    // Causal attention: query t sees cache positions [0, pos[t]].
    virtual void attention(KVCache& cache, int64_t layer, const float* q, int64_t ldq, int64_t n_tok,
                           const int32_t* pos, int64_t n_heads, float scale, float* out, int64_t ldo) = 0;
    // out[t, :n] = silu(gu[t, :n]) * gu[t, n:2n].
    virtual void silu_mul(const float* gu, int64_t n_tok, int64_t ldgu, int64_t n, float* out, int64_t ldo) = 0;
    virtual void embed(const Matrix& table, const int32_t* tokens, int64_t n_tok, float* out, int64_t ldo) = 0;
    // Drops cache positions [keep, keep+discard) and moves [keep+discard, used) down by discard,
    // rotating the moved keys by rot (cos2/sin2 of -discard positions, 2*head_dim floats).
    virtual void kv_shift(KVCache& cache, int64_t keep, int64_t discard, int64_t used, const float* rot) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(int n_threads, const KernelTable* kernels);

// Row r of a matrix of any type, as floats.
void dequantize_row(const Matrix& m, int64_t r, float* out);

// The same for a matrix in memory or in a file (Matrix::fd); scratch holds what is read.
// Throws std::runtime_error when the file can no longer be read (truncated while in use).
void read_row(const Matrix& m, int64_t r, float* out, std::vector<uint8_t>& scratch);

}  // namespace llamacpu
