// The warp-specialised Hopper backward past head dim 128 (kD = 160, 192, 224, 256; sm_90a),
// for the batches attention_bwd_sm90_ws.cuh's kernels take (tensors TMA can describe).
// Deterministic: two kernels, no atomics, as the warp-specialised backward at head dims <= 128.
//
// A 64-key dK/dV block cannot keep both accumulators in one warpgroup (64 x kD floats each: kD
// registers a thread, 256 at kD = 256), so its two compute warpgroups split them: group 0 holds
// dV, group 1 dK, for all 64 keys. A step (64 queries m0.. of one head of the GQA group):
//   group w: S^T and dP^T of the block's 64 keys x queries m0 + 32w.. (N = 32 products), then
//     P z and dS for them, written as bf16 / fp16 into sP[i % 2] and sdS[i % 2] (keys x queries,
//     the next products' K-major A operand);
//   a barrier of the two groups;
//   group 0: dV += (P z)^T dO, group 1: dK += dS^T Q (A from shared memory, N = kD).
// Each group multiplies the same amount (half of S^T and dP^T, one 64 x 64 x kD product).
// sP / sdS have two stages: a group writes stage i % 2 after the barrier of step i - 1, which the
// other group reaches only once its product of step i - 2 (the last reader of that stage) is done.
// The producer warpgroup and the ring of Q, dO, lse and delta tiles are the dK/dV kernel's
// (produce_dkdv, DkdvLayout, DkdvSteps).
//
// The dQ kernel is attention_bwd_dq_ws_kernel with two groups of 64 queries and 32-key steps
// (WsBwdConfig<kD, 2, 1, 2, 32>): its dQ accumulator takes kD / 2 registers a thread, S and dP
// 16 each.
#pragma once

#include "cuda/attention_bwd_sm90_ws.cuh"

namespace orchard::cuda::sm90 {

template <int kD_>
struct WideDkdvConfig {
    static constexpr int kD = kD_, kWG = 2, kMinBlocks = 1, kStages = 2;
    static constexpr int kBlock = 64, kStep = 64, kHalfStep = kStep / 2, kThreads = 128 * (kWG + 1);
    static_assert(kD > 128 && kD <= 256 && kD % 32 == 0);
    static constexpr int kComputeRegs = compute_regs(kWG, kMinBlocks);
    using BlockTile = SwizzledTile<kBlock, kD>;  // the block's K, V
    using StepTile = SwizzledTile<kStep, kD>;    // a step's Q, dO
    using PTile = SwizzledTile<kBlock, kStep>;   // P z or dS, transposed: keys x queries
    using StepRing = Ring<kStages>;
    // Two stages of sP and sdS, then the dK/dV kernel's layout (DkdvLayout); 1024 to align.
    // 231464 bytes at kD = 256, inside the 232448 a Hopper block may have.
    static constexpr size_t kPBytes = 2 * kStages * size_t(PTile::kBytes);
    static constexpr size_t kDkvSmem = kPBytes + 2 * BlockTile::kBytes + 2 * kStages * size_t(StepTile::kBytes) +
                                       2 * kStages * kStep * 4 + 8 + StepRing::kBarrierBytes + 1024;
};

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_bwd_dkdv_wide_kernel(const KernelParams p, const __grid_constant__ BwdMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kD = Cfg::kD, kBN = Cfg::kBlock, kBM = Cfg::kStep, kHalf = Cfg::kHalfStep, kQT = kHalf / 8;
    using KTile = typename Cfg::BlockTile;
    using QTile = typename Cfg::StepTile;
    using PTile = typename Cfg::PTile;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sP = (smem_addr(smem_raw) + 1023) & ~1023u;  // [2] PTile, then sdS [2] PTile
    const uint32_t sdS = sP + 2 * PTile::kBytes;
    const DkdvLayout<Cfg> l(sP + uint32_t(Cfg::kPBytes));
    const int b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t n0 = int64_t(blockIdx.x) * kBN;
    if (n0 >= s.sk) return;  // past a varlen sequence's keys: nothing to load or store
    const DkdvSteps steps(p, s, blockIdx.y, n0, kBN, kBM);

    if (ws_block_start(l.kv_full, 128 * Cfg::kWG, l.ring)) {  // the producer
        if (threadIdx.x == 0) produce_dkdv<Cfg>(p, maps, l, steps, s, b, int(n0));
        return;
    }

    setmaxnreg_inc<Cfg::kComputeRegs>();
    const int wg = threadIdx.x / 128 - 1;  // 0: dV, 1: dK
    const int kr = threadIdx.x / 32 % 4 * 16;  // this warp's first key inside the block
    const int q0 = wg * kHalf;                 // the group's first query inside the step
    float acc[kD / 8][4] = {};                 // dV (group 0) or dK (group 1)
    float(&acc_f)[kD / 2] = reinterpret_cast<float(&)[kD / 2]>(acc);
    mbarrier_wait(l.kv_full, 0);  // also where no query sees the block: no load outlives it
    for (int i = 0; i < steps.count(); ++i) {
        const int h = steps.head(i);
        const int64_t m0 = steps.m0(i), mh = m0 + q0;
        const uint32_t tQ = l.q(i), tdO = l.dout(i);
        const uint32_t tP = sP + (i & 1) * PTile::kBytes, tdS = sdS + (i & 1) * PTile::kBytes;
        l.ring.wait(i);

        // S^T = K Q^T and dP^T = V dO^T for the group's 32 queries, P z while dP^T is multiplied.
        float st[kQT][4], dpt[kQT][4];
        float(&st_f)[kQT * 4] = reinterpret_cast<float(&)[kQT * 4]>(st);
        float(&dpt_f)[kQT * 4] = reinterpret_cast<float(&)[kQT * 4]>(dpt);
        start_scores_t<T, KTile, QTile, kHalf>(st_f, dpt_f, l.sK, l.sV, 0, tQ, tdO, q0);
        wgmma_wait<1>();
        fence_regs(st_f);
        const ScoreMod mod = score_mod(p, b, h);
        const DkdvElems<kQT> el{p, s, mod, int64_t(b) * p.Hq + h, mh, n0, kr};
        float pz[kQT][4];
        const bool full = mh < s.sq && tile_fully_visible(p, s, mh, kHalf, n0, kBN);
        const uint32_t keep = el.probs_of(full, st, pz, l.lse(smem_raw, i) + q0);
        uint32_t a[kHalf / 16][4];
#pragma unroll
        for (int ks = 0; ks < kHalf / 16; ++ks) c_to_a<T>(a[ks], pz[2 * ks], pz[2 * ks + 1]);
        store_a_tile<PTile>(tP, kr, q0, a);
        wgmma_wait<0>();  // dP^T is in
        fence_regs(dpt_f);
        el.dS_of(st, dpt, keep, l.delta(smem_raw, i) + q0);
#pragma unroll
        for (int ks = 0; ks < kHalf / 16; ++ks) c_to_a<T>(a[ks], dpt[2 * ks], dpt[2 * ks + 1]);
        store_a_tile<PTile>(tdS, kr, q0, a);
        fence_async_smem();  // before the other group's products read them
        named_barrier_sync(1, 128 * Cfg::kWG);

        // dV += (P z)^T dO or dK += dS^T Q over the step's 64 queries.
        fence_regs(acc_f);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBM / 16; ++kk)
            wgmma_ss_tile<T, QTile>(acc_f, k_major<PTile>(wg == 0 ? tP : tdS, 0, kk), wg == 0 ? tdO : tQ, kk, true);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(acc_f);
        l.ring.release(i);
    }
    // dS was kept unscaled: dK takes the softmax scale here (store_dkdv's rule).
    if (wg == 0) store_key_rows<T, kD>(p.dv, p.dv_st, p, s, b, steps.hk, n0 + kr, acc, 1.f);
    else store_key_rows<T, kD>(p.dk, p.dk_st, p, s, b, steps.hk, n0 + kr, acc, p.scale);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

// The wide backward where the warp-specialised kernels apply (launch_bwd_ws); false, having
// launched nothing, where they do not.
template <class T, int kD>
bool launch_bwd_wide(const KernelParams& p, cudaStream_t stream) {
    using Dkv = WideDkdvConfig<kD>;
    return launch_bwd_ws<T, Dkv, WsBwdConfig<kD, 2, 1, 2, 32>>(p, stream, attention_bwd_dkdv_wide_kernel<T, Dkv>);
}

}  // namespace orchard::cuda::sm90
