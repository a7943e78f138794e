// The warp-specialised Hopper backward (sm_90a), for padded (not varlen) batches whose tensors
// the copy engine can describe (launch_bwd_ws says false otherwise, and the kernels of
// attention_bwd_sm90.cuh run; run_bwd() picks). Same two kernels and the same steps (dkdv_step,
// dq_step) as those; what changes is how tiles arrive. Warpgroup 0 is the producer: one of its
// threads loads the block's own tiles once and every step's tiles into a ring of kStages stages
// by TMA (and a dK/dV step's lse and delta by a bulk copy), and the group gives most of its
// registers to the compute groups (setmaxnreg). Warpgroups 1..kWG each own 64 of the block's
// keys (dK/dV) or queries (dQ), wait on a stage's barrier for its bytes and release it once their
// products have read it, never waiting for each other.
#pragma once

#include "cuda/attention_bwd_sm90.cuh"
#include "cuda/tma.cuh"

namespace orchard::cuda::sm90 {

// kWG compute warpgroups a block, kMinBlocks blocks an SM, kStages ring stages.
template <int kD_, int kWG_, int kMinBlocks_, int kStages_ = 2>
struct WsBwdConfig {
    static constexpr int kD = kD_, kWG = kWG_, kMinBlocks = kMinBlocks_, kStages = kStages_;
    static constexpr int kBlock = 64 * kWG, kStep = 64, kThreads = 128 * (kWG + 1);
    static_assert(kD == 64 || kD == 80 || kD == 96 || kD == 128);
    static constexpr int kComputeRegs = compute_regs(kWG, kMinBlocks);
    using BlockTile = SwizzledTile<kBlock, kD>;  // the block's K, V (dK/dV) or Q, dO (dQ)
    using StepTile = SwizzledTile<kStep, kD>;    // a step's Q, dO (dK/dV) or K, V (dQ)
    using StepRing = Ring<kStages>;
    // Two block tiles, the ring's step tiles (two a stage; dK/dV also kStep lse2 and delta
    // floats), the block tiles' barrier, the ring's; 1024 to align to the swizzle atom.
    static constexpr size_t kDqSmem =
        2 * BlockTile::kBytes + 2 * kStages * size_t(StepTile::kBytes) + 8 + StepRing::kBarrierBytes + 1024;
    static constexpr size_t kDkvSmem = kDqSmem + 2 * kStages * kStep * 4;
};

// The tensor maps of one kernel: the block's two tensors and the step's two.
struct BwdMaps {
    TileMaps block0, block1, step0, step1;
};

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_bwd_dkdv_ws_kernel(const KernelParams p, const __grid_constant__ BwdMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kD = Cfg::kD, kBN = Cfg::kBlock, kBM = Cfg::kStep, kStages = Cfg::kStages;
    constexpr int kDT = kD / 8;
    using KTile = typename Cfg::BlockTile;
    using QTile = typename Cfg::StepTile;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sK = (smem_addr(smem_raw) + 1023) & ~1023u, sV = sK + KTile::kBytes;
    const uint32_t sQ = sV + KTile::kBytes;             // [kStages]
    const uint32_t sdO = sQ + kStages * QTile::kBytes;  // [kStages]
    const uint32_t sLse = sdO + kStages * QTile::kBytes, sDelta = sLse + kStages * kBM * 4;  // [kStages][kBM] floats
    const uint32_t kv_full = sDelta + kStages * kBM * 4;
    const typename Cfg::StepRing ring{kv_full + 8};

    const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t n0 = int64_t(n_block) * kBN;
    const int group = p.Hq / p.Hkv;
    const Span qs = queries_seeing(n0, min(n0 + kBN, s.sk), s.diag, p.window_left, p.window_right, s.sq);
    const int m_first = int(qs.lo / kBM);
    const int m_count = qs.hi > qs.lo ? int((qs.hi + kBM - 1) / kBM) - m_first : 0;
    const int steps = group * m_count;  // (query head, query block) pairs
    auto head_of = [&](int step) { return hk * group + step / m_count; };
    auto m0_of = [&](int step) { return int64_t(m_first + step % m_count) * kBM; };

    if (ws_block_start(kv_full, 128 * Cfg::kWG, ring)) {  // the producer
        if (threadIdx.x != 0) return;
        mbarrier_arrive_expect_tx(kv_full, 2 * KTile::kBytes);
        load_swizzled_tma<KTile>(sK, maps.block0, kv_full, hk, int(n0), b);
        load_swizzled_tma<KTile>(sV, maps.block1, kv_full, hk, int(n0), b);
        for (int i = 0; i < steps; ++i) {
            const int h = head_of(i), m0 = int(m0_of(i)), stage = i % kStages;
            const uint32_t full = ring.acquire(i, 2 * QTile::kBytes + 2 * kBM * 4);
            load_swizzled_tma<QTile>(sQ + stage * QTile::kBytes, maps.step0, full, h, m0, b);
            load_swizzled_tma<QTile>(sdO + stage * QTile::kBytes, maps.step1, full, h, m0, b);
            const int64_t at = (int64_t(b) * p.Hq + h) * p.ws_pitch + m0;  // inside the padded rows
            bulk_load(sLse + stage * kBM * 4, p.lse2 + at, kBM * 4, full);
            bulk_load(sDelta + stage * kBM * 4, p.delta + at, kBM * 4, full);
        }
        return;
    }

    setmaxnreg_inc<Cfg::kComputeRegs>();
    const int warp = threadIdx.x / 32 - 4;
    float acc_dk[kDT][4] = {}, acc_dv[kDT][4] = {};
    const int kr = warp * 16;  // this warp's first key inside the block
    mbarrier_wait(kv_full, 0);        // also where no query sees the block: no load outlives it
    for (int i = 0; i < steps; ++i) {
        const int h = head_of(i), stage = i % kStages;
        const int64_t m0 = m0_of(i);
        const uint32_t tQ = sQ + stage * QTile::kBytes, tdO = sdO + stage * QTile::kBytes;
        const float* tLse = reinterpret_cast<const float*>(smem_raw + (sLse - smem_addr(smem_raw))) + stage * kBM;
        const float* tDelta = reinterpret_cast<const float*>(smem_raw + (sDelta - smem_addr(smem_raw))) + stage * kBM;
        ring.wait(i);
        dkdv_step<T, Cfg>(p, s, b, h, m0, n0, kr, sK, sV, tQ, tdO, tLse, tDelta, acc_dk, acc_dv);
        ring.release(i);
    }
    store_dkdv<T, kD>(p, s, b, hk, n0 + kr, acc_dk, acc_dv);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_bwd_dq_ws_kernel(const KernelParams p, const __grid_constant__ BwdMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kD = Cfg::kD, kBQ = Cfg::kBlock, kBK = Cfg::kStep, kStages = Cfg::kStages;
    constexpr int kDT = kD / 8;
    using QTile = typename Cfg::BlockTile;
    using KTile = typename Cfg::StepTile;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u, sdO = sQ + QTile::kBytes;
    const uint32_t sK = sdO + QTile::kBytes;            // [kStages]
    const uint32_t sV = sK + kStages * KTile::kBytes;   // [kStages]
    const uint32_t qd_full = sV + kStages * KTile::kBytes;
    const typename Cfg::StepRing ring{qd_full + 8};

    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t m0 = int64_t(m_block) * kBQ;
    const int hk = h / (p.Hq / p.Hkv);
    const auto [n_first, n_end] = key_tiles(p, s, m0, kBQ, kBK);
    const int tiles = n_end - n_first;

    if (ws_block_start(qd_full, 128 * Cfg::kWG, ring)) {  // the producer
        if (threadIdx.x != 0) return;
        mbarrier_arrive_expect_tx(qd_full, 2 * QTile::kBytes);
        load_swizzled_tma<QTile>(sQ, maps.block0, qd_full, h, int(m0), b);
        load_swizzled_tma<QTile>(sdO, maps.block1, qd_full, h, int(m0), b);
        for (int i = 0; i < tiles; ++i) {
            const int stage = i % kStages, n0 = (n_first + i) * kBK;
            const uint32_t full = ring.acquire(i, 2 * KTile::kBytes);
            load_swizzled_tma<KTile>(sK + stage * KTile::kBytes, maps.step0, full, hk, n0, b);
            load_swizzled_tma<KTile>(sV + stage * KTile::kBytes, maps.step1, full, hk, n0, b);
        }
        return;
    }

    setmaxnreg_inc<Cfg::kComputeRegs>();
    const int warp = threadIdx.x / 32 - 4, g = threadIdx.x % 32 / 4;
    const ScoreMod mod = score_mod(p, b, h);
    const int64_t bh = int64_t(b) * p.Hq + h;
    const int qr = warp * 16;  // this warp's first query inside the block
    float lse2[2], delta[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) std::tie(lse2[rr], delta[rr]) = row_lse_delta(p, s, b, h, m0 + qr + g + rr * 8);
    float acc_dq[kDT][4] = {};
    mbarrier_wait(qd_full, 0);  // also where the rows see no key: no load outlives the block
    for (int i = 0; i < tiles; ++i) {
        const int stage = i % kStages;
        const uint32_t tK = sK + stage * KTile::kBytes, tV = sV + stage * KTile::kBytes;
        const int64_t n0 = int64_t(n_first + i) * kBK;
        ring.wait(i);
        dq_step<T, Cfg>(p, s, mod, bh, m0, qr, n0, sQ, sdO, tK, tV, lse2, delta, acc_dq);
        ring.release(i);
    }
    store_dq<T, kD>(p, s, b, h, m0 + qr, acc_dq);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

// Launches the delta preprocess and the warp-specialised kernels where they apply (see above);
// false, having launched nothing, where they do not.
template <class T, class DkvCfg, class DqCfg>
bool launch_bwd_ws(const KernelParams& p, cudaStream_t stream) {
    // The bulk copies of lse2 and delta need 16-byte aligned rows (ws_pitch is a multiple of 64).
    if (p.cu_q != nullptr || reinterpret_cast<uintptr_t>(p.delta) % 16 != 0) return false;
    using KBlock = typename DkvCfg::BlockTile;
    using QStep = typename DkvCfg::StepTile;
    using QBlock = typename DqCfg::BlockTile;
    using KStep = typename DqCfg::StepTile;
    BwdMaps dkdv{}, dq{};
    const bool want_dkdv = p.dk || p.dv, want_dq = p.dq != nullptr;
    if (want_dkdv &&
        !(make_tile_maps<KBlock>(dkdv.block0, p.k, p.B, p.Sk, p.Hkv, p.D, p.k_st.b, p.k_st.s, p.k_st.h) &&
          make_tile_maps<KBlock>(dkdv.block1, p.v, p.B, p.Sk, p.Hkv, p.D, p.v_st.b, p.v_st.s, p.v_st.h) &&
          make_tile_maps<QStep>(dkdv.step0, p.q, p.B, p.Sq, p.Hq, p.D, p.q_st.b, p.q_st.s, p.q_st.h) &&
          make_tile_maps<QStep>(dkdv.step1, p.dout, p.B, p.Sq, p.Hq, p.D, p.dout_st.b, p.dout_st.s, p.dout_st.h)))
        return false;
    if (want_dq &&
        !(make_tile_maps<QBlock>(dq.block0, p.q, p.B, p.Sq, p.Hq, p.D, p.q_st.b, p.q_st.s, p.q_st.h) &&
          make_tile_maps<QBlock>(dq.block1, p.dout, p.B, p.Sq, p.Hq, p.D, p.dout_st.b, p.dout_st.s, p.dout_st.h) &&
          make_tile_maps<KStep>(dq.step0, p.k, p.B, p.Sk, p.Hkv, p.D, p.k_st.b, p.k_st.s, p.k_st.h) &&
          make_tile_maps<KStep>(dq.step1, p.v, p.B, p.Sk, p.Hkv, p.D, p.v_st.b, p.v_st.s, p.v_st.h)))
        return false;
    launch_bwd_delta<T>(p, stream);
    const dim3 dkdv_grid(unsigned((p.Sk + DkvCfg::kBlock - 1) / DkvCfg::kBlock), unsigned(p.Hkv), unsigned(p.B));
    if (want_dkdv && !empty_grid(dkdv_grid)) {
        auto kernel = attention_bwd_dkdv_ws_kernel<T, DkvCfg>;
        set_smem(kernel, DkvCfg::kDkvSmem, "cudaFuncSetAttribute (dK/dV, warp-specialised)");
        kernel<<<dkdv_grid, DkvCfg::kThreads, DkvCfg::kDkvSmem, stream>>>(p, dkdv);
        check_cuda(cudaGetLastError(), "backward dK/dV kernel launch (warp-specialised)");
    }
    const dim3 dq_grid(unsigned((p.Sq + DqCfg::kBlock - 1) / DqCfg::kBlock), unsigned(p.Hq), unsigned(p.B));
    if (want_dq && !empty_grid(dq_grid)) {
        auto kernel = attention_bwd_dq_ws_kernel<T, DqCfg>;
        set_smem(kernel, DqCfg::kDqSmem, "cudaFuncSetAttribute (dQ, warp-specialised)");
        kernel<<<dq_grid, DqCfg::kThreads, DqCfg::kDqSmem, stream>>>(p, dq);
        check_cuda(cudaGetLastError(), "backward dQ kernel launch (warp-specialised)");
    }
    return true;
}

// The warp-specialised kernels wherever they apply (p.tma, no varlen, tensors TMA can describe),
// in the shapes that measured fastest on the H200 (bf16, same run; docs/PERFORMANCE.md): one
// compute warpgroup a block and two blocks an SM up to kD = 96, two warpgroups and one block at
// 128. Against BwdShapes' kernels: +10 to +20% at 64, +50% at 80 and 96 (Phi-2: 169 -> 259
// TFLOP/s), +4 to +23% at 128.
template <class T, int kD>
void run_bwd(const KernelParams& p, cudaStream_t stream) {
    using Ws = std::conditional_t<kD == 128, WsBwdConfig<kD, 2, 1>, WsBwdConfig<kD, 1, 2>>;
    if (p.tma && launch_bwd_ws<T, Ws, Ws>(p, stream)) return;
    using Shapes = BwdShapes<kD>;
    launch_bwd<T, typename Shapes::Dkv, typename Shapes::Dq>(p, stream);
}

}  // namespace orchard::cuda::sm90
