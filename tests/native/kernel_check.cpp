// Standalone check of one SIMD kernel table against the scalar reference, without Python.
// The same program checks the AVX2 table natively on x86 and the NEON table on AArch64
// (cross-compiled and run under qemu-aarch64 by run_aarch64.sh), so the Arm path is tested
// on machines without an Arm CPU. The table is chosen at compile time:
//
//   -DCHECK_TABLE=kAvx2Kernels -DLLAMACPU_HAVE_AVX2        kernels_avx2.cpp (-mavx2 -mfma -mf16c)
//   -DCHECK_TABLE=kNeonKernels -DLLAMACPU_HAVE_NEON        kernels_neon.cpp (aarch64)
//   -DCHECK_TABLE=kNeonEmuKernels -DLLAMACPU_HAVE_NEON_EMU kernels_neon_emu.cpp (SIMDe)
//
// plus the table's kquants_*.cpp unit (same flags), linked with kernels_scalar.cpp,
// kquants_scalar.cpp, quantize.cpp, kquants_quantize.cpp and cpu.cpp, all compiled with -ffp-contract=off
// as CMakeLists.txt does (otherwise the compiler may fuse the reference's own mul + add).
//
// What "agree" means per kernel:
//  - quantize_row_q8 and the f16 conversions: bit for bit (NaN only has to stay NaN).
//  - quantized matmuls: bit for bit equal to the per-row arithmetic every SIMD path promises
//    (exact integer dot per block, then acc = fma(dot, d_w * d_a, acc) in block order, and for
//    Q4_1 then acc = fma(m_w, float(sum a) * d_a, acc)), and within rounding of the scalar
//    path, which multiplies and adds separately.
//  - everything else: within an error bound derived from the magnitudes of its sums.
// Outputs a kernel must not write (other tiles, padding rows, the gaps of a stride) must keep
// their initial bits.
//
// Prints one line per kernel. Exit status: 0 all agree, 1 a mismatch, 77 this CPU cannot run
// the table (the test runners treat that as a skip).
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu.h"
#include "kernels.h"
#include "kquants.h"
#include "quantize.h"
#include "quants.h"

#ifndef CHECK_TABLE
#error "compile with -DCHECK_TABLE=<kernel table>, e.g. kAvx2Kernels"
#endif

using namespace llamacpu;

namespace {

const KernelTable& simd = CHECK_TABLE;
const KernelTable& ref = kScalarKernels;

// ---- reporting ---------------------------------------------------------------------------

std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

struct Result {
    Result(const char* kernel_, const char* how_) : kernel(kernel_), how(how_) {}
    const char* kernel;
    std::string how;        // what was compared, for the report line
    int64_t values = 0;     // output values compared
    double worst = 0.0;     // largest |got - want| / tolerance seen
    int64_t failures = 0;
    std::string first;      // the first failure, in words

    void fail(const std::string& what) {
        if (failures++ == 0) first = what;
    }
    // `where` is a callable that names the value; only called on a failure.
    template <typename Where>
    void same_bits(uint32_t got, uint32_t want, Where&& where) {
        ++values;
        if (got != want) fail(fmt("%s: got bits %08x, want %08x", where().c_str(), got, want));
    }
    template <typename Where>
    void same_float(float got, float want, Where&& where) {
        ++values;
        if (std::isnan(got) && std::isnan(want)) return;
        if (bits_of(got) != bits_of(want)) fail(fmt("%s: got %.9g, want %.9g (bitwise)", where().c_str(), got, want));
    }
    template <typename Where>
    void close(double got, double want, double tol, Where&& where) {
        ++values;
        if (got == want || (std::isnan(got) && std::isnan(want))) return;
        const double err = std::fabs(got - want);
        if (tol > 0) worst = std::fmax(worst, err / tol);
        if (!(err <= tol)) fail(fmt("%s: got %.9g, want %.9g, tolerance %.3g", where().c_str(), got, want, tol));
    }
};

// Worst-case relative error of a float sum of n terms against the sum of their magnitudes,
// for the difference of two paths that round differently: n units of 2^-24 each, plus slack
// for the few roundings outside the sum.
double sum_tolerance(int64_t n) { return double(n + 4) * std::ldexp(1.0, -23); }

// ---- random inputs -----------------------------------------------------------------------

std::mt19937 rng(20240607);

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

std::vector<float> randn(int64_t n, float scale = 1.0f) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

std::vector<uint16_t> to_f16(const std::vector<float>& v) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = fp32_to_fp16(v[i]);
    return h;
}

// ---- quantized matmuls -------------------------------------------------------------------

struct QMatrix {
    int32_t type;
    int64_t rows, k;
    std::vector<uint8_t> bytes;  // quants, then scales (quants.h)
    int64_t nb() const { return k / kBlock; }
    int64_t quant_bytes() const { return n_tiles(rows) * nb() * tile_block_quant_bytes(type); }
    uint16_t* scales() { return reinterpret_cast<uint16_t*>(bytes.data() + quant_bytes()); }
    // fp16 values per tile-block: 16 scales d, and for Q4_1 then 16 mins m.
    int64_t scale_stride() const { return type == kQ4_1 ? 2 * kTileRows : kTileRows; }
    int64_t n_scales() const { return n_tiles(rows) * nb() * scale_stride(); }
    const uint8_t* tile_block(int64_t t, int64_t b) const {
        return bytes.data() + (t * nb() + b) * tile_block_quant_bytes(type);
    }
    // Entry `which` (0: d, 1: m) of row n's scales for block b.
    float scale_entry(int64_t n, int64_t b, int which) const {
        const uint16_t* s = reinterpret_cast<const uint16_t*>(bytes.data() + quant_bytes());
        return fp16_to_fp32(s[((n / kTileRows) * nb() + b) * scale_stride() + which * kTileRows + n % kTileRows]);
    }
    float scale(int64_t n, int64_t b) const { return scale_entry(n, b, 0); }
    float min(int64_t n, int64_t b) const { return scale_entry(n, b, 1); }
    // The quant of row n, column c of block b, read from the layout as quants.h describes
    // it (independently of the kernels): Q4_0 and Q4_1 as the stored nibble 0..15.
    int quant(int64_t n, int64_t b, int c) const {
        const uint8_t* tb = tile_block(n / kTileRows, b);
        const int r = int(n % kTileRows);
        if (type == kQ8_0) return int8_t(tb[(c / 4) * 64 + r * 4 + c % 4]);
        const int cc = c % 16;
        const uint8_t byte = tb[(cc / 4) * 64 + r * 4 + cc % 4];
        return c < 16 ? (byte & 0x0f) : (byte >> 4);
    }
};

// Weights the converter would write: quantize_tiles of gaussian rows.
QMatrix quantized_from_floats(int32_t type, int64_t rows, int64_t k) {
    QMatrix m{type, rows, k, std::vector<uint8_t>(matrix_bytes(type, rows, k))};
    quantize_tiles(type, randn(rows * k).data(), rows, k, m.bytes.data(), m.scales());
    return m;
}

// Every byte value (so nibbles 0 and 15, int8 -128 and 127, and junk in the padding rows) and
// random scales of either sign.
QMatrix quantized_raw(int32_t type, int64_t rows, int64_t k) {
    QMatrix m{type, rows, k, std::vector<uint8_t>(matrix_bytes(type, rows, k))};
    for (int64_t i = 0; i < m.quant_bytes(); ++i) m.bytes[i] = uint8_t(rng());
    for (int64_t i = 0; i < m.n_scales(); ++i) m.scales()[i] = fp32_to_fp16(uniform(-2.0f, 2.0f));
    return m;
}

struct Acts {
    std::vector<int8_t> q;
    std::vector<float> d;
    std::vector<int32_t> s;
    std::vector<int32_t> g;  // ActQ8::g, as the backend fills it for Q6_K
    ActQ8 view;
};

// T rows of k activations, quantized by the scalar path (both tables get the same input), one
// scale per group columns (32; the K-quant kernels take kSuperBlock).
Acts quantized_acts(int64_t T, int64_t k, int64_t group = kBlock) {
    const int64_t nb = k / kBlock;
    Acts a{std::vector<int8_t>(T * k), std::vector<float>(T * nb), std::vector<int32_t>(T * nb),
           std::vector<int32_t>(T * 2 * nb), {}};
    const std::vector<float> x = randn(T * k, 3.0f);
    for (int64_t t = 0; t < T; ++t) {
        ref.quantize_row_q8(x.data() + t * k, k, group, a.q.data() + t * k, a.d.data() + t * nb, a.s.data() + t * nb);
        kq_scalar_q6k_offsets(a.q.data() + t * k, nb, a.g.data() + t * 2 * nb);
    }
    a.view = ActQ8{a.q.data(), a.d.data(), a.s.data(), k, nb, T, a.g.data()};
    return a;
}

// The per-row arithmetic every SIMD path promises for row n and token tok; *magnitude gets
// the sum of |term| for the tolerance against the scalar path.
float fused_row(const QMatrix& m, const Acts& a, int64_t n, int64_t tok, double* magnitude) {
    float acc = 0.0f;
    *magnitude = 0.0;
    for (int64_t b = 0; b < m.nb(); ++b) {
        int32_t dot = 0;
        for (int c = 0; c < kBlock; ++c) dot += m.quant(n, b, c) * a.q[tok * a.view.ldq + b * kBlock + c];
        if (m.type == kQ4_0) dot -= 8 * a.s[tok * a.view.nb + b];
        const float da = a.d[tok * a.view.nb + b];
        const float scale = m.scale(n, b) * da;
        acc = std::fma(float(dot), scale, acc);
        *magnitude += std::fabs(double(dot) * double(scale));
        if (m.type == kQ4_1) {
            const float sum_scaled = float(a.s[tok * a.view.nb + b]) * da;
            acc = std::fma(m.min(n, b), sum_scaled, acc);
            *magnitude += std::fabs(double(m.min(n, b)) * double(sum_scaled));
        }
    }
    return acc;
}

// Float terms a quantized matmul sums per output: one per block, two for Q4_1.
int64_t n_terms(const QMatrix& m) { return m.type == kQ4_1 ? 2 * m.nb() : m.nb(); }

using MatmulQ = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const ActQ8&, float*, int64_t, bool);

// One tile range of a quantized matmul against the fused reference (bit for bit) and the
// scalar path (within the rounding of `terms` float sums); rows outside the range untouched.
template <typename M, typename Fused>
void check_tiles_case(Result& res, MatmulQ got_fn, MatmulQ want_fn, const M& m, const Acts& a, int64_t tile0,
                      int64_t tile1, bool accumulate, Fused fused_of, int64_t terms) {
    const int64_t T = a.view.T, ldo = m.rows + 3;
    std::vector<float> init(T * ldo);
    for (float& v : init) v = uniform(-1.0f, 1.0f);
    std::vector<float> got = init, want = init;
    got_fn(m.bytes.data(), m.rows, m.k, tile0, tile1, a.view, got.data(), ldo, accumulate);
    want_fn(m.bytes.data(), m.rows, m.k, tile0, tile1, a.view, want.data(), ldo, accumulate);
    const int64_t n_begin = tile0 * kTileRows, n_end = std::min(tile1 * kTileRows, m.rows);
    for (int64_t tok = 0; tok < T; ++tok) {
        for (int64_t n = 0; n < ldo; ++n) {
            const int64_t i = tok * ldo + n;
            auto where = [&](const char* what) {
                return fmt("rows %lld k %lld T %lld tiles [%lld,%lld) acc %d: token %lld row %lld %s",
                           (long long)m.rows, (long long)m.k, (long long)T, (long long)tile0, (long long)tile1,
                           int(accumulate), (long long)tok, (long long)n, what);
            };
            if (n < n_begin || n >= n_end) {
                res.same_bits(bits_of(got[i]), bits_of(init[i]), [&] { return where("(must stay untouched)"); });
                continue;
            }
            double magnitude;
            const float fused = fused_of(m, a, n, tok, &magnitude);
            res.same_float(got[i], accumulate ? init[i] + fused : fused, [&] { return where("vs fused reference"); });
            res.close(got[i], want[i], sum_tolerance(terms) * (magnitude + std::fabs(init[i])),
                      [&] { return where("vs scalar"); });
        }
    }
}

void check_matmul_q_case(Result& res, MatmulQ got_fn, MatmulQ want_fn, const QMatrix& m, const Acts& a,
                         int64_t tile0, int64_t tile1, bool accumulate) {
    check_tiles_case(res, got_fn, want_fn, m, a, tile0, tile1, accumulate, fused_row, n_terms(m));
}

MatmulQ matmul_of(const KernelTable& table, int32_t type) {
    return type == kQ4_0 ? table.matmul_q4_0 : type == kQ4_1 ? table.matmul_q4_1 : table.matmul_q8_0;
}

Result check_matmul_q(int32_t type) {
    Result res{type == kQ4_0 ? "matmul_q4_0" : type == kQ4_1 ? "matmul_q4_1" : "matmul_q8_0",
               "bitwise vs fused per-row reference, close to scalar"};
    const MatmulQ got_fn = matmul_of(simd, type);
    const MatmulQ want_fn = matmul_of(ref, type);
    for (int raw = 0; raw < 2; ++raw) {
        for (int64_t rows : {1, 4, 5, 16, 19, 33, 64}) {
            for (int64_t k : {32, 96, 160}) {
                const QMatrix m = raw ? quantized_raw(type, rows, k) : quantized_from_floats(type, rows, k);
                const int64_t nt = n_tiles(rows);
                for (int64_t T : {1, 2, 3, 4, 5, 8, 9}) {
                    const Acts a = quantized_acts(T, k);
                    for (int accumulate = 0; accumulate < 2; ++accumulate) {
                        check_matmul_q_case(res, got_fn, want_fn, m, a, 0, nt, accumulate);
                        if (nt > 1) check_matmul_q_case(res, got_fn, want_fn, m, a, 1, nt, accumulate);
                        if (nt > 2) check_matmul_q_case(res, got_fn, want_fn, m, a, 0, 1, accumulate);
                    }
                }
            }
        }
    }
    return res;
}

// ---- K-quant matmuls ---------------------------------------------------------------------

// A Q4_K / Q6_K matrix, read from the layout as kquants.h describes it (independently of the
// kernels and of kquants.h's own helpers).
struct KMatrix {
    int32_t type;
    int64_t rows, k;
    std::vector<uint8_t> bytes;  // quants, then scales
    int64_t nsb() const { return k / kSuperBlock; }
    int64_t quant_bytes() const { return n_tiles(rows) * nsb() * k_tile_quant_bytes(type); }
    const uint8_t* quants(int64_t n, int64_t s) const {
        return bytes.data() + ((n / kTileRows) * nsb() + s) * k_tile_quant_bytes(type);
    }
    const uint8_t* scales(int64_t n, int64_t s) const {
        return bytes.data() + quant_bytes() + ((n / kTileRows) * nsb() + s) * k_tile_scale_bytes(type);
    }
    float fp16(int64_t n, int64_t s, int which) const {  // Q4_K: 0 d, 1 dmin; Q6_K: 0 d
        uint16_t h;
        std::memcpy(&h, scales(n, s) + 32 * which + 2 * (n % kTileRows), 2);
        return fp16_to_fp32(h);
    }
    // Q4_K: the nibble (0..15) of column c (0..255) of super-block s; Q6_K: the 6-bit quant.
    int quant(int64_t n, int64_t s, int c) const {
        const int r = int(n % kTileRows), j = c / 32, cc = c % 32;
        if (type == kQ4_K) {
            const uint8_t byte = quants(n, s)[256 * j + ((cc % 16) / 4) * 64 + r * 4 + cc % 4];
            return cc < 16 ? (byte & 15) : (byte >> 4);
        }
        const uint8_t* sub = quants(n, s) + 384 * j;
        const int t = cc / 16, g = (cc % 16) / 4, i = cc % 4;
        auto vec = [&](int kk) { return int(sub[(3 * t + kk) * 64 + r * 4 + i]); };
        if (g < 3) return vec(g) & 63;
        return (vec(0) >> 6) | ((vec(1) >> 6) << 2) | ((vec(2) >> 6) << 4);
    }
    // Q4_K: sub-block j's 6-bit scale and min from GGUF's 12 bytes (byte kk of row r at 16*kk + r).
    void scale_min(int64_t n, int64_t s, int j, int* sc, int* m) const {
        const uint8_t* b = scales(n, s) + 64 + n % kTileRows;
        uint8_t g[12];
        for (int kk = 0; kk < 12; ++kk) g[kk] = b[16 * kk];
        *sc = j < 4 ? g[j] & 63 : (g[j + 4] & 15) | ((g[j - 4] >> 6) << 4);
        *m = j < 4 ? g[j + 4] & 63 : (g[j + 4] >> 4) | ((g[j] >> 6) << 4);
    }
    int q6_scale(int64_t n, int64_t s, int g) const { return int8_t(scales(n, s)[32 + 16 * g + n % kTileRows]); }
};

KMatrix kmatrix_from_floats(int32_t type, int64_t rows, int64_t k) {
    KMatrix m{type, rows, k, std::vector<uint8_t>(matrix_bytes(type, rows, k))};
    quantize_k_tiles(type, randn(rows * k).data(), rows, k, m.bytes.data(), kQuantMse, nullptr);
    return m;
}

// Every byte value in the quants and the packed scales (so 6-bit scales and mins up to 63,
// int8 scales down to -128), random fp16 d and dmin of either sign, junk in padding rows.
KMatrix kmatrix_raw(int32_t type, int64_t rows, int64_t k) {
    KMatrix m{type, rows, k, std::vector<uint8_t>(matrix_bytes(type, rows, k))};
    for (uint8_t& b : m.bytes) b = uint8_t(rng());
    const int64_t per_tile = k_tile_scale_bytes(type), fp16s = type == kQ4_K ? 32 : 16;
    for (int64_t i = 0; i < n_tiles(rows) * m.nsb(); ++i) {
        uint16_t* h = reinterpret_cast<uint16_t*>(m.bytes.data() + m.quant_bytes() + i * per_tile);
        for (int64_t r = 0; r < fp16s; ++r) h[r] = fp32_to_fp16(uniform(-0.05f, 0.05f));
    }
    return m;
}

// The per-row arithmetic of kquants.h with every multiply-add fused, as the SIMD paths do:
// exact integer sums per super-block, then one fma per sum with (d * da).
float fused_row_k(const KMatrix& m, const Acts& a, int64_t n, int64_t tok, double* magnitude) {
    float acc = 0.0f;
    *magnitude = 0.0;
    for (int64_t s = 0; s < m.nsb(); ++s) {
        int64_t isd = 0, ism = 0;
        for (int j = 0; j < 8; ++j) {
            const int64_t b = s * 8 + j;
            const int8_t* x = a.q.data() + tok * a.view.ldq + b * kBlock;
            if (m.type == kQ4_K) {
                int32_t dot = 0;
                for (int c = 0; c < kBlock; ++c) dot += m.quant(n, s, 32 * j + c) * x[c];
                int sc, mn;
                m.scale_min(n, s, j, &sc, &mn);
                isd += int64_t(sc) * dot;
                ism += int64_t(mn) * a.s[tok * a.view.nb + b];
            } else {
                int32_t dot[2] = {0, 0};
                for (int c = 0; c < kBlock; ++c) dot[c / 16] += (m.quant(n, s, 32 * j + c) - 32) * x[c];
                isd += int64_t(m.q6_scale(n, s, 2 * j)) * dot[0] + int64_t(m.q6_scale(n, s, 2 * j + 1)) * dot[1];
            }
        }
        // The kquants.h bounds: both sums fit int32 whatever the bytes.
        if (isd != int32_t(isd) || ism != int32_t(ism)) std::abort();
        const float da = a.d[tok * a.view.nb + s * 8];
        const float dd = m.fp16(n, s, 0) * da;
        acc = std::fma(dd, float(int32_t(isd)), acc);
        *magnitude += std::fabs(double(dd) * double(isd));
        if (m.type == kQ4_K) {
            const float dm = m.fp16(n, s, 1) * da;
            acc = std::fma(-dm, float(int32_t(ism)), acc);
            *magnitude += std::fabs(double(dm) * double(ism));
        }
    }
    return acc;
}

void check_matmul_k_case(Result& res, MatmulQ got_fn, MatmulQ want_fn, const KMatrix& m, const Acts& a,
                         int64_t tile0, int64_t tile1, bool accumulate) {
    // Terms the scalar path rounds: per super-block the scale products, the int-to-float
    // conversions and the sums.
    const int64_t terms = (m.type == kQ4_K ? 6 : 3) * m.nsb();
    check_tiles_case(res, got_fn, want_fn, m, a, tile0, tile1, accumulate, fused_row_k, terms);
}

Result check_matmul_k(int32_t type) {
    Result res{type == kQ4_K ? "matmul_q4_k" : "matmul_q6_k", "bitwise vs fused per-row reference, close to scalar"};
    const MatmulQ got_fn = type == kQ4_K ? simd.matmul_q4_k : simd.matmul_q6_k;
    const MatmulQ want_fn = type == kQ4_K ? ref.matmul_q4_k : ref.matmul_q6_k;
    for (int raw = 0; raw < 2; ++raw) {
        for (int64_t rows : {1, 5, 16, 19, 33}) {
            for (int64_t k : {256, 768}) {
                const KMatrix m = raw ? kmatrix_raw(type, rows, k) : kmatrix_from_floats(type, rows, k);
                const int64_t nt = n_tiles(rows);
                for (int64_t T : {1, 2, 3, 4, 5, 9}) {
                    const Acts a = quantized_acts(T, k, kSuperBlock);
                    for (int accumulate = 0; accumulate < 2; ++accumulate) {
                        check_matmul_k_case(res, got_fn, want_fn, m, a, 0, nt, accumulate);
                        if (nt > 1) check_matmul_k_case(res, got_fn, want_fn, m, a, 1, nt, accumulate);
                    }
                }
            }
        }
    }
    return res;
}

// ---- float matmuls -----------------------------------------------------------------------

template <typename W>
using MatmulF = void (*)(const W*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

template <typename W>
float weight_value(W w) {
    if constexpr (sizeof(W) == 2) return fp16_to_fp32(w);
    else return w;
}

template <typename W>
void check_matmul_float_case(Result& res, MatmulF<W> got_fn, MatmulF<W> want_fn, const std::vector<W>& w,
                             int64_t rows, int64_t k, int64_t row0, int64_t row1, int64_t n_tok, bool accumulate) {
    const int64_t ldx = k + 2, ldo = rows + 2;
    const std::vector<float> x = randn(n_tok * ldx);
    std::vector<float> init(n_tok * ldo);
    for (float& v : init) v = uniform(-1.0f, 1.0f);
    std::vector<float> got = init, want = init;
    got_fn(w.data(), k, row0, row1, x.data(), ldx, n_tok, got.data(), ldo, accumulate);
    want_fn(w.data(), k, row0, row1, x.data(), ldx, n_tok, want.data(), ldo, accumulate);
    for (int64_t t = 0; t < n_tok; ++t) {
        for (int64_t n = 0; n < ldo; ++n) {
            const int64_t i = t * ldo + n;
            auto where = [&](const char* what) {
                return fmt("rows [%lld,%lld) k %lld n_tok %lld acc %d: token %lld row %lld %s", (long long)row0,
                           (long long)row1, (long long)k, (long long)n_tok, int(accumulate), (long long)t, (long long)n,
                           what);
            };
            if (n < row0 || n >= row1) {
                res.same_bits(bits_of(got[i]), bits_of(init[i]), [&] { return where("(must stay untouched)"); });
                continue;
            }
            double magnitude = accumulate ? std::fabs(init[i]) : 0.0;
            for (int64_t j = 0; j < k; ++j)
                magnitude += std::fabs(double(weight_value(w[n * k + j])) * x[t * ldx + j]);
            res.close(got[i], want[i], sum_tolerance(k) * magnitude, [&] { return where(""); });
        }
    }
}

template <typename W>
Result check_matmul_float(const char* name, MatmulF<W> got_fn, MatmulF<W> want_fn) {
    Result res{name, "close to scalar"};
    for (int64_t rows : {1, 3, 4, 5, 9}) {
        for (int64_t k : {1, 3, 4, 5, 8, 9, 31, 64, 67}) {
            const std::vector<float> wf = randn(rows * k);
            std::vector<W> w;
            if constexpr (sizeof(W) == 2) w = to_f16(wf);
            else w = wf;
            for (int64_t n_tok : {1, 2, 3, 4, 5, 9}) {
                for (int accumulate = 0; accumulate < 2; ++accumulate) {
                    check_matmul_float_case<W>(res, got_fn, want_fn, w, rows, k, 0, rows, n_tok, accumulate);
                    if (rows > 2)
                        check_matmul_float_case<W>(res, got_fn, want_fn, w, rows, k, 1, rows - 1, n_tok, accumulate);
                }
            }
        }
    }
    return res;
}

// ---- activation quantization -------------------------------------------------------------

// Blocks that probe the rounding and the edges of act_inv_scale: ties at x*id = n + 0.5 (amax
// 127 makes id exactly 1), all zeros, subnormals, amax around 3.7e-37 where 127/amax stops
// being finite, and huge values.
std::vector<float> quantize_probe_row(int64_t k) {
    std::vector<float> x = randn(k, 2.0f);
    const int64_t nb = k / kBlock;
    for (int64_t b = 0; b < nb; ++b) {
        float* xb = x.data() + b * kBlock;
        switch (b % 6) {
            case 0:
                for (int i = 0; i < kBlock; ++i) xb[i] = float(int(rng() % 254) - 127) + 0.5f;
                xb[7] = 127.0f;
                break;
            case 1: std::fill(xb, xb + kBlock, 0.0f); break;
            case 2: for (int i = 0; i < kBlock; ++i) xb[i] = std::ldexp(float(int(rng() % 41) - 20), -149); break;
            case 3: for (int i = 0; i < kBlock; ++i) xb[i] *= 1e30f; break;
            case 4: {
                const float amax = uniform(3.6e-37f, 3.9e-37f);
                for (int i = 0; i < kBlock; ++i) xb[i] = uniform(-amax, amax);
                xb[11] = -amax;
                break;
            }
            default: break;  // gaussian
        }
    }
    return x;
}

Result check_quantize_row_q8() {
    Result res{"quantize_row_q8", "bitwise vs scalar"};
    for (int64_t k : {32, 64, 96, 192, 320, 256, 768}) {
      for (int64_t group : {kBlock, kSuperBlock}) {
        if (k % group) continue;
        for (int rep = 0; rep < 8; ++rep) {
            const std::vector<float> x = rep < 4 ? quantize_probe_row(k) : randn(k, rep);
            const int64_t nb = k / kBlock;
            std::vector<int8_t> gq(k), wq(k);
            std::vector<float> gd(nb), wd(nb);
            std::vector<int32_t> gs(nb), ws(nb);
            simd.quantize_row_q8(x.data(), k, group, gq.data(), gd.data(), gs.data());
            ref.quantize_row_q8(x.data(), k, group, wq.data(), wd.data(), ws.data());
            auto where = [&](const char* what, int64_t i) {
                return [=] {
                    return fmt("k %lld group %lld rep %d: %s[%lld]", (long long)k, (long long)group, rep, what, (long long)i);
                };
            };
            for (int64_t i = 0; i < k; ++i) res.same_bits(uint8_t(gq[i]), uint8_t(wq[i]), where("q", i));
            for (int64_t b = 0; b < nb; ++b) {
                res.same_bits(bits_of(gd[b]), bits_of(wd[b]), where("d", b));
                res.same_bits(uint32_t(gs[b]), uint32_t(ws[b]), where("s", b));
            }
        }
      }
    }
    return res;
}

Result check_q6k_offsets() {
    Result res{"q6k_offsets", "bitwise vs scalar"};
    if (!simd.q6k_offsets) return res;  // the table's Q6_K kernel does not read ActQ8::g
    for (int64_t nb : {1, 2, 3, 8, 24}) {
        for (int rep = 0; rep < 8; ++rep) {
            std::vector<int8_t> q(nb * kBlock);
            for (int8_t& v : q) v = int8_t(std::lround(uniform(-127.0f, 127.0f)));
            if (rep == 0) std::fill(q.begin(), q.end(), int8_t(127));  // the largest sums
            if (rep == 1) std::fill(q.begin(), q.end(), int8_t(-127));
            std::vector<int32_t> got(2 * nb), want(2 * nb);
            simd.q6k_offsets(q.data(), nb, got.data());
            kq_scalar_q6k_offsets(q.data(), nb, want.data());
            for (int64_t i = 0; i < 2 * nb; ++i)
                res.same_bits(uint32_t(got[i]), uint32_t(want[i]),
                              [=] { return fmt("nb %lld rep %d: g[%lld]", (long long)nb, rep, (long long)i); });
        }
    }
    return res;
}

// ---- element-wise kernels ----------------------------------------------------------------

const int64_t kLengths[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 100, 1000};

Result check_rmsnorm() {
    Result res{"rmsnorm", "close to scalar"};
    for (int64_t n : kLengths) {
        const std::vector<float> x = randn(n, 2.0f), w = randn(n);
        std::vector<float> got(n), want(n);
        simd.rmsnorm(x.data(), w.data(), n, 1e-5f, got.data());
        ref.rmsnorm(x.data(), w.data(), n, 1e-5f, want.data());
        for (int64_t i = 0; i < n; ++i)
            res.close(got[i], want[i], sum_tolerance(n + 8) * std::fabs(want[i]) + 1e-30,
                      [&] { return fmt("n %lld: [%lld]", (long long)n, (long long)i); });
    }
    return res;
}

Result check_rope() {
    Result res{"rope", "close to scalar"};
    for (int64_t n_heads : {1, 3}) {
        for (int64_t hd : {2, 4, 6, 8, 10, 64, 66}) {
            const std::vector<float> x = randn(n_heads * hd);
            std::vector<float> cos2(hd), sin2(hd);
            for (int64_t i = 0; i < hd; i += 2) {
                const float a = uniform(-3.2f, 3.2f);
                cos2[i] = cos2[i + 1] = std::cos(a);
                sin2[i] = -std::sin(a);
                sin2[i + 1] = std::sin(a);
            }
            std::vector<float> got = x, want = x;
            simd.rope(got.data(), n_heads, hd, cos2.data(), sin2.data());
            ref.rope(want.data(), n_heads, hd, cos2.data(), sin2.data());
            for (int64_t i = 0; i < n_heads * hd; ++i) {
                const int64_t c = i % hd, partner = i ^ 1;
                const double magnitude = std::fabs(x[i] * cos2[c]) + std::fabs(x[partner] * sin2[c]);
                res.close(got[i], want[i], sum_tolerance(2) * magnitude, [&] {
                    return fmt("heads %lld hd %lld: [%lld]", (long long)n_heads, (long long)hd, (long long)i);
                });
            }
        }
    }
    return res;
}

// exp, one division and two multiplications: a few units in the last place of the result
// (absolute slack where exp(-g) overflows and the result is about 0).
Result check_silu_mul() {
    Result res{"silu_mul", "close to scalar"};
    for (int64_t n : kLengths) {
        for (float spread : {4.0f, 40.0f}) {
            const std::vector<float> g = randn(n, spread), u = randn(n);
            std::vector<float> got(n), want(n);
            simd.silu_mul(g.data(), u.data(), got.data(), n);
            ref.silu_mul(g.data(), u.data(), want.data(), n);
            for (int64_t i = 0; i < n; ++i)
                res.close(got[i], want[i], std::ldexp(8.0, -24) * std::fabs(want[i]) + 1e-35, [&] {
                    return fmt("n %lld spread %g: [%lld] gate %g", (long long)n, spread, (long long)i, g[i]);
                });
        }
    }
    return res;
}

// Each output is exp(x - max) / sum: a few ulp for exp and the division, sum_tolerance(n) for the
// sum; values that underflow (below ~1e-38 of the largest) only need to stay tiny.
Result check_softmax() {
    Result res{"softmax", "close to scalar"};
    for (int64_t n : kLengths) {
        for (float spread : {1.0f, 10.0f, 60.0f}) {
            const std::vector<float> x = randn(n, spread);
            std::vector<float> got = x, want = x;
            simd.softmax(got.data(), n);
            ref.softmax(want.data(), n);
            for (int64_t i = 0; i < n; ++i)
                res.close(got[i], want[i], (sum_tolerance(n) + std::ldexp(8.0, -24)) * std::fabs(want[i]) + 1e-35,
                          [&] { return fmt("n %lld spread %g: [%lld]", (long long)n, spread, (long long)i); });
        }
    }
    return res;
}

// ---- attention ---------------------------------------------------------------------------

float kv_value(const std::vector<float>& f32, const std::vector<uint16_t>& f16, bool use_f16, int64_t i) {
    return use_f16 ? fp16_to_fp32(f16[i]) : f32[i];
}

// Tolerance per output column: scores off by at most delta change each probability by a
// factor within exp(+-2 delta), so out[c] moves by about 2 delta * sum_j p_j |v[j][c]|; plus
// the rounding of the weighted sum itself.
void check_attention_case(Result& res, bool kv_f16, int64_t n_pos, int64_t hd, int64_t n_rep) {
    const std::vector<float> q = randn(n_rep * hd), kf = randn(n_pos * hd), vf = randn(n_pos * hd);
    const std::vector<uint16_t> kh = to_f16(kf), vh = to_f16(vf);
    const void* k = kv_f16 ? static_cast<const void*>(kh.data()) : kf.data();
    const void* v = kv_f16 ? static_cast<const void*>(vh.data()) : vf.data();
    const float scale = 1.0f / std::sqrt(float(hd));
    std::vector<float> scores(kAttentionHeadGroup * n_pos), got(n_rep * hd), want(n_rep * hd);
    simd.attention(q.data(), k, v, kv_f16, n_pos, hd, n_rep, scale, scores.data(), got.data());
    ref.attention(q.data(), k, v, kv_f16, n_pos, hd, n_rep, scale, scores.data(), want.data());
    for (int64_t r = 0; r < n_rep; ++r) {
        std::vector<double> s(n_pos);
        double score_err = 0.0, mx = -INFINITY, sum = 0.0;
        for (int64_t j = 0; j < n_pos; ++j) {
            double dot = 0.0, magnitude = 0.0;
            for (int64_t i = 0; i < hd; ++i) {
                const double term = double(q[r * hd + i]) * kv_value(kf, kh, kv_f16, j * hd + i);
                dot += term;
                magnitude += std::fabs(term);
            }
            s[j] = dot * scale;
            score_err = std::fmax(score_err, sum_tolerance(hd) * magnitude * scale);
            mx = std::fmax(mx, s[j]);
        }
        for (double& p : s) sum += (p = std::exp(p - mx));
        for (int64_t c = 0; c < hd; ++c) {
            double spread = 0.0;
            for (int64_t j = 0; j < n_pos; ++j)
                spread += s[j] / sum * std::fabs(kv_value(vf, vh, kv_f16, j * hd + c));
            const int64_t i = r * hd + c;
            const double tol = (2.0 * score_err + sum_tolerance(n_pos) + std::ldexp(8.0, -24)) * spread + 1e-30;
            res.close(got[i], want[i], tol, [&] {
                return fmt("%s n_pos %lld hd %lld n_rep %lld: head %lld col %lld", kv_f16 ? "f16" : "f32",
                           (long long)n_pos, (long long)hd, (long long)n_rep, (long long)r, (long long)c);
            });
        }
    }
}

Result check_attention() {
    Result res{"attention", "close to scalar, f32 and f16 KV"};
    for (int kv_f16 = 0; kv_f16 < 2; ++kv_f16)
        for (int64_t n_pos : {1, 2, 3, 4, 5, 8, 9, 17, 40})
            for (int64_t hd : {2, 4, 6, 8, 12, 36, 64, 100, 128})
                // 7: head groups of 4, 2 and 1 (kAttentionHeadGroup).
                for (int64_t n_rep : {1, 3, 7}) check_attention_case(res, kv_f16, n_pos, hd, n_rep);
    return res;
}

// ---- f16 conversions ---------------------------------------------------------------------

// All 65536 halves, converted at odd offsets and lengths so that vector bodies and tails
// both see every value.
Result check_f16_to_f32() {
    Result res{"f16_to_f32", "bitwise vs scalar, all 65536 values"};
    std::vector<uint16_t> h(65536 + 7);
    for (size_t i = 0; i < h.size(); ++i) h[i] = uint16_t(i);
    for (int64_t offset : {0, 3}) {
        for (int64_t len : {65536, 1, 3, 5, 7}) {
            std::vector<float> got(len), want(len);
            simd.f16_to_f32(h.data() + offset, got.data(), len);
            ref.f16_to_f32(h.data() + offset, want.data(), len);
            for (int64_t i = 0; i < len; ++i)
                res.same_float(got[i], want[i], [&] { return fmt("half %04x", unsigned(h[offset + i])); });
        }
    }
    return res;
}

// Random bit patterns, plus exact ties between neighbouring halves (normal and subnormal)
// and the overflow boundary, where round-half-to-even decides.
std::vector<float> f16_probe_floats() {
    std::vector<float> x;
    for (int i = 0; i < 100000; ++i) {
        const uint32_t u = uint32_t(rng());
        float f;
        std::memcpy(&f, &u, 4);
        x.push_back(f);
        x.push_back(std::ldexp(uniform(-1.0f, 1.0f), int(rng() % 48) - 30));
    }
    for (uint32_t h = 0; h + 1 < 0x7c00; h += 7) {  // up to the largest finite half
        const float a = fp16_to_fp32(uint16_t(h)), b = fp16_to_fp32(uint16_t(h + 1));
        x.push_back(a + (b - a) * 0.5f);  // exact: the midpoint needs one more bit than a half
        x.push_back(-(a + (b - a) * 0.5f));
    }
    for (float f : {65504.0f, 65519.996f, 65520.0f, 65536.0f, 5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f, 0.0f, -0.0f,
                    INFINITY, -INFINITY, NAN})
        x.push_back(f);
    return x;
}

Result check_f32_to_f16() {
    Result res{"f32_to_f16", "bitwise vs scalar, ties and specials"};
    const std::vector<float> x = f16_probe_floats();
    for (int64_t offset : {0, 1}) {
        const int64_t n = int64_t(x.size()) - offset;
        std::vector<uint16_t> got(n), want(n);
        simd.f32_to_f16(x.data() + offset, got.data(), n);
        ref.f32_to_f16(x.data() + offset, want.data(), n);
        for (int64_t i = 0; i < n; ++i) {
            const float in = x[offset + i];
            const bool both_nan = std::isnan(fp16_to_fp32(got[i])) && std::isnan(fp16_to_fp32(want[i]));
            res.same_bits(both_nan ? 0 : got[i], both_nan ? 0 : want[i],
                          [&] { return fmt("offset %lld: %.9g (bits %08x)", (long long)offset, in, bits_of(in)); });
        }
    }
    return res;
}

}  // namespace

int main() {
    if (find_table(simd.name) == nullptr) {
        std::printf("kernel_check: table %s is not usable on this CPU, skipped\n", simd.name);
        return 77;
    }
    std::printf("kernel_check: %s vs scalar\n", simd.name);
    const Result results[] = {
        check_matmul_q(kQ4_0),
        check_matmul_q(kQ4_1),
        check_matmul_q(kQ8_0),
        check_matmul_k(kQ4_K),
        check_matmul_k(kQ6_K),
        check_matmul_float<uint16_t>("matmul_f16", simd.matmul_f16, ref.matmul_f16),
        check_matmul_float<float>("matmul_f32", simd.matmul_f32, ref.matmul_f32),
        check_quantize_row_q8(),
        check_q6k_offsets(),
        check_rmsnorm(),
        check_rope(),
        check_silu_mul(),
        check_softmax(),
        check_attention(),
        check_f16_to_f32(),
        check_f32_to_f16(),
    };
    int failed = 0;
    for (const Result& r : results) {
        if (r.failures) {
            ++failed;
            std::printf("  %-16s FAIL %lld of %lld values (%s); first: %s\n", r.kernel, (long long)r.failures,
                        (long long)r.values, r.how.c_str(), r.first.c_str());
        } else {
            std::printf("  %-16s ok   %8lld values, %s", r.kernel, (long long)r.values, r.how.c_str());
            if (r.worst > 0) std::printf("; worst error %.3f of tolerance", r.worst);
            std::printf("\n");
        }
    }
    return failed ? 1 : 0;
}
