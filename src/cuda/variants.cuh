// Block shapes of the mma.sync kernels per head dim (the Hopper kernels keep theirs in their own
// headers), and the definitions behind launch.h's declarations. Included only by the generated
// per-variant translation units.
//
// Forward: 128 query rows x 64 keys with 4 warps (two 16-row fragments per warp, so each K/V
// fragment loaded from shared memory feeds two MMAs) up to kD = 128: 64 fp32 score and up to 128
// output accumulators per thread, FlashAttention 2's choice on A100/H100. Past 128 the output
// accumulator alone is kD / 2 registers per fragment, so one fragment per warp, and 32-key tiles:
// 64 x 32 in two stages needs 99 KiB of shared memory at kD = 256 (64 x 64: 165 KiB), so two
// blocks share an SM of an H100 / A100; on the H200 64 x 32 ran the forward 24% (kD = 192) and
// 27% (256) faster than 64 x 64 (docs/PERFORMANCE.md).
// Backward: 64 keys per block (16 per warp) and 64 queries per step; past kD = 128 the dK/dV
// accumulators take kD registers per thread and 32 queries per step keeps the rest small.
#pragma once

#include <string>

#include "cuda/attention_bwd.cuh"
#include "cuda/attention_bwd_sm90_fused.cuh"
#include "cuda/attention_bwd_sm90_wide.cuh"
#include "cuda/attention_fwd.cuh"
#include "cuda/attention_fwd_sm90_ws.cuh"
#include "cuda/launch.h"

namespace orchard::cuda {

template <int kD>
using FwdConfigFor = std::conditional_t<(kD <= 128), FwdConfig<kD, 128, 64, 4>, FwdConfig<kD, 64, 32, 4>>;
template <int kD>
using BwdConfigFor = std::conditional_t<(kD <= 128), BwdConfig<kD, 64, 64>, BwdConfig<kD, 64, 32>>;

// Where those blocks need more shared memory than a block may have, smaller ones: 32 keys per
// forward tile (up to kD = 128; past it the usual ones are those); half the queries per backward
// step, and past kD = 128 also half the keys per block. They fit the least any sm_80+ GPU
// offers, 99 KiB (RTX 30x0 / 40x0 / 50x0: sm_86, sm_89, sm_120), which the usual blocks pass
// at kD = 128 (102-103 KiB) and in the backward past it; the A100's 163 KiB they all fit.
inline constexpr size_t kLeastSmemLimit = 99 * 1024;
template <int kD>
using FwdSmallConfigFor = FwdConfig<kD, 128, 32, 4>;
template <int kD>
using BwdSmallConfigFor = std::conditional_t<(kD <= 128), BwdConfig<kD, 64, 32>, BwdConfig<kD, 32, 16>>;

// Calls launch(Usual{}) where the device's shared memory fits those blocks, else launch(Small{})
// (compiled only where Usual may not fit), else throws a clear error.
template <class Usual, class Small, class Launch>
void launch_fitting(const KernelParams& p, const char* direction, Launch launch) {
    if (Usual::kSmemBytes <= p.smem_limit) return launch(Usual{});
    size_t least = Usual::kSmemBytes;
    if constexpr (Usual::kSmemBytes > kLeastSmemLimit) {
        static_assert(Small::kSmemBytes <= kLeastSmemLimit);
        if (Small::kSmemBytes <= p.smem_limit) return launch(Small{});
        least = Small::kSmemBytes;
    }
    throw Error(ErrorKind::unsupported,
                std::string("orchard (CUDA backend): the ") + direction + " at head dim " +
                    std::to_string(p.D) + " needs " + std::to_string(least) +
                    " bytes of shared memory per block but the device allows " +
                    std::to_string(p.smem_limit));
}

// On Hopper (p.sm90) the wgmma kernels take the head dims whose tiles and products they have:
// 64, 80, 96 and from 128 on (forward; past 128 the output product splits into N = 128 or 192
// plus a narrow stack), 64, 80, 96 and 128 (backward), in the shapes that measured fastest on the
// H200 (sm90::run_fwd, sm90::BwdShapes, sm90::run_bwd; docs/PERFORMANCE.md).
template <class T, int kD>
void run_fwd(const KernelParams& p, cudaStream_t stream) {
    if constexpr (kD == 64 || kD == 80 || kD == 96 || kD >= 128)
        if (p.sm90) return sm90::run_fwd<T, kD>(p, stream);
    launch_fitting<FwdConfigFor<kD>, FwdSmallConfigFor<kD>>(
        p, "forward", [&](auto cfg) { launch_fwd<T, decltype(cfg)>(p, stream); });
}

template <class T, int kD>
void run_bwd(const KernelParams& p, cudaStream_t stream) {
    if constexpr (kD == 64 || kD == 80 || kD == 96 || kD == 128) {
        if (p.sm90) return sm90::run_bwd<T, kD>(p, stream);
    } else if constexpr (kD > 128) {
        if (p.tma && sm90::launch_bwd_wide<T, kD>(p, stream)) return;
    }
    launch_fitting<BwdConfigFor<kD>, BwdSmallConfigFor<kD>>(
        p, "backward", [&](auto cfg) { launch_bwd<T, decltype(cfg)>(p, stream); });
}

}  // namespace orchard::cuda

// One variant's translation unit: ORCHARD_VARIANT(__nv_bfloat16, 128).
#define ORCHARD_VARIANT(T, D)                                                              \
    template void run_fwd<T, D>(const KernelParams&, cudaStream_t);                         \
    template void run_bwd<T, D>(const KernelParams&, cudaStream_t);
