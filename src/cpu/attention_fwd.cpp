// CPU forward: tiled FlashAttention (online softmax, no S x S matrix), SIMD per target via
// Highway dynamic dispatch, threads over (batch, head, query block).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention_fwd.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/thread_pool.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/tile_size.h"
#include "hwy/aligned_allocator.h"

HWY_BEFORE_NAMESPACE();
namespace orchard::cpu::HWY_NAMESPACE {

// One task: query rows [i0, i0 + bq) of head h in sequence b, all visible key blocks.
template <class T>
void fwd_task(const AttentionParams& p, const TileSize& ts, int64_t b, int64_t h, int64_t mb) {
    using A = acc_t<T>;
    const int64_t L = lanes<A>();
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = sk - sq;
    const int64_t i0 = mb * ts.block_q;
    if (i0 >= sq) return;
    const int64_t rows = std::min(ts.block_q, sq - i0);
    const int64_t hk = h / (p.Hq / p.Hkv);
    const int64_t fq = p.first_q(b), fk = p.first_k(b);
    const int64_t bk = ts.block_k, ldv = round_up(p.Dv, L), ldk = round_up(bk, L);

    // Tiles: q (rows, D), kt (D, ldk), v (bk, ldv), s (rows, ldk), acc (rows, ldv).
    auto q = hwy::AllocateAligned<A>(rows * p.D);
    auto kt = hwy::AllocateAligned<A>(p.D * ldk);
    auto v = hwy::AllocateAligned<A>(bk * ldv);
    auto s = hwy::AllocateAligned<A>(rows * ldk);
    auto acc = hwy::AllocateAligned<A>(rows * ldv);
    auto m = hwy::AllocateAligned<A>(rows);
    auto l = hwy::AllocateAligned<A>(rows);
    std::fill(acc.get(), acc.get() + rows * ldv, A(0));
    std::fill(m.get(), m.get() + rows, -std::numeric_limits<A>::infinity());
    std::fill(l.get(), l.get() + rows, A(0));
    pack_rows(q.get(), p.D, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s, p.q_st.d, rows,
              p.D, p.D);

    const A slope = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : A(0);
    const Span first = visible_keys(i0, diag, p.window_left, p.window_right, sk);
    const Span last = visible_keys(i0 + rows - 1, diag, p.window_left, p.window_right, sk);
    const int64_t j_lo = first.lo, j_hi = std::max(last.hi, j_lo);

    for (int64_t j0 = j_lo; j0 < j_hi; j0 += bk) {
        const int64_t cols = std::min(bk, j_hi - j0);
        const T* kb = at<const T>(p.k, p.k_st, b, fk, j0, hk);
        pack_transposed(kt.get(), ldk, kb, p.k_st.s, p.k_st.d, cols, p.D, ldk);
        pack_rows(v.get(), ldv, at<const T>(p.v, p.v_st, b, fk, j0, hk), p.v_st.s, p.v_st.d,
                  cols, p.Dv, ldv);
        std::fill(s.get(), s.get() + rows * ldk, A(0));
        gemm_acc(rows, ldk, p.D, q.get(), p.D, 1, kt.get(), ldk, s.get(), ldk);
        const TileGeom g{i0, rows, j0, cols, diag};
        finish_scores<A>(p, slope, g, s.get(), nullptr, ldk, ldk);

        for (int64_t r = 0; r < rows; ++r) {
            A* srow = s.get() + r * ldk;
            const A m_new = std::max(m[r], row_max(srow, ldk));
            if (m_new == -std::numeric_limits<A>::infinity()) {
                std::fill(srow, srow + ldk, A(0));  // nothing visible yet in this row
                continue;
            }
            const A rescale = std::exp(m[r] - m_new);  // 0 when m[r] was -inf
            l[r] = l[r] * rescale + exp_shifted(srow, ldk, m_new);
            m[r] = m_new;
            if (rescale != A(1)) scale_row(acc.get() + r * ldv, ldv, rescale);
        }
        if (p.dropout) apply_dropout(p, b * p.Hq + h, g, s.get(), s.get(), ldk);
        gemm_acc(rows, ldv, cols, s.get(), ldk, 1, v.get(), ldv, acc.get(), ldv);
    }

    T* out = at<T>(p.out, p.out_st, b, fq, i0, h);
    float* lse = p.lse + b * p.lse_st.b + h * p.lse_st.h + (fq + i0) * p.lse_st.s;
    for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == A(0);  // fully masked row: out = 0, lse = +inf
        lse[r * p.lse_st.s] = empty ? std::numeric_limits<float>::infinity()
                                    : float(m[r] + std::log(l[r]));
        store_rows(out + r * p.out_st.s, 0, p.out_st.d, acc.get() + r * ldv, ldv, 1, p.Dv,
                   empty ? A(0) : A(1) / l[r]);
    }
}

template <class T>
void fwd_typed(const AttentionParams& p) {
    const TileSize ts = tile_size(p.D, p.Dv);
    const int64_t nb = ceil_div(p.Sq, ts.block_q);
    // Later query blocks see more keys under causal masks: hand them out first.
    const int64_t heads = p.B * p.Hq;
    auto task = [&](int64_t t) {
        const int64_t mb = nb - 1 - t / heads, bh = t % heads;
        fwd_task<T>(p, ts, bh / p.Hq, bh % p.Hq, mb);
    };
    parallel_for(p.B * p.Hq * nb, task);
}

void attention_fwd_target(const AttentionParams& p) {
    dispatch_dtype(p.dtype, [&](auto tag) { fwd_typed<decltype(tag)>(p); });
}

}  // namespace orchard::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace orchard::cpu {

HWY_EXPORT(attention_fwd_target);

void attention_fwd_cpu(const AttentionParams& params) {
    HWY_DYNAMIC_DISPATCH(attention_fwd_target)(params);
}

}  // namespace orchard::cpu
#endif
