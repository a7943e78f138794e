// The CUDA backend: what it supports, the workspace it needs, and the launch of the compiled
// kernel variants on the caller's stream and device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "core/backend.h"
#include "cuda/launch.h"

namespace orchard::cuda {

void check_cuda(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw Error(ErrorKind::internal, std::string("orchard (CUDA backend): ") + what + " failed: " +
                                             cudaGetErrorString(status));
}

// The backward workspace's row pitch: whole 64-row steps of the dK/dV kernels copy from it.
static int64_t workspace_pitch(int64_t sq) { return (sq + 63) / 64 * 64; }

KernelParams make_kernel_params(const AttentionParams& a) {
    KernelParams p{};
    p.q = a.q, p.k = a.k, p.v = a.v, p.out = a.out, p.out_w = a.out, p.dout = a.dout;
    p.dq = a.dq, p.dk = a.dk, p.dv = a.dv, p.lse = a.lse;
    p.q_st = a.q_st, p.k_st = a.k_st, p.v_st = a.v_st, p.out_st = a.out_st;
    p.dout_st = a.dout_st, p.dq_st = a.dq_st, p.dk_st = a.dk_st, p.dv_st = a.dv_st;
    p.lse_st = a.lse_st;
    p.cu_q = a.cu_seqlens_q, p.cu_k = a.cu_seqlens_k;
    p.Sq = a.Sq, p.Sk = a.Sk, p.total_q = a.total_q, p.total_k = a.total_k;
    p.B = int(a.B), p.Hq = int(a.Hq), p.Hkv = int(a.Hkv), p.D = int(a.D);
    p.scale = float(a.scale);
    p.scale_log2 = float(a.scale * 1.4426950408889634);
    p.softcap = float(a.softcap);
    p.alibi = a.alibi_slopes, p.alibi_b = a.alibi_b, p.alibi_h = a.alibi_h;
    p.window_left = a.window_left, p.window_right = a.window_right;
    p.q_pos = a.q_position_offset, p.k_pos = a.k_position_offset;
    p.dropout = a.dropout, p.keep_threshold = a.keep_threshold;
    p.rp_dropout = float(a.rp_dropout), p.seed = a.seed, p.offset = a.offset;
    p.ws_pitch = workspace_pitch(a.Sq);
    p.delta = static_cast<float*>(a.workspace);
    p.lse2 = p.delta + a.B * a.Hq * p.ws_pitch;
    return p;
}

namespace {

using Runner = void (*)(const KernelParams&, cudaStream_t);
struct Variant {
    int hd;
    Runner fwd_f16, bwd_f16, fwd_bf16, bwd_bf16;
};

// The variants this build has (ORCHARD_CUDA_HEADDIMS), from the generated list.
#define ORCHARD_CUDA_HD(D) \
    {D, &run_fwd<__half, D>, &run_bwd<__half, D>, &run_fwd<__nv_bfloat16, D>, &run_bwd<__nv_bfloat16, D>},
constexpr Variant kVariants[] = {
#include "cuda_variants.inc"
};
#undef ORCHARD_CUDA_HD

constexpr int kMaxHeadDim = 256;

// Head dim d runs the smallest built variant at or above it; columns past d are zero-filled.
const Variant* find_variant(int64_t d) {
    const Variant* best = nullptr;
    for (const Variant& v : kVariants)
        if (v.hd >= d && (best == nullptr || v.hd < best->hd)) best = &v;
    return best;
}

std::string built_head_dims() {
    std::string s;
    for (const Variant& v : kVariants) s += (s.empty() ? "" : ", ") + std::to_string(v.hd);
    return s;
}

// The kernels copy rows in 16-byte pieces: unit column stride, other strides multiples of 8
// elements, 16-byte aligned data. The PyTorch binding copies inputs that are laid out otherwise.
bool vector_friendly(const void* ptr, const Strides& st) {
    return ptr == nullptr || (st.d == 1 && st.s % 8 == 0 && st.h % 8 == 0 && st.b % 8 == 0 &&
                              reinterpret_cast<uintptr_t>(ptr) % 16 == 0);
}

BackendSupport supports(const AttentionParams& p, Direction direction) {
    auto no = [](std::string why) { return BackendSupport{false, "the CUDA backend " + why}; };
    if (p.dtype != DType::f16 && p.dtype != DType::bf16)
        return no(std::string("supports fp16 and bf16 inputs but got ") + to_string(p.dtype));
    if (p.D != p.Dv)
        return no("needs equal head dims for q/k and v but got D = " + std::to_string(p.D) +
                  ", Dv = " + std::to_string(p.Dv));
    if (p.D % 8 != 0 || p.D > kMaxHeadDim)
        return no("supports head dims that are multiples of 8 up to " + std::to_string(kMaxHeadDim) +
                  " but got " + std::to_string(p.D));
    if (!find_variant(p.D))
        return no("was built without kernels for head dim " + std::to_string(p.D) +
                  " or a larger one (built: " + built_head_dims() + "; see ORCHARD_CUDA_HEADDIMS)");
    if (p.B > 65535 || p.Hq > 65535)
        return no("supports batch and head counts up to 65535 but got B = " + std::to_string(p.B) +
                  ", Hq = " + std::to_string(p.Hq));
    const std::pair<const char*, bool> layouts[] = {
        {"q", vector_friendly(p.q, p.q_st)},       {"k", vector_friendly(p.k, p.k_st)},
        {"v", vector_friendly(p.v, p.v_st)},       {"out", vector_friendly(p.out, p.out_st)},
        {"dout", vector_friendly(p.dout, p.dout_st)}, {"dq", vector_friendly(p.dq, p.dq_st)},
        {"dk", vector_friendly(p.dk, p.dk_st)},    {"dv", vector_friendly(p.dv, p.dv_st)}};
    for (const auto& [name, ok] : layouts)
        if (!ok)
            return no(std::string("needs ") + name +
                      " with a contiguous last dimension, strides that are multiples of 8 "
                      "elements and 16-byte aligned data");
    int major = 0;
    const cudaError_t status =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, p.device.index);
    if (status != cudaSuccess)
        return no("cannot use CUDA device " + std::to_string(p.device.index) + ": " +
                  cudaGetErrorString(status));
    if (major < 8) return no("needs compute capability 8.0 or newer (Ampere, Hopper)");
    (void)direction;
    return {true, {}};
}

// Makes the tensors' device current for the launch and restores the caller's afterwards.
class DeviceScope {
public:
    explicit DeviceScope(int device) {
        check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceScope() { cudaSetDevice(previous_); }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

private:
    int previous_ = 0;
};

// Whether the wgmma kernels run: this build has sm_90a code, the device has compute capability
// 9.0 (the only one sm_90a code runs on), and ORCHARD_CUDA_WGMMA is not "0" (the switch that
// lets tests and benchmarks run the mma.sync kernels on Hopper too).
bool use_sm90(int device) {
#if defined(ORCHARD_CUDA_SM90A)
    const char* env = std::getenv("ORCHARD_CUDA_WGMMA");
    if (env != nullptr && std::string(env) == "0") return false;
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
    return major == 9 && minor == 0;
#else
    (void)device;
    return false;
#endif
}

// Whether the wgmma kernels' warp-specialised versions run where they apply: unless
// ORCHARD_CUDA_TMA is "0" (the switch that lets tests and benchmarks run the cp.async wgmma
// kernels on every case, not only on the varlen ones that always take them).
bool use_tma() {
    const char* env = std::getenv("ORCHARD_CUDA_TMA");
    return env == nullptr || std::string(env) != "0";
}

// The dynamic shared memory a block may opt in to on the device: 227 KiB on Hopper, 163 KiB on
// the A100, 99 KiB on consumer GPUs. ORCHARD_CUDA_SMEM_LIMIT (bytes) lowers it, the switch that
// lets tests run on one GPU the mma.sync kernels' smaller blocks of the others (variants.cuh).
size_t smem_limit(int device) {
    int bytes = 0;
    check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    size_t limit = size_t(bytes);
    if (const char* env = std::getenv("ORCHARD_CUDA_SMEM_LIMIT"))
        limit = std::min(limit, size_t(std::strtoull(env, nullptr, 10)));
    return limit;
}

// What the kernels' choices read of the device, on each call.
void set_device_facts(KernelParams& p, int device) {
    p.sm90 = use_sm90(device);
    p.tma = p.sm90 && use_tma();
    p.smem_limit = smem_limit(device);
    check_cuda(cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
}

void attention_fwd(const AttentionParams& a) {
    const DeviceScope scope(a.device.index);
    const Variant& v = *find_variant(a.D);
    KernelParams p = make_kernel_params(a);
    set_device_facts(p, a.device.index);
    (a.dtype == DType::f16 ? v.fwd_f16 : v.fwd_bf16)(p, static_cast<cudaStream_t>(a.stream));
}

// Whether the backward may take the fused Hopper kernel (attention_bwd_sm90_fused.cuh), whose
// fp32 dQ sums take workspace: not when asked to be deterministic (its additions' order varies),
// at the head dims it has, where the warp-specialised kernels run (`tma`: KernelParams::tma), and
// unless ORCHARD_CUDA_FUSED_BWD is "0" (the switch that lets tests and benchmarks run the
// two-kernel backward without asking for determinism).
bool fused_bwd(const AttentionParams& a, bool tma) {
    const char* env = std::getenv("ORCHARD_CUDA_FUSED_BWD");
    return tma && !a.deterministic && fused_bwd_head_dim(find_variant(a.D)->hd) &&
           (env == nullptr || std::string(env) != "0");
}

// delta and lse2, float32 (B, Hq, Sq rounded up to 64) each (KernelParams::delta); then, where
// the fused backward may run, its dQ sums: float32 (B, Hq, Sq rounded up to 64, head dim of the
// kernels).
size_t workspace_bytes(const AttentionParams& p, bool fused) {
    const int64_t rows = p.B * p.Hq * workspace_pitch(p.Sq);
    return size_t(2 * rows + (fused ? rows * find_variant(p.D)->hd : 0)) * sizeof(float);
}

size_t bwd_workspace_size(const AttentionParams& p) {
    return workspace_bytes(p, fused_bwd(p, use_sm90(p.device.index) && use_tma()));
}

void attention_bwd(const AttentionParams& a) {
    const DeviceScope scope(a.device.index);
    const Variant& v = *find_variant(a.D);
    KernelParams p = make_kernel_params(a);
    set_device_facts(p, a.device.index);
    // The sums only where the workspace was sized for them (a switch flipped since the size was
    // asked for leaves the two-kernel backward).
    if (fused_bwd(a, p.tma) && a.workspace_bytes >= workspace_bytes(a, true))
        p.dq_accum = p.lse2 + a.B * a.Hq * p.ws_pitch;
    (a.dtype == DType::f16 ? v.bwd_f16 : v.bwd_bf16)(p, static_cast<cudaStream_t>(a.stream));
}

}  // namespace
}  // namespace orchard::cuda

namespace orchard {

const BackendOps& cuda_backend() {
    static const BackendOps ops{Backend::cuda, &cuda::supports, &cuda::attention_fwd,
                                &cuda::attention_bwd, &cuda::bwd_workspace_size};
    return ops;
}

}  // namespace orchard
