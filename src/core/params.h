// The one plain struct that crosses from the core into every backend (FA's Flash_fwd_params).
// Built once by validate.cpp; kernels read it and assume everything in it has been checked.
#pragma once

#include <cstdint>

#include "orchard/types.h"

namespace orchard {

// Strides, in elements, of a (batch, token, head, dim) tensor. For varlen tensors `b` is 0 and
// a sequence's first token is `cu_seqlens[b]`.
struct Strides {
    int64_t b = 0, s = 0, h = 0, d = 0;
};

// Strides of the float32 lse: (batch, head, row). Varlen: b = 0, rows indexed by cu_seqlens.
struct LseStrides {
    int64_t b = 0, h = 0, s = 0;
};

// Metal only: the byte offset of each tensor inside its buffer, since there the pointers below
// are buffer handles (an MTLBuffer, or a host address in the emulator build). 0 on pointer
// devices (CPU, CUDA), where the offset is already applied to the pointer.
struct ByteOffsets {
    int64_t q = 0, k = 0, v = 0, out = 0, lse = 0, dout = 0, dq = 0, dk = 0, dv = 0;
    int64_t cu_seqlens_q = 0, cu_seqlens_k = 0, alibi_slopes = 0;
};

// "Unbounded" window edge: large enough to never clip, small enough never to overflow.
inline constexpr int64_t kUnbounded = int64_t(1) << 40;

struct AttentionParams {
    // Sizes. For varlen, Sq / Sk are the upper bounds max_seqlen_q / max_seqlen_k.
    int64_t B = 0, Sq = 0, Sk = 0, Hq = 0, Hkv = 0, D = 0, Dv = 0;
    DType dtype = DType::f32;
    Device device = {};
    Backend backend = Backend::cpu;

    // Element pointers (byte offsets already applied on pointer devices).
    const void* q = nullptr;
    const void* k = nullptr;
    const void* v = nullptr;
    void* out = nullptr;   // forward: written; backward: read
    float* lse = nullptr;  // forward: written; backward: read
    const void* dout = nullptr;
    void* dq = nullptr;
    void* dk = nullptr;
    void* dv = nullptr;
    Strides q_st, k_st, v_st, out_st, dout_st, dq_st, dk_st, dv_st;
    LseStrides lse_st;
    ByteOffsets offsets;

    // Varlen (nullptr when padded): sequence b spans tokens [cu[b], cu[b + 1]).
    const int32_t* cu_seqlens_q = nullptr;
    const int32_t* cu_seqlens_k = nullptr;
    // Varlen: tokens in q and k (their first dims), for device kernels that cannot read
    // cu_seqlens on the host and must keep every sequence inside the tensors.
    int64_t total_q = 0, total_k = 0;

    // Scores: s = scale * q.k; softcap; ALiBi; then masking by the window.
    // Options keep double precision so that the float64 path is exact; kernels narrow them.
    double scale = 1.0;
    double softcap = 0.0;  // 0 = off
    const float* alibi_slopes = nullptr;  // slope of (b, h): alibi_slopes[b * alibi_b + h * alibi_h]
    int64_t alibi_b = 0, alibi_h = 0;
    // Window relative to the diagonal i + diag(b); kUnbounded when open. causal: right = 0.
    int64_t window_left = kUnbounded;
    int64_t window_right = kUnbounded;

    // Dropout: keep iff philox word < keep_threshold; kept values scaled by rp_dropout.
    bool dropout = false;
    double dropout_p = 0.0;
    uint32_t keep_threshold = 0;
    double rp_dropout = 1.0;  // 1 / (1 - p)
    uint64_t seed = 0;
    uint32_t offset = 0;

    // Positions of this call's first query / key in the full sequence (DESIGN.md, "Position
    // offsets"): masks, ALiBi and dropout use I = q_position_offset + i, J = k_position_offset + j.
    // Both 0 with varlen.
    int64_t q_position_offset = 0;
    int64_t k_position_offset = 0;

    bool deterministic = false;
    void* stream = nullptr;
    void* workspace = nullptr;
    uint64_t workspace_bytes = 0;

    bool is_varlen() const { return cu_seqlens_q != nullptr; }
    int64_t seqlen_q(int64_t b) const {
        return is_varlen() ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : Sq;
    }
    int64_t seqlen_k(int64_t b) const {
        return is_varlen() ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : Sk;
    }
    int64_t first_q(int64_t b) const { return is_varlen() ? cu_seqlens_q[b] : 0; }
    int64_t first_k(int64_t b) const { return is_varlen() ? cu_seqlens_k[b] : 0; }
    // The diagonal in this call's indices: key j is visible to query i iff
    // i + diag - left <= j <= i + diag + right, and ALiBi's distance is |i + diag - j|. It is
    // I + Sk - Sq - J rewritten with the positions I, J of the offsets.
    int64_t diag(int64_t b) const {
        return seqlen_k(b) - seqlen_q(b) + q_position_offset - k_position_offset;
    }
};

}  // namespace orchard
