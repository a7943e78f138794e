// Host side of the Metal backend shared by every host path (see launch.h).
#include "metal/launch.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "core/validate.h"
#include "orchard/metal.h"

namespace orchard::metal_host {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

uint32_t blocks_of(int64_t n) { return uint32_t((n + msl::kBlockRows - 1) / msl::kBlockRows); }

void copy_strides(int64_t* dst, const Strides& st) {
    dst[0] = st.b;
    dst[1] = st.s;
    dst[2] = st.h;
    dst[3] = st.d;
}

int bucket(const AttentionParams& p) { return msl::head_dim_bucket(int(std::max(p.D, p.Dv))); }

}  // namespace

BackendSupport supports(const AttentionParams& p, Direction) {
    if (p.dtype != DType::f32 && p.dtype != DType::f16 && p.dtype != DType::bf16)
        return {false, std::string("the Metal backend supports float32, float16 and bfloat16 "
                                   "but got ") + to_string(p.dtype)};
    if (p.D % 8 != 0 || p.Dv % 8 != 0 || p.D < 8 || p.Dv < 8 || p.D > kMaxHeadDim ||
        p.Dv > kMaxHeadDim)
        return {false, "the Metal backend supports head dims that are multiples of 8 from 8 to " +
                           std::to_string(kMaxHeadDim) + " but got D = " + std::to_string(p.D) +
                           ", Dv = " + std::to_string(p.Dv)};
    // Sizes travel as int32 and grids are uint32 (positions inside a sequence stay int64).
    for (int64_t n : {p.B, p.Sq, p.Sk, p.Hq, p.Hkv, p.total_q, p.total_k})
        if (n > kInt32Max)
            return {false, "the Metal backend supports sizes up to 2^31 - 1 but got B = " +
                               std::to_string(p.B) + ", Sq = " + std::to_string(p.Sq) +
                               ", Sk = " + std::to_string(p.Sk) + ", Hq = " +
                               std::to_string(p.Hq) + ", Hkv = " + std::to_string(p.Hkv)};
    return {true, {}};
}

msl::KernelParams kernel_params(const AttentionParams& p) {
    msl::KernelParams k{};
    copy_strides(k.q_st, p.q_st);
    copy_strides(k.k_st, p.k_st);
    copy_strides(k.v_st, p.v_st);
    copy_strides(k.out_st, p.out_st);
    copy_strides(k.dout_st, p.dout_st);
    copy_strides(k.dq_st, p.dq_st);
    copy_strides(k.dk_st, p.dk_st);
    copy_strides(k.dv_st, p.dv_st);
    k.lse_st[0] = p.lse_st.b;
    k.lse_st[1] = p.lse_st.h;
    k.lse_st[2] = p.lse_st.s;
    k.alibi_b = p.alibi_b;
    k.alibi_h = p.alibi_h;
    k.window_left = p.window_left;
    k.window_right = p.window_right;
    k.q_pos = p.q_position_offset;
    k.k_pos = p.k_position_offset;
    k.seed = p.seed;
    k.B = int32_t(p.B);
    k.Sq = int32_t(p.Sq);
    k.Sk = int32_t(p.Sk);
    k.Hq = int32_t(p.Hq);
    k.Hkv = int32_t(p.Hkv);
    k.D = int32_t(p.D);
    k.Dv = int32_t(p.Dv);
    k.total_q = int32_t(p.total_q);
    k.total_k = int32_t(p.total_k);
    k.varlen = p.is_varlen();
    k.has_alibi = p.alibi_slopes != nullptr;
    k.dropout = p.dropout;
    k.need_dq = p.dq != nullptr;
    k.need_dk = p.dk != nullptr;
    k.need_dv = p.dv != nullptr;
    k.scale = float(p.scale);
    k.softcap = float(p.softcap);
    k.rp_dropout = float(p.rp_dropout);
    k.keep_threshold = p.keep_threshold;
    k.offset = p.offset;
    return k;
}

size_t bwd_workspace_size(const AttentionParams& p) {
    return size_t(p.B * p.Hq * p.Sq) * sizeof(float);
}

const char* msl_type_name(DType dtype) {
    switch (dtype) {
        case DType::f16: return "half";
        case DType::bf16: return "bfloat";
        default: return "float";
    }
}

std::string kernel_name(const char* op, const AttentionParams& p) {
    return std::string(op) + "_" + msl_type_name(p.dtype) + "_" + std::to_string(bucket(p));
}

Grid grid_by_queries(const AttentionParams& p) {
    return {blocks_of(p.Sq), uint32_t(p.Hq), uint32_t(p.B)};
}
Grid grid_by_keys(const AttentionParams& p) {
    return {blocks_of(p.Sk), uint32_t(p.Hkv), uint32_t(p.B)};
}

namespace {

MetalLaunchPlan plan_of(const PreparedCall& call) {
    const AttentionParams& p = call.params;
    MetalLaunchPlan plan;
    plan.nothing_to_do = call.nothing_to_do;
    const msl::KernelParams kp = kernel_params(p);
    plan.params.resize(sizeof kp);
    std::memcpy(plan.params.data(), &kp, sizeof kp);
    plan.dtype = msl_type_name(p.dtype);
    plan.head_dim_bucket = bucket(p);
    const Grid gq = grid_by_queries(p), gk = grid_by_keys(p);
    plan.grid_queries[0] = gq.x, plan.grid_queries[1] = gq.y, plan.grid_queries[2] = gq.z;
    plan.grid_keys[0] = gk.x, plan.grid_keys[1] = gk.y, plan.grid_keys[2] = gk.z;
    plan.threads_per_threadgroup = msl::kThreads;
    plan.workspace_bytes = bwd_workspace_size(p);
    return plan;
}

AttentionOptions on_metal(AttentionOptions o) {
    o.backend = Backend::metal;
    return o;
}

}  // namespace
}  // namespace orchard::metal_host

namespace orchard {

MetalLaunchPlan metal_forward_plan(const ForwardArgs& args, const AttentionOptions& options) {
    return metal_host::plan_of(prepare_forward(args, metal_host::on_metal(options)));
}

MetalLaunchPlan metal_backward_plan(const BackwardArgs& args, const AttentionOptions& options) {
    return metal_host::plan_of(prepare_backward(args, metal_host::on_metal(options), {}));
}

}  // namespace orchard
