// Metal Shading Language parts shared by the forward and backward kernels: sequence bounds,
// the score transform (scale, softcap, ALiBi, mask, dropout) and tile copies between device
// memory, threadgroup memory and simdgroup matrices.
#pragma once

#include <metal_stdlib>

#include "core/mask.h"  // visible_keys, queries_seeing; core/philox.h: the dropout mask
#include "metal/kernel_params.h"

using namespace metal;

namespace orchard {
namespace msl {

typedef simdgroup_matrix<float, 8, 8> Frag;  // one 8x8 fp32 tile, spread over a simdgroup

// Where sequence b lives: its first token and lengths (varlen: from cu_seqlens, clamped to the
// buffers so that inconsistent cu_seqlens cannot make a kernel read or write out of bounds).
struct Seq {
    long first_q, first_k, sq, sk;
};

inline Seq sequence(constant KernelParams& p, device const int32_t* cu_q,
                    device const int32_t* cu_k, int b) {
    Seq s;
    if (p.varlen == 0) {
        s.first_q = 0;
        s.first_k = 0;
        s.sq = p.Sq;
        s.sk = p.Sk;
        return s;
    }
    const long q0 = clamp(long(cu_q[b]), 0L, long(p.total_q));
    const long q1 = clamp(long(cu_q[b + 1]), q0, long(p.total_q));
    const long k0 = clamp(long(cu_k[b]), 0L, long(p.total_k));
    const long k1 = clamp(long(cu_k[b + 1]), k0, long(p.total_k));
    s.first_q = q0;
    s.first_k = k0;
    s.sq = min(q1 - q0, long(p.Sq));
    s.sk = min(k1 - k0, long(p.Sk));
    return s;
}

// Element offset of (b, token, h, 0) in a tensor with (b, s, h, d) strides `st`.
inline long offset_of(constant int64_t* st, int b, long token, int h) {
    return b * st[0] + token * st[1] + h * st[2];
}

// The score of a masked (query, key) pair. Finite on purpose: the kernels must not depend on
// infinities, which a fast-math compile (a host's default) may assume never occur. It only has
// to be far below any real score so that exp(kMaskedScore - m) is 0.
constant float kMaskedScore = -1e30f;

// Score of query i, key j (positions inside the sequence) from the raw dot product q.k:
// scale, softcap, ALiBi; kMaskedScore outside the window / sequence. `t` gets
// tanh(s / softcap) for the softcap derivative of the backward.
inline float score(constant KernelParams& p, float dot, float slope, long i, long j, long diag,
                   Span keys, thread float& t) {
    t = 0.0f;
    if (j < keys.lo || j >= keys.hi) return kMaskedScore;
    float s = dot * p.scale;
    if (p.softcap > 0.0f) {
        t = tanh(s / p.softcap);
        s = p.softcap * t;
    }
    return s - slope * float(abs(i + diag - j));
}

// P = exp(s - lse) of the backward: 0 for masked pairs and for rows that saw no key (their lse
// is +inf; rows past the sequence get FLT_MAX), tested by comparison, never by inf arithmetic.
inline float probability(float s, float lse) {
    return (s <= kMaskedScore || lse >= FLT_MAX) ? 0.0f : exp(s - lse);
}

// Dropout multiplier of (i, j) for head bh = b * Hq + h: 0 or 1 / (1 - p); 1 without dropout.
// The mask is drawn at the positions I = q_pos + i, J = k_pos + j (DESIGN.md).
inline float dropout_factor(constant KernelParams& p, long bh, long i, long j) {
    if (p.dropout == 0) return 1.0f;
    return dropout_keep(p.seed, p.offset, p.keep_threshold, bh, p.q_pos + i, p.k_pos + j)
               ? p.rp_dropout
               : 0.0f;
}

// The diagonal in this call's indices (AttentionParams::diag): key j is visible to query i iff
// i + diag - left <= j <= i + diag + right; ALiBi's distance is |i + diag - j|.
inline long diagonal(constant KernelParams& p, Seq seq) {
    return seq.sk - seq.sq + p.q_pos - p.k_pos;
}

inline float alibi_slope(constant KernelParams& p, device const float* alibi, int b, int h) {
    return p.has_alibi != 0 ? alibi[b * p.alibi_b + h * p.alibi_h] : 0.0f;
}

// frag <- rows [0, 8) x cols [0, 8) of a strided device tile converted to fp32; rows at or past
// `valid_rows` are 0. Each lane moves 2 of the 64 elements through `stage` (8x8 floats).
template <typename T>
inline void load_frag(thread Frag& frag, threadgroup float* stage, device const T* src,
                      long s_row, long s_col, long valid_rows, ushort lane) {
    for (int e = lane; e < 64; e += kSimdWidth) {
        const int r = e / 8, c = e % 8;
        stage[e] = r < valid_rows ? float(src[r * s_row + c * s_col]) : 0.0f;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(frag, stage, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
}

// The first `valid_rows` rows of frag -> a strided device tile, converted to T.
template <typename T>
inline void store_frag(Frag frag, threadgroup float* stage, device T* dst, long s_row,
                       long s_col, long valid_rows, ushort lane) {
    simdgroup_store(frag, stage, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = lane; e < 64; e += kSimdWidth) {
        const int r = e / 8, c = e % 8;
        if (r < valid_rows) dst[r * s_row + c * s_col] = T(stage[e]);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
}

// Rows of a strided device block (rows, cols) -> threadgroup memory as fp32 (leading dim
// `cols`), by the whole threadgroup; rows at or past `valid_rows` are 0 so that padding keys /
// queries contribute nothing (0 * garbage could be NaN).
template <typename T>
inline void load_block(threadgroup float* dst, device const T* src, long s_row, long s_col,
                       int rows, long valid_rows, int cols, uint tid) {
    for (int e = tid; e < rows * cols; e += kThreads) {
        const int r = e / cols, c = e % cols;
        dst[e] = r < valid_rows ? float(src[r * s_row + c * s_col]) : 0.0f;
    }
}

// The (8, 8) diagonal matrix diag(x_r) of one value per row, for scaling the rows of an
// accumulator with simdgroup_multiply (the lane layout of simdgroup_matrix is not specified,
// so rows cannot be scaled element-wise). Lanes 4r..4r+3 hold row r's value; `stage` is 8x8.
inline Frag row_diagonal(threadgroup float* stage, float x, ushort lane) {
    for (int e = lane; e < 64; e += kSimdWidth) stage[e] = 0.0f;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    if (lane % 4 == 0) stage[(lane / 4) * 9] = x;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    Frag d;
    simdgroup_load(d, stage, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    return d;
}

// Reductions over the 4 lanes 4r..4r+3 that share row r of a score tile.
inline float row_max4(float x) {
    x = max(x, simd_shuffle_xor(x, ushort(1)));
    return max(x, simd_shuffle_xor(x, ushort(2)));
}
inline float row_sum4(float x) {
    x += simd_shuffle_xor(x, ushort(1));
    return x + simd_shuffle_xor(x, ushort(2));
}

}  // namespace msl
}  // namespace orchard
