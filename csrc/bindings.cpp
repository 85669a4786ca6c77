// Python bindings (module llamacpu._core). Everything that crosses from Python is checked
// here (dtype, shape, strides, bounds) before a kernel sees a pointer, and every op releases
// the GIL while it runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "backend.h"
#include "cpu.h"
#include "kquants.h"
#include "prefetch.h"
#include "quantize.h"
#include "sampler.h"

namespace py = pybind11;
using namespace llamacpu;

namespace {

// A file descriptor closed with its owner.
struct FileHandle {
    int fd;
    ~FileHandle() { ::close(fd); }
};

// A weight matrix viewing a Python buffer (normally the model file's mmap), which stays
// exported, and so alive and unclosable, for as long as this object exists.
struct PyMatrix {
    Matrix m;
    std::unique_ptr<py::buffer_info> view;
    std::unique_ptr<FileHandle> file;  // a matrix read from a file by rows (Matrix::fd)
    // A matrix stored as row segments of different types (a fused q/k/v whose v rows are more
    // precise): the segments in row order. m then has their total rows and no data of its own.
    std::vector<std::shared_ptr<PyMatrix>> parts;
};

constexpr int32_t kStacked = -1;  // PyMatrix::m.dtype of a matrix made of row segments

std::shared_ptr<PyMatrix> make_stacked(const std::vector<std::shared_ptr<PyMatrix>>& parts) {
    if (parts.size() < 2 || parts.size() > 16) throw std::invalid_argument("stacked: 2 to 16 matrices");
    auto pm = std::make_shared<PyMatrix>();
    pm->m.dtype = kStacked;
    for (const auto& p : parts) {
        if (!p || !p->parts.empty() || !p->m.data)
            throw std::invalid_argument("stacked: the parts must be plain matrices in memory");
        if (p->m.cols != parts[0]->m.cols) throw std::invalid_argument("stacked: the parts differ in columns");
        pm->m.rows += p->m.rows;  // each below 2^31, at most 16 of them: no overflow
    }
    pm->m.cols = parts[0]->m.cols;
    pm->parts = parts;
    return pm;
}

// The segment of a stacked matrix (or the matrix itself) that holds row r, and r within it.
std::pair<const Matrix*, int64_t> row_home(const PyMatrix& p, int64_t r) {
    for (const auto& part : p.parts) {
        if (r < part->m.rows) return {&part->m, r};
        r -= part->m.rows;
    }
    return {&p.m, r};
}

std::shared_ptr<PyMatrix> make_matrix(py::buffer buf, int64_t offset, int32_t dtype, int64_t rows, int64_t cols) {
    auto info = std::make_unique<py::buffer_info>(buf.request());
    const int64_t size = info->size * info->itemsize;
    const int64_t need = matrix_bytes(dtype, rows, cols);
    if (need < 0) throw std::invalid_argument("matrix: bad dtype or shape");
    if (offset < 0 || offset > size || need > size - offset)
        throw std::invalid_argument("matrix: data lies outside the buffer");
    auto pm = std::make_shared<PyMatrix>();
    pm->m.dtype = dtype;
    pm->m.rows = rows;
    pm->m.cols = cols;
    pm->m.data = static_cast<const uint8_t*>(info->ptr) + offset;
    pm->view = std::move(info);
    return pm;
}

// A matrix left in the file: its rows are read on demand with pread from a duplicate of fd,
// so the matrix outlives whatever owns fd. Only an embedding table's rows are ever needed.
std::shared_ptr<PyMatrix> file_matrix(int fd, int64_t offset, int32_t dtype, int64_t rows, int64_t cols) {
    const int64_t need_bytes = matrix_bytes(dtype, rows, cols);
    if (need_bytes < 0) throw std::invalid_argument("matrix: bad dtype or shape");
    struct stat st;
    if (fd < 0 || ::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        throw std::invalid_argument("matrix: fd is not an open regular file");
    if (offset < 0 || offset > st.st_size || need_bytes > st.st_size - offset)
        throw std::invalid_argument("matrix: data lies outside the file");
    const int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) throw std::runtime_error("matrix: cannot duplicate the file descriptor");
    auto pm = std::make_shared<PyMatrix>();
    pm->file.reset(new FileHandle{own});
    pm->m.dtype = dtype;
    pm->m.rows = rows;
    pm->m.cols = cols;
    pm->m.fd = own;
    pm->m.file_offset = offset;
    return pm;
}

// A float32 array seen as rows with a row stride: 1-D arrays are one row.
struct Rows {
    float* p;
    int64_t rows, cols, ld;
};

template <typename T>
void check_dtype(const py::array& a, const char* name) {
    if (!py::dtype::of<T>().is(a.dtype()))
        throw std::invalid_argument(std::string(name) + ": wrong dtype " + std::string(py::str(a.dtype())));
}

Rows rows_of(py::array& a, const char* name, bool writable) {
    check_dtype<float>(a, name);
    if (writable && !a.writeable()) throw std::invalid_argument(std::string(name) + ": array is read-only");
    Rows r;
    r.p = static_cast<float*>(const_cast<void*>(a.data()));
    if (a.ndim() == 1) {
        if (a.strides(0) != 4 && a.shape(0) > 1) throw std::invalid_argument(std::string(name) + ": not contiguous");
        r.rows = 1;
        r.cols = a.shape(0);
        r.ld = r.cols;
    } else if (a.ndim() == 2) {
        r.rows = a.shape(0);
        r.cols = a.shape(1);
        if (r.cols > 1 && a.strides(1) != 4) throw std::invalid_argument(std::string(name) + ": rows not contiguous");
        if (a.strides(0) % 4 || (r.rows > 1 && a.strides(0) < r.cols * 4))
            throw std::invalid_argument(std::string(name) + ": bad row stride");
        r.ld = r.rows > 1 ? a.strides(0) / 4 : r.cols;
    } else {
        throw std::invalid_argument(std::string(name) + ": must be 1-D or 2-D");
    }
    return r;
}

template <typename T>
const T* vec_of(py::array& a, const char* name, int64_t n) {
    check_dtype<T>(a, name);
    if (a.ndim() != 1 || (a.shape(0) > 1 && a.strides(0) != sizeof(T)))
        throw std::invalid_argument(std::string(name) + ": must be a contiguous 1-D array");
    if (a.shape(0) < n) throw std::invalid_argument(std::string(name) + ": too short");
    return static_cast<const T*>(a.data());
}

void need(bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
}

const KernelTable* table_or_throw(const std::string& isa) {
    const KernelTable* k = find_table(isa);
    if (!k) {
        std::string names;
        for (const KernelTable* t : usable_tables()) names += std::string(names.empty() ? "" : ", ") + t->name;
        throw std::invalid_argument("instruction set '" + isa + "' is not available on this CPU (available: " + names + ")");
    }
    return k;
}

void check_positions(const int32_t* pos, int64_t n, int64_t limit) {
    for (int64_t i = 0; i < n; ++i)
        if (pos[i] < 0 || pos[i] >= limit) throw std::invalid_argument("position outside the context");
}

// Time spent inside the backend's ops, so a benchmark can tell the kernels' share of a
// decode step from the Python loop's.
struct OpTimer {
    explicit OpTimer(double& total) : total_(total), t0_(std::chrono::steady_clock::now()) {}
    ~OpTimer() { total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(); }
    double& total_;
    std::chrono::steady_clock::time_point t0_;
};

// A recorded sequence of backend ops with their buffers bound, replayed by one call with the
// GIL released. The decoder (src/llamacpu/model.py) records one plan per batch size; values
// that change between runs (token ids, positions) are read from their arrays at run time, and
// checked again there.
class Plan {
public:
    std::vector<std::function<void()>> ops;
    std::vector<py::object> keep;  // arrays, matrices and caches the ops use stay alive

    void run(double& seconds) {
        py::gil_scoped_release nogil;
        OpTimer timer(seconds);
        auto last_check = std::chrono::steady_clock::now();
        for (auto& op : ops) {
            op();
            // A long prompt must still stop on Ctrl-C: look for signals every 50 ms.
            const auto now = std::chrono::steady_clock::now();
            if (now - last_check > std::chrono::milliseconds(50)) {
                last_check = now;
                py::gil_scoped_acquire gil;
                if (PyErr_CheckSignals() != 0) throw py::error_already_set();
            }
        }
    }
};

class PyBackend {
public:
    PyBackend(int n_threads, const std::string& isa) : b_(make_cpu_backend(n_threads, table_or_throw(isa))) {}

    std::string name() const { return b_->name(); }
    int n_threads() const { return b_->n_threads(); }

    void record(Plan& plan) {
        need(!rec_, "already recording");
        rec_ = &plan;
    }
    void stop() { rec_ = nullptr; }
    void run(Plan& plan) { plan.run(seconds_); }

    void matmul(std::shared_ptr<PyMatrix> w, py::array x, py::array out, bool accumulate) {
        Rows xr = rows_of(x, "x", false), o = rows_of(out, "out", true);
        need(w->m.data || !w->parts.empty(), "matmul: the weight matrix is not in memory (a by-row file matrix)");
        need(xr.cols == w->m.cols, "matmul: x columns != weight columns");
        need(o.cols == w->m.rows, "matmul: out columns != weight rows");
        need(xr.rows == o.rows, "matmul: x rows != out rows");
        Backend* b = b_.get();
        if (!w->parts.empty()) {
            // Each segment writes its own columns of out.
            std::vector<std::pair<const Matrix*, int64_t>> segs;
            int64_t r0 = 0;
            for (const auto& p : w->parts) {
                segs.emplace_back(&p->m, r0);
                r0 += p->m.rows;
            }
            submit([=] {
                for (const auto& [m, r] : segs) b->matmul(*m, xr.p, xr.rows, xr.ld, o.p + r, o.ld, accumulate);
            }, {py::cast(w), x, out});
            return;
        }
        const Matrix* m = &w->m;
        submit([=] { b->matmul(*m, xr.p, xr.rows, xr.ld, o.p, o.ld, accumulate); }, {py::cast(w), x, out});
    }

    void rmsnorm(py::array x, py::array w, float eps, py::array out) {
        Rows xr = rows_of(x, "x", false), o = rows_of(out, "out", true);
        need(xr.rows == o.rows && xr.cols == o.cols, "rmsnorm: x and out differ in shape");
        const float* wp = vec_of<float>(w, "w", xr.cols);
        Backend* b = b_.get();
        submit([=] { b->rmsnorm(xr.p, xr.rows, xr.ld, wp, xr.cols, eps, o.p, o.ld); }, {x, w, out});
    }

    void rope(py::array x, int64_t n_heads, int64_t hd, py::array pos, py::array table) {
        Rows xr = rows_of(x, "x", true);
        // Division, not n_heads * hd: a product of two huge ints could wrap past the check.
        need(n_heads > 0 && hd > 0 && hd % 2 == 0 && n_heads <= xr.cols / hd, "rope: bad head shape");
        const int32_t* pp = vec_of<int32_t>(pos, "pos", xr.rows);
        check_dtype<float>(table, "table");
        need(table.ndim() == 3 && table.shape(1) == 2 && table.shape(2) == hd && table.flags() & py::array::c_style,
             "rope: table must be C-contiguous [n, 2, head_dim]");
        const int64_t n_table = table.shape(0);
        check_positions(pp, xr.rows, n_table);
        const float* tp = static_cast<const float*>(table.data());
        Backend* b = b_.get();
        submit([=] {
            check_positions(pp, xr.rows, n_table);
            b->rope(xr.p, xr.rows, xr.ld, n_heads, hd, pp, tp);
        }, {x, pos, table});
    }

    void kv_store(py::object cache, int64_t layer, py::array k, py::array v, py::array pos) {
        KVCache* c = cache.cast<KVCache*>();
        Rows kr = rows_of(k, "k", false), vr = rows_of(v, "v", false);
        need(layer >= 0 && layer < c->n_layers, "kv_store: layer out of range");
        need(kr.rows == vr.rows && kr.cols == c->n_kv_heads * c->head_dim && vr.cols == kr.cols, "kv_store: bad shape");
        const int32_t* pp = vec_of<int32_t>(pos, "pos", kr.rows);
        check_positions(pp, kr.rows, c->n_ctx);
        Backend* b = b_.get();
        submit([=] {
            check_positions(pp, kr.rows, c->n_ctx);
            b->kv_store(*c, layer, kr.p, kr.ld, vr.p, vr.ld, kr.rows, pp);
        }, {cache, k, v, pos});
    }

    void attention(py::object cache, int64_t layer, py::array q, py::array pos, int64_t n_heads, float scale,
                   py::array out) {
        KVCache* c = cache.cast<KVCache*>();
        Rows qr = rows_of(q, "q", false), o = rows_of(out, "out", true);
        need(layer >= 0 && layer < c->n_layers, "attention: layer out of range");
        need(n_heads > 0 && n_heads % c->n_kv_heads == 0, "attention: heads not a multiple of kv heads");
        need(n_heads <= qr.cols / c->head_dim && qr.cols == n_heads * c->head_dim && o.cols == qr.cols &&
                 o.rows == qr.rows,
             "attention: bad shape");
        const int32_t* pp = vec_of<int32_t>(pos, "pos", qr.rows);
        check_positions(pp, qr.rows, c->n_ctx);
        Backend* b = b_.get();
        submit([=] {
            check_positions(pp, qr.rows, c->n_ctx);
            b->attention(*c, layer, qr.p, qr.ld, qr.rows, pp, n_heads, scale, o.p, o.ld);
        }, {cache, q, pos, out});
    }

    void silu_mul(py::array gu, py::array out) {
        Rows g = rows_of(gu, "gu", false), o = rows_of(out, "out", true);
        need(g.rows == o.rows && g.cols == 2 * o.cols, "silu_mul: gu must be [n, 2*m] for out [n, m]");
        Backend* b = b_.get();
        submit([=] { b->silu_mul(g.p, g.rows, g.ld, o.cols, o.p, o.ld); }, {gu, out});
    }

    void embed(std::shared_ptr<PyMatrix> w, py::array tokens, py::array out) {
        Rows o = rows_of(out, "out", true);
        need(w->parts.empty(), "embed: a matrix of row segments cannot be an embedding table");
        need(o.cols == w->m.cols, "embed: out columns != table columns");
        const int32_t* tp = vec_of<int32_t>(tokens, "tokens", o.rows);
        const Matrix* m = &w->m;
        auto check = [=] {
            for (int64_t i = 0; i < o.rows; ++i)
                if (tp[i] < 0 || tp[i] >= m->rows) throw std::invalid_argument("embed: token id out of range");
        };
        check();
        Backend* b = b_.get();
        submit([=] {
            check();
            b->embed(*m, tp, o.rows, o.p, o.ld);
        }, {py::cast(w), tokens, out});
    }

    void kv_shift(KVCache& c, int64_t keep, int64_t discard, int64_t used, py::array rot) {
        need(!rec_, "kv_shift cannot be recorded");
        need(keep >= 0 && discard > 0 && used <= c.n_ctx && keep <= used && discard <= used - keep,
             "kv_shift: bad range");
        const float* rp = vec_of<float>(rot, "rot", 2 * c.head_dim);
        py::gil_scoped_release nogil;
        OpTimer timer(seconds_);
        b_->kv_shift(c, keep, discard, used, rp);
    }

    double seconds() const { return seconds_; }

private:
    // Runs op now (GIL released), or appends it to the plan being recorded.
    void submit(std::function<void()> op, std::initializer_list<py::object> uses) {
        if (rec_) {
            for (const py::object& o : uses) rec_->keep.push_back(o);
            rec_->ops.push_back(std::move(op));
            return;
        }
        py::gil_scoped_release nogil;
        OpTimer timer(seconds_);
        op();
    }

    std::unique_ptr<Backend> b_;
    Plan* rec_ = nullptr;
    double seconds_ = 0.0;
};

// Direct access to single kernels of one table, for the tests that compare each SIMD path
// with the scalar reference on the same inputs.
class PyKernels {
public:
    explicit PyKernels(const std::string& isa) : k_(table_or_throw(isa)) {}
    std::string name() const { return k_->name; }
    bool reads_q6k_offsets() const { return k_->q6k_offsets != nullptr; }

    py::tuple quantize_row_q8(py::array x, int64_t group) {
        Rows xr = rows_of(x, "x", false);
        need(group == kBlock || group == kSuperBlock, "quantize_row_q8: group is 32 or 256");
        need(xr.rows == 1 && xr.cols % group == 0, "quantize_row_q8: 1-D, length a multiple of the group");
        const int64_t nb = xr.cols / kBlock;
        py::array_t<int8_t> q(xr.cols);
        py::array_t<float> d(nb);
        py::array_t<int32_t> s(nb);
        k_->quantize_row_q8(xr.p, xr.cols, group, q.mutable_data(), d.mutable_data(), s.mutable_data());
        return py::make_tuple(q, d, s);
    }

    py::array_t<int32_t> q6k_offsets(py::array q) {
        check_dtype<int8_t>(q, "q");
        need(q.ndim() == 1 && (q.flags() & py::array::c_style) && q.shape(0) % kBlock == 0,
             "q6k_offsets: 1-D int8, length a multiple of 32");
        if (!k_->q6k_offsets)
            throw std::invalid_argument(std::string("q6k_offsets: the ") + k_->name + " path's Q6_K kernel does not read them");
        const int64_t nb = q.shape(0) / kBlock;
        py::array_t<int32_t> g(2 * nb);
        k_->q6k_offsets(static_cast<const int8_t*>(q.data()), nb, g.mutable_data());
        return g;
    }

    void softmax(py::array x) {
        Rows xr = rows_of(x, "x", true);
        need(xr.rows == 1, "softmax: 1-D");
        k_->softmax(xr.p, xr.cols);
    }

    void attention(py::array q, py::array k, py::array v, int64_t n_rep, float scale, py::array out) {
        Rows qr = rows_of(q, "q", false), o = rows_of(out, "out", true);
        need(k.ndim() == 2 && v.ndim() == 2 && k.shape(0) == v.shape(0) && k.shape(1) == v.shape(1), "k, v: [n_pos, hd]");
        need((k.flags() & py::array::c_style) && (v.flags() & py::array::c_style), "k, v: C-contiguous");
        const bool f16 = py::dtype::of<uint16_t>().is(k.dtype());
        if (f16) check_dtype<uint16_t>(v, "v"); else { check_dtype<float>(k, "k"); check_dtype<float>(v, "v"); }
        const int64_t n_pos = k.shape(0), hd = k.shape(1);
        need(n_pos > 0 && hd > 0 && n_rep > 0 && n_rep <= qr.cols / hd && qr.rows == 1 && qr.cols == n_rep * hd &&
                 o.cols == qr.cols,
             "attention: bad shape");
        std::vector<float> scores(static_cast<size_t>(kAttentionHeadGroup * n_pos));
        k_->attention(qr.p, k.data(), v.data(), f16, n_pos, hd, n_rep, scale, scores.data(), o.p);
    }

private:
    const KernelTable* k_;
};

// Positions [0, n) of one head's keys or values as floats: a copy, for tests and debugging.
py::array_t<float> cache_rows(KVCache& c, int64_t layer, int64_t head, int64_t n, bool values) {
    need(layer >= 0 && layer < c.n_layers && head >= 0 && head < c.n_kv_heads && n >= 0 && n <= c.n_ctx, "range");
    py::array_t<float> out({n, c.head_dim});
    for (int64_t p = 0; p < n; ++p) {
        float* o = out.mutable_data(p);
        const uint8_t* row = values ? c.v(layer, head, p) : c.k(layer, head, p);
        if (c.f16) {
            const uint16_t* s = reinterpret_cast<const uint16_t*>(row);
            for (int64_t i = 0; i < c.head_dim; ++i) o[i] = fp16_to_fp32(s[i]);
        } else {
            std::memcpy(o, row, size_t(c.head_dim) * 4);
        }
    }
    return out;
}

// Reads every 8-byte word of buf with n_threads threads: the memory bandwidth reference for
// token generation, which streams every weight once per token. Returns the XOR of the words
// (so a test can tell that all of them were read) and the seconds taken. Each 1 MiB chunk is
// read as `streams` side-by-side parts (1, 2 or 4), with software prefetch ahead as the GEMV
// kernels do or without: which reads fastest depends on the core (on a Zen 3 core four
// prefetched streams read 10-20% more than one plain stream; on a Zen 4 core the same four
// streams read about 18% more without the prefetch), so callers try several
// (llamacpu.bench.READ_PATTERNS) and keep the fastest: the probe should find the most this
// machine reads, not a figure the kernels beat.
std::pair<uint64_t, double> read_all(py::buffer buf, int n_threads, int streams, bool prefetch) {
    need(streams == 1 || streams == 2 || streams == 4, "read probe: streams is 1, 2 or 4");
    py::buffer_info info = buf.request();
    const auto* p = static_cast<const uint64_t*>(info.ptr);
    const int64_t words = info.size * info.itemsize / 8;
    constexpr int64_t kChunk = 1 << 17;  // 1 MiB of uint64
    constexpr int64_t kPrefetchWords = kPrefetchBytes / 8;
    const int64_t chunks = (words + kChunk - 1) / kChunk;
    ThreadPool pool(n_threads);
    std::vector<uint64_t> sink(size_t(n_threads) * 8, 0);
    py::gil_scoped_release nogil;
    const auto t0 = std::chrono::steady_clock::now();
    pool.run(chunks, [&](int64_t c, int thread) {
        // 16-byte vector loads (SSE2 / NEON, in every build) into independent accumulators,
        // each its own variable: copied into an array instead, the words took a round trip
        // through the stack, and the probe read about half what the kernels read.
        typedef uint64_t v2u64 __attribute__((vector_size(16)));
        const int64_t a = c * kChunk, b = std::min(words, a + kChunk);
        const int64_t part = (b - a) / (8 * streams) * 8;
        v2u64 x0 = {0, 0}, x1 = x0, x2 = x0, x3 = x0;
        for (int64_t i = a; i < a + part; i += 8) {
            for (int s = 0; s < streams; ++s) {
                if (prefetch) __builtin_prefetch(p + i + s * part + kPrefetchWords);
                const uint64_t* q = p + i + s * part;
                v2u64 v0, v1, v2, v3;
                std::memcpy(&v0, q, 16);
                std::memcpy(&v1, q + 2, 16);
                std::memcpy(&v2, q + 4, 16);
                std::memcpy(&v3, q + 6, 16);
                x0 ^= v0;
                x1 ^= v1;
                x2 ^= v2;
                x3 ^= v3;
            }
        }
        uint64_t r = 0;
        for (int64_t i = a + streams * part; i < b; ++i) r ^= p[i];
        const v2u64 x = x0 ^ x1 ^ x2 ^ x3;
        sink[size_t(thread) * 8] ^= r ^ x[0] ^ x[1];
    });
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    uint64_t all = 0;
    for (uint64_t v : sink) all ^= v;
    return {all, dt};
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "llamacpu kernels, CPU backend, sampler and quantizers";

    m.attr("F32") = int(kF32);
    m.attr("F16") = int(kF16);
    m.attr("Q8_0") = int(kQ8_0);
    m.attr("Q4_0") = int(kQ4_0);
    m.attr("Q4_1") = int(kQ4_1);
    m.attr("Q4_K") = int(kQ4_K);
    m.attr("Q6_K") = int(kQ6_K);
    m.attr("SUPER_BLOCK") = kSuperBlock;
    m.attr("TILE_ROWS") = kTileRows;
    m.attr("BLOCK") = kBlock;

    m.def("matrix_bytes", &matrix_bytes, "Bytes of a [rows, cols] matrix of a type; -1 if not allowed",
          py::arg("dtype"), py::arg("rows"), py::arg("cols"));

    m.def("cpu_features", [] {
        const CpuFeatures& f = cpu_features();
        py::dict d;
        d["brand"] = f.brand;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512vnni"] = f.avx512vnni;
        d["neon"] = f.neon;
        d["dotprod"] = f.dotprod;
        d["vendor"] = f.vendor;
        return d;
    });
    m.def("software_prefetch", [] { return g_software_prefetch; },
          "Whether the single-token kernels prefetch ahead (chosen by CPU when the library loads; "
          "LLAMACPU_PREFETCH=0 or 1 overrides)");
    m.def("read_seconds", [](py::buffer buf, int n_threads, int streams, bool prefetch) {
              return read_all(buf, n_threads, streams, prefetch).second;
          }, py::arg("buffer"), py::arg("n_threads"), py::arg("streams") = 4, py::arg("prefetch") = true,
          "Seconds to read every 8-byte word of buffer with n threads, each 1 MiB chunk as `streams` "
          "side-by-side parts (1, 2 or 4), prefetched ahead or not (memory bandwidth probe)");
    m.def("read_xor", [](py::buffer buf, int n_threads, int streams, bool prefetch) {
              return read_all(buf, n_threads, streams, prefetch).first;
          }, py::arg("buffer"), py::arg("n_threads"), py::arg("streams") = 4, py::arg("prefetch") = true,
          "XOR of the words read_seconds reads (for tests)");
    m.def("usable_isas", [] {
        std::vector<std::string> names;
        for (const KernelTable* k : usable_tables()) names.push_back(k->name);
        return names;
    }, "Instruction-set paths this build has and this CPU runs, best first");

    py::class_<PyMatrix, std::shared_ptr<PyMatrix>>(m, "Matrix")
        .def(py::init(&make_matrix), py::arg("buffer"), py::arg("offset"), py::arg("dtype"), py::arg("rows"),
             py::arg("cols"))
        .def_property_readonly("dtype", [](const PyMatrix& p) { return p.m.dtype; })
        .def_property_readonly("rows", [](const PyMatrix& p) { return p.m.rows; })
        .def_property_readonly("cols", [](const PyMatrix& p) { return p.m.cols; })
        .def_static("from_file", &file_matrix, py::arg("fd"), py::arg("offset"), py::arg("dtype"), py::arg("rows"),
                    py::arg("cols"), "A matrix left in the file, its rows read on demand (for embed)")
        .def_property_readonly("in_memory", [](const PyMatrix& p) { return p.m.data != nullptr || !p.parts.empty(); })
        .def_static("stacked", &make_stacked, py::arg("parts"),
                    "One matrix made of row segments (matrices of the same columns, any types); dtype -1")
        .def_property_readonly("parts", [](const PyMatrix& p) {
            std::vector<std::pair<int64_t, int32_t>> out;
            for (const auto& part : p.parts) out.emplace_back(part->m.rows, part->m.dtype);
            return out;
        }, "(rows, dtype) of each row segment; empty for a plain matrix")
        .def("dequantize_row", [](const PyMatrix& p, int64_t r) {
            if (r < 0 || r >= p.m.rows) throw std::invalid_argument("row out of range");
            py::array_t<float> out(p.m.cols);
            const auto [m, rr] = row_home(p, r);
            std::vector<uint8_t> scratch;
            read_row(*m, rr, out.mutable_data(), scratch);
            return out;
        });

    py::class_<KVCache>(m, "KVCache")
        .def(py::init([](int64_t n_layers, int64_t n_kv_heads, int64_t n_ctx, int64_t head_dim, bool f16) {
                 need(n_layers > 0 && n_kv_heads > 0 && n_ctx > 0 && head_dim > 0, "KVCache: sizes must be positive");
                 // Checked factor by factor: the plain product of four large ints can wrap.
                 int64_t elems = 1;
                 for (int64_t f : {n_layers, n_kv_heads, n_ctx, head_dim}) {
                     need(f < (int64_t(1) << 40) / elems, "KVCache: too large");
                     elems *= f;
                 }
                 return new KVCache(n_layers, n_kv_heads, n_ctx, head_dim, f16);
             }),
             py::arg("n_layers"), py::arg("n_kv_heads"), py::arg("n_ctx"), py::arg("head_dim"), py::arg("f16"))
        .def_property_readonly("bytes", &KVCache::bytes)
        .def_readonly("n_ctx", &KVCache::n_ctx)
        .def_readonly("f16", &KVCache::f16)
        .def("keys", [](KVCache& c, int64_t layer, int64_t head, int64_t n) { return cache_rows(c, layer, head, n, false); })
        .def("values", [](KVCache& c, int64_t layer, int64_t head, int64_t n) { return cache_rows(c, layer, head, n, true); });

    py::class_<Plan>(m, "Plan")
        .def(py::init<>())
        .def("__len__", [](const Plan& p) { return p.ops.size(); });

    py::class_<PyBackend>(m, "Backend")
        .def(py::init<int, const std::string&>(), py::arg("n_threads") = 1, py::arg("isa") = "auto")
        .def_property_readonly("name", &PyBackend::name)
        .def_property_readonly("n_threads", &PyBackend::n_threads)
        .def_property_readonly("seconds", &PyBackend::seconds, "Total time spent inside ops")
        .def("matmul", &PyBackend::matmul, py::arg("w"), py::arg("x"), py::arg("out"), py::arg("accumulate") = false)
        .def("rmsnorm", &PyBackend::rmsnorm)
        .def("rope", &PyBackend::rope)
        .def("kv_store", &PyBackend::kv_store)
        .def("attention", &PyBackend::attention)
        .def("silu_mul", &PyBackend::silu_mul)
        .def("embed", &PyBackend::embed)
        .def("kv_shift", &PyBackend::kv_shift)
        .def("record", &PyBackend::record, py::keep_alive<1, 2>(),
             "Ops called from now on are appended to plan instead of run")
        .def("stop", &PyBackend::stop, "Stops recording")
        .def("run", &PyBackend::run, "Runs a recorded plan (GIL released)");

    py::class_<PyKernels>(m, "Kernels")
        .def(py::init<const std::string&>())
        .def_property_readonly("name", &PyKernels::name)
        .def_property_readonly("q6k_reads_offsets", [](const PyKernels& k) { return k.reads_q6k_offsets(); },
                               "whether this path's Q6_K kernel reads the per-call group offsets (q6k_offsets)")
        .def("quantize_row_q8", &PyKernels::quantize_row_q8, py::arg("x"), py::arg("group") = kBlock)
        .def("q6k_offsets", &PyKernels::q6k_offsets, py::arg("q"))
        .def("softmax", &PyKernels::softmax)
        .def("attention", &PyKernels::attention);

    py::class_<Sampler>(m, "Sampler")
        .def(py::init<uint64_t>(), py::arg("seed"))
        .def("seed", &Sampler::seed)
        .def("sample",
             [](Sampler& s, py::array logits, float temperature, int32_t top_k, float top_p, float min_p,
                float repeat_penalty, py::array recent) {
                 Rows l = rows_of(logits, "logits", false);
                 need(l.rows == 1 && l.cols > 0, "sample: logits must be a non-empty 1-D array");
                 const int32_t* rp = recent.size() ? vec_of<int32_t>(recent, "recent", 0) : nullptr;
                 const int64_t n_recent = recent.size();
                 SamplerParams p;
                 p.temperature = temperature;
                 p.top_k = top_k;
                 p.top_p = top_p;
                 p.min_p = min_p;
                 p.repeat_penalty = repeat_penalty;
                 py::gil_scoped_release nogil;
                 return s.sample(l.p, l.cols, p, rp, n_recent);
             },
             py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
             py::arg("repeat_penalty"), py::arg("recent"));

    m.def("quantize_tiles", [](int32_t dtype, py::array src, py::array quants, py::array scales,
                               const std::string& method) {
        Rows s = rows_of(src, "src", false);
        need(is_quantized(dtype), "quantize_tiles: dtype must be Q8_0, Q4_0 or Q4_1");
        need(method == "mse" || method == "ref", "quantize_tiles: method must be 'mse' or 'ref'");
        const int32_t how = method == "ref" ? kQuantRef : kQuantMse;
        need(s.cols % kBlock == 0 && s.ld == s.cols, "quantize_tiles: src must be contiguous, cols % 32 == 0");
        const int64_t nb = s.cols / kBlock, tiles = n_tiles(s.rows);
        check_dtype<uint8_t>(quants, "quants");
        check_dtype<uint16_t>(scales, "scales");
        need(quants.writeable() && scales.writeable(), "quantize_tiles: outputs must be writable");
        need((quants.flags() & py::array::c_style) && (scales.flags() & py::array::c_style), "outputs: C-contiguous");
        need(quants.size() == tiles * nb * tile_block_quant_bytes(dtype), "quantize_tiles: quants has the wrong size");
        need(scales.size() == tiles * nb * tile_block_scale_bytes(dtype) / 2, "quantize_tiles: scales has the wrong size");
        uint8_t* qp = static_cast<uint8_t*>(quants.mutable_data());
        uint16_t* sp = static_cast<uint16_t*>(scales.mutable_data());
        py::gil_scoped_release nogil;
        quantize_tiles(dtype, s.p, s.rows, s.cols, qp, sp, how);
    }, py::arg("dtype"), py::arg("src"), py::arg("quants"), py::arg("scales"), py::arg("method") = "mse");
    // K-quants (kquants.h): the float rows of src [rows, cols], cols % 256 == 0, quantized by
    // method "mse" (least weighted squared error, never worse than "ref") or "ref" (llama.cpp's
    // rule, byte for byte); importance: optional float32 [cols] weighting the error per column.
    auto k_args = [](int32_t dtype, py::array& src, const std::string& method, py::object importance,
                     const float** imp) {
        need(is_kquant(dtype), "dtype must be Q4_K or Q6_K");
        need(method == "mse" || method == "ref", "method must be 'mse' or 'ref'");
        Rows s = rows_of(src, "src", false);
        need(s.cols % kSuperBlock == 0 && s.ld == s.cols, "src must be contiguous with cols % 256 == 0");
        *imp = nullptr;
        if (!importance.is_none()) {
            // An array the caller holds (a cast copy would die before the quantizer reads it).
            need(py::isinstance<py::array>(importance), "importance must be a float32 numpy array");
            py::array a = importance.cast<py::array>();
            *imp = vec_of<float>(a, "importance", s.cols);
            need(a.shape(0) == s.cols, "importance must have one value per column");
        }
        return std::make_pair(s, method == "ref" ? int32_t(kQuantRef) : int32_t(kQuantMse));
    };
    m.def("quantize_k_tiles", [k_args](int32_t dtype, py::array src, py::array dst, const std::string& method,
                                       py::object importance) {
        const float* imp;
        const auto [s, how] = k_args(dtype, src, method, importance, &imp);
        check_dtype<uint8_t>(dst, "dst");
        need(dst.writeable() && (dst.flags() & py::array::c_style), "dst: writable and C-contiguous");
        need(dst.size() == matrix_bytes(dtype, s.rows, s.cols), "dst has the wrong size");
        uint8_t* dp = static_cast<uint8_t*>(dst.mutable_data());
        py::gil_scoped_release nogil;
        quantize_k_tiles(dtype, s.p, s.rows, s.cols, dp, how, imp);
    }, py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("method") = "mse", py::arg("importance") = py::none(),
       "Quantizes src into the tile layout of a Q4_K / Q6_K matrix (dst: matrix_bytes uint8)");
    m.def("quantize_k_gguf", [k_args](int32_t dtype, py::array src, const std::string& method, py::object importance) {
        const float* imp;
        const auto [s, how] = k_args(dtype, src, method, importance, &imp);
        const int64_t bytes = (s.cols / kSuperBlock) * (dtype == kQ4_K ? 144 : 210);
        py::array_t<uint8_t> out({s.rows, bytes});
        uint8_t* op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            quantize_k_gguf(dtype, s.p, s.rows, s.cols, op, how, imp);
        }
        return out;
    }, py::arg("dtype"), py::arg("src"), py::arg("method") = "mse", py::arg("importance") = py::none(),
       "The same quantization as GGUF Q4_K / Q6_K blocks: uint8 [rows, cols/256 * 144 or 210]");
}
