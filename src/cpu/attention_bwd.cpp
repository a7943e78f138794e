// CPU backward, deterministic by construction (no atomics, fixed summation order):
//   preprocess  D = rowsum(dout * out)                       threads over (batch, head)
//   dK/dV pass  per key block, over its query blocks and the  threads over (batch, kv head,
//               query heads of its GQA group                   key block)
//   dQ pass     per query block, over its key blocks           threads over (batch, head,
//                                                              query block)
// Both passes recompute S and dP from q, k, v, dout and the given lse (nothing S x S stored),
// which costs 7 block matmuls per tile pair instead of 5. When there are enough (batch, kv head)
// pairs to keep every thread busy, one fused pass per pair computes dQ alongside dK/dV in a
// private O(S) buffer instead (5 matmuls); it adds the same terms in the same order, so results
// are bitwise identical either way, whatever the thread count.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention_bwd.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <type_traits>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/first_touch.h"
#include "cpu/gemm_bf16.h"
#include "cpu/packed_heads.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/simd_dispatch.h"
#include "cpu/tile_size.h"

HWY_BEFORE_NAMESPACE();
namespace orchard::cpu::HWY_NAMESPACE {

// Per-step tiles of a score block in orientation O: S becomes P, dP becomes dS.
template <class A>
struct ScoreTiles {
    Tile<A> s, t, pd, dp;  // scores/P, tanh (softcap), P * Z, dP/dS
    ScoreTiles(int64_t n) {
        s = alloc_tile<A>(n);
        t = alloc_tile<A>(n);
        pd = alloc_tile<A>(n);
        dp = alloc_tile<A>(n);
    }
};

// From scores (in w.s, finished) and dP (in w.dp) of one tile: P = exp(S - lse) in w.s, P with
// dropout in w.pd (or w.s without dropout), and dS = P * (dP * Z - D) = Pd * dP - P * D, times
// the softcap derivative 1 - tanh^2, in w.dp. lse and D are per query: indexed by tile row
// (q_rows) or by vector position (k_rows). Returns the P-with-dropout tile.
template <Orient O, class A>
const A* probs_and_ds(const AttentionParams& p, int64_t bh, const TileGeom& g, const A* lse,
                      const A* dsum, ScoreTiles<A>& w, int64_t ld) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d), n = tile_rows<O>(g);
    auto per_query = [&](const A* v, int64_t x, int64_t y) {
        if constexpr (O == Orient::q_rows) return hn::Set(d, v[x]);
        else return hn::LoadU(d, v + y);
    };
    for (int64_t x = 0; x < n; ++x)
        for (int64_t y = 0; y < ld; y += L) {
            A* sp = w.s.get() + x * ld + y;
            hn::StoreU(exp_softmax(d, hn::Sub(hn::LoadU(d, sp), per_query(lse, x, y))), d, sp);
        }
    const A* pd = w.s.get();
    if (p.dropout) {
        std::fill(w.pd.get(), w.pd.get() + n * ld, A(0));
        apply_dropout<O>(p, bh, g, w.s.get(), w.pd.get(), ld);
        pd = w.pd.get();
    }
    const bool softcap = p.softcap > 0;
    const auto one = hn::Set(d, A(1));
    for (int64_t x = 0; x < n; ++x)
        for (int64_t y = 0; y < ld; y += L) {
            const int64_t o = x * ld + y;
            const auto prob = hn::LoadU(d, w.s.get() + o);
            auto ds = hn::Sub(hn::Mul(hn::LoadU(d, pd + o), hn::LoadU(d, w.dp.get() + o)),
                              hn::Mul(prob, per_query(dsum, x, y)));
            if (softcap) {
                const auto th = hn::LoadU(d, w.t.get() + o);
                ds = hn::Mul(ds, hn::NegMulAdd(th, th, one));
            }
            hn::StoreU(ds, d, w.dp.get() + o);
        }
    return pd;
}

// lse and D of query rows [i0, i0 + rows) of head (b, h) into lse / di (padded with 0 to ld).
template <class A>
void load_row_stats(const AttentionParams& p, const A* dsum, int64_t b, int64_t h, int64_t i0,
                    int64_t rows, int64_t ld, A* lse, A* di) {
    const float* src = p.lse + b * p.lse_st.b + h * p.lse_st.h + (p.first_q(b) + i0) * p.lse_st.s;
    for (int64_t r = 0; r < ld; ++r) {
        lse[r] = r < rows ? A(src[r * p.lse_st.s]) : A(0);
        di[r] = r < rows ? dsum[(b * p.Hq + h) * p.Sq + i0 + r] : A(0);
    }
}

template <class T, class A>
void preprocess_task(const AttentionParams& p, A* dsum, int64_t bh) {
    const int64_t b = bh / p.Hq, h = bh % p.Hq, fq = p.first_q(b);
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    const bool contiguous = p.out_st.d == 1 && p.dout_st.d == 1;
    constexpr int64_t kAhead = 8;  // rows prefetched ahead: each row is in its own page
    for (int64_t i = 0; i < p.seqlen_q(b); ++i) {
        const T* o = at<const T>(p.out, p.out_st, b, fq, i, h);
        const T* g = at<const T>(p.dout, p.dout_st, b, fq, i, h);
        if (contiguous && i + kAhead < p.seqlen_q(b)) {
            prefetch_bytes(o + kAhead * p.out_st.s, p.Dv * sizeof(T));
            prefetch_bytes(g + kAhead * p.dout_st.s, p.Dv * sizeof(T));
        }
        A acc = 0;
        int64_t c = 0;
        if constexpr (std::is_same_v<T, A>) {
            // Two vector accumulators: a scalar sum is one serial chain of Dv FMAs.
            if (contiguous) {
                auto s0 = hn::Zero(d), s1 = hn::Zero(d);
                for (; c + 2 * L <= p.Dv; c += 2 * L) {
                    s0 = hn::MulAdd(hn::LoadU(d, o + c), hn::LoadU(d, g + c), s0);
                    s1 = hn::MulAdd(hn::LoadU(d, o + c + L), hn::LoadU(d, g + c + L), s1);
                }
                for (; c + L <= p.Dv; c += L)
                    s0 = hn::MulAdd(hn::LoadU(d, o + c), hn::LoadU(d, g + c), s0);
                acc = hn::GetLane(hn::SumOfLanes(d, hn::Add(s0, s1)));
            }
        }
        for (; c < p.Dv; ++c)
            acc += load_as<A>(o[c * p.out_st.d]) * load_as<A>(g[c * p.dout_st.d]);
        dsum[bh * p.Sq + i] = acc;
    }
}

// The fused pass's per-task buffers for one (batch, kv head), over the sq queries of its group's
// heads: dQ accumulated there, (group, sq, ldd); and, when they fit kMaxTaskBufferBytes, q
// (group, sq, ldd) and dout (group, sq, ldv) packed once for all the task's key blocks instead
// of once per (key block, query block) (+2-5% at S <= 2048 on a 2-core Zen 3; null otherwise).
template <class A>
struct FusedRows {
    A* dq;
    const A* q;
    const A* dout;
};

// dK, dV of key rows [j0, j0 + bk) of kv head (b, hk), over every query block of every query
// head of its group that sees them. Scores are held as S (bq, bk): k^T and v^T are the packed
// operands, transposed once per task. With `fused` (the fused single pass) it also adds this
// key block's share of dQ there, and reads q and dout from there when they are packed.
template <class T, class A>
void dkdv_task(const AttentionParams& p, const TileSize& ts, const A* dsum, int64_t b,
               int64_t hk, int64_t nb, const FusedRows<A>* fused) {
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = p.diag(b);
    const int64_t j0 = nb * ts.block_k;
    if (j0 >= sk) return;
    const int64_t cols = std::min(ts.block_k, sk - j0), group = p.Hq / p.Hkv;
    const int64_t L = lanes<A>(), bq = ts.block_q, fk = p.first_k(b), fq = p.first_q(b);
    const int64_t ldd = round_up(p.D, L), ldv = round_up(p.Dv, L);
    const int64_t ldk = transposed_ld(cols, L, sizeof(A));

    auto kt = alloc_tile<A>(p.D * ldk);   // (D, ldk)
    auto vt = alloc_tile<A>(p.Dv * ldk);  // (Dv, ldk)
    const bool packed = fused && fused->q;
    auto q = alloc_tile<A>(packed ? 0 : bq * ldd);     // (bq, ldd), unless packed
    auto dout = alloc_tile<A>(packed ? 0 : bq * ldv);  // (bq, ldv), unless packed
    auto lse = alloc_tile<A>(bq);
    auto di = alloc_tile<A>(bq);
    auto dk = alloc_tile<A>(cols * ldd);  // (cols, ldd)
    auto dv = alloc_tile<A>(cols * ldv);  // (cols, ldv)
    auto kn = alloc_tile<A>(fused ? cols * ldd : 0);  // (cols, ldd), fused pass only
    ScoreTiles<A> w(bq * ldk);                       // (bq, ldk)
    std::fill(dk.get(), dk.get() + cols * ldd, A(0));
    std::fill(dv.get(), dv.get() + cols * ldv, A(0));
    pack_transposed(kt.get(), ldk, at<const T>(p.k, p.k_st, b, fk, j0, hk), p.k_st.s, p.k_st.d,
                    cols, p.D, ldk);
    pack_transposed(vt.get(), ldk, at<const T>(p.v, p.v_st, b, fk, j0, hk), p.v_st.s, p.v_st.d,
                    cols, p.Dv, ldk);
    if (fused)
        pack_rows(kn.get(), ldd, at<const T>(p.k, p.k_st, b, fk, j0, hk), p.k_st.s, p.k_st.d,
                  cols, p.D, ldd);

    const Span qs = queries_seeing(j0, j0 + cols, diag, p.window_left, p.window_right, sq);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const A slope = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : A(0);
        for (int64_t i0 = qs.lo; i0 < qs.hi; i0 += bq) {
            const int64_t rows = std::min(bq, qs.hi - i0);
            const TileGeom g{i0, rows, j0, cols, diag};
            const int64_t row0 = (h - hk * group) * sq + i0;  // in the fused buffers
            const A* qr = packed ? fused->q + row0 * ldd : q.get();
            const A* dr = packed ? fused->dout + row0 * ldv : dout.get();
            if (!packed) {
                pack_rows(q.get(), ldd, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s,
                          p.q_st.d, rows, p.D, ldd);
                pack_rows(dout.get(), ldv, at<const T>(p.dout, p.dout_st, b, fq, i0, h),
                          p.dout_st.s, p.dout_st.d, rows, p.Dv, ldv);
            }
            load_row_stats(p, dsum, b, h, i0, rows, rows, lse.get(), di.get());
            gemm<false>(rows, ldk, p.D, qr, ldd, 1, kt.get(), ldk, w.s.get(), ldk);
            finish_scores<Orient::q_rows>(p, slope, g, w.s.get(), w.t.get(), ldk, ldk,
                                          score_prescale<A>(p));
            gemm<false>(rows, ldk, p.Dv, dr, ldv, 1, vt.get(), ldk, w.dp.get(), ldk);
            const A* pd = probs_and_ds<Orient::q_rows>(p, b * p.Hq + h, g, lse.get(), di.get(), w, ldk);
            // dV (cols, Dv) += Pd^T (cols, rows) dout (rows, Dv); dK += dS^T q.
            if (p.dv) gemm<true>(cols, ldv, rows, pd, 1, ldk, dr, ldv, dv.get(), ldv);
            if (p.dk) gemm<true>(cols, ldd, rows, w.dp.get(), 1, ldk, qr, ldd, dk.get(), ldd);
            // dQ (rows, D) += dS (rows, cols) k (cols, D): the same sums, in the same key order,
            // as the dQ pass computes.
            if (fused)
                gemm<true>(rows, ldd, cols, w.dp.get(), ldk, 1, kn.get(), ldd,
                           fused->dq + row0 * ldd, ldd);
        }
    }
    if (p.dk)
        store_output_rows(at<T>(p.dk, p.dk_st, b, fk, j0, hk), p.dk_st.s, p.dk_st.d, dk.get(),
                          ldd, cols, p.D, A(p.scale));
    if (p.dv)
        store_output_rows(at<T>(p.dv, p.dv_st, b, fk, j0, hk), p.dv_st.s, p.dv_st.d, dv.get(),
                          ldv, cols, p.Dv, A(1));
}

// dQ of query rows [i0, i0 + bq) of head (b, h), over its visible key blocks. Scores are held as
// S^T (bk, bq): q^T and dout^T are the packed operands, transposed once per task.
template <class T, class A>
void dq_task(const AttentionParams& p, const TileSize& ts, const A* dsum, int64_t b, int64_t h,
             int64_t mb) {
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = p.diag(b);
    const int64_t i0 = mb * ts.block_q;
    if (i0 >= sq) return;
    const int64_t rows = std::min(ts.block_q, sq - i0), hk = h / (p.Hq / p.Hkv);
    const int64_t L = lanes<A>(), bk = ts.block_k, fk = p.first_k(b), fq = p.first_q(b);
    const int64_t ldd = round_up(p.D, L), ldq = transposed_ld(rows, L, sizeof(A));

    auto qt = alloc_tile<A>(p.D * ldq);     // (D, ldq)
    auto dot = alloc_tile<A>(p.Dv * ldq);   // dout^T (Dv, ldq)
    auto lse = alloc_tile<A>(ldq);
    auto di = alloc_tile<A>(ldq);
    auto k = alloc_tile<A>(bk * ldd);       // (bk, ldd)
    auto vb = alloc_tile<A>(std::is_same_v<T, A> ? 0 : bk * p.Dv);  // (bk, Dv)
    auto dq = alloc_tile<A>(rows * ldd);    // (rows, ldd)
    ScoreTiles<A> w(bk * ldq);                         // (bk, ldq)
    std::fill(dq.get(), dq.get() + rows * ldd, A(0));
    pack_transposed(qt.get(), ldq, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s, p.q_st.d,
                    rows, p.D, ldq);
    pack_transposed(dot.get(), ldq, at<const T>(p.dout, p.dout_st, b, fq, i0, h), p.dout_st.s,
                    p.dout_st.d, rows, p.Dv, ldq);
    load_row_stats(p, dsum, b, h, i0, rows, ldq, lse.get(), di.get());

    const A slope = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : A(0);
    const Span keys = keys_of_rows(i0, rows, diag, p.window_left, p.window_right, sk);
    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t cols = std::min(bk, keys.hi - j0);
        const TileGeom g{i0, rows, j0, cols, diag};
        pack_rows(k.get(), ldd, at<const T>(p.k, p.k_st, b, fk, j0, hk), p.k_st.s, p.k_st.d,
                  cols, p.D, ldd);
        // dP^T = v dout^T, v read in place when no conversion is needed.
        const ElementOperand<A> va =
            in_place_or_packed(at<const T>(p.v, p.v_st, b, fk, j0, hk), p.v_st.s, p.v_st.d, cols,
                               p.Dv, vb.get());
        gemm<false>(cols, ldq, p.D, k.get(), ldd, 1, qt.get(), ldq, w.s.get(), ldq);
        finish_scores<Orient::k_rows>(p, slope, g, w.s.get(), w.t.get(), ldq, ldq,
                                      score_prescale<A>(p));
        gemm<false>(cols, ldq, p.Dv, va.data, va.s_row, va.s_col, dot.get(), ldq, w.dp.get(), ldq);
        probs_and_ds<Orient::k_rows>(p, b * p.Hq + h, g, lse.get(), di.get(), w, ldq);
        // dQ (rows, D) += dS (rows, cols) k (cols, D), dS read from dS^T.
        gemm<true>(rows, ldd, cols, w.dp.get(), 1, ldq, k.get(), ldd, dq.get(), ldd);
    }
    store_output_rows(at<T>(p.dq, p.dq_st, b, fq, i0, h), p.dq_st.s, p.dq_st.d, dq.get(), ldd,
                      rows, p.D, A(p.scale));
}

// dkdv_task for bf16 inputs on the bf16 GEMMs (bf16_gemms()). S (bq, bk) as there, from q (A
// operand, packed per query block like the fp32 path) and k^T (B, packed per task); then
// dV^T (Dv, bk) += dout^T Pd and dK^T (D, bk) += q^T dS, with q^T and dout^T packed once per call
// (qt, dot) and Pd, dS rounded to bf16 pairs of query rows. With `dq_acc` (group, sq,
// round_up(D, 16)) also dQ (rows, D) += dS k there, dS rounded to bf16 rows (the fused pass).
inline void dkdv_task_bf16(const AttentionParams& p, const TileSize& ts, const float* dsum,
                           const PackedT& qt, const PackedT& dot, int64_t b, int64_t hk,
                           int64_t nb, float* dq_acc) {
    using T = bfloat16_t;
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = p.diag(b);
    const int64_t j0 = nb * ts.block_k;
    if (j0 >= sk) return;
    const int64_t cols = std::min(ts.block_k, sk - j0), group = p.Hq / p.Hkv;
    const int64_t bq = ts.block_q, fk = p.first_k(b), fq = p.first_q(b);
    const int64_t ldk = round_up(cols, 16), dp = round_up(p.D, 2), dvp = round_up(p.Dv, 2);

    auto kt = alloc_tile<uint32_t>(dp / 2 * ldk);                // k^T pairs (D / 2, ldk)
    auto vt = alloc_tile<uint32_t>(dvp / 2 * ldk);               // v^T pairs (Dv / 2, ldk)
    auto q = alloc_tile<uint16_t>(bq * dp);                       // (bq, dp)
    auto dout = alloc_tile<uint16_t>(bq * dvp);                   // (bq, dvp)
    auto pairs = alloc_tile<uint32_t>((bq / 2 + 1) * ldk);       // Pd or dS pairs (bq / 2, ldk)
    auto scratch = alloc_tile<uint16_t>(2 * std::max(p.D, p.Dv));
    auto lse = alloc_tile<float>(bq);
    auto di = alloc_tile<float>(bq);
    auto dkt = alloc_tile<float>(p.D * ldk);   // dK^T (D, ldk)
    auto dvt = alloc_tile<float>(p.Dv * ldk);  // dV^T (Dv, ldk)
    ScoreTiles<float> w(bq * ldk);             // (bq, ldk)
    const int64_t ldd = round_up(p.D, 16);
    auto kpairs = alloc_tile<uint32_t>(dq_acc ? (cols / 2 + 1) * ldd : 0);  // (cols / 2, ldd)
    auto ds = alloc_tile<uint16_t>(dq_acc ? bq * ldk : 0);                 // dS (bq, ldk)
    if (dq_acc)
        pack_bf16_pairs(kpairs.get(), ldd, at<const T>(p.k, p.k_st, b, fk, j0, hk), p.k_st.s,
                        p.k_st.d, cols, p.D, ldd);
    std::fill(dkt.get(), dkt.get() + p.D * ldk, 0.f);
    std::fill(dvt.get(), dvt.get() + p.Dv * ldk, 0.f);
    pack_bf16_pairs_transposed(kt.get(), ldk, at<const T>(p.k, p.k_st, b, fk, j0, hk), p.k_st.s,
                               p.k_st.d, cols, p.D, ldk);
    pack_bf16_pairs_transposed(vt.get(), ldk, at<const T>(p.v, p.v_st, b, fk, j0, hk), p.v_st.s,
                               p.v_st.d, cols, p.Dv, ldk);

    const Span qs = queries_seeing(j0, j0 + cols, diag, p.window_left, p.window_right, sq);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float slope = p.alibi_slopes ? float(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : 0.f;
        for (int64_t i0 = qs.lo; i0 < qs.hi; i0 += bq) {
            const int64_t rows = std::min(bq, qs.hi - i0);
            const TileGeom g{i0, rows, j0, cols, diag};
            pack_bf16_rows(q.get(), dp, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s,
                           p.q_st.d, rows, p.D, dp);
            pack_bf16_rows(dout.get(), dvp, at<const T>(p.dout, p.dout_st, b, fq, i0, h),
                           p.dout_st.s, p.dout_st.d, rows, p.Dv, dvp);
            load_row_stats(p, dsum, b, h, i0, rows, rows, lse.get(), di.get());
            gemm_bf16(false, rows, ldk, dp / 2, q.get(), dp, kt.get(), ldk, w.s.get(), ldk);
            finish_scores<Orient::q_rows>(p, slope, g, w.s.get(), w.t.get(), ldk, ldk,
                                          score_prescale<float>(p));
            gemm_bf16(false, rows, ldk, dvp / 2, dout.get(), dvp, vt.get(), ldk, w.dp.get(), ldk);
            const float* pd = probs_and_ds<Orient::q_rows>(p, b * p.Hq + h, g, lse.get(),
                                                           di.get(), w, ldk);
            // dV^T (Dv, ldk) += dout^T (Dv, rows) Pd (rows, ldk); dK^T += q^T dS.
            if (p.dv) {
                pairs_from_f32(pairs.get(), ldk, pd, ldk, rows, ldk);
                gemm_bf16_k(true, p.Dv, ldk, rows, dot.at(b, h, i0), dot.ld, pairs.get(), ldk,
                            dvt.get(), ldk, nullptr, scratch.get());
            }
            if (p.dk) {
                pairs_from_f32(pairs.get(), ldk, w.dp.get(), ldk, rows, ldk);
                gemm_bf16_k(true, p.D, ldk, rows, qt.at(b, h, i0), qt.ld, pairs.get(), ldk,
                            dkt.get(), ldk, nullptr, scratch.get());
            }
            // dQ (rows, D) += dS (rows, cols) k (cols, D). dS past `cols` is 0 (masked scores,
            // zero v^T pairs), so an odd last pair reads a zero from this tile.
            if (dq_acc) {
                bf16_from_f32(ds.get(), ldk, w.dp.get(), ldk, rows, ldk);
                gemm_bf16(true, rows, ldd, ceil_div(cols, 2), ds.get(), ldk, kpairs.get(), ldd,
                          dq_acc + ((h - hk * group) * sq + i0) * ldd, ldd);
            }
        }
    }
    if (p.dk)
        store_rows(at<T>(p.dk, p.dk_st, b, fk, j0, hk), p.dk_st.d, p.dk_st.s, dkt.get(), ldk,
                   p.D, cols, float(p.scale));
    if (p.dv)
        store_rows(at<T>(p.dv, p.dv_st, b, fk, j0, hk), p.dv_st.d, p.dv_st.s, dvt.get(), ldk,
                   p.Dv, cols, 1.f);
}

// dq_task for bf16 inputs on the bf16 GEMMs. S^T (bk, bq) as there, from k (A, packed per tile)
// and q^T (B, packed per task); dQ^T (D, bq) += k^T dS^T with k^T packed once per call
// (kt) and dS^T rounded to bf16 pairs of keys.
inline void dq_task_bf16(const AttentionParams& p, const TileSize& ts, const float* dsum,
                         const PackedT& kt, int64_t b, int64_t h, int64_t mb) {
    using T = bfloat16_t;
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = p.diag(b);
    const int64_t i0 = mb * ts.block_q;
    if (i0 >= sq) return;
    const int64_t rows = std::min(ts.block_q, sq - i0), hk = h / (p.Hq / p.Hkv);
    const int64_t bk = ts.block_k, fk = p.first_k(b), fq = p.first_q(b);
    const int64_t ldq = round_up(rows, 16), dp = round_up(p.D, 2), dvp = round_up(p.Dv, 2);

    auto qt = alloc_tile<uint32_t>(dp / 2 * ldq);               // q^T pairs (D / 2, ldq)
    auto dot = alloc_tile<uint32_t>(dvp / 2 * ldq);             // dout^T pairs (Dv / 2, ldq)
    auto k = alloc_tile<uint16_t>(bk * dp);                      // (bk, dp)
    auto v = alloc_tile<uint16_t>(bk * dvp);                     // (bk, dvp)
    auto pairs = alloc_tile<uint32_t>((bk / 2 + 1) * ldq);      // dS^T pairs (bk / 2, ldq)
    auto scratch = alloc_tile<uint16_t>(2 * p.D);
    auto lse = alloc_tile<float>(ldq);
    auto di = alloc_tile<float>(ldq);
    auto dqt = alloc_tile<float>(p.D * ldq);  // dQ^T (D, ldq)
    ScoreTiles<float> w(bk * ldq);            // (bk, ldq)
    std::fill(dqt.get(), dqt.get() + p.D * ldq, 0.f);
    pack_bf16_pairs_transposed(qt.get(), ldq, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s,
                               p.q_st.d, rows, p.D, ldq);
    pack_bf16_pairs_transposed(dot.get(), ldq, at<const T>(p.dout, p.dout_st, b, fq, i0, h),
                               p.dout_st.s, p.dout_st.d, rows, p.Dv, ldq);
    load_row_stats(p, dsum, b, h, i0, rows, ldq, lse.get(), di.get());

    const float slope = p.alibi_slopes ? float(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : 0.f;
    const Span keys = keys_of_rows(i0, rows, diag, p.window_left, p.window_right, sk);
    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t cols = std::min(bk, keys.hi - j0);
        const TileGeom g{i0, rows, j0, cols, diag};
        pack_bf16_rows(k.get(), dp, at<const T>(p.k, p.k_st, b, fk, j0, hk), p.k_st.s, p.k_st.d,
                       cols, p.D, dp);
        pack_bf16_rows(v.get(), dvp, at<const T>(p.v, p.v_st, b, fk, j0, hk), p.v_st.s, p.v_st.d,
                       cols, p.Dv, dvp);
        gemm_bf16(false, cols, ldq, dp / 2, k.get(), dp, qt.get(), ldq, w.s.get(), ldq);
        finish_scores<Orient::k_rows>(p, slope, g, w.s.get(), w.t.get(), ldq, ldq,
                                      score_prescale<float>(p));
        gemm_bf16(false, cols, ldq, dvp / 2, v.get(), dvp, dot.get(), ldq, w.dp.get(), ldq);
        probs_and_ds<Orient::k_rows>(p, b * p.Hq + h, g, lse.get(), di.get(), w, ldq);
        // dQ^T (D, ldq) += k^T (D, cols) dS^T (cols, ldq).
        pairs_from_f32(pairs.get(), ldq, w.dp.get(), ldq, cols, ldq);
        gemm_bf16_k(true, p.D, ldq, cols, kt.at(b, hk, j0), kt.ld, pairs.get(), ldq, dqt.get(),
                    ldq, nullptr, scratch.get());
    }
    store_rows(at<T>(p.dq, p.dq_st, b, fq, i0, h), p.dq_st.d, p.dq_st.s, dqt.get(), ldq, p.D,
               rows, float(p.scale));
}

// The backward of bf16 inputs on the bf16 GEMMs: the fused pass or the two passes, chosen by
// fuse_dq_bf16 from the problem alone, so that results do not depend on the thread count (the
// two variants round dS in different orientations).
inline void bwd_bf16(const AttentionParams& p, const TileSize& ts, const float* dsum) {
    ++bf16_gemm_calls(simd_level() >= SimdLevel::amx);
    const int64_t nk = ceil_div(p.Sk, ts.block_k), kv_heads = p.B * p.Hkv;
    const int64_t group = p.Hq / p.Hkv, ldd = round_up(p.D, 16);
    const bool need_dq = p.dq != nullptr, need_dkdv = p.dk != nullptr || p.dv != nullptr;
    const int64_t dq_bytes = group * p.Sq * ldd * int64_t(sizeof(float));
    const bool fused = need_dq && need_dkdv && fuse_dq_bf16(kv_heads, dq_bytes, p.is_varlen());
    if (need_dkdv) {
        const PackedT qt = pack_heads_transposed(p, p.q, p.q_st, p.Hq, p.D, p.Sq, false);
        const PackedT dot = pack_heads_transposed(p, p.dout, p.dout_st, p.Hq, p.Dv, p.Sq, false);
        // Fused: one task per (batch, kv head), all its key blocks in order, dQ in a private
        // buffer. Else one task per (batch, kv head, key block), the first key blocks first.
        auto dkdv_fused = [&](int64_t bh) {
            const int64_t b = bh / p.Hkv, hk = bh % p.Hkv, sq = p.seqlen_q(b);
            auto dq = alloc_tile<float>(group * sq * ldd);
            std::fill(dq.get(), dq.get() + group * sq * ldd, 0.f);
            for (int64_t nb = 0; nb < nk; ++nb)
                dkdv_task_bf16(p, ts, dsum, qt, dot, b, hk, nb, dq.get());
            for (int64_t g = 0; g < group; ++g)
                store_rows(at<bfloat16_t>(p.dq, p.dq_st, b, p.first_q(b), 0, hk * group + g),
                           p.dq_st.s, p.dq_st.d, dq.get() + g * sq * ldd, ldd, sq, p.D,
                           float(p.scale));
        };
        auto dkdv = [&](int64_t t) {
            const int64_t nb = t / kv_heads, bh = t % kv_heads;
            dkdv_task_bf16(p, ts, dsum, qt, dot, bh / p.Hkv, bh % p.Hkv, nb, nullptr);
        };
        if (fused) {
            parallel_for(kv_heads, dkdv_fused);
            return;
        }
        parallel_for(nk * kv_heads, dkdv);
    }
    if (p.dq != nullptr) {
        const PackedT kt = pack_heads_transposed(p, p.k, p.k_st, p.Hkv, p.D, p.Sk, true);
        const int64_t nq = ceil_div(p.Sq, ts.block_q), heads = p.B * p.Hq;
        auto dq = [&](int64_t t) {
            const int64_t mb = nq - 1 - t / heads, bh = t % heads;
            dq_task_bf16(p, ts, dsum, kt, bh / p.Hq, bh % p.Hq, mb);
        };
        parallel_for(nq * heads, dq);
    }
}

// The gradients' pages before the passes (first_touch.h): every element is written afterwards.
// Dense gradients only, never varlen.
template <class T>
void fault_in_gradients(const AttentionParams& p) {
    if (p.is_varlen()) return;
    fault_in<T>(p.dq, p.B, p.Sq, p.Hq, p.D, p.dq_st);
    fault_in<T>(p.dk, p.B, p.Sk, p.Hkv, p.D, p.dk_st);
    fault_in<T>(p.dv, p.B, p.Sk, p.Hkv, p.Dv, p.dv_st);
}

template <class T>
void bwd_typed(const AttentionParams& p) {
    using A = acc_t<T>;
    // The bf16-GEMM path (AMX / AVX512-BF16) keeps tile_size(): its tiles were measured there.
    const bool bf16_dot = std::is_same_v<T, bfloat16_t> && bf16_gemms();
    const TileSize ts = bf16_dot ? tile_size(p.D, p.Dv) : bwd_tile_size(p.D, p.Dv);
    const size_t n_dsum = size_t(p.B * p.Hq * p.Sq);
    std::vector<A> owned;
    A* dsum = static_cast<A*>(p.workspace);
    if (p.workspace_bytes < n_dsum * sizeof(A)) {
        owned.resize(n_dsum);
        dsum = owned.data();
    }
    fault_in_gradients<T>(p);
    auto pre = [&](int64_t bh) { preprocess_task<T>(p, dsum, bh); };
    parallel_for(p.B * p.Hq, pre);
    if constexpr (std::is_same_v<T, bfloat16_t>) {
        if (bf16_dot) return bwd_bf16(p, ts, dsum);
    }

    const int64_t nk = ceil_div(p.Sk, ts.block_k), kv_heads = p.B * p.Hkv;
    const int64_t group = p.Hq / p.Hkv, ldd = round_up(p.D, lanes<A>());
    const int64_t ldv = round_up(p.Dv, lanes<A>());
    const int64_t dq_bytes = group * p.Sq * ldd * int64_t(sizeof(A));
    // The fused pass packs q and dout once per task when they fit beside dQ (FusedRows).
    const bool pack_once =
        group * p.Sq * (2 * ldd + ldv) * int64_t(sizeof(A)) <= kMaxTaskBufferBytes;
    const bool need_dq = p.dq != nullptr, need_dkdv = p.dk != nullptr || p.dv != nullptr;
    if (need_dq && need_dkdv && fuse_dq(kv_heads, pool_threads(), dq_bytes, p.is_varlen())) {
        // One task per (batch, kv head): all its key blocks in order, dQ in a private buffer.
        auto fused = [&](int64_t bh) {
            const int64_t b = bh / p.Hkv, hk = bh % p.Hkv, sq = p.seqlen_q(b);
            auto dq = alloc_tile<A>(group * sq * ldd);
            auto q = alloc_tile<A>(pack_once ? group * sq * ldd : 0);
            auto dout = alloc_tile<A>(pack_once ? group * sq * ldv : 0);
            std::fill(dq.get(), dq.get() + group * sq * ldd, A(0));
            for (int64_t g = 0; pack_once && g < group; ++g) {
                const int64_t h = hk * group + g, fq = p.first_q(b);
                pack_rows(q.get() + g * sq * ldd, ldd, at<const T>(p.q, p.q_st, b, fq, 0, h),
                          p.q_st.s, p.q_st.d, sq, p.D, ldd);
                pack_rows(dout.get() + g * sq * ldv, ldv,
                          at<const T>(p.dout, p.dout_st, b, fq, 0, h), p.dout_st.s,
                          p.dout_st.d, sq, p.Dv, ldv);
            }
            const FusedRows<A> rows{dq.get(), pack_once ? q.get() : nullptr,
                                    pack_once ? dout.get() : nullptr};
            for (int64_t nb = 0; nb < nk; ++nb) dkdv_task<T>(p, ts, dsum, b, hk, nb, &rows);
            for (int64_t g = 0; g < group; ++g) {
                const int64_t h = hk * group + g;
                store_output_rows(at<T>(p.dq, p.dq_st, b, p.first_q(b), 0, h), p.dq_st.s,
                                  p.dq_st.d, dq.get() + g * sq * ldd, ldd, sq, p.D, A(p.scale));
            }
        };
        parallel_for(kv_heads, fused);
        return;
    }

    // Two passes (each skipped when its gradients are not asked for). Under causal masks the
    // first key blocks and the last query blocks have the most work: they are handed out first.
    auto dkdv = [&](int64_t t) {
        const int64_t nb = t / kv_heads, bh = t % kv_heads;
        dkdv_task<T>(p, ts, dsum, bh / p.Hkv, bh % p.Hkv, nb,
                     static_cast<const FusedRows<A>*>(nullptr));
    };
    if (need_dkdv) parallel_for(nk * kv_heads, dkdv);

    const int64_t nq = ceil_div(p.Sq, ts.block_q), heads = p.B * p.Hq;
    auto dq = [&](int64_t t) {
        const int64_t mb = nq - 1 - t / heads, bh = t % heads;
        dq_task<T>(p, ts, dsum, bh / p.Hq, bh % p.Hq, mb);
    };
    if (need_dq) parallel_for(nq * heads, dq);
}

void attention_bwd_target(const AttentionParams& p) {
    dispatch_dtype(p.dtype, [&](auto tag) { bwd_typed<decltype(tag)>(p); });
}

}  // namespace orchard::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace orchard::cpu {

void attention_bwd_cpu(const AttentionParams& params) { ORCHARD_SIMD_DISPATCH(attention_bwd_target, params); }

}  // namespace orchard::cpu
#endif
