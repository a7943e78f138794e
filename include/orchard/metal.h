// Launch plans of Orchard's Metal kernels, for hosts that dispatch them through their own Metal
// runtime (PyTorch on MPS: python/orchard/metal.py with torch.mps.compile_shader).
// The arguments are validated exactly as by forward() / backward() on Backend::metal.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "orchard/attention.h"

namespace orchard {

struct MetalLaunchPlan {
    bool nothing_to_do = false;  // empty problem: outputs are empty (or zero-filled grads)
    std::vector<uint8_t> params;  // the constant buffer [[buffer(0)]] of every kernel
    // Kernels are named "<op>_<dtype>_<bucket>" ("attention_fwd_half_128"), the preprocess
    // "attention_bwd_preprocess_<dtype>"; src/metal/*.metal lists them.
    std::string dtype;            // "float", "half" or "bfloat"
    int head_dim_bucket = 0;      // 64, 128 or 256
    // Threadgroups of 128 threads: by 32 query rows (forward, preprocess, dQ) and by 32 key
    // rows (dK/dV).
    uint32_t grid_queries[3] = {0, 0, 0};
    uint32_t grid_keys[3] = {0, 0, 0};
    uint32_t threads_per_threadgroup = 0;
    size_t workspace_bytes = 0;   // backward: float scratch bound as the kernels' `delta`
};

MetalLaunchPlan metal_forward_plan(const ForwardArgs& args, const AttentionOptions& options);
MetalLaunchPlan metal_backward_plan(const BackwardArgs& args, const AttentionOptions& options);

}  // namespace orchard
