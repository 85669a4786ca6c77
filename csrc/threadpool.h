// A small fork-join pool for the kernels. The calling thread works too, so a pool of n
// threads starts n-1 workers. Between jobs the workers spin for a short while (a decode
// step issues a job every few microseconds, and waking a sleeping thread costs tens of
// them), then sleep on a condition variable so an idle model uses no CPU.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace llamacpu {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }

    // Calls fn(task, thread_index) once for every task in [0, n_tasks). Tasks are claimed in
    // increasing order from a shared counter, so a thread that falls behind (a noisy core)
    // takes fewer. Which thread runs a task never changes what the task computes.
    void run(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);

private:
    void worker(int index);
    void work(int index);

    int n_threads_;
    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<uint64_t> epoch_{0};
    std::atomic<int> pending_{0};
    std::atomic<int64_t> next_task_{0};
    std::atomic<bool> stop_{false};
    int64_t n_tasks_ = 0;
    const std::function<void(int64_t, int)>* fn_ = nullptr;
};

}  // namespace llamacpu
