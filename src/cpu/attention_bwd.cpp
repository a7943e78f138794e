// CPU backward, deterministic by construction (no atomics, fixed summation order):
//   preprocess  D = rowsum(dout * out)                       threads over (batch, head)
//   dK/dV pass  per key block, over its query blocks and the  threads over (batch, kv head,
//               query heads of its GQA group                   key block)
//   dQ pass     per query block, over its key blocks           threads over (batch, head,
//                                                              query block)
// Both passes recompute S and dP from q, k, v, dout and the given lse (nothing S x S stored).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention_bwd.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/tile_size.h"
#include "hwy/aligned_allocator.h"

HWY_BEFORE_NAMESPACE();
namespace orchard::cpu::HWY_NAMESPACE {

// Tiles of one (query block, key block) pair; leading dims padded to the vector width.
template <class A>
struct BwdTiles {
    int64_t ldd, ldv, ldk;  // padded D, Dv, block_k
    hwy::AlignedFreeUniquePtr<A[]> q, dout, kt, vt, k, s, t, pd, dp, lse, di, acc;

    BwdTiles(const AttentionParams& p, const TileSize& ts, int64_t acc_rows, int64_t acc_ld2) {
        const int64_t L = lanes<A>(), bq = ts.block_q;
        ldd = round_up(p.D, L);
        ldv = round_up(p.Dv, L);
        ldk = round_up(ts.block_k, L);
        q = hwy::AllocateAligned<A>(bq * ldd);       // (bq, D)
        dout = hwy::AllocateAligned<A>(bq * ldv);    // (bq, Dv)
        kt = hwy::AllocateAligned<A>(p.D * ldk);     // (D, bk)
        vt = hwy::AllocateAligned<A>(p.Dv * ldk);    // (Dv, bk)
        k = hwy::AllocateAligned<A>(ts.block_k * ldd);  // (bk, D), dQ pass only
        s = hwy::AllocateAligned<A>(bq * ldk);       // scores, then P          (bq, bk)
        t = hwy::AllocateAligned<A>(bq * ldk);       // tanh of softcap          (bq, bk)
        pd = hwy::AllocateAligned<A>(bq * ldk);      // P with dropout applied   (bq, bk)
        dp = hwy::AllocateAligned<A>(bq * ldk);      // dP, then dS              (bq, bk)
        lse = hwy::AllocateAligned<A>(bq);
        di = hwy::AllocateAligned<A>(bq);
        acc = hwy::AllocateAligned<A>(acc_rows * acc_ld2);
    }
};

// Packs q, dout, lse and D of query rows [i0, i0 + rows) of head (b, h).
template <class T, class A>
void pack_query_block(const AttentionParams& p, const A* dsum, int64_t b, int64_t h, int64_t i0,
                      int64_t rows, BwdTiles<A>& w) {
    const int64_t fq = p.first_q(b);
    pack_rows(w.q.get(), w.ldd, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s, p.q_st.d, rows,
              p.D, w.ldd);
    pack_rows(w.dout.get(), w.ldv, at<const T>(p.dout, p.dout_st, b, fq, i0, h), p.dout_st.s,
              p.dout_st.d, rows, p.Dv, w.ldv);
    const float* lse = p.lse + b * p.lse_st.b + h * p.lse_st.h + (fq + i0) * p.lse_st.s;
    for (int64_t r = 0; r < rows; ++r) {
        w.lse[r] = A(lse[r * p.lse_st.s]);
        w.di[r] = dsum[(b * p.Hq + h) * p.Sq + i0 + r];
    }
}

// Packs k^T, v^T (and k when `with_k`) of key rows [j0, j0 + cols) of kv head (b, hk).
template <class T, class A>
void pack_key_block(const AttentionParams& p, int64_t b, int64_t hk, int64_t j0, int64_t cols,
                    bool with_k, BwdTiles<A>& w) {
    const int64_t fk = p.first_k(b);
    const T* kb = at<const T>(p.k, p.k_st, b, fk, j0, hk);
    pack_transposed(w.kt.get(), w.ldk, kb, p.k_st.s, p.k_st.d, cols, p.D, w.ldk);
    pack_transposed(w.vt.get(), w.ldk, at<const T>(p.v, p.v_st, b, fk, j0, hk), p.v_st.s,
                    p.v_st.d, cols, p.Dv, w.ldk);
    if (with_k) pack_rows(w.k.get(), w.ldd, kb, p.k_st.s, p.k_st.d, cols, p.D, w.ldd);
}

// For packed blocks: P (in w.s), P with dropout (w.pd, or w.s without dropout) and
// dS (in w.dp) = P * (dP * Z - D), times the softcap derivative. Returns the P-with-dropout tile.
template <class A>
const A* probs_and_ds(const AttentionParams& p, int64_t bh, A slope, const TileGeom& g,
                      BwdTiles<A>& w) {
    const int64_t ldk = w.ldk;
    std::fill(w.s.get(), w.s.get() + g.rows * ldk, A(0));
    gemm_acc(g.rows, ldk, p.D, w.q.get(), w.ldd, 1, w.kt.get(), ldk, w.s.get(), ldk);
    const bool softcap = p.softcap > 0;
    finish_scores<A>(p, slope, g, w.s.get(), softcap ? w.t.get() : nullptr, ldk, ldk);
    for (int64_t r = 0; r < g.rows; ++r) exp_shifted(w.s.get() + r * ldk, ldk, w.lse[r]);
    const A* pd = w.s.get();
    if (p.dropout) {
        apply_dropout(p, bh, g, w.s.get(), w.pd.get(), ldk);
        for (int64_t r = 0; r < g.rows; ++r)
            std::fill(w.pd.get() + r * ldk + g.cols, w.pd.get() + (r + 1) * ldk, A(0));
        pd = w.pd.get();
    }
    std::fill(w.dp.get(), w.dp.get() + g.rows * ldk, A(0));
    gemm_acc(g.rows, ldk, p.Dv, w.dout.get(), w.ldv, 1, w.vt.get(), ldk, w.dp.get(), ldk);
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    const auto one = hn::Set(d, A(1));
    for (int64_t r = 0; r < g.rows; ++r) {
        const auto di = hn::Set(d, w.di[r]);
        for (int64_t c = 0; c < ldk; c += L) {
            const int64_t o = r * ldk + c;
            const auto prob = hn::LoadU(d, w.s.get() + o);
            const auto dpv = hn::LoadU(d, w.dp.get() + o);
            // dS = P * (dP * Z - D) = Pd * dP - P * D, with Pd = P * Z.
            auto ds = hn::Sub(hn::Mul(hn::LoadU(d, pd + o), dpv), hn::Mul(prob, di));
            if (softcap) {
                const auto th = hn::LoadU(d, w.t.get() + o);
                ds = hn::Mul(ds, hn::NegMulAdd(th, th, one));
            }
            hn::StoreU(ds, d, w.dp.get() + o);
        }
    }
    return pd;
}

template <class T, class A>
void preprocess_task(const AttentionParams& p, A* dsum, int64_t bh) {
    const int64_t b = bh / p.Hq, h = bh % p.Hq, fq = p.first_q(b);
    for (int64_t i = 0; i < p.seqlen_q(b); ++i) {
        const T* o = at<const T>(p.out, p.out_st, b, fq, i, h);
        const T* g = at<const T>(p.dout, p.dout_st, b, fq, i, h);
        A acc = 0;
        for (int64_t d = 0; d < p.Dv; ++d)
            acc += load_as<A>(o[d * p.out_st.d]) * load_as<A>(g[d * p.dout_st.d]);
        dsum[bh * p.Sq + i] = acc;
    }
}

template <class T, class A>
void dkdv_task(const AttentionParams& p, const TileSize& ts, const A* dsum, int64_t b,
               int64_t hk, int64_t nb) {
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = sk - sq;
    const int64_t j0 = nb * ts.block_k;
    if (j0 >= sk) return;
    const int64_t cols = std::min(ts.block_k, sk - j0), group = p.Hq / p.Hkv;
    const int64_t ldd = round_up(p.D, lanes<A>());
    BwdTiles<A> w(p, ts, cols, ldd + round_up(p.Dv, lanes<A>()));
    A* dk = w.acc.get();                // (cols, ldd)
    A* dv = w.acc.get() + cols * ldd;  // (cols, ldv)
    std::fill(w.acc.get(), w.acc.get() + cols * (ldd + w.ldv), A(0));
    pack_key_block<T>(p, b, hk, j0, cols, false, w);

    const Span qs = queries_seeing(j0, j0 + cols, diag, p.window_left, p.window_right, sq);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const A slope = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : A(0);
        for (int64_t i0 = qs.lo; i0 < qs.hi; i0 += ts.block_q) {
            const int64_t rows = std::min(ts.block_q, qs.hi - i0);
            pack_query_block<T>(p, dsum, b, h, i0, rows, w);
            const TileGeom g{i0, rows, j0, cols, diag};
            const A* pd = probs_and_ds(p, b * p.Hq + h, slope, g, w);
            // dV (cols, Dv) += Pd^T (cols, rows) * dout (rows, Dv); dK += dS^T * q.
            gemm_acc(cols, w.ldv, rows, pd, 1, w.ldk, w.dout.get(), w.ldv, dv, w.ldv);
            gemm_acc(cols, ldd, rows, w.dp.get(), 1, w.ldk, w.q.get(), ldd, dk, ldd);
        }
    }
    const int64_t fk = p.first_k(b);
    T* dk_out = at<T>(p.dk, p.dk_st, b, fk, j0, hk);
    T* dv_out = at<T>(p.dv, p.dv_st, b, fk, j0, hk);
    store_rows(dk_out, p.dk_st.s, p.dk_st.d, dk, ldd, cols, p.D, A(p.scale));
    store_rows(dv_out, p.dv_st.s, p.dv_st.d, dv, w.ldv, cols, p.Dv, A(1));
}

template <class T, class A>
void dq_task(const AttentionParams& p, const TileSize& ts, const A* dsum, int64_t b, int64_t h,
             int64_t mb) {
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = sk - sq;
    const int64_t i0 = mb * ts.block_q;
    if (i0 >= sq) return;
    const int64_t rows = std::min(ts.block_q, sq - i0), hk = h / (p.Hq / p.Hkv);
    const int64_t ldd = round_up(p.D, lanes<A>());
    BwdTiles<A> w(p, ts, rows, ldd);
    A* dq = w.acc.get();  // (rows, ldd)
    std::fill(dq, dq + rows * ldd, A(0));
    pack_query_block<T>(p, dsum, b, h, i0, rows, w);

    const A slope = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : A(0);
    const Span first = visible_keys(i0, diag, p.window_left, p.window_right, sk);
    const Span last = visible_keys(i0 + rows - 1, diag, p.window_left, p.window_right, sk);
    const int64_t j_hi = std::max(last.hi, first.lo);
    for (int64_t j0 = first.lo; j0 < j_hi; j0 += ts.block_k) {
        const int64_t cols = std::min(ts.block_k, j_hi - j0);
        pack_key_block<T>(p, b, hk, j0, cols, true, w);
        const TileGeom g{i0, rows, j0, cols, diag};
        probs_and_ds(p, b * p.Hq + h, slope, g, w);
        // dQ (rows, D) += dS (rows, cols) * k (cols, D).
        gemm_acc(rows, ldd, cols, w.dp.get(), w.ldk, 1, w.k.get(), ldd, dq, ldd);
    }
    store_rows(at<T>(p.dq, p.dq_st, b, p.first_q(b), i0, h), p.dq_st.s, p.dq_st.d, dq, ldd, rows,
               p.D, A(p.scale));
}

template <class T>
void bwd_typed(const AttentionParams& p) {
    using A = acc_t<T>;
    const TileSize ts = tile_size(p.D, p.Dv);
    const size_t n_dsum = size_t(p.B * p.Hq * p.Sq);
    std::vector<A> owned;
    A* dsum = static_cast<A*>(p.workspace);
    if (p.workspace_bytes < n_dsum * sizeof(A)) {
        owned.resize(n_dsum);
        dsum = owned.data();
    }
    auto pre = [&](int64_t bh) { preprocess_task<T>(p, dsum, bh); };
    parallel_for(p.B * p.Hq, pre);

    // Under causal masks the first key blocks and the last query blocks have the most work:
    // they are handed out first.
    const int64_t nk = ceil_div(p.Sk, ts.block_k), kv_heads = p.B * p.Hkv;
    auto dkdv = [&](int64_t t) {
        const int64_t nb = t / kv_heads, bh = t % kv_heads;
        dkdv_task<T>(p, ts, dsum, bh / p.Hkv, bh % p.Hkv, nb);
    };
    parallel_for(nk * kv_heads, dkdv);

    const int64_t nq = ceil_div(p.Sq, ts.block_q), heads = p.B * p.Hq;
    auto dq = [&](int64_t t) {
        const int64_t mb = nq - 1 - t / heads, bh = t % heads;
        dq_task<T>(p, ts, dsum, bh / p.Hq, bh % p.Hq, mb);
    };
    parallel_for(nq * heads, dq);
}

void attention_bwd_target(const AttentionParams& p) {
    dispatch_dtype(p.dtype, [&](auto tag) { bwd_typed<decltype(tag)>(p); });
}

}  // namespace orchard::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace orchard::cpu {

HWY_EXPORT(attention_bwd_target);

void attention_bwd_cpu(const AttentionParams& params) {
    HWY_DYNAMIC_DISPATCH(attention_bwd_target)(params);
}

}  // namespace orchard::cpu
#endif
