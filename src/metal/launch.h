// Host side of the Metal backend shared by every host path (the emulator build and the
// Objective-C++ one): what the kernels support, their constant buffer, names, grids, scratch.
// (Threadgroup memory is declared statically in the kernels: no host sets its length.)
#pragma once

#include <cstdint>
#include <string>

#include "core/backend.h"
#include "metal/kernel_params.h"

namespace orchard::metal_host {

BackendSupport supports(const AttentionParams& p, Direction direction);

// The kernels' constant buffer (validated params narrowed to 32-bit sizes and fp32 options).
msl::KernelParams kernel_params(const AttentionParams& p);

// D = rowsum(dout * out) of every (b, h, row): B * Hq * Sq floats, in the caller's workspace.
size_t bwd_workspace_size(const AttentionParams& p);

// The kernel of `op` ("attention_fwd", "attention_bwd_dq", ...) for p's dtype and head-dim
// bucket, as named by the [[host_name]]s of the .metal files: "attention_fwd_half_128".
std::string kernel_name(const char* op, const AttentionParams& p);
const char* msl_type_name(DType dtype);

// Threadgroups: one per 32 query rows (forward, preprocess, dQ) or 32 key rows (dK/dV).
struct Grid {
    uint32_t x, y, z;
};
Grid grid_by_queries(const AttentionParams& p);
Grid grid_by_keys(const AttentionParams& p);

}  // namespace orchard::metal_host
