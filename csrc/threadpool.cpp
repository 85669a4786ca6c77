#include "threadpool.h"

#include <sched.h>

#include <chrono>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield" ::: "memory"); }
#else
static inline void cpu_relax() {}
#endif

namespace llamacpu {

// How long an idle worker spins before it sleeps: longer than the Python code between two
// kernel calls of one decode step, far shorter than a person's pause.
static constexpr auto kSpin = std::chrono::microseconds(300);

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back(&ThreadPool::worker, this, i);
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_.store(true);
        epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
}

void ThreadPool::work(int index) {
    for (;;) {
        const int64_t t = next_task_.fetch_add(1, std::memory_order_relaxed);
        if (t >= n_tasks_) break;
        (*fn_)(t, index);
    }
}

void ThreadPool::run(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
    if (n_tasks <= 0) return;
    if (n_threads_ == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
        return;
    }
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(mu_);
        epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(0);
    // Workers finish within microseconds when they have a core; when the machine is
    // oversubscribed, yielding lets a descheduled worker run instead of spinning against it.
    for (int spins = 0; pending_.load(std::memory_order_acquire) > 0; ++spins) {
        if (spins < 4096) {
            cpu_relax();
        } else {
            sched_yield();
        }
    }
}

void ThreadPool::worker(int index) {
    uint64_t seen = 0;
    for (;;) {
        auto start = std::chrono::steady_clock::now();
        int spins = 0;
        while (epoch_.load(std::memory_order_acquire) == seen) {
            cpu_relax();
            if (++spins % 256 == 0) {
                if (spins >= 4096) sched_yield();
                if (std::chrono::steady_clock::now() - start > kSpin) {
                    std::unique_lock<std::mutex> lock(mu_);
                    cv_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
                    break;
                }
            }
        }
        seen = epoch_.load(std::memory_order_acquire);
        if (stop_.load()) return;
        work(index);
        pending_.fetch_sub(1, std::memory_order_release);
    }
}

}  // namespace llamacpu
