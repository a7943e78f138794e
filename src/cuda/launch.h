// The kernel variants the CUDA backend can run: one (dtype, padded head dim) pair each, compiled
// in its own translation unit (CMake generates them from ORCHARD_CUDA_HEADDIMS).
#pragma once

#include <cuda_runtime.h>

#include "cuda/kernel_params.cuh"

namespace orchard::cuda {

// kD is a built head dim at or above D (ORCHARD_CUDA_HEADDIMS); columns past D are zero-filled.
template <class T, int kD>
void run_fwd(const KernelParams& p, cudaStream_t stream);
template <class T, int kD>
void run_bwd(const KernelParams& p, cudaStream_t stream);

// The head dims of the fused Hopper backward (attention_bwd_sm90_fused.cuh), whose fp32 dQ sums
// take backward workspace (backend.cu).
constexpr bool fused_bwd_head_dim(int kD) { return kD == 64 || kD == 128; }

}  // namespace orchard::cuda
