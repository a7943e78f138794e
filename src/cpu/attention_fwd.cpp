// CPU forward: tiled FlashAttention (online softmax, no S x S matrix), SIMD per target via
// Highway dynamic dispatch, threads over (batch, head, query block).
//
// Each task keeps one query block fixed and streams key blocks past it, so the query block is
// transposed once into the packed GEMM operand q^T (D, bq) and scores are held as S^T (bk, bq):
// vectors run over queries, which makes the online softmax's per-query max and sum plain
// element-wise vector ops.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention_fwd.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "core/thread_pool.h"
#include "cpu/first_touch.h"
#include "cpu/gemm_bf16.h"
#include "cpu/packed_heads.h"
#include "cpu/tile_ops-inl.h"
#include "cpu/simd_dispatch.h"
#include "cpu/tile_size.h"

HWY_BEFORE_NAMESPACE();
namespace orchard::cpu::HWY_NAMESPACE {

// Online softmax over the keys of S^T (n_keys, width), rows ld apart, the scores being `pre`
// times the tile's values (pre > 0; 1 when they are finished scores): updates the running max m
// and sum l of every query (vectors over width), turns the tile into P^T = exp(pre S^T - m_new)
// and returns in `alpha` the factor exp(m_old - m_new) that rescales each query's accumulator.
template <class A>
void softmax_update(A* st, int64_t n_keys, int64_t width, int64_t ld, A pre_factor, A* m, A* l,
                    A* alpha) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    const auto neg_inf = hn::Set(d, -std::numeric_limits<A>::infinity());
    const auto pre = hn::Set(d, pre_factor);
    for (int64_t y = 0; y < width; y += L) {
        const auto m_old = hn::LoadU(d, m + y);
        auto x_max = neg_inf;
        for (int64_t x = 0; x < n_keys; ++x) x_max = hn::Max(x_max, hn::LoadU(d, st + x * ld + y));
        const auto m_new = hn::Max(m_old, hn::Mul(x_max, pre));
        // Queries that have seen no visible key yet keep m = -inf and use 0 as the shift.
        const auto shift = hn::IfThenZeroElse(hn::Eq(m_new, neg_inf), m_new);
        auto sum = hn::Zero(d);
        for (int64_t x = 0; x < n_keys; ++x) {
            const auto e = exp_softmax(d, hn::MulSub(hn::LoadU(d, st + x * ld + y), pre, shift));
            sum = hn::Add(sum, e);
            hn::StoreU(e, d, st + x * ld + y);
        }
        const auto a = exp_softmax(d, hn::Sub(m_old, shift));
        hn::StoreU(hn::MulAdd(hn::LoadU(d, l + y), a, sum), d, l + y);
        hn::StoreU(m_new, d, m + y);
        hn::StoreU(a, d, alpha + y);
    }
}

// out and lse of query rows [i0, i0 + rows) from the accumulator acc (addressed by acc_at(r, d),
// a reference), and the running max m and sum l; out by streaming stores where it can be
// (stream_row).
template <class T, class A, class AccAt>
void store_out_lse(const AttentionParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                   const A* m, const A* l, AccAt acc_at) {
    T* out = at<T>(p.out, p.out_st, b, p.first_q(b), i0, h);
    float* lse = p.lse + b * p.lse_st.b + h * p.lse_st.h + (p.first_q(b) + i0) * p.lse_st.s;
    const bool stream = streamable<T, A>(out, p.out_st.s, p.out_st.d, rows, p.Dv);
    for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == A(0);  // fully masked row: out = 0, lse = +inf
        lse[r * p.lse_st.s] = empty ? std::numeric_limits<float>::infinity()
                                    : float(m[r] + std::log(l[r]));
        const A factor = empty ? A(0) : A(1) / l[r];
        T* row = out + r * p.out_st.s;
        if constexpr (std::is_same_v<T, A>) {
            if (stream) {
                stream_row(row, &acc_at(r, 0), p.Dv, factor);
                continue;
            }
        }
        for (int64_t c = 0; c < p.Dv; ++c)
            row[c * p.out_st.d] = store_as<T>(acc_at(r, c) * factor);
    }
    if (stream) hwy::FlushStream();
}

// k rows [j0, j0 + n) of kv head hk in sequence b into k (n, D), v rows into v (n, ldv), fp32
// (or the accumulation type) and row-major.
template <class T, class A>
void pack_kv(const AttentionParams& p, int64_t b, int64_t hk, int64_t j0, int64_t n, A* k, A* v,
             int64_t ldv) {
    pack_rows(k, p.D, at<const T>(p.k, p.k_st, b, p.first_k(b), j0, hk), p.k_st.s, p.k_st.d, n,
              p.D, p.D);
    pack_rows(v, ldv, at<const T>(p.v, p.v_st, b, p.first_k(b), j0, hk), p.v_st.s, p.v_st.d, n,
              p.Dv, ldv);
}

// Key rows [lo, ...) of one (batch, kv head) packed for the GEMMs, k (n, D) and v (n, ldv)
// row-major; k == nullptr: each key block is packed when it is reached.
template <class A>
struct KvRows {
    const A* k = nullptr;
    const A* v = nullptr;
    int64_t lo = 0;
};

// Query rows [i0, i0 + bq) of head h in sequence b, all visible key blocks, each met in passes of
// kFwdPassQ queries (tile_size.h); keys come from `kv` or are packed here block by block.
template <class T>
void fwd_block(const AttentionParams& p, const TileSize& ts, int64_t b, int64_t h, int64_t mb,
               const KvRows<acc_t<T>>& kv) {
    using A = acc_t<T>;
    const int64_t L = lanes<A>();
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = p.diag(b);
    const int64_t i0 = mb * ts.block_q;
    if (i0 >= sq) return;
    const int64_t rows = std::min(ts.block_q, sq - i0);
    const int64_t hk = h / (p.Hq / p.Hkv);
    const int64_t fq = p.first_q(b);
    const int64_t bk = ts.block_k, ldv = round_up(p.Dv, L);
    const int64_t ldq = transposed_ld(rows, L, sizeof(A));
    const int64_t lds = round_up(std::min(kFwdPassQ, rows), L);

    // Tiles: qt (D, ldq), k (bk, D) and v (bk, ldv) unless packed, st (bk, lds), acc (rows, ldv).
    const bool packed = kv.k != nullptr;
    auto qt = alloc_tile<A>(p.D * ldq);
    auto kb = alloc_tile<A>(packed ? 0 : bk * p.D);
    auto vb = alloc_tile<A>(packed ? 0 : bk * ldv);
    auto st = alloc_tile<A>(bk * lds);
    auto acc = alloc_tile<A>(rows * ldv);
    auto m = alloc_tile<A>(ldq);
    auto l = alloc_tile<A>(ldq);
    auto alpha = alloc_tile<A>(ldq);
    std::fill(acc.get(), acc.get() + rows * ldv, A(0));
    std::fill(m.get(), m.get() + ldq, -std::numeric_limits<A>::infinity());
    std::fill(l.get(), l.get() + ldq, A(0));
    // q^T is packed already multiplied by the score scale (scale / softcap with a softcap), so
    // tiles with nothing to mask, cap or bias need no pass before the softmax.
    pack_transposed(qt.get(), ldq, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s, p.q_st.d,
                    rows, p.D, ldq, score_prescale<A>(p));

    const A slope = p.alibi_slopes ? A(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : A(0);
    const Span keys = keys_of_rows(i0, rows, diag, p.window_left, p.window_right, sk);

    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t cols = std::min(bk, keys.hi - j0);
        const A* k = packed ? kv.k + (j0 - kv.lo) * p.D : kb.get();
        const A* v = packed ? kv.v + (j0 - kv.lo) * ldv : vb.get();
        if (!packed) pack_kv<T>(p, b, hk, j0, cols, kb.get(), vb.get(), ldv);
        for (int64_t c0 = 0; c0 < rows; c0 += kFwdPassQ) {
            // Only the queries [y0, y0 + n) of the pass that see a key of this block take part
            // (the causal diagonal and window edges leave the others out of both GEMMs).
            const int64_t prows = std::min(kFwdPassQ, rows - c0);
            const QueryCols qc = query_cols(p, i0 + c0, prows, j0, cols, diag, L,
                                            round_up(prows, L));
            if (qc.width == 0) continue;
            const int64_t y0 = c0 + qc.y0, n = qc.width;
            const TileGeom& g = qc.g;
            // S^T = k q^T.
            A* s_t = st.get() + qc.y0;
            gemm<false>(cols, n, p.D, k, p.D, 1, qt.get() + y0, ldq, s_t, lds);
            if (p.softcap > 0 || slope != A(0) || !fully_visible(p, g))
                finish_scores<Orient::k_rows>(p, slope, g, s_t, static_cast<A*>(nullptr), n,
                                              lds, A(1));
            softmax_update(s_t, cols, n, lds, A(1), m.get() + y0, l.get() + y0, alpha.get() + y0);
            if (p.dropout) apply_dropout<Orient::k_rows>(p, b * p.Hq + h, g, s_t, s_t, lds);
            // acc (rows, Dv) = diag(alpha) acc + P (rows, cols) v (cols, Dv), P read from P^T:
            // the online softmax's rescale rides on the GEMM's load of acc.
            gemm<true>(g.rows, ldv, cols, s_t, 1, lds, v, ldv, acc.get() + y0 * ldv, ldv,
                       alpha.get() + y0);
        }
    }

    store_out_lse<T>(p, b, h, i0, rows, m.get(), l.get(),
                     [&](int64_t r, int64_t d) -> const A& { return acc[r * ldv + d]; });
}

// One task: query blocks [mb_lo, mb_hi) of head h in sequence b, the last first. k and v are
// packed because their rows lie H * D apart in a (B, S, H, D) tensor, often a multiple of 4 KiB,
// and the GEMM's 6 rows would share L1 sets (packing was 0-20% faster than reading in place).
// A task of several blocks packs the keys they see once for all of them; a single block packs
// each key block as it reaches it (no buffer the size of the keys).
template <class T>
void fwd_task(const AttentionParams& p, const TileSize& ts, int64_t b, int64_t h, int64_t mb_lo,
              int64_t mb_hi) {
    using A = acc_t<T>;
    const int64_t sq = p.seqlen_q(b), i0 = mb_lo * ts.block_q;
    if (i0 >= sq) return;
    mb_hi = std::min(mb_hi, ceil_div(sq, ts.block_q));
    if (mb_hi - mb_lo == 1) return fwd_block<T>(p, ts, b, h, mb_lo, KvRows<A>{});
    const int64_t hk = h / (p.Hq / p.Hkv), ldv = round_up(p.Dv, lanes<A>());
    const Span keys = keys_of_rows(i0, std::min(sq, mb_hi * ts.block_q) - i0, p.diag(b),
                                   p.window_left, p.window_right, p.seqlen_k(b));
    const int64_t n = std::max<int64_t>(keys.hi - keys.lo, 0);
    auto k = alloc_tile<A>(n * p.D);  // (n, D)
    auto v = alloc_tile<A>(n * ldv);  // (n, ldv)
    pack_kv<T>(p, b, hk, keys.lo, n, k.get(), v.get(), ldv);
    for (int64_t mb = mb_hi - 1; mb >= mb_lo; --mb)
        fwd_block<T>(p, ts, b, h, mb, KvRows<A>{k.get(), v.get(), keys.lo});
}

// fwd_task for bf16 inputs on the bf16 GEMMs (gemm_bf16.h: AMX tiles or AVX512-BF16; T =
// bfloat16_t, bf16_gemms()). The same online softmax on S^T (bk, bq) in fp32; the
// GEMM operands stay bf16, and P is rounded to bf16 for the P V product (as FlashAttention does
// on GPUs). The accumulator is held transposed, acc^T (Dv, bq), so that P^T's pairs of keys are
// the packed operand and the online softmax's rescale is a per-column factor.
inline void fwd_task_bf16(const AttentionParams& p, const TileSize& ts, const PackedT& vt,
                          int64_t b, int64_t h, int64_t mb) {
    using T = bfloat16_t;
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = p.diag(b);
    const int64_t i0 = mb * ts.block_q;
    if (i0 >= sq) return;
    const int64_t rows = std::min(ts.block_q, sq - i0);
    const int64_t hk = h / (p.Hq / p.Hkv);
    const int64_t fq = p.first_q(b), fk = p.first_k(b);
    // Columns run over queries in 16-lane vectors; K dims are padded to even (pairs).
    const int64_t bk = ts.block_k, ldq = round_up(rows, 16), dp = round_up(p.D, 2);

    auto qt = alloc_tile<uint32_t>(dp / 2 * ldq);           // q^T pairs (D / 2, ldq)
    // k is packed although its rows may hold whole pairs in place: rows of a (B, S, H, D) tensor
    // lie H * D apart, often a power of two, and the 16 rows of an AMX tile would then share a
    // few L1 sets.
    auto k = alloc_tile<uint16_t>(bk * dp);                 // (bk, dp)
    auto pt = alloc_tile<uint32_t>(bk / 2 * ldq + ldq);     // P^T pairs (cols_pad / 2, ldq)
    auto last_pair = alloc_tile<uint16_t>(2 * p.Dv);        // gemm_bf16_k's scratch
    auto st = alloc_tile<float>(bk * ldq);                  // S^T, then P^T (bk, ldq)
    auto acc = alloc_tile<float>(p.Dv * ldq);               // acc^T (Dv, ldq)
    auto m = alloc_tile<float>(ldq);
    auto l = alloc_tile<float>(ldq);
    auto alpha = alloc_tile<float>(ldq);
    std::fill(acc.get(), acc.get() + p.Dv * ldq, 0.f);
    std::fill(m.get(), m.get() + ldq, -std::numeric_limits<float>::infinity());
    std::fill(l.get(), l.get() + ldq, 0.f);
    // q is packed unscaled (bf16 is exact only so): the score scale is applied in fp32 by
    // finish_scores or the softmax.
    pack_bf16_pairs_transposed(qt.get(), ldq, at<const T>(p.q, p.q_st, b, fq, i0, h), p.q_st.s,
                               p.q_st.d, rows, p.D, ldq);

    const float slope = p.alibi_slopes ? float(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : 0.f;
    const Span keys = keys_of_rows(i0, rows, diag, p.window_left, p.window_right, sk);

    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
        const int64_t cols = std::min(bk, keys.hi - j0);
        const TileGeom g{i0, rows, j0, cols, diag};
        pack_bf16_rows(k.get(), dp, at<const T>(p.k, p.k_st, b, fk, j0, hk), p.k_st.s, p.k_st.d,
                       cols, p.D, dp);
        // S^T (cols, ldq) = k (cols, D) q^T (D, ldq), unscaled.
        gemm_bf16(false, cols, ldq, dp / 2, k.get(), dp, qt.get(), ldq, st.get(), ldq);
        float pre = score_prescale<float>(p);
        if (p.softcap > 0 || slope != 0.f || !fully_visible(p, g)) {
            finish_scores<Orient::k_rows>(p, slope, g, st.get(), static_cast<float*>(nullptr),
                                          ldq, ldq, pre);
            pre = 1.f;
        }
        softmax_update(st.get(), cols, ldq, ldq, pre, m.get(), l.get(), alpha.get());
        if (p.dropout)
            apply_dropout<Orient::k_rows>(p, b * p.Hq + h, g, st.get(), st.get(), ldq);
        // acc^T (Dv, ldq) = acc^T diag(alpha) + v^T (Dv, cols) P^T (cols, ldq), P^T in bf16.
        pairs_from_f32(pt.get(), ldq, st.get(), ldq, cols, ldq);
        gemm_bf16_k(true, p.Dv, ldq, cols, vt.at(b, hk, j0), vt.ld, pt.get(), ldq, acc.get(), ldq,
                    alpha.get(), last_pair.get());
    }
    store_out_lse<T>(p, b, h, i0, rows, m.get(), l.get(),
                     [&](int64_t r, int64_t d) { return acc[d * ldq + r]; });
}

template <class T>
void fwd_typed(const AttentionParams& p) {
    constexpr bool kBf16 = std::is_same_v<T, bfloat16_t>;
    const bool bf16_dot = kBf16 && bf16_gemms();
    const TileSize ts = bf16_dot ? tile_size(p.D, p.Dv) : fwd_tile_size(p.D, p.Dv);
    const int64_t nb = ceil_div(p.Sq, ts.block_q);
    if (bf16_dot) ++bf16_gemm_calls(simd_level() >= SimdLevel::amx);
    // v^T once per call (the size of v), so that query blocks do not each transpose it again.
    const PackedT vt = bf16_dot ? pack_heads_transposed(p, p.v, p.v_st, p.Hkv, p.Dv, p.Sk, true)
                                : PackedT{};
    // The output's pages mapped before the tasks write it (first_touch.h): on fresh memory threads
    // writing neighbouring heads' rows would meet in its pages, a trap per page. Through PyTorch on
    // a 2-core Xeon, D = 64 / 128: S = 512 +5-6%, S = 1024 +3%, S >= 2048 +2%. On memory already
    // mapped it costs ~0.3 ms per 32 MiB on one thread.
    if (!p.is_varlen()) fault_in<T>(p.out, p.B, p.Sq, p.Hq, p.Dv, p.out_st);
    // Tasks of `per_task` query blocks (one on the bf16 GEMMs), `groups` of them per head.
    const int64_t per_task = bf16_dot ? 1 : fwd_blocks_per_task(p.B * p.Hq, nb, pool_threads());
    const int64_t groups = ceil_div(nb, per_task);
    auto task = [&](int64_t t) {
        // One head after the other, so that the threads share its k and v in cache; within a
        // head the later query blocks first: under causal masks they see the most keys.
        const int64_t bh = t / groups, g = groups - 1 - t % groups;
        if (bf16_dot)
            fwd_task_bf16(p, ts, vt, bh / p.Hq, bh % p.Hq, g);
        else
            fwd_task<T>(p, ts, bh / p.Hq, bh % p.Hq, g * per_task, (g + 1) * per_task);
    };
    parallel_for(p.B * p.Hq * groups, task);
}

void attention_fwd_target(const AttentionParams& p) {
    dispatch_dtype(p.dtype, [&](auto tag) { fwd_typed<decltype(tag)>(p); });
}

}  // namespace orchard::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace orchard::cpu {

void attention_fwd_cpu(const AttentionParams& params) { ORCHARD_SIMD_DISPATCH(attention_fwd_target, params); }

}  // namespace orchard::cpu
#endif
