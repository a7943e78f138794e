// Validation of every argument of forward() / backward(), done once, and the params it builds.
#include "core/validate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

#include "core/memory_overlap.h"
#include "core/philox.h"

namespace orchard {
namespace {

// Backends read the workspace as arrays of float / double (and vectors of them).
constexpr uintptr_t kWorkspaceAlignment = 64;

template <typename... Ts>
[[noreturn]] void fail(ErrorKind kind, const std::string& op, const Ts&... parts) {
    std::ostringstream os;
    os << op << ": ";
    (os << ... << parts);
    throw Error(kind, os.str());
}

template <typename... Ts>
[[noreturn]] void invalid(const std::string& op, const Ts&... parts) {
    fail(ErrorKind::invalid_argument, op, parts...);
}

std::string shape_str(const TensorView& v) {
    std::ostringstream os;
    os << "(";
    for (int i = 0; i < v.ndim; ++i) os << (i ? ", " : "") << v.shape[i];
    os << (v.ndim == 1 ? ",)" : ")");
    return os.str();
}

std::string dims_str(const std::vector<int64_t>& dims) {
    std::ostringstream os;
    os << "(";
    for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
    os << (dims.size() == 1 ? ",)" : ")");
    return os.str();
}

std::string strides_str(const TensorView& v) {
    return dims_str(std::vector<int64_t>(v.strides, v.strides + v.ndim));
}

std::string device_str(Device d) {
    return d.kind == DeviceKind::cpu ? "cpu" : std::string(to_string(d.kind)) + ":" + std::to_string(d.index);
}

struct Named {
    const char* name;
    const TensorView* view;
};

// The number of elements of a view with sizes >= 0, or -1 when its bytes do not fit in int64
// (TensorView::numel() would overflow, e.g. wrap to 0 and pass for an empty tensor).
int64_t checked_numel(const TensorView& v) {
    for (int i = 0; i < v.ndim; ++i)
        if (v.shape[i] == 0) return 0;
    const int64_t limit = std::numeric_limits<int64_t>::max() / element_size(v.dtype);
    int64_t n = 1;
    for (int i = 0; i < v.ndim; ++i) {
        if (n > limit / v.shape[i]) return -1;
        n *= v.shape[i];
    }
    return n;
}

// Checks common to every tensor argument: given, sane sizes, data present, on q's device.
void check_view(const std::string& op, const Named& t, Device device) {
    const TensorView& v = *t.view;
    if (v.ndim == 0 && v.data == nullptr) invalid(op, t.name, " is missing (an empty view)");
    if (v.ndim < 0 || v.ndim > kMaxDims)
        invalid(op, t.name, " has ", v.ndim, " dimensions; expected 1 to ", kMaxDims);
    for (int i = 0; i < v.ndim; ++i)
        if (v.shape[i] < 0)
            invalid(op, t.name, " sizes must be >= 0 but its shape is ", shape_str(v));
    const int64_t numel = checked_numel(v);
    if (numel < 0)
        invalid(op, t.name, " must span fewer than 2^63 bytes but has shape ", shape_str(v),
                " of ", to_string(v.dtype));
    if (v.data == nullptr && numel > 0)
        invalid(op, t.name, " has a null data pointer but ", numel, " elements");
    if (!(v.device == device))
        invalid(op, t.name, " is on ", device_str(v.device), " but q is on ", device_str(device));
}

void check_rank(const std::string& op, const Named& t, int rank, const char* layout) {
    if (t.view->ndim != rank)
        invalid(op, t.name, " must have ", rank, " dimensions ", layout, " but has ",
                t.view->ndim, ": shape ", shape_str(*t.view));
}

void check_shape(const std::string& op, const Named& t, const std::vector<int64_t>& expected,
                 const char* names) {
    bool same = int(expected.size()) == t.view->ndim;
    for (int i = 0; same && i < t.view->ndim; ++i) same = t.view->shape[i] == expected[i];
    if (!same)
        invalid(op, t.name, " has shape ", shape_str(*t.view), " but expected ",
                dims_str(expected), " = ", names);
}

void check_dtype(const std::string& op, const Named& t, DType expected, const char* what) {
    if (t.view->dtype != expected)
        invalid(op, t.name, " has dtype ", to_string(t.view->dtype), " but ", what, " ",
                to_string(expected));
}

void check_writable(const std::string& op, const Named& out, const std::vector<Named>& others) {
    if (has_internal_overlap(*out.view))
        invalid(op, out.name, " has overlapping elements (a stride-0 / expanded dimension; shape ",
                shape_str(*out.view), ", strides ", strides_str(*out.view),
                "): it cannot be written; pass a tensor with its own memory");
    for (const Named& o : others)
        if (o.view != out.view && may_overlap(*out.view, *o.view))
            invalid(op, out.name, " overlaps ", o.name,
                    " in memory; outputs must not alias inputs or other outputs");
}

Strides bshd(const TensorView& v, bool varlen) {
    // Padded (B, S, H, D) or varlen (total, H, D).
    if (varlen) return {0, v.strides[0], v.strides[1], v.strides[2]};
    return {v.strides[0], v.strides[1], v.strides[2], v.strides[3]};
}

const void* ptr(const TensorView& v) {
    return v.device.kind == DeviceKind::metal ? v.data : static_cast<const void*>(v.base());
}

// The byte offset that ptr() leaves to the backend (Metal binds buffer + offset).
int64_t buffer_offset(const TensorView& v) {
    return v.device.kind == DeviceKind::metal ? v.byte_offset : 0;
}

void check_cu_seqlens(const std::string& op, const char* name, const TensorView& cu, int64_t B,
                      int64_t total, int64_t& max_seqlen, const char* max_name) {
    if (cu.dtype != DType::i32) invalid(op, name, " has dtype ", to_string(cu.dtype), " but expected int32");
    if (cu.ndim != 1 || cu.shape[0] != B + 1)
        invalid(op, name, " has shape ", shape_str(cu), " but expected (", B + 1, ",) = (B + 1,)");
    if (cu.shape[0] > 1 && cu.strides[0] != 1)
        invalid(op, name, " must be contiguous (stride 1) but has stride ", cu.strides[0]);
    if (max_seqlen < 0) invalid(op, max_name, " must be >= 0 but is ", max_seqlen);
    if (cu.device.kind != DeviceKind::cpu) {
        // Device memory is not read here: the GPU backend checks bounds in its kernels.
        if (max_seqlen <= 0 && B > 0 && total > 0)
            invalid(op, max_name, " must be given (> 0) for device tensors but is ", max_seqlen);
        return;
    }
    const auto* c = reinterpret_cast<const int32_t*>(cu.base());
    if (c[0] != 0) invalid(op, name, "[0] must be 0 but is ", c[0]);
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
        if (c[b + 1] < c[b])
            invalid(op, name, " must be non-decreasing but ", name, "[", b + 1, "] = ", c[b + 1],
                    " < ", name, "[", b, "] = ", c[b]);
        longest = std::max<int64_t>(longest, c[b + 1] - c[b]);
    }
    if (c[B] != total)
        invalid(op, name, "[-1] must equal the total number of tokens ", total, " but is ", c[B]);
    if (max_seqlen > 0 && longest > max_seqlen)
        invalid(op, max_name, " is ", max_seqlen, " but the longest sequence in ", name, " has ",
                longest, " tokens");
    // Any upper bound is allowed; the exact one is known here, so a loose max_seqlen (say 2^40)
    // sizes neither the kernels' grids nor their scratch.
    max_seqlen = longest;
}

const BackendOps& pick_backend(const std::string& op, Backend requested, Device device) {
    auto expect = [&](DeviceKind kind) {
        if (device.kind != kind)
            invalid(op, "backend ", to_string(requested), " needs ", to_string(kind),
                    " tensors but q is on ", device_str(device));
    };
    switch (requested) {
        case Backend::reference: expect(DeviceKind::cpu); return reference_backend();
        case Backend::cpu: expect(DeviceKind::cpu); return cpu_backend();
        case Backend::cuda: expect(DeviceKind::cuda); return cuda_backend();
        case Backend::metal: expect(DeviceKind::metal); return metal_backend();
        case Backend::automatic: break;
    }
    switch (device.kind) {
        case DeviceKind::cuda: return cuda_backend();
        case DeviceKind::metal: return metal_backend();
        case DeviceKind::cpu: break;
    }
    return cpu_backend();
}

// Everything forward and backward share: q, k, v, out, lse and the options.
PreparedCall prepare_common(const std::string& op, const TensorView& q, const TensorView& k,
                            const TensorView& v, const TensorView& out, const TensorView& lse,
                            const AttentionOptions& o) {
    PreparedCall call;
    call.op = op;
    AttentionParams& p = call.params;
    const Device device = q.device;
    for (const Named& t : {Named{"q", &q}, Named{"k", &k}, Named{"v", &v}, Named{"out", &out},
                           Named{"lse", &lse}})
        check_view(op, t, device);

    const bool varlen = !o.cu_seqlens_q.empty_view();
    if (varlen == o.cu_seqlens_k.empty_view())
        invalid(op, "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at all "
                "but only ", varlen ? "cu_seqlens_q" : "cu_seqlens_k", " is given");
    const int rank = varlen ? 3 : 4;
    const char* layout = varlen ? "(total, H, D)" : "(B, S, H, D)";
    for (const Named& t : {Named{"q", &q}, Named{"k", &k}, Named{"v", &v}, Named{"out", &out}})
        check_rank(op, t, rank, layout);
    check_rank(op, {"lse", &lse}, varlen ? 2 : 3, varlen ? "(Hq, total_q)" : "(B, Hq, Sq)");

    const DType dt = q.dtype;
    if (dt != DType::f32 && dt != DType::f16 && dt != DType::bf16 && dt != DType::f64)
        invalid(op, "q has dtype ", to_string(dt), " but expected float32, float16, bfloat16 or float64");
    for (const Named& t : {Named{"k", &k}, Named{"v", &v}, Named{"out", &out}})
        check_dtype(op, t, dt, "q has");
    check_dtype(op, {"lse", &lse}, DType::f32, "expected");

    const int o1 = varlen ? 0 : 1;  // index of the sequence dim
    const int64_t Hq = q.shape[o1 + 1], D = q.shape[o1 + 2];
    const int64_t Hkv = k.shape[o1 + 1], Dv = v.shape[o1 + 2];
    if (k.shape[o1 + 2] != D) invalid(op, "k has head_dim ", k.shape[o1 + 2], " but q has ", D);
    if (!varlen && k.shape[0] != q.shape[0])
        invalid(op, "k has batch size ", k.shape[0], " but q has ", q.shape[0]);
    if (v.shape[0] != k.shape[0] || (!varlen && v.shape[1] != k.shape[1]))
        invalid(op, "v has shape ", shape_str(v), " but k has ", shape_str(k),
                "; they must agree in everything but the last dim");
    if (v.shape[o1 + 1] != Hkv)
        invalid(op, "v has ", v.shape[o1 + 1], " heads but k has ", Hkv);
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0)
        invalid(op, "the number of query heads (", Hq, ") must be a multiple of the number of "
                "key/value heads (", Hkv, ")");

    p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.Dv = Dv;
    p.dtype = dt;
    p.device = device;
    if (varlen) {
        for (const Named& t : {Named{"cu_seqlens_q", &o.cu_seqlens_q}, Named{"cu_seqlens_k", &o.cu_seqlens_k}})
            check_view(op, t, device);
        p.B = o.cu_seqlens_q.shape[0] - 1;
        if (o.cu_seqlens_q.ndim != 1 || p.B < 0)
            invalid(op, "cu_seqlens_q has shape ", shape_str(o.cu_seqlens_q), " but expected (B + 1,)");
        int64_t max_q = o.max_seqlen_q, max_k = o.max_seqlen_k;
        check_cu_seqlens(op, "cu_seqlens_q", o.cu_seqlens_q, p.B, q.shape[0], max_q, "max_seqlen_q");
        check_cu_seqlens(op, "cu_seqlens_k", o.cu_seqlens_k, p.B, k.shape[0], max_k, "max_seqlen_k");
        p.Sq = max_q; p.Sk = max_k;
        p.cu_seqlens_q = static_cast<const int32_t*>(ptr(o.cu_seqlens_q));
        p.cu_seqlens_k = static_cast<const int32_t*>(ptr(o.cu_seqlens_k));
        p.total_q = q.shape[0];
        p.total_k = k.shape[0];
        p.offsets.cu_seqlens_q = buffer_offset(o.cu_seqlens_q);
        p.offsets.cu_seqlens_k = buffer_offset(o.cu_seqlens_k);
        check_shape(op, {"out", &out}, {q.shape[0], Hq, Dv}, "(total_q, Hq, Dv)");
        check_shape(op, {"lse", &lse}, {Hq, q.shape[0]}, "(Hq, total_q)");
        p.lse_st = {0, lse.strides[0], lse.strides[1]};
    } else {
        p.B = q.shape[0]; p.Sq = q.shape[1]; p.Sk = k.shape[1];
        check_shape(op, {"out", &out}, {p.B, p.Sq, Hq, Dv}, "(B, Sq, Hq, Dv)");
        check_shape(op, {"lse", &lse}, {p.B, Hq, p.Sq}, "(B, Hq, Sq)");
        p.lse_st = {lse.strides[0], lse.strides[1], lse.strides[2]};
    }
    p.q = ptr(q); p.k = ptr(k); p.v = ptr(v);
    p.out = const_cast<void*>(ptr(out));
    p.lse = static_cast<float*>(const_cast<void*>(ptr(lse)));
    p.offsets.q = buffer_offset(q); p.offsets.k = buffer_offset(k); p.offsets.v = buffer_offset(v);
    p.offsets.out = buffer_offset(out);
    p.offsets.lse = buffer_offset(lse);
    p.q_st = bshd(q, varlen); p.k_st = bshd(k, varlen); p.v_st = bshd(v, varlen);
    p.out_st = bshd(out, varlen);

    // Options.
    const double scale = o.scale.value_or(D > 0 ? 1.0 / std::sqrt(double(D)) : 1.0);
    if (!std::isfinite(scale)) invalid(op, "softmax_scale must be finite but is ", scale);
    p.scale = scale;
    if (!(o.softcap >= 0.0) || !std::isfinite(o.softcap))
        invalid(op, "softcap must be finite and >= 0 but is ", o.softcap);
    p.softcap = o.softcap;
    if (o.window_left < -1 || o.window_right < -1)
        invalid(op, "window_size must be >= -1 (-1 = unbounded) but is (", o.window_left, ", ",
                o.window_right, ")");
    if (o.causal && o.window_right > 0)
        invalid(op, "causal=true implies window_size[1] = 0 but window_size[1] is ", o.window_right);
    // A window wider than kUnbounded is unbounded; clamping keeps the kernels' index arithmetic
    // (i + Sk - Sq +- window) from overflowing.
    p.window_left = o.window_left < 0 ? kUnbounded : std::min(o.window_left, kUnbounded);
    p.window_right =
        o.causal ? 0 : (o.window_right < 0 ? kUnbounded : std::min(o.window_right, kUnbounded));

    if (!o.alibi_slopes.empty_view()) {
        const TensorView& a = o.alibi_slopes;
        check_view(op, {"alibi_slopes", &a}, device);
        check_dtype(op, {"alibi_slopes", &a}, DType::f32, "expected");
        const bool per_batch = a.ndim == 2;
        if (!(a.ndim == 1 && a.shape[0] == Hq) && !(per_batch && a.shape[0] == p.B && a.shape[1] == Hq))
            invalid(op, "alibi_slopes has shape ", shape_str(a), " but expected (", Hq,
                    ",) or (", p.B, ", ", Hq, ") = (Hq,) or (B, Hq)");
        p.alibi_slopes = static_cast<const float*>(ptr(a));
        p.offsets.alibi_slopes = buffer_offset(a);
        p.alibi_b = per_batch ? a.strides[0] : 0;
        p.alibi_h = per_batch ? a.strides[1] : a.strides[0];
    }

    if (!(o.dropout_p >= 0.0 && o.dropout_p < 1.0))
        invalid(op, "dropout_p must be in [0, 1) but is ", o.dropout_p);
    if (o.offset > 0xFFFFFFFFull)
        invalid(op, "the dropout offset must be < 2^32 but is ", o.offset);
    p.dropout = o.dropout_p > 0.0;
    p.dropout_p = o.dropout_p;
    p.keep_threshold = dropout_keep_threshold(o.dropout_p);
    p.rp_dropout = 1.0 / (1.0 - o.dropout_p);
    p.seed = o.seed;
    p.offset = uint32_t(o.offset);
    p.deterministic = o.deterministic;
    p.stream = o.stream;

    if (o.q_position_offset != 0 || o.k_position_offset != 0) {
        if (varlen)
            invalid(op, "q_position_offset / k_position_offset are not supported with varlen "
                    "inputs (cu_seqlens) but are (", o.q_position_offset, ", ",
                    o.k_position_offset, ")");
        // Positions are 32-bit words of the dropout counter (DESIGN.md).
        constexpr int64_t kPositions = int64_t(1) << 32;
        auto check = [&](const char* name, int64_t value, int64_t len, const char* len_name) {
            if (value < 0 || value > kPositions - len)
                invalid(op, name, " must be in [0, 2^32 - ", len_name, "] = [0, ",
                        kPositions - len, "] (positions are 32-bit) but is ", value);
        };
        check("q_position_offset", o.q_position_offset, p.Sq, "Sq");
        check("k_position_offset", o.k_position_offset, p.Sk, "Sk");
        p.q_position_offset = o.q_position_offset;
        p.k_position_offset = o.k_position_offset;
    }

    call.ops = &pick_backend(op, o.backend, device);
    p.backend = call.ops->backend;
    call.nothing_to_do = p.B == 0 || Hq == 0 || q.shape[0] == 0 || (!varlen && p.Sq == 0);
    return call;
}

void check_supported(PreparedCall& call, Direction dir) {
    const BackendSupport s = call.ops->supports(call.params, dir);
    if (!s.ok) fail(ErrorKind::unsupported, call.op, s.reason);
}

}  // namespace

PreparedCall prepare_forward(const ForwardArgs& a, const AttentionOptions& o) {
    const std::string op = o.op_name ? o.op_name : "orchard::forward";
    PreparedCall call = prepare_common(op, a.q, a.k, a.v, a.out, a.lse, o);
    const std::vector<Named> all = {{"q", &a.q}, {"k", &a.k}, {"v", &a.v}, {"out", &a.out},
                                    {"lse", &a.lse}, {"alibi_slopes", &o.alibi_slopes},
                                    {"cu_seqlens_q", &o.cu_seqlens_q}, {"cu_seqlens_k", &o.cu_seqlens_k}};
    check_writable(op, {"out", &a.out}, all);
    check_writable(op, {"lse", &a.lse}, all);
    check_supported(call, Direction::forward);
    return call;
}

PreparedCall prepare_backward(const BackwardArgs& a, const AttentionOptions& o, Workspace ws) {
    const std::string op = o.op_name ? o.op_name : "orchard::backward";
    PreparedCall call = prepare_common(op, a.q, a.k, a.v, a.out, a.lse, o);
    AttentionParams& p = call.params;
    const bool varlen = p.is_varlen();
    // Gradients not asked for are empty views: they are neither computed nor written.
    std::vector<Named> grads;
    for (const Named& t : {Named{"dq", &a.dq}, Named{"dk", &a.dk}, Named{"dv", &a.dv}})
        if (!t.view->empty_view()) grads.push_back(t);
    if (grads.empty()) invalid(op, "dq, dk and dv are all missing; at least one must be given");
    for (const Named& t : {Named{"dout", &a.dout}}) {
        check_view(op, t, p.device);
        check_dtype(op, t, p.dtype, "q has");
    }
    for (const Named& t : grads) {
        check_view(op, t, p.device);
        check_dtype(op, t, p.dtype, "q has");
    }
    auto shape_of = [](const TensorView& v) {
        return std::vector<int64_t>(v.shape, v.shape + v.ndim);
    };
    check_shape(op, {"dout", &a.dout}, shape_of(a.out),
                varlen ? "the shape of out (total_q, Hq, Dv)" : "the shape of out (B, Sq, Hq, Dv)");
    if (!a.dq.empty_view()) check_shape(op, {"dq", &a.dq}, shape_of(a.q), "the shape of q");
    if (!a.dk.empty_view()) check_shape(op, {"dk", &a.dk}, shape_of(a.k), "the shape of k");
    if (!a.dv.empty_view()) check_shape(op, {"dv", &a.dv}, shape_of(a.v), "the shape of v");
    std::vector<Named> all = {{"q", &a.q}, {"k", &a.k}, {"v", &a.v}, {"out", &a.out},
                              {"dout", &a.dout}, {"lse", &a.lse},
                              {"alibi_slopes", &o.alibi_slopes},
                              {"cu_seqlens_q", &o.cu_seqlens_q}, {"cu_seqlens_k", &o.cu_seqlens_k}};
    all.insert(all.end(), grads.begin(), grads.end());
    for (const Named& t : grads) check_writable(op, t, all);
    auto out_ptr = [&](const TensorView& v) {
        return v.empty_view() ? nullptr : const_cast<void*>(ptr(v));
    };
    p.dout = ptr(a.dout);
    p.dq = out_ptr(a.dq);
    p.dk = out_ptr(a.dk);
    p.dv = out_ptr(a.dv);
    p.dout_st = bshd(a.dout, varlen);
    p.offsets.dout = buffer_offset(a.dout);
    if (p.dq) p.offsets.dq = buffer_offset(a.dq);
    if (p.dk) p.offsets.dk = buffer_offset(a.dk);
    if (p.dv) p.offsets.dv = buffer_offset(a.dv);
    if (p.dq) p.dq_st = bshd(a.dq, varlen);
    if (p.dk) p.dk_st = bshd(a.dk, varlen);
    if (p.dv) p.dv_st = bshd(a.dv, varlen);
    p.workspace = ws.data;
    p.workspace_bytes = ws.bytes;
    check_supported(call, Direction::backward);
    if (ws.data == nullptr && ws.bytes > 0)
        invalid(op, "workspace has ", ws.bytes, " bytes but a null data pointer");
    if (reinterpret_cast<uintptr_t>(ws.data) % kWorkspaceAlignment != 0)
        invalid(op, "workspace must be ", kWorkspaceAlignment, "-byte aligned but its address is ",
                ws.data);
    // Gradients of an empty problem are still defined: dk / dv are zero when no query exists
    // (Sq = 0, or Hq = 0 with Hkv > 0), dq is zero when no key exists. Only when there is no
    // gradient element to write is there nothing to do.
    call.nothing_to_do = true;
    for (const Named& t : grads) call.nothing_to_do = call.nothing_to_do && t.view->numel() == 0;
    return call;
}

}  // namespace orchard
