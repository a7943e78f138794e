// The Hopper backward kernels (sm_90a): the algorithm of attention_bwd.cuh (delta preprocess,
// dK/dV per key block looping over its GQA group's query blocks, dQ per query block; no atomics)
// with every product on wgmma. A block is one or two warpgroups, each owning 64 keys (dK/dV) or
// queries (dQ), 16 a warp as in the mma.sync kernels, so the score transform, dropout and
// gradient helpers of attention_bwd.cuh run unchanged on the wgmma accumulators.
//   dK/dV step (64 queries): S^T = K Q^T, dP^T = V dO^T (both operands in shared memory),
//     dV += (P z)^T dO, dK += dS^T Q (P, dS from registers; dO, Q as MN-major operands).
//   dQ step (64 keys): S = Q K^T, dP = dO V^T, dQ += dS K (K as an MN-major operand).
// Within a step the elementwise phases overlap the products still running: P while dP^T (dP)
// is multiplied, dS while dV is.
#pragma once

#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/attention_bwd.cuh"
#include "cuda/wgmma.cuh"

namespace orchard::cuda::sm90 {

// kD = 64, 80, 96 or 128: dK and dV accumulators take kD registers a thread (larger head dims stay
// on mma.sync). A block is kWG warpgroups, each owning 64 of the block's keys (dK/dV) or queries
// (dQ); the warpgroups share the step's tiles (64 queries or keys). kMinBlocks: blocks an SM
// should hold (the register cap, __launch_bounds__). Which shape runs per head dim: run_bwd.
template <int kD_, int kWG_ = 1, int kMinBlocks_ = 2>
struct BwdConfig {
    static constexpr int kD = kD_, kWG = kWG_, kMinBlocks = kMinBlocks_;
    static constexpr int kBlock = 64 * kWG, kStep = 64, kThreads = 128 * kWG;
    static_assert(kD == 64 || kD == 80 || kD == 96 || kD == 128);
    using BlockTile = SwizzledTile<kBlock, kD>;  // the block's K, V (dK/dV) or Q, dO (dQ)
    using StepTile = SwizzledTile<kStep, kD>;    // a step's Q, dO (dK/dV) or K, V (dQ)
    // Block tiles, two stages of two step tiles, (dK/dV) two stages of lse and delta, alignment.
    static constexpr size_t kDkvSmem = 2 * BlockTile::kBytes + 4 * StepTile::kBytes + 4 * kStep * 4 + 1024;
    static constexpr size_t kDqSmem = 2 * BlockTile::kBytes + 4 * StepTile::kBytes + 1024;
};

// The shapes per head dim, measured on the H200 (bf16, FlashAttention's benchmark shapes, same
// run): at 64 a dQ kernel capped to three blocks an SM (163 registers, no spill) ran 3-7% faster
// than with two; at 80 (Phi-2) the same shape ran 1-8% faster causal than two-warpgroup blocks
// (docs/bench/cuda-hd80-shapes-2026-12-02.txt); at 96 two warpgroups a block for both kernels ran
// 2-5% faster; at 128 the one-warpgroup blocks were fastest up to 4k (two-warpgroup dK/dV
// blocks won by 2-3% at 16k).
template <int kD>
struct BwdShapes {
    using Dkv = std::conditional_t<kD == 96, BwdConfig<kD, 2, 1>, BwdConfig<kD>>;
    using Dq = std::conditional_t<kD == 96, BwdConfig<kD, 2, 1>, BwdConfig<kD, 1, kD <= 80 ? 3 : 2>>;
};

// Starts S^T = K Q^T and dP^T = V dO^T of a dK/dV step for the 64 keys krow.. of the block's
// tiles sK, sV against the kN queries qrow.. of the step's tiles tQ, tdO: kD / 16 k-steps each,
// committed separately so that P can be computed while dP^T is multiplied.
template <class T, class KTile, class QTile, int kN>
__device__ __forceinline__ void start_scores_t(float (&st)[kN / 2], float (&dpt)[kN / 2], uint32_t sK, uint32_t sV,
                                               int krow, uint32_t tQ, uint32_t tdO, int qrow) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KTile::kD / 16; ++kk)
        wgmma_ss<T, kN, false>(st, k_major<KTile>(sK, krow, kk), k_major<QTile>(tQ, qrow, kk), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < KTile::kD / 16; ++kk)
        wgmma_ss<T, kN, false>(dpt, k_major<KTile>(sV, krow, kk), k_major<QTile>(tdO, qrow, kk), kk > 0);
    wgmma_commit();
}

// What a dK/dV step does with its dS^T besides dK: nothing (the fused kernel stores it, starts
// dQ before dK and writes dQ out while dK runs).
struct NoDsUse {
    template <class Frags>
    __device__ __forceinline__ void store(const Frags&) const {}
    __device__ __forceinline__ void before_dk() const {}
    __device__ __forceinline__ void after_dk() const {}
};

// One step of the dK/dV kernels (this file's, the warp-specialised and the fused one) for a
// warp's 16 keys (kr.. of the block's keys n0..; its warpgroup's K and V rows in sK, sV) against
// the kStep queries m0.. of head h (tiles tQ, tdO; their lse2 and delta in tLse, tDelta). S^T =
// K Q^T and dP^T = V dO^T, committed separately so that P is computed while dP^T is multiplied;
// dV += (P z)^T dO (dO an MN-major operand) while dS is computed; use_ds.store(dS^T as A
// fragments [kStep / 16][4]) and use_ds.before_dk() (which may commit one product group);
// dK += dS^T Q, and use_ds.after_dk() while it runs. Returns once every product (use_ds's too)
// is done.
template <class T, class Cfg, class UseDs = NoDsUse>
__device__ __forceinline__ void dkdv_step(const KernelParams& p, const Seq& s, int b, int h, int64_t m0, int64_t n0,
                                          int kr, uint32_t sK, uint32_t sV, uint32_t tQ, uint32_t tdO,
                                          const float* tLse, const float* tDelta, float (&acc_dk)[Cfg::kD / 8][4],
                                          float (&acc_dv)[Cfg::kD / 8][4], const UseDs& use_ds = {}) {
    constexpr int kD = Cfg::kD, kBN = Cfg::kBlock, kBM = Cfg::kStep, kQT = kBM / 8, kDT = kD / 8;
    using KTile = typename Cfg::BlockTile;
    using QTile = typename Cfg::StepTile;
    float(&dk)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_dk);
    float(&dv)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_dv);
    const int wg_row = kr / 64 * 64;  // the warpgroup's first key
    const ScoreMod mod = score_mod(p, b, h);
    float st[kQT][4], dpt[kQT][4];
    float(&st_f)[kQT * 4] = reinterpret_cast<float(&)[kQT * 4]>(st);
    float(&dpt_f)[kQT * 4] = reinterpret_cast<float(&)[kQT * 4]>(dpt);
    start_scores_t<T, KTile, QTile, kBM>(st_f, dpt_f, sK, sV, wg_row, tQ, tdO, 0);
    wgmma_wait<1>();
    fence_regs(st_f);

    const DkdvElems<kQT> el{p, s, mod, int64_t(b) * p.Hq + h, m0, n0, kr};
    float pz[kQT][4];
    const uint32_t keep = el.probs_of(tile_fully_visible(p, s, m0, kBM, n0, kBN), st, pz, tLse);
    uint32_t ap[kBM / 16][4], ads[kBM / 16][4];
#pragma unroll
    for (int ks = 0; ks < kBM / 16; ++ks) c_to_a<T>(ap[ks], pz[2 * ks], pz[2 * ks + 1]);
    fence_regs(dv);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBM / 16; ++ks) wgmma_rs_tile<T, QTile>(dv, ap[ks], tdO, ks);
    wgmma_commit();
    wgmma_wait<1>();  // dP^T is in
    fence_regs(dpt_f);
    el.dS_of(st, dpt, keep, tDelta);
#pragma unroll
    for (int ks = 0; ks < kBM / 16; ++ks) c_to_a<T>(ads[ks], dpt[2 * ks], dpt[2 * ks + 1]);
    use_ds.store(ads);
    use_ds.before_dk();
    fence_regs(dk);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBM / 16; ++ks) wgmma_rs_tile<T, QTile>(dk, ads[ks], tQ, ks);
    wgmma_commit();
    use_ds.after_dk();
    wgmma_wait<0>();
    fence_regs(dv);
    fence_regs(dk);
}

// One step of the dQ kernels for a warp's 16 queries (qr.. of the block's queries m0..; its
// warpgroup's Q and dO rows in sQ, sdO; the thread's rows' lse2 and delta) against the kStep keys
// n0.. (tiles tK, tV). S = Q K^T and dP = dO V^T, P while dP is multiplied, then dQ += dS K (K an
// MN-major operand). Returns once every product has read its tiles.
template <class T, class Cfg>
__device__ __forceinline__ void dq_step(const KernelParams& p, const Seq& s, const ScoreMod& mod, int64_t bh,
                                        int64_t m0, int qr, int64_t n0, uint32_t sQ, uint32_t sdO, uint32_t tK,
                                        uint32_t tV, const float (&lse2)[2], const float (&delta)[2],
                                        float (&acc_dq)[Cfg::kD / 8][4]) {
    constexpr int kD = Cfg::kD, kBQ = Cfg::kBlock, kBK = Cfg::kStep, kKT = kBK / 8, kDT = kD / 8;
    using QTile = typename Cfg::BlockTile;
    using KTile = typename Cfg::StepTile;
    float(&dq)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_dq);
    const int wg_row = qr / 64 * 64;  // the warpgroup's first query
    float acc_s[kKT][4], acc_dp[kKT][4];
    float(&s_f)[kKT * 4] = reinterpret_cast<float(&)[kKT * 4]>(acc_s);
    float(&dp_f)[kKT * 4] = reinterpret_cast<float(&)[kKT * 4]>(acc_dp);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
        wgmma_ss<T, kBK, false>(s_f, k_major<QTile>(sQ, wg_row, kk), k_major<KTile>(tK, 0, kk), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
        wgmma_ss<T, kBK, false>(dp_f, k_major<QTile>(sdO, wg_row, kk), k_major<KTile>(tV, 0, kk), kk > 0);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(s_f);
    const DqElems<kKT> el{p, s, mod, bh, m0, qr, n0};
    const uint32_t keep = el.probs_of(tile_fully_visible(p, s, m0, kBQ, n0, kBK), acc_s, lse2);
    wgmma_wait<0>();
    fence_regs(dp_f);
    el.dS_of(acc_s, acc_dp, keep, delta);
    uint32_t a[kBK / 16][4];
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) c_to_a<T>(a[ks], acc_dp[2 * ks], acc_dp[2 * ks + 1]);
    fence_regs(dq);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) wgmma_rs_tile<T, KTile>(dq, a[ks], tK, ks);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dq);
}

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) attention_bwd_dkdv_sm90_kernel(const KernelParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kD = Cfg::kD, kBN = Cfg::kBlock, kBM = Cfg::kStep, kThreads = Cfg::kThreads;
    constexpr int kDT = kD / 8;
    using KTile = typename Cfg::BlockTile;
    using QTile = typename Cfg::StepTile;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sK = (smem_addr(smem_raw) + 1023) & ~1023u, sV = sK + KTile::kBytes;
    const uint32_t sQ = sV + KTile::kBytes;       // [2] stages
    const uint32_t sdO = sQ + 2 * QTile::kBytes;  // [2] stages
    // Then, as plain floats: [2][kBM] lse (log2 units) and [2][kBM] delta.
    float* sLse = reinterpret_cast<float*>(smem_raw + (sdO + 2 * QTile::kBytes - smem_addr(smem_raw)));
    float* sDelta = sLse + 2 * kBM;

    const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t n0 = int64_t(n_block) * kBN;
    if (n0 >= s.sk) return;
    const int group = p.Hq / p.Hkv;
    const int warp = threadIdx.x / 32;
    const int64_t diag = s.diag;

    const Span qs = queries_seeing(n0, min(n0 + kBN, s.sk), diag, p.window_left, p.window_right, s.sq);
    const int m_first = int(qs.lo / kBM);
    const int m_count = qs.hi > qs.lo ? int((qs.hi + kBM - 1) / kBM) - m_first : 0;
    const int steps = group * m_count;  // (query head, query block) pairs

    load_swizzled_async<KTile, kThreads>(sK, row_ptr<T>(p.k, p.k_st, b, s.first_k, hk), p.k_st.s, n0, s.sk, p.D);
    load_swizzled_async<KTile, kThreads>(sV, row_ptr<T>(p.v, p.v_st, b, s.first_k, hk), p.v_st.s, n0, s.sk, p.D);
    auto load_step = [&](int step, int stage) {
        const int h = hk * group + step / m_count;
        const int64_t m0 = int64_t(m_first + step % m_count) * kBM;
        load_swizzled_async<QTile, kThreads>(sQ + stage * QTile::kBytes, row_ptr<T>(p.q, p.q_st, b, s.first_q, h),
                                             p.q_st.s, m0, s.sq, p.D);
        load_swizzled_async<QTile, kThreads>(sdO + stage * QTile::kBytes,
                                             row_ptr<T>(p.dout, p.dout_st, b, s.first_q, h), p.dout_st.s, m0,
                                             s.sq, p.D);
        load_lse_delta_async<kBM>(p, b, h, m0, sLse + stage * kBM, sDelta + stage * kBM);
    };
    if (steps > 0) load_step(0, 0);
    cp_async_commit();

    float acc_dk[kDT][4] = {}, acc_dv[kDT][4] = {};
    const int kr = warp * 16;  // this warp's first key inside the block
    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();  // this step's tiles are in; the other stage's readers are done
        if (step + 1 < steps) load_step(step + 1, stage ^ 1);
        cp_async_commit();
        const int h = hk * group + step / m_count;
        const int64_t m0 = int64_t(m_first + step % m_count) * kBM;
        const uint32_t tQ = sQ + stage * QTile::kBytes, tdO = sdO + stage * QTile::kBytes;
        const float* tLse = sLse + stage * kBM;
        const float* tDelta = sDelta + stage * kBM;
        dkdv_step<T, Cfg>(p, s, b, h, m0, n0, kr, sK, sV, tQ, tdO, tLse, tDelta, acc_dk, acc_dv);
    }
    cp_async_wait<0>();  // keys no query sees skip the loop: their K/V copies end here

    store_dkdv<T, kD>(p, s, b, hk, n0 + kr, acc_dk, acc_dv);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) attention_bwd_dq_sm90_kernel(const KernelParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kD = Cfg::kD, kBQ = Cfg::kBlock, kBK = Cfg::kStep, kThreads = Cfg::kThreads;
    constexpr int kDT = kD / 8;
    using QTile = typename Cfg::BlockTile;
    using KTile = typename Cfg::StepTile;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sdO = sQ + QTile::kBytes;
    const uint32_t sK = sdO + QTile::kBytes;     // [2] stages
    const uint32_t sV = sK + 2 * KTile::kBytes;  // [2] stages

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
    auto load_kv = [&](int n, int stage) {
        const int64_t n0 = int64_t(n) * kBK;
        load_swizzled_async<KTile, kThreads>(sK + stage * KTile::kBytes, k, p.k_st.s, n0, s.sk, p.D);
        load_swizzled_async<KTile, kThreads>(sV + stage * KTile::kBytes, v, p.v_st.s, n0, s.sk, p.D);
    };
    load_swizzled_async<QTile, kThreads>(sQ, row_ptr<T>(p.q, p.q_st, b, s.first_q, h), p.q_st.s, m0, s.sq, p.D);
    load_swizzled_async<QTile, kThreads>(sdO, row_ptr<T>(p.dout, p.dout_st, b, s.first_q, h), p.dout_st.s, m0,
                                         s.sq, p.D);
    if (n_first < n_end) load_kv(n_first, 0);
    cp_async_commit();

    const int qr = warp * 16;  // this warp's first query inside the block
    float lse2[2], delta[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) std::tie(lse2[rr], delta[rr]) = row_lse_delta(p, s, b, h, m0 + qr + g + rr * 8);

    float acc_dq[kDT][4] = {};
    for (int n = n_first; n < n_end; ++n) {
        const int stage = (n - n_first) & 1;
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();
        if (n + 1 < n_end) load_kv(n + 1, stage ^ 1);
        cp_async_commit();
        const uint32_t tK = sK + stage * KTile::kBytes, tV = sV + stage * KTile::kBytes;
        const int64_t n0 = int64_t(n) * kBK;
        dq_step<T, Cfg>(p, s, mod, bh, m0, qr, n0, sQ, sdO, tK, tV, lse2, delta, acc_dq);
    }
    cp_async_wait<0>();

    store_dq<T, kD>(p, s, b, h, m0 + qr, acc_dq);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

template <class T, class DkvCfg, class DqCfg>
void launch_bwd(const KernelParams& p, cudaStream_t stream) {
    launch_bwd_delta<T>(p, stream);
    const dim3 dkdv_grid(unsigned((p.Sk + DkvCfg::kBlock - 1) / DkvCfg::kBlock), unsigned(p.Hkv), unsigned(p.B));
    if ((p.dk || p.dv) && !empty_grid(dkdv_grid)) {
        auto kernel = attention_bwd_dkdv_sm90_kernel<T, DkvCfg>;
        set_smem(kernel, DkvCfg::kDkvSmem, "cudaFuncSetAttribute (dK/dV, sm90)");
        kernel<<<dkdv_grid, DkvCfg::kThreads, DkvCfg::kDkvSmem, stream>>>(p);
        check_cuda(cudaGetLastError(), "backward dK/dV kernel launch (sm90)");
    }
    const dim3 dq_grid(unsigned((p.Sq + DqCfg::kBlock - 1) / DqCfg::kBlock), unsigned(p.Hq), unsigned(p.B));
    if (p.dq && !empty_grid(dq_grid)) {
        auto kernel = attention_bwd_dq_sm90_kernel<T, DqCfg>;
        set_smem(kernel, DqCfg::kDqSmem, "cudaFuncSetAttribute (dQ, sm90)");
        kernel<<<dq_grid, DqCfg::kThreads, DqCfg::kDqSmem, stream>>>(p);
        check_cuda(cudaGetLastError(), "backward dQ kernel launch (sm90)");
    }
}

}  // namespace orchard::cuda::sm90
