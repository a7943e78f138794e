// Per-target SIMD building blocks of the CPU kernels (Highway): small GEMMs on packed tiles,
// the score transform (scale, softcap, ALiBi, mask), exp and dropout on (rows, cols) tiles.
// Included once per SIMD target by attention_fwd.cpp / attention_bwd.cpp (foreach_target).

#if defined(ORCHARD_CPU_TILE_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ORCHARD_CPU_TILE_OPS_INL_H_
#undef ORCHARD_CPU_TILE_OPS_INL_H_
#else
#define ORCHARD_CPU_TILE_OPS_INL_H_
#endif

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/mask.h"
#include "core/params.h"
#include "core/philox.h"
#include "cpu/tile.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace orchard::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Rows per register block: AVX-512 and NEON have 32 vector registers (8 x 2 accumulators fit);
// AVX2 / SSE4 have 16 (4 x 2).
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
inline constexpr int kRowsPerBlock = 4;
#else
inline constexpr int kRowsPerBlock = 8;
#endif

template <class A>
inline int64_t lanes() {
    return int64_t(hn::Lanes(hn::ScalableTag<A>()));
}

// C (MR, NV * lanes) += A (MR, K) * B (K, NV * lanes): A by scalar broadcast (any strides),
// B row-major with leading dim ldb, C row-major with leading dim ldc.
template <int MR, int NV, class A>
HWY_INLINE void gemm_block(int64_t K, const A* a, int64_t sa_i, int64_t sa_k, const A* b,
                           int64_t ldb, A* c, int64_t ldc) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    using V = hn::Vec<decltype(d)>;
    V acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = hn::LoadU(d, c + r * ldc + v * L);
    for (int64_t k = 0; k < K; ++k) {
        V bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = hn::LoadU(d, b + k * ldb + v * L);
        for (int r = 0; r < MR; ++r) {
            const V av = hn::Set(d, a[r * sa_i + k * sa_k]);
            for (int v = 0; v < NV; ++v) acc[r][v] = hn::MulAdd(av, bv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) hn::StoreU(acc[r][v], d, c + r * ldc + v * L);
}

template <int MR, class A>
HWY_INLINE void gemm_rows(int64_t N, int64_t K, const A* a, int64_t sa_i, int64_t sa_k,
                          const A* b, int64_t ldb, A* c, int64_t ldc) {
    const int64_t L = lanes<A>();
    int64_t n = 0;
    for (; n + 2 * L <= N; n += 2 * L) gemm_block<MR, 2>(K, a, sa_i, sa_k, b + n, ldb, c + n, ldc);
    for (; n < N; n += L) gemm_block<MR, 1>(K, a, sa_i, sa_k, b + n, ldb, c + n, ldc);
}

// C (M, N) += A (M, K) * B (K, N). N must be a multiple of lanes<A>() (tiles are padded with
// zeros to that width); A is read element-wise at a[i * sa_i + k * sa_k].
template <class A>
void gemm_acc(int64_t M, int64_t N, int64_t K, const A* a, int64_t sa_i, int64_t sa_k,
              const A* b, int64_t ldb, A* c, int64_t ldc) {
    constexpr int MR = kRowsPerBlock;
    int64_t i = 0;
    for (; i + MR <= M; i += MR)
        gemm_rows<MR>(N, K, a + i * sa_i, sa_i, sa_k, b, ldb, c + i * ldc, ldc);
    for (; i + 2 <= M; i += 2) gemm_rows<2>(N, K, a + i * sa_i, sa_i, sa_k, b, ldb, c + i * ldc, ldc);
    for (; i < M; ++i) gemm_rows<1>(N, K, a + i * sa_i, sa_i, sa_k, b, ldb, c + i * ldc, ldc);
}

// Where a (q block, k block) tile sits in its sequence.
struct TileGeom {
    int64_t i0, rows;  // query positions [i0, i0 + rows) inside the sequence
    int64_t j0, cols;  // key positions [j0, j0 + cols)
    int64_t diag;      // sk - sq of the sequence
};

// Turns raw dot products S (rows, width) into scores: scale, softcap (tanh kept in `t` when
// non-null, for the backward), ALiBi, and -inf outside the window or past `cols`.
template <class A>
void finish_scores(const AttentionParams& p, A slope, const TileGeom& g, A* s, A* t, int64_t ld,
                   int64_t width) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    const A neg_inf = -std::numeric_limits<A>::infinity();
    const bool softcap = p.softcap > 0;
    const auto cap = hn::Set(d, A(p.softcap));
    const auto pre = hn::Set(d, softcap ? A(p.scale) / A(p.softcap) : A(p.scale));
    for (int64_t r = 0; r < g.rows; ++r) {
        A* row = s + r * ld;
        const int64_t i = g.i0 + r;
        // Distance |i + diag - j| for j = j0 + c is |c - (i + diag - j0)|.
        const auto center = hn::Set(d, A(i + g.diag - g.j0));
        for (int64_t c = 0; c < width; c += L) {
            auto x = hn::Mul(hn::LoadU(d, row + c), pre);
            if (softcap) {
                const auto th = hn::Tanh(d, x);
                if (t != nullptr) hn::StoreU(th, d, t + r * ld + c);
                x = hn::Mul(cap, th);
            }
            if (slope != A(0)) {
                const auto dist = hn::Abs(hn::Sub(hn::Iota(d, A(c)), center));
                x = hn::NegMulAdd(hn::Set(d, slope), dist, x);
            }
            hn::StoreU(x, d, row + c);
        }
        const Span keys = visible_keys(i, g.diag, p.window_left, p.window_right, g.j0 + g.cols);
        const int64_t lo = std::max<int64_t>(keys.lo - g.j0, 0);
        const int64_t hi = std::max<int64_t>(keys.hi - g.j0, lo);
        for (int64_t c = 0; c < lo; ++c) row[c] = neg_inf;
        for (int64_t c = hi; c < width; ++c) row[c] = neg_inf;
    }
}

// s <- exp(s - shift) on `width` entries (multiple of lanes); -inf inputs give 0. Returns the sum.
template <class A>
A exp_shifted(A* s, int64_t width, A shift) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    const auto m = hn::Set(d, shift);
    const auto lowest = hn::Set(d, std::numeric_limits<A>::lowest());
    auto sum = hn::Zero(d);
    for (int64_t c = 0; c < width; c += L) {
        const auto e = hn::Exp(d, hn::Max(hn::Sub(hn::LoadU(d, s + c), m), lowest));
        sum = hn::Add(sum, e);
        hn::StoreU(e, d, s + c);
    }
    return hn::GetLane(hn::SumOfLanes(d, sum));
}

template <class A>
A row_max(const A* s, int64_t width) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    auto m = hn::Set(d, -std::numeric_limits<A>::infinity());
    for (int64_t c = 0; c < width; c += L) m = hn::Max(m, hn::LoadU(d, s + c));
    return hn::GetLane(hn::MaxOfLanes(d, m));
}

template <class A>
void scale_row(A* x, int64_t width, A factor) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    const auto f = hn::Set(d, factor);
    for (int64_t c = 0; c < width; c += L) hn::StoreU(hn::Mul(hn::LoadU(d, x + c), f), d, x + c);
}

// pd = p * dropout multiplier (0 or 1 / (1 - p)) of DESIGN.md's Philox mask, for head bh.
template <class A>
void apply_dropout(const AttentionParams& p, int64_t bh, const TileGeom& g, const A* prob,
                   A* pd, int64_t ld) {
    const A kept = A(p.rp_dropout);
    for (int64_t r = 0; r < g.rows; ++r) {
        const int64_t i = g.i0 + r;
        const A* in = prob + r * ld;
        A* out = pd + r * ld;
        for (int64_t c = 0; c < g.cols;) {
            const int64_t j = g.j0 + c;
            const Philox4 w = dropout_words(p.seed, p.offset, bh, i, j / 4);
            for (int64_t k = j % 4; k < 4 && c < g.cols; ++k, ++c)
                out[c] = w.x[k] < p.keep_threshold ? in[c] * kept : A(0);
        }
    }
}

}  // namespace orchard::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ORCHARD_CPU_TILE_OPS_INL_H_
