// A small persistent thread pool: workers wake per job and pull task indices from an atomic.
#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace orchard {
namespace {

thread_local bool t_inside_task = false;

int default_threads() {
    if (const char* env = std::getenv("ORCHARD_NUM_THREADS")) {
        const int n = std::atoi(env);
        if (n > 0) return n;
    }
    return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
public:
    // Lock-free, so that callers can compare before resizing without waiting for a job.
    int threads() const { return threads_.load(); }

    void resize(int n) {
        std::lock_guard<std::mutex> job(job_mutex_);
        if (n == threads_.load() && int(workers_.size()) + 1 == n) return;
        stop_workers();
        for (int i = 1; i < n; ++i) workers_.emplace_back([this] { work(); });
        threads_.store(n);
    }

    void run(int64_t n, TaskRef task) {
        std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
        if (!job.owns_lock() || t_inside_task || workers_.empty() || n == 1) {
            run_serial(n, task);
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            task_ = &task;
            n_ = n;
            next_.store(0);
            busy_ = int(workers_.size());
            error_ = nullptr;
            ++generation_;
        }
        wake_.notify_all();
        drain();
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return busy_ == 0; });
        task_ = nullptr;
        if (error_) std::rethrow_exception(error_);
    }

private:
    static void run_serial(int64_t n, TaskRef task) {
        const bool outer = t_inside_task;
        t_inside_task = true;
        try {
            for (int64_t i = 0; i < n; ++i) task(i);
        } catch (...) {
            t_inside_task = outer;
            throw;
        }
        t_inside_task = outer;
    }

    // Pulls indices until none are left; records the first exception.
    void drain() {
        t_inside_task = true;
        for (int64_t i; (i = next_.fetch_add(1)) < n_;) {
            try {
                (*task_)(i);
            } catch (...) {
                std::lock_guard<std::mutex> lock(mutex_);
                if (!error_) error_ = std::current_exception();
                next_.store(n_);
            }
        }
        t_inside_task = false;
    }

    void work() {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
            }
            drain();
            std::lock_guard<std::mutex> lock(mutex_);
            if (--busy_ == 0) done_.notify_one();
        }
    }

    void stop_workers() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        for (auto& w : workers_) w.join();
        workers_.clear();
        stop_ = false;
    }

    std::mutex job_mutex_;  // one job at a time
    std::mutex mutex_;      // guards the fields below
    std::condition_variable wake_, done_;
    std::vector<std::thread> workers_;
    std::atomic<int> threads_{1};
    TaskRef* task_ = nullptr;
    int64_t n_ = 0;
    std::atomic<int64_t> next_{0};
    int busy_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
    std::exception_ptr error_;
};

Pool& pool() {
    static Pool* p = [] {
        auto* created = new Pool();  // never destroyed: workers may outlive static destructors
        created->resize(default_threads());
        return created;
    }();
    return *p;
}

struct Runner {
    std::atomic<ParallelRun> run{nullptr};
    std::atomic<int> workers{1};
};

Runner& runner() {
    static Runner r;
    return r;
}

// Tasks handed out from an atomic counter to the workers of a framework's runner.
struct RunnerJob {
    int64_t n;
    TaskRef* task;
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::exception_ptr error;

    static void body(void* ctx, int) {
        auto* job = static_cast<RunnerJob*>(ctx);
        const bool outer = t_inside_task;
        t_inside_task = true;
        for (int64_t i; (i = job->next.fetch_add(1)) < job->n;) {
            try {
                (*job->task)(i);
            } catch (...) {
                std::lock_guard<std::mutex> lock(job->mutex);
                if (!job->error) job->error = std::current_exception();
                job->next.store(job->n);
            }
        }
        t_inside_task = outer;
    }
};

}  // namespace

void parallel_for(int64_t n, TaskRef task) {
    if (n <= 0) return;
    const ParallelRun run = runner().run.load();
    if (run == nullptr || t_inside_task) {
        pool().run(n, task);  // the pool itself runs nested calls inline
        return;
    }
    RunnerJob job;
    job.n = n;
    job.task = &task;
    run(int(std::min<int64_t>(n, runner().workers.load())), &RunnerJob::body, &job);
    if (job.error) std::rethrow_exception(job.error);
}

void set_pool_threads(int n) { pool().resize(n > 0 ? n : default_threads()); }

int pool_threads() {
    return runner().run.load() != nullptr ? runner().workers.load() : pool().threads();
}

void set_runner(ParallelRun run, int n_workers) {
    runner().workers.store(std::max(1, n_workers));
    runner().run.store(run);
}

}  // namespace orchard
