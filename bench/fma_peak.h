// Attainable fp32 FMA throughput of this machine: the ceiling that frac_peak refers to.
#pragma once

#include <cstdint>

namespace orchard::bench {

// Runs `rounds` rounds of independent register-resident FMAs on the calling thread and returns
// the FLOPs done (2 per lane per FMA).
double fma_loop(int64_t rounds);
double fma_loop_flops(int64_t rounds);  // what fma_loop(rounds) returns, without running it

// GFLOP/s of `threads` threads running fma_loop at once: the best of several runs.
double fma_peak_gflops(int threads);

}  // namespace orchard::bench
