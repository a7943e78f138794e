// The CUDA backward kernels (sm_80+), deterministic by construction (no atomics):
//   1. preprocess: delta = rowsum(dO * O) and lse * log2(e) per (batch, head, row), into the
//      caller's workspace;
//   2. dK/dV: one block per (key block, kv head, batch), looping over the query blocks of every
//      query head of its GQA group, so dK/dV of a kv head are summed in registers;
//   3. dQ: one block per (query block, head, batch), looping over key blocks.
// Splitting dQ from dK/dV recomputes S and dP (7 matmuls instead of FlashAttention 2's 5), the
// design metal-flash-attention uses for GPUs without float atomics. A variant adding dQ with fp32
// atomics from the dK/dV kernel (FlashAttention 2's way) measured slower on the H200 (hdim 128,
// 16k: 137 against 188 TFLOP/s), as did, on the Hopper kernels, element-wise atomics from 64-key
// blocks and TMA bulk reductions from 128-key blocks (docs/PERFORMANCE.md); so there is one
// backward and `deterministic` changes nothing.
#pragma once

#include <cmath>
#include <tuple>
#include <utility>

#include "cuda/kernel_params.cuh"
#include "cuda/mma.cuh"
#include "cuda/tile_io.cuh"

namespace orchard::cuda {

// ---- 1. delta = rowsum(dO * O), lse2 = lse * log2(e) ----------------------------------------

inline constexpr int kDeltaRows = 8;  // one warp per row

// Over the workspace's whole rows (ws_pitch), so that its padding holds delta 0 and lse2 +inf.
template <class T>
__global__ void __launch_bounds__(kDeltaRows * 32) attention_bwd_delta_kernel(const KernelParams p) {
    const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x % 32;
    const int64_t i = int64_t(blockIdx.x) * kDeltaRows + threadIdx.x / 32;
    const Seq s = seq_of(p, b);
    if (i >= p.ws_pitch) return;
    const int64_t at = (int64_t(b) * p.Hq + h) * p.ws_pitch + i;
    if (i >= s.sq) {
        if (lane == 0) p.delta[at] = 0.f, p.lse2[at] = INFINITY;
        return;
    }
    const T* o = row_ptr<T>(p.out, p.out_st, b, s.first_q + i, h);
    const T* dout = row_ptr<T>(p.dout, p.dout_st, b, s.first_q + i, h);
    float acc = 0.f;
    for (int d = lane; d < p.D; d += 32) acc += to_float(o[d]) * to_float(dout[d]);
#pragma unroll
    for (int w = 16; w > 0; w /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, w);
    if (lane == 0) {
        p.delta[at] = acc;
        p.lse2[at] = p.lse[b * p.lse_st.b + h * p.lse_st.h + (s.first_q + i) * p.lse_st.s] * kLog2e;
    }
}

// ---- 2. dK, dV ------------------------------------------------------------------------------

// kBN keys per block (16 per warp), kBM queries per step.
template <int kD_, int kBN_, int kBM_>
struct BwdConfig {
    static constexpr int kD = kD_, kBN = kBN_, kBM = kBM_;
    static constexpr int kWarps = kBN / 16, kThreads = kWarps * 32;
    static constexpr int kP = kRowPitch<kD>;
    static_assert(kBN % 16 == 0 && kBM % 16 == 0 && kD % 16 == 0);
    // dK/dV kernel: sK, sV (kBN x kP); two stages of sQ, sdO (kBM x kP); two stages of lse, delta.
    static constexpr size_t kDkvSmem = size_t(2 * kBN + 4 * kBM) * kP * 2 + 4 * kBM * 4;
    // dQ kernel (kBN queries per block, kBM keys per step): sQ, sdO; two stages of sK, sV.
    static constexpr size_t kDqSmem = size_t(2 * kBN + 4 * kBM) * kP * 2;
    static constexpr size_t kSmemBytes = kDkvSmem > kDqSmem ? kDkvSmem : kDqSmem;
};

// The dropout keep bits of a thread's kTiles C tiles (bit 4 * tile + c), one Philox
// call per element: `ij(tile, c)` gives the (query, key) of element c of a tile.
template <int kTiles, class IJ>
__device__ __forceinline__ uint32_t keep_bits(const KernelParams& p, int64_t bh, IJ ij) {
    static_assert(kTiles * 4 <= 32);
    uint32_t bits = 0;
#pragma unroll 1  // Philox is long: a rolled loop keeps its registers out of the hot path
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const auto [i, j] = ij(tile, c);
            if (dropout_word(dropout_words_at(p, bh, i, j), p.k_pos + j) < p.keep_threshold)
                bits |= 1u << (tile * 4 + c);
        }
    return bits;
}

// Scores of kTiles C tiles: the general transform where the call has softcap / ALiBi, then -inf
// where the tile is not fully visible; `ij(tile, c)` gives an element's (query, key). One branch
// per tile and pass (see the forward kernel).
template <int kTiles, class IJ>
__device__ __forceinline__ void transform_and_mask(const KernelParams& p, const Seq& s,
                                                   const ScoreMod& mod, bool full,
                                                   float (&acc)[kTiles][4], IJ ij) {
    if (!mod.plain) {
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const auto [i, j] = ij(tile, c);
                acc[tile][c] = mod.general(acc[tile][c], i + s.diag - j);
            }
    }
    if (!full) {
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const auto [i, j] = ij(tile, c);
                const int64_t rel = j - i - s.diag;
                if (rel < -p.window_left || rel > p.window_right || j >= s.sk) acc[tile][c] = -INFINITY;
            }
    }
}

// The elementwise backward of kTiles C tiles in two phases, so that a kernel can run the first
// while dP is still being multiplied and the second while P z is (the wgmma kernels do):
//   probs: s (scores in log2 units, or raw on the plain path; masked = -inf) -> pz = P * z (the
//     dV operand) and s <- P [* (1 - tanh^2) with softcap], the factor dS needs from the scores;
//   grads: dp <- dS / scale = s * (dp * z - delta): the softmax scale is applied once to dK and
//     dQ when they are stored (one multiply an output element, not one a score),
// with z = keep ? 1 / (1 - p) : 0. lse2_of / delta_of give an element's row (or column) values;
// dist(tile, c) = i + diag - j for softcap. Without dropout (kDropout false) z = 1 needs no
// per-element selects: a third of the elementwise instructions at head dim 64.
template <int kTiles, bool kSoftcap, bool kDropout, class Lse, class Dist>
__device__ __forceinline__ void probs(const ScoreMod& mod, float (&s)[kTiles][4], float (&pz)[kTiles][4],
                                      uint32_t keep, float rp, Lse lse2_of, Dist dist) {
    const float factor = mod.log2_factor();
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float pr = fast_exp2(fmaf(s[tile][c], factor, -lse2_of(tile, c)));
            if constexpr (kDropout) pz[tile][c] = (keep >> (tile * 4 + c)) & 1u ? pr * rp : 0.f;
            else pz[tile][c] = pr;
            if constexpr (kSoftcap) {
                const float t = mod.softcap_tanh(s[tile][c], dist(tile, c));
                s[tile][c] = pr * (1.f - t * t);
            } else {
                s[tile][c] = pr;
            }
        }
}

template <int kTiles, bool kDropout, class Delta>
__device__ __forceinline__ void grads(const float (&s)[kTiles][4], float (&dp)[kTiles][4], uint32_t keep, float rp,
                                      Delta delta_of) {
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float dpz = kDropout ? dp[tile][c] * ((keep >> (tile * 4 + c)) & 1u ? rp : 0.f) : dp[tile][c];
            dp[tile][c] = s[tile][c] * (dpz - delta_of(tile, c));
        }
}

// grads() with the dropout branch taken once per call (tile_probs() does the same for probs()).
template <int kTiles, class Delta>
__device__ __forceinline__ void tile_grads(const KernelParams& p, const float (&s)[kTiles][4],
                                           float (&dp)[kTiles][4], uint32_t keep, Delta delta_of) {
    if (p.dropout) grads<kTiles, true>(s, dp, keep, p.rp_dropout, delta_of);
    else grads<kTiles, false>(s, dp, keep, p.rp_dropout, delta_of);
}

// Phase 1 on kTiles C tiles whose element (tile, c) is (query, key) ij(tile, c): the score
// transform and mask, the dropout keep bits (returned), then probs(). lse2_of as in probs().
template <int kTiles, class IJ, class Lse>
__device__ __forceinline__ uint32_t tile_probs(const KernelParams& p, const Seq& s, const ScoreMod& mod,
                                               int64_t bh, bool full, float (&sc)[kTiles][4],
                                               float (&pz)[kTiles][4], IJ ij, Lse lse2_of) {
    transform_and_mask(p, s, mod, full, sc, ij);
    const uint32_t keep = p.dropout ? keep_bits<kTiles>(p, bh, ij) : ~0u;
    auto dist = [&](int tile, int c) {
        const auto [i, j] = ij(tile, c);
        return i + s.diag - j;
    };
    const float rp = p.rp_dropout;
    if (mod.softcap > 0.f) {
        if (p.dropout) probs<kTiles, true, true>(mod, sc, pz, keep, rp, lse2_of, dist);
        else probs<kTiles, true, false>(mod, sc, pz, keep, rp, lse2_of, dist);
    } else {
        if (p.dropout) probs<kTiles, false, true>(mod, sc, pz, keep, rp, lse2_of, dist);
        else probs<kTiles, false, false>(mod, sc, pz, keep, rp, lse2_of, dist);
    }
    return keep;
}

// Row i's lse (log2 units) and delta; rows past the end get lse = +inf (so p = 0) and delta 0.
__device__ __forceinline__ std::pair<float, float> row_lse_delta(const KernelParams& p, const Seq& s, int b,
                                                                 int h, int64_t i) {
    if (i >= s.sq) return {INFINITY, 0.f};
    const int64_t at = (int64_t(b) * p.Hq + h) * p.ws_pitch + i;
    return {p.lse2[at], p.delta[at]};
}

// Starts copying the lse2 and delta of kRows rows m0.. (m0 a multiple of kRows, kRows of 32 or
// 64: inside the workspace's padded rows) into sLse / sDelta: 16-byte cp.async pieces, so that a
// dK/dV step's prefetch never waits on a global load.
template <int kRows>
__device__ __forceinline__ void load_lse_delta_async(const KernelParams& p, int b, int h, int64_t m0,
                                                     float* sLse, float* sDelta) {
    constexpr int kPieces = kRows / 4;  // of each array
    const int t = threadIdx.x;
    if (t >= 2 * kPieces) return;
    const int64_t at = (int64_t(b) * p.Hq + h) * p.ws_pitch + m0 + (t % kPieces) * 4;
    if (t < kPieces) cp_async_16(sLse + t * 4, p.lse2 + at, true);
    else cp_async_16(sDelta + (t - kPieces) * 4, p.delta + at, true);
}

// The elementwise part of a dK/dV step on a warp's C tiles, shared by the mma.sync and the wgmma
// kernels; st = S^T and dpt = dP^T of its 16 keys n0 + kr.. (rows) x kQT * 8 queries m0..
// (columns); tLse / tDelta: the step's queries; `full`: the block's tile is fully visible.
// Phase 1 (probs_of): st in, pz = P z and st = probs()'s dS factor out; returns the keep bits.
// Phase 2 (dS_of): dpt <- dS / scale (grads()).
template <int kQT>
struct DkdvElems {
    const KernelParams& p;
    const Seq& s;
    const ScoreMod& mod;
    int64_t bh, m0, n0;
    int kr;
    // Element (qt, c): key j = n0 + kr + g + 8 * (c / 2), query i = m0 + qt * 8 + 2t + c % 2.
    __device__ __forceinline__ std::pair<int64_t, int64_t> ij(int qt, int c) const {
        const int lane = threadIdx.x % 32;
        return {m0 + qt * 8 + 2 * (lane % 4) + c % 2, n0 + kr + lane / 4 + 8 * (c / 2)};
    }
    __device__ __forceinline__ static int col(int qt, int c) { return qt * 8 + 2 * (threadIdx.x % 4) + c % 2; }

    __device__ __forceinline__ uint32_t probs_of(bool full, float (&st)[kQT][4], float (&pz)[kQT][4],
                                                 const float* tLse) const {
        return tile_probs(p, s, mod, bh, full, st, pz, [&](int qt, int c) { return ij(qt, c); },
                          [&](int qt, int c) { return tLse[col(qt, c)]; });
    }
    __device__ __forceinline__ void dS_of(const float (&st)[kQT][4], float (&dpt)[kQT][4], uint32_t keep,
                                          const float* tDelta) const {
        tile_grads<kQT>(p, st, dpt, keep, [&](int qt, int c) { return tDelta[col(qt, c)]; });
    }
};

// ... of a dQ step: acc_s = S and acc_dp = dP of a warp's 16 queries m0 + qr.. x kKT * 8 keys
// n0..; lse2 / delta: the thread's rows g and g + 8. Only dS is needed (P z is dropped).
template <int kKT>
struct DqElems {
    const KernelParams& p;
    const Seq& s;
    const ScoreMod& mod;
    int64_t bh, m0;
    int qr;
    int64_t n0;
    // Element (nt, c): query i = m0 + qr + g + 8 * (c / 2), key j = n0 + nt * 8 + 2t + c % 2.
    __device__ __forceinline__ std::pair<int64_t, int64_t> ij(int nt, int c) const {
        const int lane = threadIdx.x % 32;
        return {m0 + qr + lane / 4 + 8 * (c / 2), n0 + nt * 8 + 2 * (lane % 4) + c % 2};
    }
    __device__ __forceinline__ uint32_t probs_of(bool full, float (&acc_s)[kKT][4], const float (&lse2)[2]) const {
        float pz[kKT][4];  // P z is not needed here: the compiler drops it
        return tile_probs(p, s, mod, bh, full, acc_s, pz, [&](int nt, int c) { return ij(nt, c); },
                          [&](int, int c) { return lse2[c / 2]; });
    }
    __device__ __forceinline__ void dS_of(const float (&acc_s)[kKT][4], float (&acc_dp)[kKT][4], uint32_t keep,
                                          const float (&delta)[2]) const {
        tile_grads<kKT>(p, acc_s, acc_dp, keep, [&](int, int c) { return delta[c / 2]; });
    }
};

// A warp's 16 rows of dK or dV (store_key_rows: keys row0.. of kv head hk, times `factor`; a null
// `out` was not asked for) or of both (store_dkdv) from fp32 accumulators, or of dQ (queries
// row0.. of head h). dS was kept unscaled, so dK and dQ take the softmax scale here.
template <class T, int kD>
__device__ __forceinline__ void store_key_rows(void* out, const Strides& st, const KernelParams& p, const Seq& s,
                                               int b, int hk, int64_t row0, const float (&acc)[kD / 8][4],
                                               float factor) {
    if (out == nullptr) return;  // not asked for
    const float f[2] = {factor, factor};
    T* base = static_cast<T*>(out) + b * st.b + s.first_k * st.s + int64_t(hk) * st.h;
    store_rows<kD, T>(base, st.s, row0, s.sk, p.D, acc, f);
}
template <class T, int kD>
__device__ __forceinline__ void store_dkdv(const KernelParams& p, const Seq& s, int b, int hk, int64_t row0,
                                           const float (&acc_dk)[kD / 8][4], const float (&acc_dv)[kD / 8][4]) {
    store_key_rows<T, kD>(p.dk, p.dk_st, p, s, b, hk, row0, acc_dk, p.scale);
    store_key_rows<T, kD>(p.dv, p.dv_st, p, s, b, hk, row0, acc_dv, 1.f);
}
template <class T, int kD>
__device__ __forceinline__ void store_dq(const KernelParams& p, const Seq& s, int b, int h, int64_t row0,
                                         const float (&acc_dq)[kD / 8][4]) {
    const float scale[2] = {p.scale, p.scale};
    T* dq = static_cast<T*>(p.dq) + b * p.dq_st.b + s.first_q * p.dq_st.s + int64_t(h) * p.dq_st.h;
    store_rows<kD, T>(dq, p.dq_st.s, row0, s.sq, p.D, acc_dq, scale);
}

// acc1 = A1 B1^T and acc2 = A2 B2^T for a warp's 16 rows row0.. of A1, A2 (kD columns each) against
// the kN rows of B1, B2 (pitch-kP shared tiles): S^T and dP^T of the dK/dV kernel, S and dP of
// the dQ kernel. A1 and A2 share their fragment addresses, as do B1 and B2.
template <class T, int kD, int kN, int kP>
__device__ __forceinline__ void two_products_nt(float (&acc1)[kN / 8][4], float (&acc2)[kN / 8][4],
                                                const T* a1, const T* a2, int row0, const T* b1,
                                                const T* b2) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t fa1[4], fa2[4];
        const int a_off = (row0 + (lane / 8 & 1) * 8 + lane % 8) * kP + kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(fa1, a1 + a_off);
        ldmatrix_x4(fa2, a2 + a_off);
#pragma unroll
        for (int np = 0; np < kN / 16; ++np) {
            uint32_t fb1[4], fb2[4];
            const int b_off = (np * 16 + (lane / 16) * 8 + lane % 8) * kP + kk * 16 + (lane / 8 & 1) * 8;
            ldmatrix_x4(fb1, b1 + b_off);
            ldmatrix_x4(fb2, b2 + b_off);
            mma_16816<T>(acc1[2 * np], fa1, fb1[0], fb1[1]);
            mma_16816<T>(acc1[2 * np + 1], fa1, fb1[2], fb1[3]);
            mma_16816<T>(acc2[2 * np], fa2, fb2[0], fb2[1]);
            mma_16816<T>(acc2[2 * np + 1], fa2, fb2[2], fb2[3]);
        }
    }
}

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attention_bwd_dkdv_kernel(const KernelParams p) {
    constexpr int kD = Cfg::kD, kBN = Cfg::kBN, kBM = Cfg::kBM, kP = Cfg::kP;
    constexpr int kQT = kBM / 8, kDT = kD / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + kBN * kP;
    T* sQ = sV + kBN * kP;      // [2][kBM][kP]
    T* sdO = sQ + 2 * kBM * kP;  // [2][kBM][kP]
    float* sLse = reinterpret_cast<float*>(sdO + 2 * kBM * kP);  // [2][kBM], log2 units
    float* sDelta = sLse + 2 * kBM;                             // [2][kBM]

    const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t n0 = int64_t(n_block) * kBN;
    if (n0 >= s.sk) return;
    const int group = p.Hq / p.Hkv;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t diag = s.diag;

    const Span qs = queries_seeing(n0, min(n0 + kBN, s.sk), diag, p.window_left, p.window_right, s.sq);
    const int m_first = int(qs.lo / kBM);
    const int m_count = qs.hi > qs.lo ? int((qs.hi + kBM - 1) / kBM) - m_first : 0;
    const int steps = group * m_count;  // (query head, query block) pairs

    const T* k = row_ptr<T>(p.k, p.k_st, b, s.first_k, hk);
    const T* v = row_ptr<T>(p.v, p.v_st, b, s.first_k, hk);
    load_tile_async<kBN, kD, Cfg::kThreads>(sK, k, p.k_st.s, n0, s.sk, p.D);
    load_tile_async<kBN, kD, Cfg::kThreads>(sV, v, p.v_st.s, n0, s.sk, p.D);
    auto load_step = [&](int step, int stage) {
        const int h = hk * group + step / m_count;
        const int64_t m0 = int64_t(m_first + step % m_count) * kBM;
        load_tile_async<kBM, kD, Cfg::kThreads>(sQ + stage * kBM * kP,
                                               row_ptr<T>(p.q, p.q_st, b, s.first_q, h), p.q_st.s,
                                               m0, s.sq, p.D);
        load_tile_async<kBM, kD, Cfg::kThreads>(sdO + stage * kBM * kP,
                                               row_ptr<T>(p.dout, p.dout_st, b, s.first_q, h),
                                               p.dout_st.s, m0, s.sq, p.D);
        load_lse_delta_async<kBM>(p, b, h, m0, sLse + stage * kBM, sDelta + stage * kBM);
    };
    if (steps > 0) load_step(0, 0);
    cp_async_commit();

    float acc_dk[kDT][4] = {}, acc_dv[kDT][4] = {};
    const int kr = warp * 16;  // this warp's first key inside the block
    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        if (step + 1 < steps) {
            load_step(step + 1, stage ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int h = hk * group + step / m_count;
        const int64_t m0 = int64_t(m_first + step % m_count) * kBM;
        const T* tQ = sQ + stage * kBM * kP;
        const T* tdO = sdO + stage * kBM * kP;
        const float* tLse = sLse + stage * kBM;
        const float* tDelta = sDelta + stage * kBM;
        const ScoreMod mod = score_mod(p, b, h);

        // S^T = K Q^T and dP^T = V dO^T: (16 keys x kBM queries) per warp.
        float st[kQT][4] = {}, dpt[kQT][4] = {};
        two_products_nt<T, kD, kBM, kP>(st, dpt, sK, sV, kr, tQ, tdO);

        const DkdvElems<kQT> el{p, s, mod, int64_t(b) * p.Hq + h, m0, n0, kr};
        float pz[kQT][4];
        const uint32_t keep = el.probs_of(tile_fully_visible(p, s, m0, kBM, n0, kBN), st, pz, tLse);
        el.dS_of(st, dpt, keep, tDelta);

        // dV += (P z)^T dO, dK += dS^T Q.
#pragma unroll
        for (int ks = 0; ks < kBM / 16; ++ks) {
            uint32_t ap[4], ads[4];
            c_to_a<T>(ap, pz[2 * ks], pz[2 * ks + 1]);
            c_to_a<T>(ads, dpt[2 * ks], dpt[2 * ks + 1]);
#pragma unroll
            for (int dp = 0; dp < kD / 16; ++dp) {
                uint32_t bo[4], bq[4];
                const int off = (ks * 16 + (lane / 8 & 1) * 8 + lane % 8) * kP + dp * 16 + (lane / 16) * 8;
                ldmatrix_x4_trans(bo, tdO + off);
                ldmatrix_x4_trans(bq, tQ + off);
                mma_16816<T>(acc_dv[2 * dp], ap, bo[0], bo[1]);
                mma_16816<T>(acc_dv[2 * dp + 1], ap, bo[2], bo[3]);
                mma_16816<T>(acc_dk[2 * dp], ads, bq[0], bq[1]);
                mma_16816<T>(acc_dk[2 * dp + 1], ads, bq[2], bq[3]);
            }
        }
        __syncthreads();  // the next prefetch overwrites this stage
    }
    cp_async_wait<0>();  // keys no query sees skip the loop: their K/V copies end here

    store_dkdv<T, kD>(p, s, b, hk, n0 + kr, acc_dk, acc_dv);
}

// ---- 3. dQ ----------------------------------------------------------------------------------

// Same shape of block as dK/dV with the roles swapped: kBN queries per block (16 per warp),
// kBM keys per step.
template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attention_bwd_dq_kernel(const KernelParams p) {
    constexpr int kD = Cfg::kD, kBQ = Cfg::kBN, kBK = Cfg::kBM, kP = Cfg::kP;
    constexpr int kKT = kBK / 8, kDT = kD / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + kBQ * kP;
    T* sK = sdO + kBQ * kP;     // [2][kBK][kP]
    T* sV = sK + 2 * kBK * kP;  // [2][kBK][kP]

    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t m0 = int64_t(m_block) * kBQ;
    if (m0 >= s.sq) return;
    const int hk = h / (p.Hq / p.Hkv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    const ScoreMod mod = score_mod(p, b, h);
    const int64_t bh = int64_t(b) * p.Hq + h;

    const auto [n_first, n_end] = key_tiles(p, s, m0, kBQ, kBK);

    const T* k = row_ptr<T>(p.k, p.k_st, b, s.first_k, hk);
    const T* v = row_ptr<T>(p.v, p.v_st, b, s.first_k, hk);
    load_tile_async<kBQ, kD, Cfg::kThreads>(sQ, row_ptr<T>(p.q, p.q_st, b, s.first_q, h), p.q_st.s,
                                           m0, s.sq, p.D);
    load_tile_async<kBQ, kD, Cfg::kThreads>(sdO, row_ptr<T>(p.dout, p.dout_st, b, s.first_q, h),
                                           p.dout_st.s, m0, s.sq, p.D);
    if (n_first < n_end) {
        load_tile_async<kBK, kD, Cfg::kThreads>(sK, k, p.k_st.s, int64_t(n_first) * kBK, s.sk, p.D);
        load_tile_async<kBK, kD, Cfg::kThreads>(sV, v, p.v_st.s, int64_t(n_first) * kBK, s.sk, p.D);
    }
    cp_async_commit();

    const int qr = warp * 16;  // this warp's first query inside the block
    float lse2[2], delta[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) std::tie(lse2[rr], delta[rr]) = row_lse_delta(p, s, b, h, m0 + qr + g + rr * 8);

    float acc_dq[kDT][4] = {};
    for (int n = n_first; n < n_end; ++n) {
        const int stage = (n - n_first) & 1;
        if (n + 1 < n_end) {
            const int64_t next0 = int64_t(n + 1) * kBK;
            load_tile_async<kBK, kD, Cfg::kThreads>(sK + (stage ^ 1) * kBK * kP, k, p.k_st.s, next0,
                                                   s.sk, p.D);
            load_tile_async<kBK, kD, Cfg::kThreads>(sV + (stage ^ 1) * kBK * kP, v, p.v_st.s, next0,
                                                   s.sk, p.D);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* tK = sK + stage * kBK * kP;
        const T* tV = sV + stage * kBK * kP;
        const int64_t n0 = int64_t(n) * kBK;

        // S = Q K^T and dP = dO V^T: (16 queries x kBK keys) per warp.
        float acc_s[kKT][4] = {}, acc_dp[kKT][4] = {};
        two_products_nt<T, kD, kBK, kP>(acc_s, acc_dp, sQ, sdO, qr, tK, tV);

        const DqElems<kKT> el{p, s, mod, bh, m0, qr, n0};
        el.dS_of(acc_s, acc_dp, el.probs_of(tile_fully_visible(p, s, m0, kBQ, n0, kBK), acc_s, lse2), delta);

        // dQ += dS K.
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks) {
            uint32_t a[4];
            c_to_a<T>(a, acc_dp[2 * ks], acc_dp[2 * ks + 1]);
#pragma unroll
            for (int dp = 0; dp < kD / 16; ++dp) {
                uint32_t bk[4];
                ldmatrix_x4_trans(bk, tK + (ks * 16 + (lane / 8 & 1) * 8 + lane % 8) * kP + dp * 16 +
                                          (lane / 16) * 8);
                mma_16816<T>(acc_dq[2 * dp], a, bk[0], bk[1]);
                mma_16816<T>(acc_dq[2 * dp + 1], a, bk[2], bk[3]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    store_dq<T, kD>(p, s, b, h, m0 + qr, acc_dq);
}

// ---- launch ---------------------------------------------------------------------------------

inline bool empty_grid(const dim3& g) { return g.x == 0 || g.y == 0 || g.z == 0; }

// Empty grids (no query, no key, no head) launch nothing; dK/dV still run with no query, to
// write their zeros.
template <class T>
void launch_bwd_delta(const KernelParams& p, cudaStream_t stream) {
    const dim3 grid(unsigned((p.ws_pitch + kDeltaRows - 1) / kDeltaRows), unsigned(p.Hq), unsigned(p.B));
    if (empty_grid(grid)) return;
    attention_bwd_delta_kernel<T><<<grid, kDeltaRows * 32, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "backward preprocess kernel launch");
}

template <class T, class Cfg>
void launch_bwd(const KernelParams& p, cudaStream_t stream) {
    launch_bwd_delta<T>(p, stream);
    const dim3 dkdv_grid(unsigned((p.Sk + Cfg::kBN - 1) / Cfg::kBN), unsigned(p.Hkv), unsigned(p.B));
    if ((p.dk || p.dv) && !empty_grid(dkdv_grid)) {
        auto kernel = attention_bwd_dkdv_kernel<T, Cfg>;
        set_smem(kernel, Cfg::kDkvSmem, "cudaFuncSetAttribute (dK/dV)");
        kernel<<<dkdv_grid, Cfg::kThreads, Cfg::kDkvSmem, stream>>>(p);
        check_cuda(cudaGetLastError(), "backward dK/dV kernel launch");
    }
    if (p.dq) {
        auto kernel = attention_bwd_dq_kernel<T, Cfg>;
        const dim3 grid(unsigned((p.Sq + Cfg::kBN - 1) / Cfg::kBN), unsigned(p.Hq), unsigned(p.B));
        if (!empty_grid(grid)) {
            set_smem(kernel, Cfg::kDqSmem, "cudaFuncSetAttribute (dQ)");
            kernel<<<grid, Cfg::kThreads, Cfg::kDqSmem, stream>>>(p);
            check_cuda(cudaGetLastError(), "backward dQ kernel launch");
        }
    }
}

}  // namespace orchard::cuda
