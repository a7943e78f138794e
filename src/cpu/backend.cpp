// The CPU backend: what it supports and its entry points.
#include <string>

#include "core/backend.h"

namespace orchard::cpu {

void attention_fwd_cpu(const AttentionParams& params);
void attention_bwd_cpu(const AttentionParams& params);

namespace {

// Tiles hold up to (block_q, D) and (D, block_k) floats; 512 bounds them near 256 KiB each.
constexpr int64_t kMaxHeadDim = 512;

BackendSupport supports(const AttentionParams& p, Direction) {
    if (p.D < 1 || p.D > kMaxHeadDim || p.Dv < 1 || p.Dv > kMaxHeadDim)
        return {false, "the CPU backend supports head dims 1 to " + std::to_string(kMaxHeadDim) +
                           " but got D = " + std::to_string(p.D) + ", Dv = " +
                           std::to_string(p.Dv)};
    return {true, {}};
}

size_t bwd_workspace_size(const AttentionParams& p) {
    // D = rowsum(dout * out) per (batch, head, row), in the accumulation type.
    const size_t acc_bytes = p.dtype == DType::f64 ? 8 : 4;
    return size_t(p.B * p.Hq * p.Sq) * acc_bytes;
}

}  // namespace
}  // namespace orchard::cpu

namespace orchard {

const BackendOps& cpu_backend() {
    static const BackendOps ops{Backend::cpu, &cpu::supports, &cpu::attention_fwd_cpu,
                                &cpu::attention_bwd_cpu, &cpu::bwd_workspace_size};
    return ops;
}

}  // namespace orchard
