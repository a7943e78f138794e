// Fused attention forward (FlashAttention-2 online softmax) in Metal Shading Language.
//
// Grid: (ceil(Sq / 32), Hq, B) threadgroups of 128 threads = 4 simdgroups. Simdgroup `sg` owns
// query rows [i0 + 8 sg, i0 + 8 sg + 8) and keeps, in simdgroup matrices, q (8, D) and the
// output accumulator (8, Dv). The threadgroup walks the keys its rows can see in blocks of BK,
// staging K (BK, D) and V (BK, Dv) as fp32 in threadgroup memory; each simdgroup computes its
// scores (8, BK) = q k^T, applies the score transform and the online softmax on them, and
// accumulates P V. Outputs: out (8, Dv) in the input dtype, lse (fp32; +inf for rows that see
// no key, whose out is 0).
#include "metal/attention_common.h"

namespace orchard {
namespace msl {

template <typename T, int DMAX>
[[kernel]] void attention_fwd(constant KernelParams& p [[buffer(0)]],
                              device const T* q [[buffer(1)]],
                              device const T* k [[buffer(2)]],
                              device const T* v [[buffer(3)]],
                              device T* out [[buffer(4)]],
                              device float* lse [[buffer(5)]],
                              device const int32_t* cu_q [[buffer(6)]],
                              device const int32_t* cu_k [[buffer(7)]],
                              device const float* alibi [[buffer(8)]],
                              uint3 tgid [[threadgroup_position_in_grid]],
                              uint tid [[thread_index_in_threadgroup]],
                              ushort sg [[simdgroup_index_in_threadgroup]],
                              ushort lane [[thread_index_in_simdgroup]]) {
    enum { BK = block_other(DMAX), NQ = DMAX / 8, COLS = BK / 4 };
    static_assert(BK % 8 == 0 && BK >= 8 && COLS >= 2, "score tiles are whole 8x8 fragments");
    const int b = tgid.z, h = tgid.y, hk = h / (p.Hq / p.Hkv);
    const int D = p.D, Dv = p.Dv;
    const Seq seq = sequence(p, cu_q, cu_k, b);
    const long i0 = long(tgid.x) * kBlockRows;
    if (i0 >= seq.sq) return;  // the whole threadgroup: this sequence is shorter than the grid
    const long diag = diagonal(p, seq), r0 = i0 + 8 * sg;
    const long last = min(i0 + kBlockRows, seq.sq) - 1;
    // Keys seen by any row of the threadgroup (the window is monotone in i).
    const long j_lo = visible_keys(i0, diag, p.window_left, p.window_right, seq.sk).lo;
    const long j_hi = visible_keys(last, diag, p.window_left, p.window_right, seq.sk).hi;

    // Sized for the bucket's largest head dim (threadgroup memory is static so that hosts that
    // cannot set its length, like torch.mps.compile_shader, can launch the kernel).
    enum { SMEM = smem_layout_by_keys(BK, DMAX, DMAX).total };
    static_assert(SMEM * 4 <= 32768, "Apple GPUs give a threadgroup at most 32 KiB");
    threadgroup float smem[SMEM];
    const SmemLayout L = smem_layout_by_keys(BK, D, Dv);
    threadgroup float* tK = smem + L.k;                      // (BK, D)
    threadgroup float* tV = smem + L.v;                      // (BK, Dv)
    threadgroup float* sS = smem + L.sg0 + sg * L.sg_stride;  // (8, BK) scores, then P
    threadgroup float* stage = sS + 2 * 8 * BK;              // (8, 8)

    // q of this simdgroup's rows: (8, D) as D / 8 fragments.
    Frag mQ[NQ];
    device const T* q_rows = q + offset_of(p.q_st, b, seq.first_q + r0, h);
    for (int kd = 0; kd < D / 8; ++kd)
        load_frag(mQ[kd], stage, q_rows + kd * 8 * p.q_st[3], p.q_st[1], p.q_st[3], seq.sq - r0,
                  lane);
    Frag acc_o[NQ];  // (8, Dv)
    for (int t = 0; t < Dv / 8; ++t) acc_o[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

    // Element-wise work on the (8, BK) tile: lane handles row `row`, columns [c0, c0 + COLS).
    const int row = lane / 4, c0 = (lane % 4) * COLS;
    const long i = r0 + row;
    const Span keys = i < seq.sq ? visible_keys(i, diag, p.window_left, p.window_right, seq.sk)
                                 : Span{0, 0};
    const float slope = alibi_slope(p, alibi, b, h);
    const long bh = long(b) * p.Hq + h;
    float m = kMaskedScore, l = 0.0f;  // running max and softmax denominator of row i

    device const T* k_head = k + offset_of(p.k_st, b, seq.first_k, hk);
    device const T* v_head = v + offset_of(p.v_st, b, seq.first_k, hk);
    for (long j0 = j_lo; j0 < j_hi; j0 += BK) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block is consumed
        load_block(tK, k_head + j0 * p.k_st[1], p.k_st[1], p.k_st[3], BK, seq.sk - j0, D, tid);
        load_block(tV, v_head + j0 * p.v_st[1], p.v_st[1], p.v_st[3], BK, seq.sk - j0, Dv, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // Raw scores (8, BK) = q (8, D) k^T (D, BK).
        for (int n = 0; n < BK / 8; ++n) {
            Frag acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            for (int kd = 0; kd < D / 8; ++kd) {
                Frag kt;
                simdgroup_load(kt, tK + n * 8 * D + kd * 8, D, ulong2(0, 0), true);
                simdgroup_multiply_accumulate(acc, mQ[kd], kt, acc);
            }
            simdgroup_store(acc, sS + n * 8, BK);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);

        // Online softmax of row i over this block.
        float s[COLS];
        float block_max = kMaskedScore;
        for (int c = 0; c < COLS; ++c) {
            float t;
            s[c] = score(p, sS[row * BK + c0 + c], slope, i, j0 + c0 + c, diag, keys, t);
            block_max = max(block_max, s[c]);
        }
        const float m_new = max(m, row_max4(block_max));
        const float m_use = m_new <= kMaskedScore ? 0.0f : m_new;  // all masked so far: p = 0
        const float alpha = exp(m - m_use);                       // m masked: 0
        float block_sum = 0.0f;
        for (int c = 0; c < COLS; ++c) {
            const float pc = exp(s[c] - m_use);
            block_sum += pc;
            sS[row * BK + c0 + c] = pc * dropout_factor(p, bh, i, j0 + c0 + c);
        }
        l = l * alpha + row_sum4(block_sum);
        m = m_new;
        // (The row_diagonal barriers also order the P stores above before the loads below.)
        const Frag rescale = row_diagonal(stage, alpha, lane);

        // acc_o (8, Dv) = diag(alpha) acc_o + P (8, BK) V (BK, Dv).
        Frag mP[BK / 8];
        for (int n = 0; n < BK / 8; ++n) simdgroup_load(mP[n], sS + n * 8, BK);
        for (int t = 0; t < Dv / 8; ++t) {
            simdgroup_multiply(acc_o[t], rescale, acc_o[t]);
            for (int n = 0; n < BK / 8; ++n) {
                Frag vt;
                simdgroup_load(vt, tV + n * 8 * Dv + t * 8, Dv);
                simdgroup_multiply_accumulate(acc_o[t], mP[n], vt, acc_o[t]);
            }
        }
    }

    // out = acc_o / l (0 for rows that saw no key); lse = m + log(l) (+inf for those rows: only
    // stored, as DESIGN.md asks, never computed with).
    const Frag inv_l = row_diagonal(stage, l > 0.0f ? 1.0f / l : 0.0f, lane);
    if (lane % 4 == 0 && i < seq.sq)
        lse[b * p.lse_st[0] + h * p.lse_st[1] + (seq.first_q + i) * p.lse_st[2]] =
            l > 0.0f ? m + log(l) : INFINITY;
    device T* out_rows = out + offset_of(p.out_st, b, seq.first_q + r0, h);
    for (int t = 0; t < Dv / 8; ++t) {
        Frag o;
        simdgroup_multiply(o, inv_l, acc_o[t]);
        store_frag(o, stage, out_rows + t * 8 * p.out_st[3], p.out_st[1], p.out_st[3],
                   seq.sq - r0, lane);
    }
}

// One kernel per (dtype, head-dim bucket); the host picks it by name.
#define ORCHARD_FWD(T, DMAX)                                                        \
    template [[host_name("attention_fwd_" #T "_" #DMAX)]] [[kernel]] decltype(     \
        attention_fwd<T, DMAX>) attention_fwd<T, DMAX>;
#define ORCHARD_FWD_DIMS(T) ORCHARD_FWD(T, 64) ORCHARD_FWD(T, 128) ORCHARD_FWD(T, 256)
ORCHARD_FWD_DIMS(float)
ORCHARD_FWD_DIMS(half)
ORCHARD_FWD_DIMS(bfloat)

}  // namespace msl
}  // namespace orchard
