// Fused attention backward in Metal Shading Language, deterministic without atomics (Apple GPUs
// have no fp32 atomics): a preprocess D = rowsum(dO * O), then a dK/dV kernel over key blocks
// that loops over all queries (and the query heads of its GQA group) and a dQ kernel over
// query blocks that loops over all keys. Each gradient element has exactly one writer.
//
// With P = exp(S - lse) (0 where masked and for rows that see no key), Z the dropout
// multiplier (0 or 1 / (1 - p)):  dV = (P Z)^T dO,  dP = dO V^T,  dS = P (dP Z - D),
// softcap: dS *= 1 - tanh^2,  then dQ = scale dS K,  dK = scale dS^T Q.
#include "metal/attention_common.h"

namespace orchard {
namespace msl {

// D = rowsum(dO * O) of (b, h, row) into delta[(b * Hq + h) * Sq + row] (Sq: the longest
// sequence). Grid: (ceil(Sq / 32), Hq, B) x 128 threads; simdgroup sg reduces 8 rows.
template <typename T>
[[kernel]] void attention_bwd_preprocess(constant KernelParams& p [[buffer(0)]],
                                         device const T* out [[buffer(1)]],
                                         device const T* dout [[buffer(2)]],
                                         device float* delta [[buffer(3)]],
                                         device const int32_t* cu_q [[buffer(4)]],
                                         device const int32_t* cu_k [[buffer(5)]],
                                         uint3 tgid [[threadgroup_position_in_grid]],
                                         ushort sg [[simdgroup_index_in_threadgroup]],
                                         ushort lane [[thread_index_in_simdgroup]]) {
    const int b = tgid.z, h = tgid.y;
    const Seq seq = sequence(p, cu_q, cu_k, b);
    for (long i = long(tgid.x) * kBlockRows + 8 * sg, r = 0; r < 8 && i < seq.sq; ++i, ++r) {
        device const T* o = out + offset_of(p.out_st, b, seq.first_q + i, h);
        device const T* g = dout + offset_of(p.dout_st, b, seq.first_q + i, h);
        float acc = 0.0f;
        for (int d = lane; d < p.Dv; d += kSimdWidth)
            acc += float(o[d * p.out_st[3]]) * float(g[d * p.dout_st[3]]);
        acc = simd_sum(acc);
        if (lane == 0) delta[(long(b) * p.Hq + h) * p.Sq + i] = acc;
    }
}

// dK, dV of key rows [j0, j0 + 32) of kv head hk, summed over the query heads of its group.
// Grid: (ceil(Sk / 32), Hkv, B) x 128 threads. Simdgroup sg owns keys [j0 + 8 sg, +8) and keeps
// k (8, D), v (8, Dv) and the accumulators dK (8, D), dV (8, Dv) in simdgroup matrices; query
// blocks of BQ rows (Q (BQ, D), dO (BQ, Dv), lse, D) are staged in threadgroup memory.
template <typename T, int DMAX>
[[kernel]] void attention_bwd_dkdv(constant KernelParams& p [[buffer(0)]],
                                   device const T* q [[buffer(1)]],
                                   device const T* k [[buffer(2)]],
                                   device const T* v [[buffer(3)]],
                                   device const T* dout [[buffer(4)]],
                                   device const float* lse [[buffer(5)]],
                                   device const float* delta [[buffer(6)]],
                                   device T* dk [[buffer(7)]],
                                   device T* dv [[buffer(8)]],
                                   device const int32_t* cu_q [[buffer(9)]],
                                   device const int32_t* cu_k [[buffer(10)]],
                                   device const float* alibi [[buffer(11)]],
                                        uint3 tgid [[threadgroup_position_in_grid]],
                                   uint tid [[thread_index_in_threadgroup]],
                                   ushort sg [[simdgroup_index_in_threadgroup]],
                                   ushort lane [[thread_index_in_simdgroup]]) {
    enum { BQ = block_other(DMAX), NF = DMAX / 8, COLS = BQ / 4 };
    static_assert(BQ % 8 == 0 && BQ >= 8 && COLS >= 2, "score tiles are whole 8x8 fragments");
    const int b = tgid.z, hk = tgid.y, group = p.Hq / p.Hkv;
    const int D = p.D, Dv = p.Dv;
    const Seq seq = sequence(p, cu_q, cu_k, b);
    const long jb = long(tgid.x) * kBlockRows;
    if (jb >= seq.sk) return;  // the whole threadgroup: this sequence is shorter than the grid
    const long diag = diagonal(p, seq), j0 = jb + 8 * sg;
    // Queries that see any key of the threadgroup.
    const Span rows = queries_seeing(jb, min(jb + kBlockRows, seq.sk), diag, p.window_left,
                                     p.window_right, seq.sq);

    enum { SMEM = smem_layout_by_queries(BQ, DMAX, DMAX).total };  // static: see the forward
    static_assert(SMEM * 4 <= 32768, "Apple GPUs give a threadgroup at most 32 KiB");
    threadgroup float smem[SMEM];
    const SmemLayout L = smem_layout_by_queries(BQ, D, Dv);
    threadgroup float* tQ = smem + L.k;                         // (BQ, D)
    threadgroup float* tdO = smem + L.v;                        // (BQ, Dv)
    threadgroup float* tLse = tdO + BQ * Dv;                    // (BQ,)
    threadgroup float* tDelta = tLse + BQ;                      // (BQ,)
    threadgroup float* sP = smem + L.sg0 + sg * L.sg_stride;    // (8 keys, BQ): S^T, then P^T Z
    threadgroup float* sdS = sP + 8 * BQ;                       // (8 keys, BQ): dP^T, then dS^T
    threadgroup float* stage = sdS + 8 * BQ;                    // (8, 8)

    Frag mK[NF], mV[NF], acc_dk[NF], acc_dv[NF];
    device const T* k_rows = k + offset_of(p.k_st, b, seq.first_k + j0, hk);
    device const T* v_rows = v + offset_of(p.v_st, b, seq.first_k + j0, hk);
    for (int kd = 0; kd < D / 8; ++kd) {
        load_frag(mK[kd], stage, k_rows + kd * 8 * p.k_st[3], p.k_st[1], p.k_st[3], seq.sk - j0,
                  lane);
        acc_dk[kd] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    for (int t = 0; t < Dv / 8; ++t) {
        load_frag(mV[t], stage, v_rows + t * 8 * p.v_st[3], p.v_st[1], p.v_st[3], seq.sk - j0,
                  lane);
        acc_dv[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }

    // Element-wise work on the (8 keys, BQ) tiles: lane handles key `row`, queries [c0, +COLS).
    const int row = lane / 4, c0 = (lane % 4) * COLS;
    const long j = j0 + row;
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const float slope = alibi_slope(p, alibi, b, h);
        const long bh = long(b) * p.Hq + h;
        device const T* q_head = q + offset_of(p.q_st, b, seq.first_q, h);
        device const T* do_head = dout + offset_of(p.dout_st, b, seq.first_q, h);
        for (long i0 = rows.lo; i0 < rows.hi; i0 += BQ) {
            threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block is consumed
            load_block(tQ, q_head + i0 * p.q_st[1], p.q_st[1], p.q_st[3], BQ, seq.sq - i0, D, tid);
            load_block(tdO, do_head + i0 * p.dout_st[1], p.dout_st[1], p.dout_st[3], BQ,
                       seq.sq - i0, Dv, tid);
            if (tid < uint(BQ)) {
                const long i = i0 + tid;
                // Rows past the sequence: lse = FLT_MAX makes their P 0 (see probability()).
                tLse[tid] = i < seq.sq ? lse[b * p.lse_st[0] + h * p.lse_st[1] +
                                             (seq.first_q + i) * p.lse_st[2]]
                                       : FLT_MAX;
                tDelta[tid] = i < seq.sq ? delta[bh * p.Sq + i] : 0.0f;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);

            // S^T (8, BQ) = k (8, D) Q^T (D, BQ);  dP^T (8, BQ) = v (8, Dv) dO^T (Dv, BQ).
            for (int n = 0; n < BQ / 8; ++n) {
                Frag acc_s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
                Frag acc_dp = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
                for (int kd = 0; kd < D / 8; ++kd) {
                    Frag qt;
                    simdgroup_load(qt, tQ + n * 8 * D + kd * 8, D, ulong2(0, 0), true);
                    simdgroup_multiply_accumulate(acc_s, mK[kd], qt, acc_s);
                }
                for (int t = 0; t < Dv / 8; ++t) {
                    Frag dot;
                    simdgroup_load(dot, tdO + n * 8 * Dv + t * 8, Dv, ulong2(0, 0), true);
                    simdgroup_multiply_accumulate(acc_dp, mV[t], dot, acc_dp);
                }
                simdgroup_store(acc_s, sP + n * 8, BQ);
                simdgroup_store(acc_dp, sdS + n * 8, BQ);
            }
            simdgroup_barrier(mem_flags::mem_threadgroup);

            for (int c = 0; c < COLS; ++c) {
                const long i = i0 + c0 + c;
                const Span keys = i < seq.sq ? visible_keys(i, diag, p.window_left,
                                                            p.window_right, seq.sk)
                                             : Span{0, 0};
                float t;
                const float s = score(p, sP[row * BQ + c0 + c], slope, i, j, diag, keys, t);
                const float pij = probability(s, tLse[c0 + c]);
                const float z = pij == 0.0f ? 0.0f : dropout_factor(p, bh, i, j);
                float ds = pij * (sdS[row * BQ + c0 + c] * z - tDelta[c0 + c]);
                if (p.softcap > 0.0f) ds *= 1.0f - t * t;
                sP[row * BQ + c0 + c] = pij * z;
                sdS[row * BQ + c0 + c] = ds * p.scale;
            }
            simdgroup_barrier(mem_flags::mem_threadgroup);

            // dV (8, Dv) += (P Z)^T (8, BQ) dO (BQ, Dv);  dK (8, D) += dS^T (8, BQ) Q (BQ, D).
            for (int n = 0; n < BQ / 8; ++n) {
                Frag pt, dst;
                simdgroup_load(pt, sP + n * 8, BQ);
                simdgroup_load(dst, sdS + n * 8, BQ);
                for (int t = 0; t < Dv / 8; ++t) {
                    Frag g;
                    simdgroup_load(g, tdO + n * 8 * Dv + t * 8, Dv);
                    simdgroup_multiply_accumulate(acc_dv[t], pt, g, acc_dv[t]);
                }
                for (int kd = 0; kd < D / 8; ++kd) {
                    Frag qf;
                    simdgroup_load(qf, tQ + n * 8 * D + kd * 8, D);
                    simdgroup_multiply_accumulate(acc_dk[kd], dst, qf, acc_dk[kd]);
                }
            }
        }
    }

    if (p.need_dk != 0) {
        device T* dk_rows = dk + offset_of(p.dk_st, b, seq.first_k + j0, hk);
        for (int kd = 0; kd < D / 8; ++kd)
            store_frag(acc_dk[kd], stage, dk_rows + kd * 8 * p.dk_st[3], p.dk_st[1], p.dk_st[3],
                       seq.sk - j0, lane);
    }
    if (p.need_dv != 0) {
        device T* dv_rows = dv + offset_of(p.dv_st, b, seq.first_k + j0, hk);
        for (int t = 0; t < Dv / 8; ++t)
            store_frag(acc_dv[t], stage, dv_rows + t * 8 * p.dv_st[3], p.dv_st[1], p.dv_st[3],
                       seq.sk - j0, lane);
    }
}

// dQ of query rows [i0, i0 + 32) of head h. Grid: (ceil(Sq / 32), Hq, B) x 128 threads.
// Simdgroup sg owns rows [i0 + 8 sg, +8) and keeps q (8, D), dO (8, Dv) and the accumulator
// dQ (8, D) in simdgroup matrices; key blocks K (BK, D), V (BK, Dv) are staged as in the forward.
template <typename T, int DMAX>
[[kernel]] void attention_bwd_dq(constant KernelParams& p [[buffer(0)]],
                                 device const T* q [[buffer(1)]],
                                 device const T* k [[buffer(2)]],
                                 device const T* v [[buffer(3)]],
                                 device const T* dout [[buffer(4)]],
                                 device const float* lse [[buffer(5)]],
                                 device const float* delta [[buffer(6)]],
                                 device T* dq [[buffer(7)]],
                                 device const int32_t* cu_q [[buffer(8)]],
                                 device const int32_t* cu_k [[buffer(9)]],
                                 device const float* alibi [[buffer(10)]],
                                    uint3 tgid [[threadgroup_position_in_grid]],
                                 uint tid [[thread_index_in_threadgroup]],
                                 ushort sg [[simdgroup_index_in_threadgroup]],
                                 ushort lane [[thread_index_in_simdgroup]]) {
    enum { BK = block_other(DMAX), NF = DMAX / 8, COLS = BK / 4 };
    static_assert(BK % 8 == 0 && BK >= 8 && COLS >= 2, "score tiles are whole 8x8 fragments");
    const int b = tgid.z, h = tgid.y, hk = h / (p.Hq / p.Hkv);
    const int D = p.D, Dv = p.Dv;
    const Seq seq = sequence(p, cu_q, cu_k, b);
    const long i0 = long(tgid.x) * kBlockRows;
    if (i0 >= seq.sq) return;  // the whole threadgroup: this sequence is shorter than the grid
    const long diag = diagonal(p, seq), r0 = i0 + 8 * sg;
    const long last = min(i0 + kBlockRows, seq.sq) - 1;
    const long j_lo = visible_keys(i0, diag, p.window_left, p.window_right, seq.sk).lo;
    const long j_hi = visible_keys(last, diag, p.window_left, p.window_right, seq.sk).hi;

    enum { SMEM = smem_layout_by_keys(BK, DMAX, DMAX).total };  // static: see the forward
    static_assert(SMEM * 4 <= 32768, "Apple GPUs give a threadgroup at most 32 KiB");
    threadgroup float smem[SMEM];
    const SmemLayout L = smem_layout_by_keys(BK, D, Dv);
    threadgroup float* tK = smem + L.k;                       // (BK, D)
    threadgroup float* tV = smem + L.v;                       // (BK, Dv)
    threadgroup float* sS = smem + L.sg0 + sg * L.sg_stride;  // (8, BK): S
    threadgroup float* sdS = sS + 8 * BK;                     // (8, BK): dP, then dS
    threadgroup float* stage = sdS + 8 * BK;                  // (8, 8)

    Frag mQ[NF], mdO[NF], acc_dq[NF];
    device const T* q_rows = q + offset_of(p.q_st, b, seq.first_q + r0, h);
    device const T* do_rows = dout + offset_of(p.dout_st, b, seq.first_q + r0, h);
    for (int kd = 0; kd < D / 8; ++kd) {
        load_frag(mQ[kd], stage, q_rows + kd * 8 * p.q_st[3], p.q_st[1], p.q_st[3], seq.sq - r0,
                  lane);
        acc_dq[kd] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    for (int t = 0; t < Dv / 8; ++t)
        load_frag(mdO[t], stage, do_rows + t * 8 * p.dout_st[3], p.dout_st[1], p.dout_st[3],
                  seq.sq - r0, lane);

    const int row = lane / 4, c0 = (lane % 4) * COLS;
    const long i = r0 + row;
    const Span keys = i < seq.sq ? visible_keys(i, diag, p.window_left, p.window_right, seq.sk)
                                 : Span{0, 0};
    const float slope = alibi_slope(p, alibi, b, h);
    const long bh = long(b) * p.Hq + h;
    const float lse_i =
        i < seq.sq ? lse[b * p.lse_st[0] + h * p.lse_st[1] + (seq.first_q + i) * p.lse_st[2]]
                   : FLT_MAX;
    const float delta_i = i < seq.sq ? delta[bh * p.Sq + i] : 0.0f;

    device const T* k_head = k + offset_of(p.k_st, b, seq.first_k, hk);
    device const T* v_head = v + offset_of(p.v_st, b, seq.first_k, hk);
    for (long j0 = j_lo; j0 < j_hi; j0 += BK) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block is consumed
        load_block(tK, k_head + j0 * p.k_st[1], p.k_st[1], p.k_st[3], BK, seq.sk - j0, D, tid);
        load_block(tV, v_head + j0 * p.v_st[1], p.v_st[1], p.v_st[3], BK, seq.sk - j0, Dv, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // S (8, BK) = q (8, D) K^T (D, BK);  dP (8, BK) = dO (8, Dv) V^T (Dv, BK).
        for (int n = 0; n < BK / 8; ++n) {
            Frag acc_s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            Frag acc_dp = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            for (int kd = 0; kd < D / 8; ++kd) {
                Frag kt;
                simdgroup_load(kt, tK + n * 8 * D + kd * 8, D, ulong2(0, 0), true);
                simdgroup_multiply_accumulate(acc_s, mQ[kd], kt, acc_s);
            }
            for (int t = 0; t < Dv / 8; ++t) {
                Frag vt;
                simdgroup_load(vt, tV + n * 8 * Dv + t * 8, Dv, ulong2(0, 0), true);
                simdgroup_multiply_accumulate(acc_dp, mdO[t], vt, acc_dp);
            }
            simdgroup_store(acc_s, sS + n * 8, BK);
            simdgroup_store(acc_dp, sdS + n * 8, BK);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);

        for (int c = 0; c < COLS; ++c) {
            const long j = j0 + c0 + c;
            float t;
            const float s = score(p, sS[row * BK + c0 + c], slope, i, j, diag, keys, t);
            const float pij = probability(s, lse_i);
            const float z = pij == 0.0f ? 0.0f : dropout_factor(p, bh, i, j);
            float ds = pij * (sdS[row * BK + c0 + c] * z - delta_i);
            if (p.softcap > 0.0f) ds *= 1.0f - t * t;
            sdS[row * BK + c0 + c] = ds * p.scale;
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);

        // dQ (8, D) += dS (8, BK) K (BK, D).
        for (int n = 0; n < BK / 8; ++n) {
            Frag ds;
            simdgroup_load(ds, sdS + n * 8, BK);
            for (int kd = 0; kd < D / 8; ++kd) {
                Frag kf;
                simdgroup_load(kf, tK + n * 8 * D + kd * 8, D);
                simdgroup_multiply_accumulate(acc_dq[kd], ds, kf, acc_dq[kd]);
            }
        }
    }

    device T* dq_rows = dq + offset_of(p.dq_st, b, seq.first_q + r0, h);
    for (int kd = 0; kd < D / 8; ++kd)
        store_frag(acc_dq[kd], stage, dq_rows + kd * 8 * p.dq_st[3], p.dq_st[1], p.dq_st[3],
                   seq.sq - r0, lane);
}

// One kernel per (dtype, head-dim bucket); the host picks it by name.
#define ORCHARD_BWD(T, DMAX)                                                                \
    template [[host_name("attention_bwd_dkdv_" #T "_" #DMAX)]] [[kernel]] decltype(        \
        attention_bwd_dkdv<T, DMAX>) attention_bwd_dkdv<T, DMAX>;                           \
    template [[host_name("attention_bwd_dq_" #T "_" #DMAX)]] [[kernel]] decltype(          \
        attention_bwd_dq<T, DMAX>) attention_bwd_dq<T, DMAX>;
#define ORCHARD_BWD_TYPE(T)                                                                 \
    template [[host_name("attention_bwd_preprocess_" #T)]] [[kernel]] decltype(            \
        attention_bwd_preprocess<T>) attention_bwd_preprocess<T>;                           \
    ORCHARD_BWD(T, 64) ORCHARD_BWD(T, 128) ORCHARD_BWD(T, 256)
ORCHARD_BWD_TYPE(float)
ORCHARD_BWD_TYPE(half)
ORCHARD_BWD_TYPE(bfloat)

}  // namespace msl
}  // namespace orchard
