// CPU benchmarks: the FMA peak, and forward / backward GFLOP/s as a fraction of that peak.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fma_peak.h"
#include "harness.h"
#include "orchard/attention.h"

namespace {

using benchmark::Counter;
using orchard::DType;
using orchard::test::Tensor;

// The ceiling of frac_peak: the FMA peak of as many threads as Orchard uses (all cores unless
// ORCHARD_NUM_THREADS says otherwise), measured once, at first use, in this process.
double peak_gflops() {
    static const double peak = orchard::bench::fma_peak_gflops(orchard::num_threads());
    return peak;
}

// GFLOPs and frac_peak, both rates over the measured (real) time.
void set_flop_counters(benchmark::State& state, double flops_per_iteration) {
    const double gflop = flops_per_iteration * 1e-9;
    state.counters["GFLOPs"] = Counter(gflop, Counter::kIsIterationInvariantRate);
    state.counters["frac_peak"] =
        Counter(gflop / peak_gflops(), Counter::kIsIterationInvariantRate);
}

void BM_fma_peak(benchmark::State& state) {
    constexpr int64_t kRounds = 10'000'000;
    const int threads = int(state.range(0));
    for (auto _ : state) {
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([] { orchard::bench::fma_loop(kRounds); });
        for (auto& th : pool) th.join();
    }
    const double gflop = threads * orchard::bench::fma_loop_flops(kRounds) * 1e-9;
    state.counters["GFLOPs"] = Counter(gflop, Counter::kIsIterationInvariantRate);
}

struct Config {
    DType dtype;
    int64_t D;
    bool causal;
    int64_t S;
    int64_t B = 1;

    // B * H * S = 8192 query rows: the work per iteration grows linearly with S.
    int64_t H() const { return std::max<int64_t>(1, 8192 / (B * S)); }
    // DESIGN.md: 4 * B * Hq * Sq * Sk * D, halved when causal.
    double forward_flops() const { return 4.0 * B * H() * S * S * D / (causal ? 2 : 1); }
    double backward_flops() const { return 2.5 * forward_flops(); }
    std::string name(const char* bm) const {
        return std::string(bm) + "/" + orchard::to_string(dtype) + "/B:" + std::to_string(B) +
               "/H:" + std::to_string(H()) + "/S:" + std::to_string(S) + "/D:" + std::to_string(D) +
               "/causal:" + std::to_string(int(causal));
    }
};

// The tensors of one problem, allocated once per benchmark run, (B, S, H, D) contiguous.
// Attention does O(S) FLOPs per input byte, so the cache state of the inputs hardly matters:
// they are not rotated.
struct Problem {
    Tensor q, k, v, out, lse, dout, dq, dk, dv;
    orchard::AttentionOptions options;

    explicit Problem(const Config& c)
        : q({c.B, c.S, c.H(), c.D}, c.dtype),
          k(q.shape(), c.dtype),
          v(q.shape(), c.dtype),
          out(q.shape(), c.dtype),
          lse({c.B, c.H(), c.S}, DType::f32),
          dout(q.shape(), c.dtype),
          dq(q.shape(), c.dtype),
          dk(q.shape(), c.dtype),
          dv(q.shape(), c.dtype) {
        std::mt19937 rng(0);
        q.fill_random(rng);
        k.fill_random(rng);
        v.fill_random(rng);
        options.causal = c.causal;
    }
    orchard::ForwardArgs forward_args() {
        return {q.view(), k.view(), v.view(), out.view(), lse.view()};
    }
    // Runs the forward once and fills dout.
    orchard::BackwardArgs backward_args() {
        orchard::forward(forward_args(), options);
        std::mt19937 rng(1);
        dout.fill_random(rng);
        return {q.view(),   k.view(),  v.view(),  out.view(), dout.view(),
                lse.view(), dq.view(), dk.view(), dv.view()};
    }
};

void BM_forward(benchmark::State& state, Config c) {
    Problem p(c);
    const orchard::ForwardArgs args = p.forward_args();
    orchard::forward(args, p.options);  // warm-up: thread pool, page faults
    for (auto _ : state) orchard::forward(args, p.options);
    set_flop_counters(state, c.forward_flops());
}

void BM_backward(benchmark::State& state, Config c) {
    Problem p(c);
    const orchard::BackwardArgs args = p.backward_args();
    orchard::backward(args, p.options);  // warm-up
    for (auto _ : state) orchard::backward(args, p.options);
    set_flop_counters(state, c.backward_flops());
}

void register_benchmarks() {
    const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
    auto* peak = benchmark::RegisterBenchmark("BM_fma_peak", BM_fma_peak)->Arg(1);
    if (cores > 1) peak->Arg(cores);
    peak->ArgName("threads")->UseRealTime()->Unit(benchmark::kMillisecond);

    for (DType dtype : {DType::f32, DType::bf16})
        for (int64_t D : {64, 128})
            for (bool causal : {false, true})
                for (int64_t S : {512, 1024, 2048, 4096}) {
                    const Config c{dtype, D, causal, S};
                    benchmark::RegisterBenchmark(c.name("BM_forward").c_str(), BM_forward, c)
                        ->UseRealTime()
                        ->Unit(benchmark::kMillisecond);
                    benchmark::RegisterBenchmark(c.name("BM_backward").c_str(), BM_backward, c)
                        ->UseRealTime()
                        ->Unit(benchmark::kMillisecond);
                }
}

}  // namespace

// Orchard's thread count is its default: all cores, or ORCHARD_NUM_THREADS when set.
int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    register_benchmarks();
    benchmark::AddCustomContext("orchard_num_threads", std::to_string(orchard::num_threads()));
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
