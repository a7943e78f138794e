// The Hopper forward kernel (sm_90a): the algorithm of attention_fwd.cuh with both products on
// wgmma. A block of query rows is one or two warpgroups of 64; S = Q K^T reads Q and K from
// shared memory, O += P V takes P from registers (the converted score accumulator) and V from
// shared memory, and overlaps the next tile's softmax. K/V tiles are double-buffered through
// cp.async; the softmax is fwd_softmax_tile(), shared with the mma.sync kernel (both hold a
// warp's scores as 16-row fragments in the same register layout).
#pragma once

#include "cuda/attention_fwd.cuh"
#include "cuda/wgmma.cuh"

namespace orchard::cuda::sm90 {

// kD = 64, 80, 96, 128 or 256; kWG warpgroups of 64 query rows per block, kBN keys per tile.
// Defaults: 128 keys per tile up to kD = 128 (score and output accumulators: 64 + 64 registers a
// thread); 64 past it, where the output alone takes kD / 2. At kD = 64 one warpgroup (and 80 KB
// of shared memory) lets two blocks share an SM, so that one block's loads and softmax overlap the
// other's products; larger head dims need the shared memory of one block of two warpgroups.
// One-warpgroup blocks keep two blocks an SM (kMinBlocks).
template <int kD_, int kWG_ = kD_ == 64 ? 1 : 2, int kBN_ = kD_ <= 128 ? 128 : 64>
struct FwdConfig {
    static constexpr int kD = kD_, kWG = kWG_, kMinBlocks = kWG == 1 ? 2 : 1;
    static constexpr int kBM = 64 * kWG, kBN = kBN_, kThreads = 128 * kWG;
    using QTile = SwizzledTile<kBM, kD>;
    using KVTile = SwizzledTile<kBN, kD>;
    // sQ, then two stages of sK and of sV; 1024 more to align the start to the swizzle atom.
    static constexpr size_t kSmemBytes = QTile::kBytes + 4 * KVTile::kBytes + 1024;
};

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) attention_fwd_sm90_kernel(const KernelParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kD = Cfg::kD, kBM = Cfg::kBM, kBN = Cfg::kBN, kThreads = Cfg::kThreads;
    constexpr int kNT = kBN / 8, kDT = kD / 8;
    using QTile = typename Cfg::QTile;
    using KVTile = typename Cfg::KVTile;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sQ = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t sK = sQ + QTile::kBytes;        // [2] stages
    const uint32_t sV = sK + 2 * KVTile::kBytes;  // [2] stages

    // Causal (a right window, no left one): later query blocks see more keys, so they are started
    // first (blocks start in blockIdx.x order) and the grid's last wave holds the shortest ones.
    const bool longest_first = p.window_right < kUnbounded && p.window_left >= kUnbounded;
    const int m_block = longest_first ? int(gridDim.x - 1 - blockIdx.x) : int(blockIdx.x);
    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t m0 = int64_t(m_block) * kBM;
    if (m0 >= s.sq) return;
    const int hk = h / (p.Hq / p.Hkv);
    const int warp = threadIdx.x / 32, wg = warp / 4;
    const ScoreMod mod = score_mod(p, b, h);

    const T* q = row_ptr<T>(p.q, p.q_st, b, s.first_q, h);
    const T* k = row_ptr<T>(p.k, p.k_st, b, s.first_k, hk);
    const T* v = row_ptr<T>(p.v, p.v_st, b, s.first_k, hk);
    const auto [n_first, n_end] = key_tiles(p, s, m0, kBM, kBN);
    auto load = [&](uint32_t dst, const T* src, int64_t stride, int n) {
        load_swizzled_async<KVTile, kThreads>(dst + (n & 1) * KVTile::kBytes, src, stride,
                                              int64_t(n) * kBN, s.sk, p.D);
    };
    load_swizzled_async<QTile, kThreads>(sQ, q, p.q_st.s, m0, s.sq, p.D);
    if (n_first < n_end) load(sK, k, p.k_st.s, n_first);
    cp_async_commit();

    float acc_o[1][kDT][4] = {};
    float(&o)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_o);
    RowStats<1> stats;
    const int warp_row0 = warp * 16;  // first row of this warp inside the block
    uint32_t pf[kBN / 16][4];         // P of the previous tile, as wgmma A fragments
    // Tile n's P V runs while tile n + 1's softmax does (FlashAttention 3's intra-warpgroup
    // overlap): iteration n issues S_n = Q K_n^T and O += P_{n-1} V_{n-1}, waits for S_n only,
    // computes P_n, then waits for the P V and rescales O. So K runs one tile ahead of V: iteration
    // n loads K_{n+1} and V_n, into the stages K_{n-1} and V_{n-2} left.
    for (int n = n_first; n < n_end; ++n) {
        cp_async_wait<0>();  // K_n and V_{n-1}, for every thread
        fence_async_smem();
        __syncthreads();  // ... and the stages refilled below are no longer read
        if (n + 1 < n_end) load(sK, k, p.k_st.s, n + 1);
        load(sV, v, p.v_st.s, n);
        cp_async_commit();
        const int64_t n0 = int64_t(n) * kBN;

        float acc_s[1][kNT][4];
        float(&sc)[kNT * 4] = reinterpret_cast<float(&)[kNT * 4]>(acc_s);
        wgmma_fence();
        const uint32_t tK = sK + (n & 1) * KVTile::kBytes;
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk)
            wgmma_ss<T, kBN, false>(sc, k_major<QTile>(sQ, wg * 64, kk), k_major<KVTile>(tK, 0, kk), kk > 0);
        wgmma_commit();
        const bool pv = n > n_first;
        if (pv) {
            const uint32_t tV = sV + ((n - 1) & 1) * KVTile::kBytes;
#pragma unroll
            for (int ks = 0; ks < kBN / 16; ++ks) wgmma_rs_tile<T, KVTile>(o, pf[ks], tV, ks);
            wgmma_commit();
            wgmma_wait<1>();
        } else {
            wgmma_wait<0>();
        }
        fence_regs(sc);

        float rescale[1][2];
        fwd_softmax_tile(p, s, mod, b, h, m0 + warp_row0, n0, tile_fully_visible(p, s, m0, kBM, n0, kBN),
                         acc_s, stats, rescale);
        wgmma_wait<0>();  // P_{n-1} V_{n-1} is in o; pf is free
        fence_regs(o);
        rescale_rows(acc_o, rescale);
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ++ks) c_to_a<T>(pf[ks], acc_s[0][2 * ks], acc_s[0][2 * ks + 1]);
    }
    if (n_first < n_end) {  // the last tile's P V
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();
        wgmma_fence();
        const uint32_t tV = sV + ((n_end - 1) & 1) * KVTile::kBytes;
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ++ks) wgmma_rs_tile<T, KVTile>(o, pf[ks], tV, ks);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
    }
    cp_async_wait<0>();  // no copy may outlive the block (rows that see no key skip the loop)

    fwd_epilogue<T, 1, kD>(p, s, b, h, m0 + warp_row0, acc_o, stats);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

template <class T, class Cfg>
void launch_fwd(const KernelParams& p, cudaStream_t stream) {
    auto kernel = attention_fwd_sm90_kernel<T, Cfg>;
    set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute (forward, sm90)");
    const dim3 grid(unsigned((p.Sq + Cfg::kBM - 1) / Cfg::kBM), unsigned(p.Hq), unsigned(p.B));
    if (grid.x * grid.y * grid.z == 0) return;
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "forward kernel launch (sm90)");
}

}  // namespace orchard::cuda::sm90
