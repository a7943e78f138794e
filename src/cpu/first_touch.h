// First touches of a framework's freshly allocated output tensors, before the kernels' passes.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/params.h"
#include "core/thread_pool.h"
#include "cpu/tile.h"

#if defined(__linux__)
#include <sys/mman.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older headers lack the name
#endif
#endif

namespace orchard::cpu {

// Maps the pages of [lo, hi) without changing their contents (Linux >= 5.14: one system call
// instead of a trap per page), or where the OS cannot, stores a zero into each page at its first
// byte inside [lo, hi).
inline void populate(uintptr_t lo, uintptr_t hi) {
    constexpr uintptr_t kPage = 4096;
    const uintptr_t first = lo & ~(kPage - 1);
#if defined(__linux__)
    if (madvise(reinterpret_cast<void*>(first), hi - first, MADV_POPULATE_WRITE) == 0) return;
#endif
    for (uintptr_t page = first; page < hi; page += kPage)
        *reinterpret_cast<volatile char*>(std::max(page, lo)) = 0;
}

// Maps the pages of a dense (B, S, H, D) tensor of T (any dim order; nothing for other views)
// before the kernels write it, on the pool's threads, a 2 MiB run per task. The kernels' threads
// write rows of different heads (256-512 bytes each) into the same pages of a (B, S, H, D) tensor
// at the same time; into freshly mapped memory (a framework's new output tensors, whose pages
// glibc maps on every call) those first touches contend on each page, a trap each. Measured: the
// 16-core Xeon's backward at S = 1024 ran at 0.25-0.7x its speed on memory already in use,
// touched first 0.8-0.9x; the 2-core EPYC's forward at S = 128 and 256 gained 10-13% through
// PyTorch; the 2-core Xeon's forward at D = 128 through PyTorch, populated rather than touched,
// S = 512 +5-8%, S = 1024 +3%, larger +2%. The caller must write every element afterwards
// (where the OS cannot populate pages, a zero is stored in each).
template <class T>
void fault_in(void* data, int64_t B, int64_t S, int64_t H, int64_t D, const Strides& st) {
    constexpr uintptr_t kRun = uintptr_t(2) << 20;
    const int64_t n = data ? dense_elements(B, S, H, D, st) : 0;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data), end = begin + n * sizeof(T);
    auto run = [&](int64_t r) {
        populate(begin + r * kRun, std::min(end, begin + (r + 1) * kRun));
    };
    if (n > 0) parallel_for(int64_t((end - begin + kRun - 1) / kRun), run);
}

}  // namespace orchard::cpu
