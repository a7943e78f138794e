// First touches of a framework's freshly allocated output tensors, before the kernels' passes.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/params.h"
#include "core/thread_pool.h"
#include "cpu/tile.h"

namespace orchard::cpu {

// Faults in the pages of a dense (B, S, H, D) tensor of T (any dim order; nothing for other
// views), one store per 4 KiB page, each task a contiguous run of 64 pages. The kernels' threads
// write rows of different heads (256-512 bytes each) into the same pages of a (B, S, H, D) tensor
// at the same time; into freshly mapped memory (a framework's new output tensors, whose pages
// glibc maps on every call) those first touches contend on each page. Measured: the 16-core Xeon's
// backward at S = 1024 ran at 0.25-0.7x its speed on memory already in use, touched first
// 0.8-0.9x; the 2-core EPYC's forward at S = 128 and 256 gained 10-13% through PyTorch. The
// caller must write every element afterwards (the stores put zeros).
template <class T>
void fault_in(void* data, int64_t B, int64_t S, int64_t H, int64_t D, const Strides& st) {
    constexpr int64_t kPage = 4096 / int64_t(sizeof(T)), kRun = 64 * kPage;
    const int64_t n = data ? dense_elements(B, S, H, D, st) : 0;
    T* base = static_cast<T*>(data);
    auto touch = [&](int64_t r) {
        for (int64_t i = r * kRun; i < std::min(n, (r + 1) * kRun); i += kPage) base[i] = T{};
    };
    if (n > 0) parallel_for(ceil_div(n, kRun), touch);
}

}  // namespace orchard::cpu
