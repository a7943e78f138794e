// The Metal backend of the emulator build (ORCHARD_METAL_EMULATOR): the .metal kernels compiled
// as C++ and launched on the CPU by tools/metal_emu. "Metal buffers" are host memory here: a
// TensorView on DeviceKind::metal holds a host address as its buffer handle plus a byte offset.
//
// The kernels come first (their rewritten copies from the build directory), then the MSL words
// are released and the host code follows.
#include "metal/attention_fwd.metal"
#include "metal/attention_bwd.metal"
#include "metal_emu/prelude_end.h"

#include <algorithm>
#include <type_traits>
#include <utility>

#include "core/backend.h"
#include "metal/launch.h"
#include "metal_emu/runtime.h"

namespace orchard::metal_host {
namespace {

using orchard_emu::Buffer;
using orchard_emu::checked_ptr;

// The bytes a kernel may touch through a tensor: from its lowest to its highest element, so
// that any access outside the tensor (not only outside the allocation) is reported.
Buffer tensor_buffer(const char* name, const void* handle, int64_t byte_offset, int64_t esize,
                     std::initializer_list<std::pair<int64_t, int64_t>> dims_strides) {
    const char* base = static_cast<const char*>(handle) + byte_offset;
    int64_t lo = 0, hi = 0;
    for (auto [n, st] : dims_strides) {
        if (n == 0 || handle == nullptr) return {name, base, base};
        lo += std::min<int64_t>(0, (n - 1) * st);
        hi += std::max<int64_t>(0, (n - 1) * st);
    }
    return {name, base + lo * esize, base + (hi + 1) * esize};
}

Buffer unbound(const char* name) { return {name, nullptr, nullptr}; }

template <class T>
checked_ptr<T> view(const void* handle, int64_t byte_offset, const Buffer& buffer) {
    auto* base = reinterpret_cast<T*>(const_cast<char*>(static_cast<const char*>(handle)) +
                                      byte_offset);
    return checked_ptr<T>(handle ? base : nullptr, &buffer);
}

// Every buffer of a call, with the extent its view allows.
struct Buffers {
    Buffer q, k, v, out, lse, dout, dq, dk, dv, cu_q, cu_k, alibi, delta;

    explicit Buffers(const AttentionParams& p) {
        const int64_t es = element_size(p.dtype);
        const bool vl = p.is_varlen();
        const int64_t nb = vl ? 1 : p.B;  // varlen: the batch is in the token dim
        const int64_t nq = vl ? p.total_q : p.Sq, nk = vl ? p.total_k : p.Sk;
        auto bshd = [&](const char* name, const void* h, int64_t off, const Strides& st,
                        int64_t s, int64_t heads, int64_t d) {
            return tensor_buffer(name, h, off, es, {{nb, st.b}, {s, st.s}, {heads, st.h}, {d, st.d}});
        };
        const ByteOffsets& o = p.offsets;
        q = bshd("q", p.q, o.q, p.q_st, nq, p.Hq, p.D);
        k = bshd("k", p.k, o.k, p.k_st, nk, p.Hkv, p.D);
        v = bshd("v", p.v, o.v, p.v_st, nk, p.Hkv, p.Dv);
        out = bshd("out", p.out, o.out, p.out_st, nq, p.Hq, p.Dv);
        dout = p.dout ? bshd("dout", p.dout, o.dout, p.dout_st, nq, p.Hq, p.Dv) : unbound("dout");
        dq = p.dq ? bshd("dq", p.dq, o.dq, p.dq_st, nq, p.Hq, p.D) : unbound("dq");
        dk = p.dk ? bshd("dk", p.dk, o.dk, p.dk_st, nk, p.Hkv, p.D) : unbound("dk");
        dv = p.dv ? bshd("dv", p.dv, o.dv, p.dv_st, nk, p.Hkv, p.Dv) : unbound("dv");
        lse = tensor_buffer("lse", p.lse, o.lse, 4,
                            {{nb, p.lse_st.b}, {p.Hq, p.lse_st.h}, {nq, p.lse_st.s}});
        cu_q = vl ? tensor_buffer("cu_seqlens_q", p.cu_seqlens_q, o.cu_seqlens_q, 4, {{p.B + 1, 1}})
                  : unbound("cu_seqlens_q (not varlen)");
        cu_k = vl ? tensor_buffer("cu_seqlens_k", p.cu_seqlens_k, o.cu_seqlens_k, 4, {{p.B + 1, 1}})
                  : unbound("cu_seqlens_k (not varlen)");
        alibi = p.alibi_slopes ? tensor_buffer("alibi_slopes", p.alibi_slopes, o.alibi_slopes, 4,
                                               {{p.B, p.alibi_b}, {p.Hq, p.alibi_h}})
                               : unbound("alibi_slopes (none)");
        delta = unbound("delta (workspace)");
    }
};

orchard_emu::uint3 dims(Grid g) { return {g.x, g.y, g.z}; }

// Calls f(T{}, std::integral_constant<int, DMAX>{}) for p's dtype and head-dim bucket.
template <class F>
void dispatch_kernel(const AttentionParams& p, F&& f) {
    auto with_type = [&](auto tag) {
        switch (msl::head_dim_bucket(int(std::max(p.D, p.Dv)))) {
            case 64: return f(tag, std::integral_constant<int, 64>{});
            case 128: return f(tag, std::integral_constant<int, 128>{});
            default: return f(tag, std::integral_constant<int, 256>{});
        }
    };
    switch (p.dtype) {
        case DType::f16: return with_type(half{});
        case DType::bf16: return with_type(bfloat{});
        default: return with_type(float{});
    }
}

// Emulator reports (divergence, out-of-bounds) are bugs of ours: internal errors.
template <class F>
void run(const char* direction, F&& f) {
    try {
        f();
    } catch (const orchard_emu::KernelError& e) {
        throw Error(ErrorKind::internal, std::string("orchard::") + direction + ": " + e.what());
    }
}

void attention_fwd_metal(const AttentionParams& p) {
    const msl::KernelParams kp = kernel_params(p);
    const Buffers bufs(p);
    const orchard_emu::Launch launch{kernel_name("attention_fwd", p), dims(grid_by_queries(p)),
                                     msl::kThreads};
    const ByteOffsets& o = p.offsets;
    run("forward", [&] {
        dispatch_kernel(p, [&](auto tag, auto dmax) {
            using T = decltype(tag);
            const auto q = view<const T>(p.q, o.q, bufs.q), k = view<const T>(p.k, o.k, bufs.k),
                       v = view<const T>(p.v, o.v, bufs.v);
            const auto out = view<T>(p.out, o.out, bufs.out);
            const auto lse = view<float>(p.lse, o.lse, bufs.lse);
            const auto cu_q = view<const int32_t>(p.cu_seqlens_q, o.cu_seqlens_q, bufs.cu_q);
            const auto cu_k = view<const int32_t>(p.cu_seqlens_k, o.cu_seqlens_k, bufs.cu_k);
            const auto alibi = view<const float>(p.alibi_slopes, o.alibi_slopes, bufs.alibi);
            orchard_emu::dispatch(launch, [&](const orchard_emu::ThreadIds& id,
                                              checked_ptr<float>) {
                msl::attention_fwd<T, decltype(dmax)::value>(kp, q, k, v, out, lse, cu_q, cu_k,
                                                             alibi, id.tgid, id.tid, id.sg,
                                                             id.lane);
            });
        });
    });
}

void attention_bwd_metal(const AttentionParams& p) {
    // The core has checked that the workspace holds bwd_workspace_size(p) bytes.
    const size_t ws_bytes = bwd_workspace_size(p);
    const msl::KernelParams kp = kernel_params(p);
    Buffers bufs(p);
    bufs.delta = tensor_buffer("delta (workspace)", p.workspace, 0, 4, {{int64_t(ws_bytes / 4), 1}});
    const ByteOffsets& o = p.offsets;
    const orchard_emu::Launch pre{std::string("attention_bwd_preprocess_") +
                                      msl_type_name(p.dtype),
                                  dims(grid_by_queries(p)), msl::kThreads};
    const orchard_emu::Launch dkdv{kernel_name("attention_bwd_dkdv", p), dims(grid_by_keys(p)),
                                   msl::kThreads};
    const orchard_emu::Launch dq{kernel_name("attention_bwd_dq", p), dims(grid_by_queries(p)),
                                 msl::kThreads};
    run("backward", [&] {
        dispatch_kernel(p, [&](auto tag, auto dmax) {
            using T = decltype(tag);
            constexpr int DMAX = decltype(dmax)::value;
            const auto q = view<const T>(p.q, o.q, bufs.q), k = view<const T>(p.k, o.k, bufs.k),
                       v = view<const T>(p.v, o.v, bufs.v);
            const auto out = view<const T>(p.out, o.out, bufs.out);
            const auto dout = view<const T>(p.dout, o.dout, bufs.dout);
            const auto lse = view<const float>(p.lse, o.lse, bufs.lse);
            const auto delta = view<float>(p.workspace, 0, bufs.delta);
            const auto cu_q = view<const int32_t>(p.cu_seqlens_q, o.cu_seqlens_q, bufs.cu_q);
            const auto cu_k = view<const int32_t>(p.cu_seqlens_k, o.cu_seqlens_k, bufs.cu_k);
            const auto alibi = view<const float>(p.alibi_slopes, o.alibi_slopes, bufs.alibi);
            const auto dq_out = view<T>(p.dq, o.dq, bufs.dq), dk_out = view<T>(p.dk, o.dk, bufs.dk),
                       dv_out = view<T>(p.dv, o.dv, bufs.dv);
            orchard_emu::dispatch(pre, [&](const orchard_emu::ThreadIds& id, checked_ptr<float>) {
                msl::attention_bwd_preprocess<T>(kp, out, dout, delta, cu_q, cu_k, id.tgid, id.sg,
                                                 id.lane);
            });
            if (p.dk || p.dv)
                orchard_emu::dispatch(dkdv, [&](const orchard_emu::ThreadIds& id,
                                                checked_ptr<float>) {
                    msl::attention_bwd_dkdv<T, DMAX>(kp, q, k, v, dout, lse, delta, dk_out,
                                                     dv_out, cu_q, cu_k, alibi, id.tgid,
                                                     id.tid, id.sg, id.lane);
                });
            if (p.dq)
                orchard_emu::dispatch(dq, [&](const orchard_emu::ThreadIds& id,
                                              checked_ptr<float>) {
                    msl::attention_bwd_dq<T, DMAX>(kp, q, k, v, dout, lse, delta, dq_out, cu_q,
                                                   cu_k, alibi, id.tgid, id.tid, id.sg,
                                                   id.lane);
                });
        });
    });
}

}  // namespace
}  // namespace orchard::metal_host

namespace orchard {

const BackendOps& metal_backend() {
    static const BackendOps ops{Backend::metal, &metal_host::supports,
                                &metal_host::attention_fwd_metal, &metal_host::attention_bwd_metal,
                                &metal_host::bwd_workspace_size};
    return ops;
}

}  // namespace orchard
