// The PyTorch binding: Orchard's ops registered through the LibTorch stable ABI, so that one
// build of this module loads in every PyTorch release >= its TORCH_TARGET_VERSION. The only file
// that sees torch types; it turns tensors into TensorViews and orchard::Error into messages
// that python/orchard maps to ValueError / NotImplementedError.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <dlfcn.h>

#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "orchard/attention.h"
#include "orchard/metal.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Errors cross into Python as RuntimeError; the tag lets the Python layer restore the kind.
[[noreturn]] void raise(orchard::ErrorKind kind, const std::string& message) {
    const char* tag = kind == orchard::ErrorKind::invalid_argument ? "[orchard:invalid_argument] "
                      : kind == orchard::ErrorKind::unsupported    ? "[orchard:unsupported] "
                                                                   : "[orchard:internal] ";
    throw std::runtime_error(tag + message);
}

// PyTorch's user-facing name of a dtype ("int64", not the C++ enum's "Long").
std::string dtype_name(ScalarType t) {
    switch (t) {
        case ScalarType::Long: return "int64";
        case ScalarType::Short: return "int16";
        case ScalarType::Char: return "int8";
        case ScalarType::Byte: return "uint8";
        case ScalarType::Bool: return "bool";
        case ScalarType::ComplexFloat: return "complex64";
        case ScalarType::ComplexDouble: return "complex128";
        default: return torch::headeronly::toString(t);
    }
}

orchard::DType to_dtype(const std::string& op, const char* name, ScalarType t) {
    switch (t) {
        case ScalarType::Float: return orchard::DType::f32;
        case ScalarType::Half: return orchard::DType::f16;
        case ScalarType::BFloat16: return orchard::DType::bf16;
        case ScalarType::Double: return orchard::DType::f64;
        case ScalarType::Int: return orchard::DType::i32;
        default:
            raise(orchard::ErrorKind::invalid_argument,
                  op + ": " + name + " has dtype " + dtype_name(t) +
                      ", which Orchard does not take (float32, float16, bfloat16, float64; int32 "
                      "for cu_seqlens)");
    }
}

orchard::Device to_device(const std::string& op, const char* name, const Tensor& t) {
    const auto type = t.device().type();
    if (type == torch::headeronly::DeviceType::CPU) return {orchard::DeviceKind::cpu, 0};
    if (type == torch::headeronly::DeviceType::CUDA)
        return {orchard::DeviceKind::cuda, t.get_device_index()};
    if (type == torch::headeronly::DeviceType::MPS)
        return {orchard::DeviceKind::metal, t.get_device_index()};
    raise(orchard::ErrorKind::unsupported,
          op + ": " + name + " is on a device Orchard has no backend for");
}

orchard::TensorView view_of(const std::string& op, const char* name, const Tensor& t) {
    if (t.dim() > orchard::kMaxDims)
        raise(orchard::ErrorKind::invalid_argument,
              op + ": " + name + " has " + std::to_string(t.dim()) + " dimensions; at most " +
                  std::to_string(orchard::kMaxDims) + " are supported");
    orchard::TensorView v;
    v.data = t.data_ptr();  // already includes the storage offset
    v.dtype = to_dtype(op, name, t.scalar_type());
    v.device = to_device(op, name, t);
    if (v.device.kind == orchard::DeviceKind::metal) {
        // A Metal view is (buffer handle, byte offset): MPS's data_ptr() is the storage's
        // MTLBuffer handle advanced by the offset, so the handle is recovered by taking it off.
        // (Only validation sees it: python/orchard/metal.py binds the tensors themselves.)
        v.byte_offset = t.storage_offset() * orchard::element_size(v.dtype);
        v.data = static_cast<char*>(v.data) - v.byte_offset;
    }
    v.ndim = int(t.dim());
    for (int i = 0; i < v.ndim; ++i) {
        v.shape[i] = t.size(i);
        v.strides[i] = t.stride(i);
    }
    return v;
}

orchard::TensorView optional_view(const std::string& op, const char* name,
                                  const std::optional<Tensor>& t) {
    return t.has_value() ? view_of(op, name, *t) : orchard::TensorView{};
}

std::vector<int64_t> sizes_of(const Tensor& t) {
    std::vector<int64_t> s(size_t(t.dim()));
    for (int64_t i = 0; i < t.dim(); ++i) s[size_t(i)] = t.size(i);
    return s;
}

// Options shared by fwd and bwd, in schema order.
struct OptionArgs {
    std::optional<Tensor> cu_seqlens_q, cu_seqlens_k;
    int64_t max_seqlen_q, max_seqlen_k;
    double dropout_p;
    std::optional<double> softmax_scale;
    bool causal;
    int64_t window_left, window_right;
    double softcap;
    std::optional<Tensor> alibi_slopes;
    Tensor rng_state;  // int64 (2,) on the CPU: Philox seed and offset
    int64_t q_position_offset, k_position_offset;  // last in the schemas, default 0
};

// The core's options; `op` must outlive them (op_name points into it).
orchard::AttentionOptions options_of(const std::string& op, const OptionArgs& a,
                                     bool deterministic) {
    orchard::AttentionOptions o;
    o.op_name = op.c_str();
    o.deterministic = deterministic;
    o.scale = a.softmax_scale;
    o.causal = a.causal;
    o.window_left = a.window_left;
    o.window_right = a.window_right;
    o.softcap = a.softcap;
    o.alibi_slopes = optional_view(op, "alibi_slopes", a.alibi_slopes);
    o.dropout_p = a.dropout_p;
    o.cu_seqlens_q = optional_view(op, "cu_seqlens_q", a.cu_seqlens_q);
    o.cu_seqlens_k = optional_view(op, "cu_seqlens_k", a.cu_seqlens_k);
    o.max_seqlen_q = a.max_seqlen_q;
    o.max_seqlen_k = a.max_seqlen_k;
    o.q_position_offset = a.q_position_offset;
    o.k_position_offset = a.k_position_offset;
    if (a.dropout_p > 0) {
        const Tensor& rng = a.rng_state;
        if (!rng.is_cpu() || rng.scalar_type() != ScalarType::Long || rng.numel() != 2)
            raise(orchard::ErrorKind::internal, op + ": rng_state must be a CPU int64 tensor (2,)");
        const int64_t* s = static_cast<const int64_t*>(rng.data_ptr());
        o.seed = uint64_t(s[0]);
        o.offset = uint64_t(s[1]);
    }
    return o;
}

// PyTorch's current CUDA stream on `device`, through the stable C shim. The shim's CUDA entry
// point lives in libtorch_cuda.so, which a CPU-only PyTorch lacks: it is looked up in the already
// loaded library rather than linked, so this module loads with either build of PyTorch.
void* current_cuda_stream(const std::string& op, int device) {
    using GetStream = int32_t (*)(int32_t, void**);
    static const GetStream get = [] {
        void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
        return lib ? reinterpret_cast<GetStream>(dlsym(lib, "aoti_torch_get_current_cuda_stream"))
                   : nullptr;
    }();
    if (get == nullptr)
        raise(orchard::ErrorKind::internal,
              op + ": CUDA tensors, but this PyTorch has no aoti_torch_get_current_cuda_stream");
    void* stream = nullptr;
    if (get(device, &stream) != 0)
        raise(orchard::ErrorKind::internal, op + ": could not read the current CUDA stream");
    return stream;
}

// The CUDA kernels read rows in 16-byte pieces (unit last stride, strides multiples of 8,
// 16-byte aligned data). Other layouts of an input are copied first, visibly (call log, stats).
Tensor readable_on_cuda(const std::string& op, orchard::Direction dir, const char* name,
                        const Tensor& t) {
    if (!t.is_cuda() || t.numel() == 0) return t;
    bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(t.dim() - 1) == 1;
    for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && t.stride(i) % 8 == 0;
    if (ok) return t;
    orchard::record_staging_copy(dir, op, std::string(name) + " (CUDA kernels need a contiguous "
                                                              "last dim and 16-byte aligned rows)");
    return torch::stable::contiguous(t);
}

// For CUDA tensors: PyTorch's current stream, and the named inputs made readable by the kernels.
void prepare_cuda(const std::string& op, orchard::Direction dir, orchard::AttentionOptions& o,
                  std::initializer_list<std::pair<const char*, Tensor*>> inputs) {
    const Tensor& q = *inputs.begin()->second;
    if (!q.is_cuda()) return;
    o.stream = current_cuda_stream(op, q.get_device_index());
    for (const auto& [name, t] : inputs) *t = readable_on_cuda(op, dir, name, *t);
}

// Orchard's CPU work runs on PyTorch's own intra-op threads: a second pool would compete with
// them for the cores (they keep spinning after each op).
void torch_run(int n, void (*body)(void* ctx, int worker), void* ctx) {
    torch::stable::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t w = begin; w < end; ++w) body(ctx, int(w));
    });
}

// Runs `f` on PyTorch's threads, with orchard::Error turned into tagged messages.
template <class F>
auto guarded(F&& f) {
    orchard::set_parallel_runner(&torch_run, int(torch::stable::get_num_threads()));
    try {
        return f();
    } catch (const orchard::Error& e) {
        raise(e.kind(), e.what());
    }
}

std::tuple<Tensor, Tensor> fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> cu_seqlens_q,
                               std::optional<Tensor> cu_seqlens_k, int64_t max_seqlen_q,
                               int64_t max_seqlen_k, double dropout_p,
                               std::optional<double> softmax_scale, bool causal,
                               int64_t window_left, int64_t window_right, double softcap,
                               std::optional<Tensor> alibi_slopes, Tensor rng_state,
                               bool deterministic, std::string op, int64_t q_position_offset,
                               int64_t k_position_offset) {
    return guarded([&] {
        const OptionArgs args{cu_seqlens_q,      cu_seqlens_k,     max_seqlen_q, max_seqlen_k,
                              dropout_p,         softmax_scale,    causal,       window_left,
                              window_right,      softcap,          alibi_slopes, rng_state,
                              q_position_offset, k_position_offset};
        orchard::AttentionOptions o = options_of(op, args, deterministic);
        prepare_cuda(op, orchard::Direction::forward, o, {{"q", &q}, {"k", &k}, {"v", &v}});
        const bool varlen = cu_seqlens_q.has_value();
        std::vector<int64_t> out_shape = sizes_of(q);
        if (!out_shape.empty()) out_shape.back() = v.dim() > 0 ? v.size(v.dim() - 1) : 0;
        std::vector<int64_t> lse_shape;
        if (varlen && q.dim() == 3) lse_shape = {q.size(1), q.size(0)};
        if (!varlen && q.dim() == 4) lse_shape = {q.size(0), q.size(2), q.size(1)};
        Tensor out = torch::stable::new_empty(q, out_shape);
        Tensor lse = torch::stable::new_empty(q, lse_shape, ScalarType::Float);
        orchard::forward({.q = view_of(op, "q", q), .k = view_of(op, "k", k),
                          .v = view_of(op, "v", v), .out = view_of(op, "out", out),
                          .lse = view_of(op, "lse", lse)},
                         o);
        return std::make_tuple(out, lse);
    });
}

std::tuple<Tensor, Tensor, Tensor> bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
                                       Tensor lse, std::optional<Tensor> cu_seqlens_q,
                                       std::optional<Tensor> cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, double dropout_p,
                                       std::optional<double> softmax_scale, bool causal,
                                       int64_t window_left, int64_t window_right, double softcap,
                                       std::optional<Tensor> alibi_slopes, Tensor rng_state,
                                       bool deterministic, bool need_dq, bool need_dk,
                                       bool need_dv, std::string op, int64_t q_position_offset,
                                       int64_t k_position_offset) {
    return guarded([&] {
        const OptionArgs args{cu_seqlens_q,      cu_seqlens_k,     max_seqlen_q, max_seqlen_k,
                              dropout_p,         softmax_scale,    causal,       window_left,
                              window_right,      softcap,          alibi_slopes, rng_state,
                              q_position_offset, k_position_offset};
        orchard::AttentionOptions o = options_of(op, args, deterministic);
        prepare_cuda(op, orchard::Direction::backward, o,
                     {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"dout", &dout}});
        // A gradient not asked for is returned as an empty (0,) tensor and not computed.
        auto grad_like = [&](const Tensor& x, bool needed) {
            return torch::stable::new_empty(x, needed ? sizes_of(x) : std::vector<int64_t>{0});
        };
        Tensor dq = grad_like(q, need_dq), dk = grad_like(k, need_dk), dv = grad_like(v, need_dv);
        auto grad_view = [&](const char* name, const Tensor& g, bool needed) {
            return needed ? view_of(op, name, g) : orchard::TensorView{};
        };
        const orchard::BackwardArgs a{
            .q = view_of(op, "q", q), .k = view_of(op, "k", k), .v = view_of(op, "v", v),
            .out = view_of(op, "out", out), .dout = view_of(op, "dout", dout),
            .lse = view_of(op, "lse", lse), .dq = grad_view("dq", dq, need_dq),
            .dk = grad_view("dk", dk, need_dk), .dv = grad_view("dv", dv, need_dv)};
        const size_t ws_bytes = orchard::backward_workspace_size(a, o);
        // Scratch from PyTorch's allocator on the tensors' device (64-byte aligned).
        std::optional<Tensor> ws;
        if (ws_bytes > 0)
            ws = torch::stable::new_empty(q, {int64_t((ws_bytes + 7) / 8)}, ScalarType::Long);
        orchard::backward(a, o, {ws ? ws->data_ptr() : nullptr, ws ? ws_bytes : 0});
        return std::make_tuple(dq, dk, dv);
    });
}

// A Metal launch plan for python/orchard/metal.py: the kernels' constant buffer as uint8 (n,)
// and int64 [nothing_to_do, head_dim_bucket, dtype (0 float, 1 half, 2 bfloat),
// grid_queries x y z, grid_keys x y z, threads_per_threadgroup, workspace_bytes], both on the CPU.
std::tuple<Tensor, Tensor> plan_tensors(const orchard::MetalLaunchPlan& plan) {
    Tensor params = torch::stable::empty({int64_t(plan.params.size())}, ScalarType::Byte);
    std::memcpy(params.data_ptr(), plan.params.data(), plan.params.size());
    Tensor info = torch::stable::empty({11}, ScalarType::Long);
    auto* p = static_cast<int64_t*>(info.data_ptr());
    p[0] = plan.nothing_to_do;
    p[1] = plan.head_dim_bucket;
    p[2] = plan.dtype == "half" ? 1 : plan.dtype == "bfloat" ? 2 : 0;
    for (int i = 0; i < 3; ++i) {
        p[3 + i] = plan.grid_queries[i];
        p[6 + i] = plan.grid_keys[i];
    }
    p[9] = plan.threads_per_threadgroup;
    p[10] = int64_t(plan.workspace_bytes);
    return std::make_tuple(params, info);
}

// Validates a forward on MPS tensors (out, lse allocated by the caller) and plans its launch.
std::tuple<Tensor, Tensor> metal_plan_fwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                          std::optional<Tensor> cu_seqlens_q,
                                          std::optional<Tensor> cu_seqlens_k,
                                          int64_t max_seqlen_q, int64_t max_seqlen_k,
                                          double dropout_p, std::optional<double> softmax_scale,
                                          bool causal, int64_t window_left, int64_t window_right,
                                          double softcap, std::optional<Tensor> alibi_slopes,
                                          Tensor rng_state, bool deterministic, std::string op,
                                          int64_t q_position_offset, int64_t k_position_offset) {
    return guarded([&] {
        const OptionArgs args{cu_seqlens_q,      cu_seqlens_k,     max_seqlen_q, max_seqlen_k,
                              dropout_p,         softmax_scale,    causal,       window_left,
                              window_right,      softcap,          alibi_slopes, rng_state,
                              q_position_offset, k_position_offset};
        const orchard::AttentionOptions o = options_of(op, args, deterministic);
        return plan_tensors(orchard::metal_forward_plan(
            {.q = view_of(op, "q", q), .k = view_of(op, "k", k), .v = view_of(op, "v", v),
             .out = view_of(op, "out", out), .lse = view_of(op, "lse", lse)},
            o));
    });
}

// The same for a backward; gradients not needed are passed as empty (0,) tensors.
std::tuple<Tensor, Tensor> metal_plan_bwd(
    Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dq, Tensor dk,
    Tensor dv, std::optional<Tensor> cu_seqlens_q, std::optional<Tensor> cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, std::optional<Tensor> alibi_slopes, Tensor rng_state, bool deterministic,
    bool need_dq, bool need_dk, bool need_dv, std::string op, int64_t q_position_offset,
    int64_t k_position_offset) {
    return guarded([&] {
        const OptionArgs args{cu_seqlens_q,      cu_seqlens_k,     max_seqlen_q, max_seqlen_k,
                              dropout_p,         softmax_scale,    causal,       window_left,
                              window_right,      softcap,          alibi_slopes, rng_state,
                              q_position_offset, k_position_offset};
        const orchard::AttentionOptions o = options_of(op, args, deterministic);
        auto grad_view = [&](const char* name, const Tensor& g, bool needed) {
            return needed ? view_of(op, name, g) : orchard::TensorView{};
        };
        return plan_tensors(orchard::metal_backward_plan(
            {.q = view_of(op, "q", q), .k = view_of(op, "k", k), .v = view_of(op, "v", v),
             .out = view_of(op, "out", out), .dout = view_of(op, "dout", dout),
             .lse = view_of(op, "lse", lse), .dq = grad_view("dq", dq, need_dq),
             .dk = grad_view("dk", dk, need_dk), .dv = grad_view("dv", dv, need_dv)},
            o));
    });
}

// Call counters: int64 (2, 5) [direction][backend], then fallbacks and staging copies (2,) each.
Tensor stats() {
    const orchard::Stats s = orchard::stats();
    Tensor t = torch::stable::empty({14}, ScalarType::Long);
    auto* p = static_cast<int64_t*>(t.data_ptr());
    for (int d = 0; d < 2; ++d)
        for (int b = 0; b < 5; ++b) p[d * 5 + b] = s.calls[d][b];
    p[10] = s.fallbacks[0];
    p[11] = s.fallbacks[1];
    p[12] = s.staging_copies[0];
    p[13] = s.staging_copies[1];
    return t;
}

void reset_stats() { orchard::reset_stats(); }

void note_fallback(std::string op, bool backward, std::string used, std::string reason) {
    orchard::record_fallback(backward ? orchard::Direction::backward : orchard::Direction::forward,
                             op, used, reason);
}

}  // namespace

STABLE_TORCH_LIBRARY(orchard, m) {
    m.def("fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
          "int max_seqlen_q, int max_seqlen_k, float dropout_p, float? softmax_scale, "
          "bool causal, int window_left, int window_right, float softcap, "
          "Tensor? alibi_slopes, Tensor rng_state, bool deterministic, str op, "
          "int q_position_offset=0, int k_position_offset=0) -> (Tensor, Tensor)");
    m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
          "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
          "float dropout_p, float? softmax_scale, bool causal, int window_left, "
          "int window_right, float softcap, Tensor? alibi_slopes, Tensor rng_state, "
          "bool deterministic, bool need_dq, bool need_dk, bool need_dv, str op, "
          "int q_position_offset=0, int k_position_offset=0) -> (Tensor, Tensor, Tensor)");
    m.def("metal_plan_fwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
          "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
          "float dropout_p, float? softmax_scale, bool causal, int window_left, "
          "int window_right, float softcap, Tensor? alibi_slopes, Tensor rng_state, "
          "bool deterministic, str op, int q_position_offset=0, int k_position_offset=0) "
          "-> (Tensor, Tensor)");
    m.def("metal_plan_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
          "Tensor dq, Tensor dk, Tensor dv, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
          "int max_seqlen_q, int max_seqlen_k, float dropout_p, float? softmax_scale, "
          "bool causal, int window_left, int window_right, float softcap, "
          "Tensor? alibi_slopes, Tensor rng_state, bool deterministic, bool need_dq, "
          "bool need_dk, bool need_dv, str op, int q_position_offset=0, "
          "int k_position_offset=0) -> (Tensor, Tensor)");
    m.def("stats() -> Tensor");
    m.def("reset_stats() -> ()");
    m.def("note_fallback(str op, bool backward, str used, str reason) -> ()");
}

// One implementation for every device: the core picks the backend from the tensors' device and
// says clearly when that backend was not built (a CPU-only build given CUDA tensors).
STABLE_TORCH_LIBRARY_IMPL(orchard, CPU, m) {
    m.impl("fwd", TORCH_BOX(&fwd));
    m.impl("bwd", TORCH_BOX(&bwd));
}

STABLE_TORCH_LIBRARY_IMPL(orchard, CUDA, m) {
    m.impl("fwd", TORCH_BOX(&fwd));
    m.impl("bwd", TORCH_BOX(&bwd));
}

STABLE_TORCH_LIBRARY_IMPL(orchard, CompositeExplicitAutograd, m) {
    m.impl("stats", TORCH_BOX(&stats));
    m.impl("reset_stats", TORCH_BOX(&reset_stats));
    m.impl("note_fallback", TORCH_BOX(&note_fallback));
    // Plans read only shapes, strides and options (never device memory): any device.
    m.impl("metal_plan_fwd", TORCH_BOX(&metal_plan_fwd));
    m.impl("metal_plan_bwd", TORCH_BOX(&metal_plan_bwd));
}
