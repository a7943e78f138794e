// The CPU backend's thread pool: a settable thread count, one job at a time, no oversubscription.
#pragma once

#include <cstdint>
#include <type_traits>

#include "orchard/attention.h"

namespace orchard {

// A non-owning reference to a callable `void(int64_t task)`.
class TaskRef {
public:
    template <typename F>
        requires(!std::is_same_v<std::remove_cv_t<F>, TaskRef>)
    TaskRef(F& f) : obj_(&f), call_([](void* o, int64_t i) { (*static_cast<F*>(o))(i); }) {}
    void operator()(int64_t i) const { call_(obj_, i); }

private:
    void* obj_;
    void (*call_)(void*, int64_t);
};

// Runs task(0) ... task(n - 1) on up to num_threads() threads (the caller is one of them),
// handing out indices in increasing order; returns when all are done. Tasks must be independent.
// A call made from inside a task, or while another thread's job holds the pool, runs serially on
// the calling thread: correct, never oversubscribed. The first exception a task throws is
// rethrown here.
void parallel_for(int64_t n, TaskRef task);

void set_pool_threads(int n);  // n <= 0: ORCHARD_NUM_THREADS, else hardware concurrency
// The number of threads parallel_for uses: the runner's workers when one is set, else the pool's.
int pool_threads();

// Runs parallel_for on a framework's threads instead of the pool (see attention.h).
void set_runner(ParallelRun run, int n_workers);

}  // namespace orchard
