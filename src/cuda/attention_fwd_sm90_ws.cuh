// The warp-specialised Hopper forward (sm_90a), FlashAttention 3's structure, for padded and varlen
// batches whose tensors the copy engine can describe (tma.cuh: make_call_maps; launch_fwd_ws says
// false otherwise, and attention_fwd_sm90_kernel runs). Tiles arrive by TMA instead of cp.async;
// the products, the overlap of P V with the next softmax and the softmax itself are
// attention_fwd_sm90_kernel's. run_fwd() picks between the two.
#pragma once

#include "cuda/attention_fwd_sm90.cuh"
#include "cuda/tma.cuh"

namespace orchard::cuda::sm90 {

// Warpgroup 0 is the producer: one of its threads issues every load of the block by TMA (Q
// once, then K and V tiles into rings of kStages stages each, in the order the loop below uses
// them: K_0, K_1, V_0, K_2, V_1, ...), and the group gives most of its registers to the others
// (setmaxnreg). Warpgroups 1..kWG each own 64 query rows and run attention_fwd_sm90_kernel's
// loop, but wait on a stage's "full" barrier for its bytes instead of on cp.async and a block
// barrier, and free the stage ("empty" barrier, one arrival a warp) as soon as their products
// have read it: the compute groups never wait for each other, and no compute thread spends an
// instruction on addresses or copies.
// kWG compute warpgroups a block, kBN keys a tile, kMinBlocks blocks an SM.
template <int kD_, int kWG_, int kBN_, int kMinBlocks_ = 1, int kStages_ = 2>
struct WsConfig {
    static constexpr int kD = kD_, kWG = kWG_, kBN = kBN_, kMinBlocks = kMinBlocks_, kStages = kStages_;
    static constexpr int kBM = 64 * kWG, kThreads = 128 * (kWG + 1);
    using QTile = SwizzledTile<kBM, kD>;
    using KVTile = SwizzledTile<kBN, kD>;
    static constexpr int kComputeRegs = compute_regs(kWG, kMinBlocks);  // 240 at kWG = 2, 160 at 3
    using KVRing = Ring<kStages, true>;  // only wgmma reads K and V
    // Q, the K and V rings, Q's barrier and the rings' barriers; 1024 to align Q to the swizzle atom.
    static constexpr size_t kSmemBytes =
        QTile::kBytes + 2 * kStages * size_t(KVTile::kBytes) + 8 + 2 * KVRing::kBarrierBytes + 1024;
};

// The tensor maps of one call: Q in boxes of kBM rows, K and V in boxes of kBN.
struct FwdMaps {
    TileMaps q, k, v;
};

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_fwd_ws_kernel(const KernelParams p, const __grid_constant__ FwdMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kD = Cfg::kD, kBM = Cfg::kBM, kBN = Cfg::kBN, kStages = Cfg::kStages;
    constexpr int kNT = kBN / 8, kDT = kD / 8;
    using QTile = typename Cfg::QTile;
    using KVTile = typename Cfg::KVTile;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sK = sQ + QTile::kBytes;             // [kStages]
    const uint32_t sV = sK + kStages * KVTile::kBytes;  // [kStages]
    const uint32_t q_full = sV + kStages * KVTile::kBytes;
    const typename Cfg::KVRing k_ring{q_full + 8}, v_ring{q_full + 8 + Cfg::KVRing::kBarrierBytes};

    const bool longest_first = p.window_right < kUnbounded && p.window_left >= kUnbounded;
    const int m_block = longest_first ? int(gridDim.x - 1 - blockIdx.x) : int(blockIdx.x);
    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t m0 = int64_t(m_block) * kBM;
    const int hk = h / (p.Hq / p.Hkv);
    if (m0 >= s.sq) return;  // past a varlen sequence's queries: nothing to load or store
    const auto [n_first, n_end] = key_tiles(p, s, m0, kBM, kBN);
    const int tiles = n_end - n_first;

    if (ws_block_start(q_full, 128 * Cfg::kWG, k_ring, v_ring)) {  // the producer
        if (threadIdx.x != 0) return;
        mbarrier_arrive_expect_tx(q_full, QTile::kBytes);
        const int tb = tma_batch(p, b);
        load_swizzled_tma<QTile>(sQ, maps.q, q_full, h, int(s.first_q + m0), tb);
        auto load = [&](const typename Cfg::KVRing& ring, uint32_t tiles_at, const TileMaps& map, int i) {
            const uint32_t full = ring.acquire(i, KVTile::kBytes);
            load_swizzled_tma<KVTile>(tiles_at + (i % kStages) * KVTile::kBytes, map, full, hk,
                                      int(s.first_k) + (n_first + i) * kBN, tb);
        };
        for (int i = 0; i <= tiles; ++i) {
            if (i < tiles) load(k_ring, sK, maps.k, i);
            if (i > 0) load(v_ring, sV, maps.v, i - 1);
        }
        return;
    }

    setmaxnreg_inc<Cfg::kComputeRegs>();
    const int warp = threadIdx.x / 32 - 4, wg = warp / 4;
    const ScoreMod mod = score_mod(p, b, h);
    float acc_o[1][kDT][4] = {};
    float(&o)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_o);
    RowStats<1> stats;
    const int warp_row0 = warp * 16;  // first row of this warp inside the block
    uint32_t pf[kBN / 16][4];         // P of the previous tile, as wgmma A fragments
    auto pv = [&](int i) {  // O += P_i V_i, issued
        v_ring.wait(i);
        const uint32_t tV = sV + (i % kStages) * KVTile::kBytes;
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ++ks) wgmma_rs_tile<T, KVTile>(o, pf[ks], tV, ks);
        wgmma_commit();
    };

    mbarrier_wait(q_full, 0);
    // The same overlap as attention_fwd_sm90_kernel: step i issues S_i = Q K_i^T and
    // O += P_{i-1} V_{i-1}, waits for S_i only, computes P_i, then waits for the P V. The loop
    // repeats that kernel's with ring waits and releases in place of cp.async waits and block
    // barriers: a step function shared by both (tried) raised the three-group kernel's register
    // spills from 28 to 300 bytes.
    for (int i = 0; i < tiles; ++i) {
        const int64_t n0 = int64_t(n_first + i) * kBN;
        float acc_s[1][kNT][4];
        float(&sc)[kNT * 4] = reinterpret_cast<float(&)[kNT * 4]>(acc_s);
        k_ring.wait(i);
        wgmma_fence();
        const uint32_t tK = sK + (i % kStages) * KVTile::kBytes;
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk)
            wgmma_ss<T, kBN, false>(sc, k_major<QTile>(sQ, wg * 64, kk), k_major<KVTile>(tK, 0, kk), kk > 0);
        wgmma_commit();
        if (i > 0) {
            pv(i - 1);
            wgmma_wait<1>();
        } else {
            wgmma_wait<0>();
        }
        fence_regs(sc);
        k_ring.release(i);

        float rescale[1][2];
        fwd_softmax_tile(p, s, mod, b, h, m0 + warp_row0, n0, tile_fully_visible(p, s, m0, kBM, n0, kBN),
                         acc_s, stats, rescale);
        wgmma_wait<0>();  // P_{i-1} V_{i-1} is in o; pf and V's stage are free
        fence_regs(o);
        if (i > 0) v_ring.release(i - 1);
        rescale_rows(acc_o, rescale);
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ++ks) c_to_a<T>(pf[ks], acc_s[0][2 * ks], acc_s[0][2 * ks + 1]);
    }
    if (tiles > 0) {  // the last tile's P V
        wgmma_fence();
        pv(tiles - 1);
        wgmma_wait<0>();
        fence_regs(o);
    }
    fwd_epilogue<T, 1, kD>(p, s, b, h, m0 + warp_row0, acc_o, stats);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

// Launches the warp-specialised kernel where it applies (see above); false where it does not.
template <class T, class Cfg>
bool launch_fwd_ws(const KernelParams& p, cudaStream_t stream) {
    FwdMaps maps{};
    if (!make_call_maps<typename Cfg::QTile>(maps.q, p, p.q, p.q_st, true) ||
        !make_call_maps<typename Cfg::KVTile>(maps.k, p, p.k, p.k_st, false) ||
        !make_call_maps<typename Cfg::KVTile>(maps.v, p, p.v, p.v_st, false))
        return false;
    auto kernel = attention_fwd_ws_kernel<T, Cfg>;
    set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute (forward, warp-specialised)");
    const dim3 grid(unsigned((p.Sq + Cfg::kBM - 1) / Cfg::kBM), unsigned(p.Hq), unsigned(p.B));
    if (grid.x * grid.y * grid.z == 0) return true;
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, maps);
    check_cuda(cudaGetLastError(), "forward kernel launch (warp-specialised)");
    return true;
}

// Which kernel and shape runs (measured on the H200, bf16, same-run A/Bs; docs/PERFORMANCE.md).
// The warp-specialised kernel wherever it applies (p.tma, tensors TMA can describe):
// against attention_fwd_sm90_kernel it ran 5-46% faster (hdim 128: +34% at 1k, +46% at 4k).
// Its shape: two compute warpgroups and 128-key tiles up to kD = 128 (64 past it). At kD = 64
// three groups (192 query rows) ran 3-12% faster (1k non-causal, 4k, 16k) but 6% slower causal
// at 1k, where the last, short blocks of a causal grid hold more rows: there one group a block,
// two blocks an SM, runs instead (0.99x flash against 0.92x with two groups, in full runs).
// Three stages instead of two measured -3 to +3%. FlashAttention 3's ping-pong of the two groups'
// products (named barriers, each group issuing S_i and P_{i-1} V_{i-1} in its turn) measured
// -10 to -35%, and -17 to -41% written again in FlashAttention 3's order; tree-reduced row max and
// sum, and O rescaled after S_i is issued, were no better either (docs/PERFORMANCE.md).
// attention_fwd_sm90_kernel (layouts TMA cannot describe, ORCHARD_CUDA_TMA=0): at kD = 128 and at
// most 2048 keys one warpgroup and 64-key tiles ran 1-10% faster than the default shape; at
// kD = 80 the default shape ran as fast as or faster than the others tried
// (docs/bench/cuda-hd80-shapes-2026-12-02.txt).
template <class T, int kD>
void run_fwd(const KernelParams& p, cudaStream_t stream) {
    if (p.tma) {
        constexpr int kBN = kD <= 128 ? 128 : 64;
        if constexpr (kD == 64) {
            const bool short_causal = p.window_right < kUnbounded && p.window_left >= kUnbounded && p.Sk <= 1024;
            if (short_causal ? launch_fwd_ws<T, WsConfig<kD, 1, kBN, 2>>(p, stream)
                             : launch_fwd_ws<T, WsConfig<kD, 3, kBN>>(p, stream))
                return;
        } else {
            if (launch_fwd_ws<T, WsConfig<kD, 2, kBN>>(p, stream)) return;
        }
    }
    if constexpr (kD == 128) {
        if (p.Sk <= 2048) return sm90::launch_fwd<T, FwdConfig<kD, 1, 64>>(p, stream);
    }
    sm90::launch_fwd<T, FwdConfig<kD>>(p, stream);
}

}  // namespace orchard::cuda::sm90
