// The FMA peak loop, compiled with -march=native (see bench/CMakeLists.txt) so that Highway's
// static target (HWY_STATIC_TARGET) is this CPU's widest SIMD: AVX-512 on the benchmark machine.
#include "fma_peak.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

// Static dispatch only: Highway 1.0.3's dynamic target list rejects some -march=native baselines.
#define HWY_COMPILE_ONLY_STATIC 1
#include "hwy/highway.h"

namespace orchard::bench {
namespace hn = hwy::HWY_NAMESPACE;

namespace {
constexpr int kChains = 12;  // the a0 ... a11 below
volatile float g_sink;       // fma_loop's result goes here, so that its loop cannot be removed
}  // namespace

double fma_loop(int64_t rounds) {
    const hn::ScalableTag<float> d;
    // a = a * m + c converges to 1: no overflow, no denormals.
    const auto m = hn::Set(d, 0.999f);
    const auto c = hn::Set(d, 0.001f);
    // 12 independent chains cover FMA latency (4-5 cycles) x 2 FMA ports, and with m and c
    // still fit the 16 registers of AVX2 (named, not an array, so that SVE can compile it).
    // Distinct starting values, or the compiler merges identical chains.
    auto a0 = hn::Set(d, 0.0f), a1 = hn::Set(d, 0.1f), a2 = hn::Set(d, 0.2f);
    auto a3 = hn::Set(d, 0.3f), a4 = hn::Set(d, 0.4f), a5 = hn::Set(d, 0.5f);
    auto a6 = hn::Set(d, 0.6f), a7 = hn::Set(d, 0.7f), a8 = hn::Set(d, 0.8f);
    auto a9 = hn::Set(d, 0.9f), a10 = hn::Set(d, 1.1f), a11 = hn::Set(d, 1.2f);
    for (int64_t r = 0; r < rounds; ++r) {
        a0 = hn::MulAdd(a0, m, c);
        a1 = hn::MulAdd(a1, m, c);
        a2 = hn::MulAdd(a2, m, c);
        a3 = hn::MulAdd(a3, m, c);
        a4 = hn::MulAdd(a4, m, c);
        a5 = hn::MulAdd(a5, m, c);
        a6 = hn::MulAdd(a6, m, c);
        a7 = hn::MulAdd(a7, m, c);
        a8 = hn::MulAdd(a8, m, c);
        a9 = hn::MulAdd(a9, m, c);
        a10 = hn::MulAdd(a10, m, c);
        a11 = hn::MulAdd(a11, m, c);
    }
    const auto sum = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11));
    g_sink = hn::GetLane(sum);
    return fma_loop_flops(rounds);
}

double fma_loop_flops(int64_t rounds) {
    return 2.0 * kChains * double(hn::Lanes(hn::ScalableTag<float>())) * double(rounds);
}

double fma_peak_gflops(int threads) {
    // The best of 20 short runs (~25 ms each): on a shared machine, a run that other processes
    // disturbed only lowers the rate, and one of 20 is likely undisturbed.
    constexpr int64_t kRounds = 10'000'000;
    double best = 0;
    for (int run = 0; run < 20; ++run) {
        std::vector<std::thread> pool;
        const auto t0 = std::chrono::steady_clock::now();
        for (int t = 0; t < threads; ++t) pool.emplace_back([] { fma_loop(kRounds); });
        for (auto& th : pool) th.join();
        const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - t0;
        best = std::max(best, threads * fma_loop_flops(kRounds) / seconds.count() * 1e-9);
    }
    return best;
}

}  // namespace orchard::bench
