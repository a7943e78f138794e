// The constant buffer of every Metal kernel and the block sizes, shared by the MSL kernels and
// the host code (emulator and Objective-C++): only types that mean the same on both sides.
#pragma once

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
#else
#include <cstdint>
#endif

namespace orchard {
namespace msl {

// AttentionParams narrowed for the GPU (buffers are bound separately). Strides are in
// elements: (b, s, h, d) for q k v out dout dq dk dv, (b, h, s) for lse.
struct KernelParams {
    int64_t q_st[4], k_st[4], v_st[4], out_st[4], dout_st[4], dq_st[4], dk_st[4], dv_st[4];
    int64_t lse_st[3];
    int64_t alibi_b, alibi_h;             // slope of (b, h) = alibi[b * alibi_b + h * alibi_h]
    int64_t window_left, window_right;    // relative to the diagonal; 2^40 when unbounded
    int64_t q_pos, k_pos;                 // position offsets: masks, ALiBi and dropout use
                                          // I = q_pos + i, J = k_pos + j
    uint64_t seed;
    int32_t B, Sq, Sk, Hq, Hkv, D, Dv;    // varlen: Sq, Sk are the longest sequences
    int32_t total_q, total_k;             // varlen: tokens in q / k (cu_seqlens are clamped)
    int32_t varlen, has_alibi, dropout, need_dq, need_dk, need_dv;
    float scale, softcap, rp_dropout;     // softcap 0 = off; rp_dropout = 1 / (1 - p)
    uint32_t keep_threshold, offset;      // dropout: keep iff philox word < keep_threshold
};

// Every kernel runs kSimdgroups simdgroups of 32 threads; each simdgroup owns 8 rows (the
// height of one simdgroup_matrix<float, 8, 8>), so a threadgroup owns kBlockRows rows: queries
// in the forward and dQ kernels, keys in the dK/dV kernel. Four simdgroups (128 threads) is
// the smallest group that still shares each staged K/V (or Q/dO) block among several
// simdgroups, which is what staging it in threadgroup memory buys.
enum { kSimdWidth = 32, kSimdgroups = 4, kThreads = 128, kBlockRows = 32 };

// Head dims are bucketed (64, 128, 256) so that each (dtype, bucket) is one instantiation;
// register arrays are sized by the bucket, loops run over the real D / 8.
inline constexpr int head_dim_bucket(int d) { return d <= 64 ? 64 : (d <= 128 ? 128 : 256); }

// Rows of the *other* operand staged per step as fp32 in threadgroup memory: keys (K and V
// blocks) in the forward and dQ kernels, queries (Q and dO blocks) in the dK/dV kernel. Both
// blocks together take block * (D + Dv) * 4 bytes = 16 KiB at the bucket's head dim, so with the
// per-simdgroup tiles every kernel stays at or under 25.3 KiB, below Apple GPUs' 32 KiB of
// threadgroup memory per threadgroup:
//   D <= 64:  32 (a 32-wide score row = 4 lanes x 8 columns per row of a simdgroup)
//   D <= 128: 16
//   D <= 256:  8 (one simdgroup_matrix wide; larger would exceed 32 KiB)
inline constexpr int block_other(int dmax) { return dmax <= 64 ? 32 : (dmax <= 128 ? 16 : 8); }

// Threadgroup memory layouts, in floats, identical on host (allocation) and kernel (offsets).
// Forward and dQ: K block (bk, D), V block (bk, Dv), then per simdgroup: two score tiles
// (8, bk) (the forward uses one) and a staging tile (8, 8) for device <-> simdgroup_matrix
// copies and the diagonal matrices.
struct SmemLayout {
    int k, v, sg0, sg_stride, total;
};
inline constexpr SmemLayout smem_layout_by_keys(int bk, int d, int dv) {
    SmemLayout l = {0, 0, 0, 0, 0};
    l.k = 0;
    l.v = bk * d;
    l.sg0 = l.v + bk * dv;
    l.sg_stride = 2 * 8 * bk + 64;
    l.total = l.sg0 + kSimdgroups * l.sg_stride;
    return l;
}
// dK/dV: Q block (bq, D) at `k`, dO block (bq, Dv) at `v`, lse and D = rowsum(dO * O) of the
// block (2 * bq) before the per-simdgroup tiles.
inline constexpr SmemLayout smem_layout_by_queries(int bq, int d, int dv) {
    SmemLayout l = {0, 0, 0, 0, 0};
    l.k = 0;
    l.v = bq * d;
    l.sg0 = l.v + bq * dv + 2 * bq;
    l.sg_stride = 2 * 8 * bq + 64;
    l.total = l.sg0 + kSimdgroups * l.sg_stride;
    return l;
}

}  // namespace msl
}  // namespace orchard
