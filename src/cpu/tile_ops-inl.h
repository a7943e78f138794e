// Per-target SIMD building blocks of the CPU kernels (Highway): small GEMMs on packed tiles,
// the score transform (scale, softcap, ALiBi, mask), exp and dropout on (rows, cols) tiles.
// Included once per SIMD target by attention_fwd.cpp / attention_bwd.cpp (foreach_target).

#if defined(ORCHARD_CPU_TILE_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ORCHARD_CPU_TILE_OPS_INL_H_
#undef ORCHARD_CPU_TILE_OPS_INL_H_
#else
#define ORCHARD_CPU_TILE_OPS_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

#include "core/mask.h"
#include "core/params.h"
#include "core/philox.h"
#include "cpu/tile.h"
#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace orchard::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Rows per register block: AVX-512 and NEON have 32 vector registers (8 x 2 accumulators fit);
// AVX2 / SSE4 have 16: 6 x 2 accumulators, the 2 vectors of B and the broadcast of A (6 x 2 made
// the AVX2 forward 5-35% faster than 4 x 2 on a Zen core: 8 accumulators do not cover the
// FMA latency of two pipes).
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
inline constexpr int kRowsPerBlock = 6;
#else
inline constexpr int kRowsPerBlock = 8;
#endif

// A tile of n elements (at least one, so empty tiles are valid allocations), 64-byte aligned,
// from tile_alloc (tile.h).
struct FreeTile {
    void operator()(void* p) const { tile_free(p); }
};
template <class A>
using Tile = std::unique_ptr<A[], FreeTile>;

template <class A>
Tile<A> alloc_tile(int64_t n) {
    return Tile<A>(static_cast<A*>(tile_alloc(size_t(std::max<int64_t>(n, 1)) * sizeof(A))));
}

template <class A>
inline int64_t lanes() {
    return int64_t(hn::Lanes(hn::ScalableTag<A>()));
}

// C (MR, NV * lanes) (+)= A (MR, K) * B (K, NV * lanes): A by scalar broadcast (any strides),
// B row-major with leading dim ldb, C row-major with leading dim ldc. When accumulating, row r
// of C is first multiplied by c_scale[r] if c_scale is given (the online softmax's rescale).
template <bool kAccumulate, int MR, int NV, class A>
HWY_INLINE void gemm_block(int64_t K, const A* a, int64_t sa_i, int64_t sa_k, const A* b,
                           int64_t ldb, A* c, int64_t ldc, const A* c_scale) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    using V = hn::Vec<decltype(d)>;
    V acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) {
            acc[r][v] = kAccumulate ? hn::LoadU(d, c + r * ldc + v * L) : hn::Zero(d);
            if (kAccumulate && c_scale != nullptr) acc[r][v] = hn::Mul(acc[r][v], hn::Set(d, c_scale[r]));
        }
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

template <bool kAccumulate, int MR, class A>
HWY_INLINE void gemm_rows(int64_t N, int64_t K, const A* a, int64_t sa_i, int64_t sa_k,
                          const A* b, int64_t ldb, A* c, int64_t ldc, const A* c_scale) {
    const int64_t L = lanes<A>();
    if constexpr (kRowsPerBlock == 8) {  // a 3-vector panel (gemm())
        if (N == 3 * L)
            return gemm_block<kAccumulate, MR, 3>(K, a, sa_i, sa_k, b, ldb, c, ldc, c_scale);
    }
    int64_t n = 0;
    for (; n + 2 * L <= N; n += 2 * L)
        gemm_block<kAccumulate, MR, 2>(K, a, sa_i, sa_k, b + n, ldb, c + n, ldc, c_scale);
    for (; n < N; n += L)
        gemm_block<kAccumulate, MR, 1>(K, a, sa_i, sa_k, b + n, ldb, c + n, ldc, c_scale);
}

// gemm() over one column panel of C: every row block of A times the same B columns.
template <bool kAccumulate, class A>
void gemm_panel(int64_t M, int64_t N, int64_t K, const A* a, int64_t sa_i, int64_t sa_k,
                const A* b, int64_t ldb, A* c, int64_t ldc, const A* c_scale) {
    constexpr int MR = kRowsPerBlock;
    auto scale_at = [&](int64_t i) { return c_scale ? c_scale + i : nullptr; };
    int64_t i = 0;
    for (; i + MR <= M; i += MR)
        gemm_rows<kAccumulate, MR>(N, K, a + i * sa_i, sa_i, sa_k, b, ldb, c + i * ldc, ldc,
                                   scale_at(i));
    // Remainders: 4 rows keep 8 accumulators (enough to hide the FMA latency), then 2, then 1.
    if constexpr (MR > 4)
        for (; i + 4 <= M; i += 4)
            gemm_rows<kAccumulate, 4>(N, K, a + i * sa_i, sa_i, sa_k, b, ldb, c + i * ldc, ldc,
                                      scale_at(i));
    for (; i + 2 <= M; i += 2)
        gemm_rows<kAccumulate, 2>(N, K, a + i * sa_i, sa_i, sa_k, b, ldb, c + i * ldc, ldc,
                                  scale_at(i));
    for (; i < M; ++i)
        gemm_rows<kAccumulate, 1>(N, K, a + i * sa_i, sa_i, sa_k, b, ldb, c + i * ldc, ldc,
                                  scale_at(i));
}

// C (M, N) = A (M, K) * B (K, N), or C = diag(c_scale) C + A * B when kAccumulate (c_scale
// optional). N must be a multiple of lanes<A>() (tiles are padded with zeros to that width); A is
// read element-wise at a[i * sa_i + k * sa_k], so it may be a transposed tile or a strided tensor.
// Column panels outer: a K x 2-vector panel of B (8 KiB at K = 128, fp32 on AVX2) stays in L1
// while all of A's row blocks pass it, so B crosses from L2 once per call rather than once per
// row block (2-14% faster on a Zen 3 core, forward and backward).
// On targets with 32 vector registers an odd number of vectors ends in one 3-vector panel (8 x 3
// accumulators) rather than a 1-vector one: there each step's 8 FMAs wait on 9 loads, and the
// forward's 48-query passes (3 AVX-512 vectors) ran a third of S^T = k q^T at ~0.6 of the
// 2-vector blocks' speed.
template <bool kAccumulate, class A>
void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t sa_i, int64_t sa_k, const A* b,
          int64_t ldb, A* c, int64_t ldc, const A* c_scale = nullptr) {
    const int64_t L = lanes<A>(), W = 2 * L;
    const int64_t last = kRowsPerBlock == 8 && N % W == L && N >= 3 * L ? 3 * L : 0;
    int64_t n = 0;
    for (; n < N - last; n += W)
        gemm_panel<kAccumulate>(M, std::min(W, N - n), K, a, sa_i, sa_k, b + n, ldb, c + n, ldc,
                                c_scale);
    if (last)
        gemm_panel<kAccumulate>(M, last, K, a, sa_i, sa_k, b + n, ldb, c + n, ldc, c_scale);
}

// Whether `rows` rows of T at dst, s_row apart, can be written by stream_row: fp32 in fp32,
// contiguous, whole vectors, every row vector-aligned.
template <class T, class A>
bool streamable(const T* dst, int64_t s_row, int64_t s_col, int64_t rows, int64_t cols) {
    if constexpr (!std::is_same_v<T, float> || !std::is_same_v<A, float>) {
        return false;
    } else {
        // Every row is aligned when the first is and the row stride is whole vectors.
        const int64_t L = lanes<A>();
        return s_col == 1 && cols % L == 0 && (rows <= 1 || s_row % L == 0) &&
               reinterpret_cast<uintptr_t>(dst) % (L * sizeof(A)) == 0;
    }
}

// dst[0, cols) = factor * src[0, cols) by streaming stores, for outputs written once, whole, and
// far larger than L2: a plain store misses and reads the line in first, wasted traffic. (Forward
// through PyTorch on a 2-core Xeon, D = 128: S = 512 +3-4%, S = 1024 +2%, S >= 2048 +1%; an
// output projection reading the output right after lost nothing.) The caller issues
// hwy::FlushStream() before its results are published to other threads.
template <class A>
HWY_INLINE void stream_row(A* dst, const A* src, int64_t cols, A factor) {
    const hn::ScalableTag<A> d;
    const auto f = hn::Set(d, factor);
    for (int64_t c = 0; c < cols; c += hn::Lanes(d))
        hn::Stream(hn::Mul(hn::LoadU(d, src + c), f), d, dst + c);
}

// store_rows (tile.h) of an output tensor's rows, streamed where they can be.
template <class T, class A>
void store_output_rows(T* dst, int64_t s_row, int64_t s_col, const A* src, int64_t ld,
                       int64_t rows, int64_t cols, A factor) {
    if (!streamable<T, A>(dst, s_row, s_col, rows, cols))
        return store_rows(dst, s_row, s_col, src, ld, rows, cols, factor);
    if constexpr (std::is_same_v<T, A>) {
        for (int64_t r = 0; r < rows; ++r) stream_row(dst + r * s_row, src + r * ld, cols, factor);
        hwy::FlushStream();
    }
}

// Where a (query block, key block) tile sits in its sequence.
struct TileGeom {
    int64_t i0, rows;  // query positions [i0, i0 + rows) inside the sequence
    int64_t j0, cols;  // key positions [j0, j0 + cols)
    int64_t diag;      // AttentionParams::diag(b) of the sequence
};

// The query columns of a k_rows tile (query rows [i0, i0 + rows), key rows [j0, j0 + cols))
// that can see a key of the tile: [y0, y0 + width), whole vectors, within the padded width ld;
// g is the tile restricted to them. Queries left of y0 or right of it see none of these keys
// (causal diagonal, window edges), so a pass may skip them: P = 0 there.
struct QueryCols {
    int64_t y0, width;
    TileGeom g;
};

inline QueryCols query_cols(const AttentionParams& p, int64_t i0, int64_t rows, int64_t j0,
                            int64_t cols, int64_t diag, int64_t lanes, int64_t ld) {
    const Span qs = queries_seeing(j0, j0 + cols, diag, p.window_left, p.window_right, i0 + rows);
    const int64_t y0 = std::max<int64_t>(qs.lo - i0, 0) / lanes * lanes;
    const int64_t y1 = std::max(y0, std::min(ld, round_up(qs.hi - i0, lanes)));
    const int64_t n_rows = std::max<int64_t>(std::min(rows, y1) - y0, 0);
    return {y0, y1 - y0, TileGeom{i0 + y0, n_rows, j0, cols, diag}};
}

// A score tile is stored with queries along its rows (q_rows: (rows, ld), vectors run over
// keys) or keys along its rows (k_rows: (cols, ld), vectors run over queries). Passes that
// keep a query block fixed use k_rows, so that the fixed block is the packed GEMM operand.
enum class Orient { q_rows, k_rows };

template <Orient O>
inline int64_t tile_rows(const TileGeom& g) {
    return O == Orient::q_rows ? g.rows : g.cols;
}

// What raw dot products are multiplied by before the softcap's tanh (or as the whole scaling).
template <class A>
A score_prescale(const AttentionParams& p) {
    return p.softcap > 0 ? A(p.scale / p.softcap) : A(p.scale);
}

// Whether every (query, key) of the tile is inside the window.
inline bool fully_visible(const AttentionParams& p, const TileGeom& g) {
    return g.j0 >= g.i0 + g.rows - 1 + g.diag - p.window_left &&
           g.j0 + g.cols - 1 <= g.i0 + g.diag + p.window_right;
}

// Turns dot products into scores: times `pre` (score_prescale, or 1 when the query tile was
// packed already scaled), softcap (tanh kept in `t` when non-null, for the backward), ALiBi, and
// -inf outside the window or past the valid queries / keys. Columns [0, width) of rows ld apart
// (width a multiple of the vector length, at most ld).
template <Orient O, class A>
void finish_scores(const AttentionParams& p, A slope, const TileGeom& g, A* s, A* t, int64_t width,
                   int64_t ld, A pre_factor) {
    const hn::ScalableTag<A> d;
    const int64_t L = hn::Lanes(d);
    const A neg_inf = -std::numeric_limits<A>::infinity();
    const bool softcap = p.softcap > 0;
    const auto cap = hn::Set(d, A(p.softcap));
    const auto pre = hn::Set(d, pre_factor);
    for (int64_t x = 0; x < tile_rows<O>(g); ++x) {
        A* row = s + x * ld;
        // ALiBi distance |i + diag - j| is |y - center| along the row; the visible span of y.
        int64_t center;
        Span span;
        if constexpr (O == Orient::q_rows) {
            const int64_t i = g.i0 + x;
            center = i + g.diag - g.j0;
            const Span keys = visible_keys(i, g.diag, p.window_left, p.window_right, g.j0 + g.cols);
            span = {keys.lo - g.j0, keys.hi - g.j0};
        } else {
            const int64_t j = g.j0 + x;
            center = j - g.diag - g.i0;
            const Span qs =
                queries_seeing(j, j + 1, g.diag, p.window_left, p.window_right, g.i0 + g.rows);
            span = {qs.lo - g.i0, qs.hi - g.i0};
        }
        const auto c_vec = hn::Set(d, A(center));
        for (int64_t y = 0; y < width; y += L) {
            auto v = hn::Mul(hn::LoadU(d, row + y), pre);
            if (softcap) {
                const auto th = hn::Tanh(d, v);
                if (t != nullptr) hn::StoreU(th, d, t + x * ld + y);
                v = hn::Mul(cap, th);
            }
            if (slope != A(0)) {
                const auto dist = hn::Abs(hn::Sub(hn::Iota(d, A(y)), c_vec));
                v = hn::NegMulAdd(hn::Set(d, slope), dist, v);
            }
            hn::StoreU(v, d, row + y);
        }
        // A row may see none of the tile (a key past all of its queries): span outside [0, width).
        const int64_t lo = std::clamp<int64_t>(span.lo, 0, width);
        const int64_t hi = std::clamp<int64_t>(span.hi, lo, width);
        for (int64_t y = 0; y < lo; ++y) row[y] = neg_inf;
        for (int64_t y = hi; y < width; ++y) row[y] = neg_inf;
    }
}

// exp(x) for the softmax's arguments (x <= 88, -inf allowed): 0 below -87 (where the result
// would come near FLT_MIN, subnormal or -inf: the same 0 as a masked score), within 2 ulp
// elsewhere (float; exp(0) = 1 exactly). About half the instructions of Highway's Exp, which
// covers the whole float range with a second reduction step and two multiplies by powers of 2:
// x = n ln2 + r with n in the low mantissa bits of x / ln2 + 1.5 * 2^23, 1 + r q(r) with q a
// degree-4 fit on |r| <= ln2 / 2 (relative error 1.0e-7), and n added to the exponent bits
// (normal for every x >= -87). With Highway's Exp the softmax was 19% of the 2-core AVX2
// forward's time. Doubles keep Highway's.
template <class D, class V>
HWY_INLINE V exp_softmax(D d, V x) {
    using T = hn::TFromD<D>;
    if constexpr (!std::is_same_v<T, float>) {
        return hn::Exp(d, hn::Max(x, hn::Set(d, std::numeric_limits<T>::lowest())));
    } else {
        const hn::RebindToSigned<D> di;
        const auto shifter = hn::Set(d, 12582912.0f);  // 1.5 * 2^23
        const auto t = hn::MulAdd(x, hn::Set(d, 1.44269504089f), shifter);
        const auto n = hn::Sub(t, shifter);  // round(x / ln2)
        auto r = hn::MulAdd(n, hn::Set(d, -0.693145751953125f), x);  // ln2 in two parts
        r = hn::MulAdd(n, hn::Set(d, -1.428606765330187045e-6f), r);
        auto e = hn::Set(d, 8.317875676e-03f);
        e = hn::MulAdd(e, r, hn::Set(d, 4.189794511e-02f));
        e = hn::MulAdd(e, r, hn::Set(d, 1.666718125e-01f));
        e = hn::MulAdd(e, r, hn::Set(d, 4.999915063e-01f));
        e = hn::MulAdd(e, r, hn::Set(d, 9.999998808e-01f));
        e = hn::MulAdd(e, r, hn::Set(d, 1.0f));
        const auto pow2n = hn::ShiftLeft<23>(hn::BitCast(di, t));
        const auto y = hn::BitCast(d, hn::Add(hn::BitCast(di, e), pow2n));
        return hn::IfThenZeroElse(hn::Lt(x, hn::Set(d, -87.0f)), y);
    }
}

// pd = p * dropout multiplier (0 or 1 / (1 - p)) of DESIGN.md's Philox mask, for head bh.
// One Philox call covers four consecutive keys of one query; the counter holds positions in the
// full sequence (i, j plus the position offsets).
template <Orient O, class A>
void apply_dropout(const AttentionParams& p, int64_t bh, const TileGeom& g, const A* prob,
                   A* pd, int64_t ld) {
    const A kept = A(p.rp_dropout);
    const int64_t qpos = p.q_position_offset, kpos = p.k_position_offset;
    for (int64_t i = g.i0; i < g.i0 + g.rows; ++i) {
        for (int64_t j = g.j0; j < g.j0 + g.cols;) {
            const Philox4 w = dropout_words(p.seed, p.offset, bh, qpos + i, (kpos + j) / 4);
            for (int64_t k = (kpos + j) % 4; k < 4 && j < g.j0 + g.cols; ++k, ++j) {
                const int64_t o = O == Orient::q_rows ? (i - g.i0) * ld + (j - g.j0)
                                                      : (j - g.j0) * ld + (i - g.i0);
                pd[o] = w.x[k] < p.keep_threshold ? prob[o] * kept : A(0);
            }
        }
    }
}

}  // namespace orchard::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ORCHARD_CPU_TILE_OPS_INL_H_
