// The warp-specialised Hopper backward (sm_90a), for padded and varlen batches whose tensors the
// copy engine can describe (tma.cuh: make_call_maps; launch_bwd_ws says false otherwise, and the
// kernels of attention_bwd_sm90.cuh run; run_bwd() in attention_bwd_sm90_fused.cuh picks, and takes
// the fused kernel before these where it applies). Same two kernels and the same steps (dkdv_step,
// dq_step) as those; what changes is how tiles arrive. Warpgroup 0 is the producer: one of its
// threads loads the block's own tiles once and every step's tiles into a ring of kStages stages by
// TMA (and a dK/dV step's lse and delta by a bulk copy), and the group gives most of its registers
// to the compute groups (setmaxnreg). Warpgroups 1..kWG each own 64 of the block's keys (dK/dV) or
// queries (dQ), wait on a stage's barrier for its bytes and release it once their products have
// read it, never waiting for each other.
#pragma once

#include "cuda/attention_bwd_sm90.cuh"
#include "cuda/tma.cuh"

namespace orchard::cuda::sm90 {

// kWG compute warpgroups a block, kMinBlocks blocks an SM, kStages ring stages, kStep queries
// (dK/dV) or keys (dQ) a step. Up to kD = 128 for both kernels (dK and dV accumulators: kD
// registers a thread); past it for the dQ kernel only (attention_bwd_sm90_wide.cuh), whose dQ
// accumulator takes kD / 2 registers, with 32-key steps to keep S and dP at 16 each.
template <int kD_, int kWG_, int kMinBlocks_, int kStages_ = 2, int kStep_ = 64>
struct WsBwdConfig {
    static constexpr int kD = kD_, kWG = kWG_, kMinBlocks = kMinBlocks_, kStages = kStages_;
    static constexpr int kBlock = 64 * kWG, kStep = kStep_, kThreads = 128 * (kWG + 1);
    static_assert(kD == 64 || kD == 80 || kD == 96 || kD == 128 || (kD % 32 == 0 && kD <= 256 && kStep == 32));
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

// The dK/dV kernels' shared memory (this file's and, first, the fused one's): the block's K and
// V, the ring's Q and dO tiles, then its lse2 and delta rows ([kStages][kStep] floats each) and
// the barriers; `end` is the first byte past them.
template <class Cfg>
struct DkdvLayout {
    using KTile = typename Cfg::BlockTile;
    using QTile = typename Cfg::StepTile;
    static constexpr int kStages = Cfg::kStages, kBM = Cfg::kStep;
    uint32_t sK, sV, sQ, sdO, sLse, sDelta, kv_full, end;
    typename Cfg::StepRing ring;

    __device__ __forceinline__ explicit DkdvLayout(uint32_t aligned_base)
        : sK(aligned_base), sV(sK + KTile::kBytes), sQ(sV + KTile::kBytes), sdO(sQ + kStages * QTile::kBytes),
          sLse(sdO + kStages * QTile::kBytes), sDelta(sLse + kStages * kBM * 4), kv_full(sDelta + kStages * kBM * 4),
          end(kv_full + 8 + Cfg::StepRing::kBarrierBytes), ring{kv_full + 8} {}
    __device__ __forceinline__ uint32_t q(int i) const { return sQ + i % kStages * QTile::kBytes; }
    __device__ __forceinline__ uint32_t dout(int i) const { return sdO + i % kStages * QTile::kBytes; }
    __device__ __forceinline__ const float* lse(const unsigned char* smem, int i) const {
        return reinterpret_cast<const float*>(smem + (sLse - smem_addr(smem))) + i % kStages * kBM;
    }
    __device__ __forceinline__ const float* delta(const unsigned char* smem, int i) const {
        return reinterpret_cast<const float*>(smem + (sDelta - smem_addr(smem))) + i % kStages * kBM;
    }
};

// The steps of the dK/dV block of keys [n0, n0 + kBlock) of kv head hk: each (query head of its
// group, query block of kStep) pair in which some query sees one of the keys.
struct DkdvSteps {
    int hk, group, m_first, m_count, bm;
    __device__ __forceinline__ DkdvSteps(const KernelParams& p, const Seq& s, int hk_, int64_t n0, int bn, int bm_)
        : hk(hk_), group(p.Hq / p.Hkv), bm(bm_) {
        const Span qs = queries_seeing(n0, min(n0 + bn, s.sk), s.diag, p.window_left, p.window_right, s.sq);
        m_first = int(qs.lo / bm);
        m_count = qs.hi > qs.lo ? int((qs.hi + bm - 1) / bm) - m_first : 0;
    }
    __device__ __forceinline__ int count() const { return group * m_count; }
    __device__ __forceinline__ int head(int i) const { return hk * group + i / m_count; }
    __device__ __forceinline__ int64_t m0(int i) const { return int64_t(m_first + i % m_count) * bm; }
};

// The dK/dV producer: one thread loads the block's K and V, then each step's Q, dO, lse2 and
// delta into the ring.
template <class Cfg>
__device__ __forceinline__ void produce_dkdv(const KernelParams& p, const BwdMaps& maps, const DkdvLayout<Cfg>& l,
                                             const DkdvSteps& steps, const Seq& s, int b, int n0) {
    using KTile = typename Cfg::BlockTile;
    using QTile = typename Cfg::StepTile;
    constexpr int kBM = Cfg::kStep;
    const int tb = tma_batch(p, b);
    mbarrier_arrive_expect_tx(l.kv_full, 2 * KTile::kBytes);
    load_swizzled_tma<KTile>(l.sK, maps.block0, l.kv_full, steps.hk, int(s.first_k) + n0, tb);
    load_swizzled_tma<KTile>(l.sV, maps.block1, l.kv_full, steps.hk, int(s.first_k) + n0, tb);
    for (int i = 0; i < steps.count(); ++i) {
        const int h = steps.head(i), m0 = int(steps.m0(i)), stage = i % Cfg::kStages;
        const uint32_t full = l.ring.acquire(i, 2 * QTile::kBytes + 2 * kBM * 4);
        load_swizzled_tma<QTile>(l.q(i), maps.step0, full, h, int(s.first_q) + m0, tb);
        load_swizzled_tma<QTile>(l.dout(i), maps.step1, full, h, int(s.first_q) + m0, tb);
        const int64_t at = (int64_t(b) * p.Hq + h) * p.ws_pitch + m0;  // inside the padded rows
        bulk_load(l.sLse + stage * kBM * 4, p.lse2 + at, kBM * 4, full);
        bulk_load(l.sDelta + stage * kBM * 4, p.delta + at, kBM * 4, full);
    }
}

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_bwd_dkdv_ws_kernel(const KernelParams p, const __grid_constant__ BwdMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kDT = Cfg::kD / 8;
    extern __shared__ unsigned char smem_raw[];
    const DkdvLayout<Cfg> l((smem_addr(smem_raw) + 1023) & ~1023u);
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t n0 = int64_t(blockIdx.x) * Cfg::kBlock;
    if (n0 >= s.sk) return;  // past a varlen sequence's keys: nothing to load or store
    const DkdvSteps steps(p, s, blockIdx.y, n0, Cfg::kBlock, Cfg::kStep);

    if (ws_block_start(l.kv_full, 128 * Cfg::kWG, l.ring)) {  // the producer
        if (threadIdx.x == 0) produce_dkdv<Cfg>(p, maps, l, steps, s, b, int(n0));
        return;
    }

    setmaxnreg_inc<Cfg::kComputeRegs>();
    const int warp = threadIdx.x / 32 - 4;
    float acc_dk[kDT][4] = {}, acc_dv[kDT][4] = {};
    const int kr = warp * 16;  // this warp's first key inside the block
    mbarrier_wait(l.kv_full, 0);  // also where no query sees the block: no load outlives it
    for (int i = 0; i < steps.count(); ++i) {
        l.ring.wait(i);
        dkdv_step<T, Cfg>(p, s, b, steps.head(i), steps.m0(i), n0, kr, l.sK, l.sV, l.q(i), l.dout(i),
                          l.lse(smem_raw, i), l.delta(smem_raw, i), acc_dk, acc_dv);
        l.ring.release(i);
    }
    store_dkdv<T, Cfg::kD>(p, s, b, steps.hk, n0 + kr, acc_dk, acc_dv);
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
    if (m0 >= s.sq) return;  // past a varlen sequence's queries: nothing to load or store
    const auto [n_first, n_end] = key_tiles(p, s, m0, kBQ, kBK);
    const int tiles = n_end - n_first;

    if (ws_block_start(qd_full, 128 * Cfg::kWG, ring)) {  // the producer
        if (threadIdx.x != 0) return;
        const int tb = tma_batch(p, b);
        mbarrier_arrive_expect_tx(qd_full, 2 * QTile::kBytes);
        load_swizzled_tma<QTile>(sQ, maps.block0, qd_full, h, int(s.first_q + m0), tb);
        load_swizzled_tma<QTile>(sdO, maps.block1, qd_full, h, int(s.first_q + m0), tb);
        for (int i = 0; i < tiles; ++i) {
            const int stage = i % kStages, n0 = int(s.first_k) + (n_first + i) * kBK;
            const uint32_t full = ring.acquire(i, 2 * KTile::kBytes);
            load_swizzled_tma<KTile>(sK + stage * KTile::kBytes, maps.step0, full, hk, n0, tb);
            load_swizzled_tma<KTile>(sV + stage * KTile::kBytes, maps.step1, full, hk, n0, tb);
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

// The maps of the dK/dV kernels (blocks of K and V, steps of Q and dO), or false where TMA
// cannot describe a tensor.
template <class Cfg>
bool make_dkdv_maps(BwdMaps& m, const KernelParams& p) {
    using KBlock = typename Cfg::BlockTile;
    using QStep = typename Cfg::StepTile;
    return make_call_maps<KBlock>(m.block0, p, p.k, p.k_st, false) &&
           make_call_maps<KBlock>(m.block1, p, p.v, p.v_st, false) &&
           make_call_maps<QStep>(m.step0, p, p.q, p.q_st, true) &&
           make_call_maps<QStep>(m.step1, p, p.dout, p.dout_st, true);
}

// Whether the warp-specialised kernels can run: lse2 / delta rows that the bulk copies can take
// (16-byte aligned; ws_pitch is a multiple of 64). The tensors' maps decide the rest.
inline bool ws_bwd_applies(const KernelParams& p) { return reinterpret_cast<uintptr_t>(p.delta) % 16 == 0; }

// The dK/dV kernels' type (this file's, and attention_bwd_sm90_wide.cuh's past head dim 128).
using DkdvWsKernel = void (*)(const KernelParams, const BwdMaps);

// Launches the delta preprocess and the warp-specialised kernels (dkdv_kernel, of DkvCfg's
// shape) where they apply (see above); false, having launched nothing, where they do not.
template <class T, class DkvCfg, class DqCfg>
bool launch_bwd_ws(const KernelParams& p, cudaStream_t stream,
                   DkdvWsKernel dkdv_kernel = attention_bwd_dkdv_ws_kernel<T, DkvCfg>) {
    if (!ws_bwd_applies(p)) return false;
    using QBlock = typename DqCfg::BlockTile;
    using KStep = typename DqCfg::StepTile;
    BwdMaps dkdv{}, dq{};
    const bool want_dkdv = p.dk || p.dv, want_dq = p.dq != nullptr;
    if (want_dkdv && !make_dkdv_maps<DkvCfg>(dkdv, p)) return false;
    if (want_dq &&
        !(make_call_maps<QBlock>(dq.block0, p, p.q, p.q_st, true) &&
          make_call_maps<QBlock>(dq.block1, p, p.dout, p.dout_st, true) &&
          make_call_maps<KStep>(dq.step0, p, p.k, p.k_st, false) &&
          make_call_maps<KStep>(dq.step1, p, p.v, p.v_st, false)))
        return false;
    launch_bwd_delta<T>(p, stream);
    const dim3 dkdv_grid(unsigned((p.Sk + DkvCfg::kBlock - 1) / DkvCfg::kBlock), unsigned(p.Hkv), unsigned(p.B));
    if (want_dkdv && !empty_grid(dkdv_grid)) {
        set_smem(dkdv_kernel, DkvCfg::kDkvSmem, "cudaFuncSetAttribute (dK/dV, warp-specialised)");
        dkdv_kernel<<<dkdv_grid, DkvCfg::kThreads, DkvCfg::kDkvSmem, stream>>>(p, dkdv);
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

}  // namespace orchard::cuda::sm90
