// The interface every backend implements (cpu/, cuda/, metal/; a stub when not built).
#pragma once

#include <cstddef>
#include <string>

#include "core/params.h"

namespace orchard {

struct BackendSupport {
    bool ok = false;
    std::string reason;  // why not, when !ok
};

struct BackendOps {
    Backend backend;
    BackendSupport (*supports)(const AttentionParams& params, Direction direction);
    void (*attention_fwd)(const AttentionParams& params);
    // params.workspace / workspace_bytes hold the caller's scratch (may be empty).
    void (*attention_bwd)(const AttentionParams& params);
    size_t (*bwd_workspace_size)(const AttentionParams& params);
};

// One per backend; the CUDA and Metal ones come from stub files when those are not built.
const BackendOps& cpu_backend();
const BackendOps& reference_backend();
const BackendOps& cuda_backend();
const BackendOps& metal_backend();

}  // namespace orchard
