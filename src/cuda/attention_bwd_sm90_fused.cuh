// The fused warp-specialised Hopper backward (sm_90a), FlashAttention 3's layout. One kernel per
// block of keys computes dK and dV as the dK/dV kernel of attention_bwd_sm90_ws.cuh does (same
// producer, same steps) and, from each step's dS, that step's share of dQ,
//   dQ[m0 .. m0 + 64) += dS K   (64 queries x kD, over the block's keys),
// which it adds to an fp32 workspace (KernelParams::dq_accum) with TMA bulk reductions; a last
// kernel scales the sums and writes dQ. Five products a step where the two kernels of the
// unfused backward do seven (their dQ kernel recomputes S and dP). The order of the additions
// varies from run to run, so `deterministic` keeps the two kernels (backend.cu then leaves
// dq_accum null), as do head dims other than 64 and 128.
//
// A step of compute warpgroup w (keys 64w.. of the block):
//   dkdv_step (S^T, dP^T, P, dV, dS, dK), also writing its rows of dS^T into sdS[i % 2],
//   waiting at a barrier of the compute groups for every group's rows, and multiplying dQ
//   columns [w kNq, (w + 1) kNq) = dS K (dS^T read as an MN-major A, K as an MN-major B);
//   the accumulators to the group's part of sdQ, then an arrival (no wait) at the part's "full"
//   barrier. The dQ writer, warp 1 of the producer group, waits there and starts the bulk
//   reduction of the part into dq_accum (reduce_dq_parts). Before, a barrier of the group and
//   one of its threads did that: the writer took 2.64 -> 2.54 ms at head dim 128, 4 x 4k (ncu),
//   +2.6 to +4.9% in same-run A/Bs from 4k (bf16, H200; head dim 64 within +-2%).
// dQ is started before dK and written out while dK is multiplied: after dK, the tensor cores
// idled while the groups stored dQ (13% of the stall samples at head dim 128; same-run A/B on
// the H200, bf16: +1 to +5%). At head dim 64 (one group, two blocks an SM) that order measured
// 1.5-3% slower while the group itself issued the reductions, and +1 to +4% with the writer.
// sdS has two stages: a group writes stage i % 2 after the barrier of step i - 1, which every
// group reaches only once its dQ product of step i - 2 has read that stage. sdQ has one part a
// group: the writer hands a part back (its "free" barrier) once the reduction has read it, and
// the group waits for that before writing the part again, a whole step later.
//
// dq_accum: per (sequence, head, 64-query block) a tile of 64 x kD floats, kWG parts of 64 x kNq
// (columns w kNq..), each in the accumulators' order: float4 j of compute thread t at float
// (128 j + t) * 4, holding C tile j's four elements (wgmma.cuh): rows 16 (t / 32) + t % 32 / 4
// and 8 more, columns 8 j + 2 (t % 4) and one more. So the sdQ writes and the reductions are
// plain contiguous copies.
#pragma once

#include "cuda/attention_bwd_sm90_ws.cuh"
#include "cuda/launch.h"

namespace orchard::cuda::sm90 {

// Named barriers of the dQ parts, one each a compute group: written (the group arrives, the
// writer waits) and read (the writer arrives, the group waits); 128 + 32 threads.
inline constexpr int kDqFull = 2, kDqFree = 4, kDqPartThreads = 128 + 32;

// kD = 64 or 128 (launch.h: fused_bwd_head_dim); kWG compute groups of 64 keys each.
template <int kD_, int kWG_, int kMinBlocks_ = 1, int kStages_ = 2>
struct FusedBwdConfig : WsBwdConfig<kD_, kWG_, kMinBlocks_, kStages_> {
    using Base = WsBwdConfig<kD_, kWG_, kMinBlocks_, kStages_>;
    static_assert(fused_bwd_head_dim(kD_));
    static constexpr int kDqCols = kD_ / kWG_;  // dQ columns a group multiplies (wgmma N: 64 or 128)
    using DsTile = SwizzledTile<Base::kBlock, Base::kStep>;  // dS^T: the block's keys x the step's queries
    static constexpr int kDqPartBytes = Base::kStep * kDqCols * 4;
    // The dK/dV kernel's memory, then (1024-aligned) two stages of dS^T and a dQ part per group.
    static constexpr size_t kSmem = Base::kDkvSmem + 1024 + 2 * DsTile::kBytes + kWG_ * kDqPartBytes;
};

// The first float of the dq_accum tile of queries m0.. (a multiple of 64) of head h, sequence b.
__device__ __forceinline__ int64_t dq_accum_tile(const KernelParams& p, int b, int h, int64_t m0, int kD) {
    return ((int64_t(b) * p.Hq + h) * (p.ws_pitch / 64) + m0 / 64) * 64 * kD;
}

// dkdv_step's use of dS^T in the fused kernel: store() writes the warp's rows into stage tDs;
// before_dk() waits for every group's rows and starts the group's dQ product into acc_dq;
// after_dk(), while dK runs, writes the finished product into the group's part of sdQ, once the
// writer has read the part's last sums, and tells the writer.
template <class T, class Cfg>
struct DqFromDs {
    using DsTile = typename Cfg::DsTile;
    using KTile = typename Cfg::BlockTile;
    static constexpr int kNq = Cfg::kDqCols;
    uint32_t tDs, sK, part;
    int kr, wg, t;
    float (&acc_dq)[kNq / 2];

    __device__ __forceinline__ void store(const uint32_t (&ads)[Cfg::kStep / 16][4]) const {
        store_a_tile<DsTile>(tDs, kr, 0, ads);
        fence_async_smem();  // before the dQ products read them
    }
    __device__ __forceinline__ void before_dk() const {
        named_barrier_sync(1, 128 * Cfg::kWG);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Cfg::kBlock / 16; ++kk)
            wgmma_ss<T, kNq, true, true>(acc_dq, mn_major<DsTile>(tDs, kk), mn_major<KTile>(sK, kk, wg * kNq), kk > 0);
        wgmma_commit();
    }
    __device__ __forceinline__ void after_dk() const {
        wgmma_wait<1>();  // dQ (and everything before it) is in; dK may still run
        fence_regs(acc_dq);
        named_barrier_sync(kDqFree + wg, kDqPartThreads);
#pragma unroll
        for (int j = 0; j < kNq / 8; ++j)
            asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(part + (j * 128 + t) * 16),
                         "f"(acc_dq[4 * j]), "f"(acc_dq[4 * j + 1]), "f"(acc_dq[4 * j + 2]), "f"(acc_dq[4 * j + 3])
                         : "memory");
        fence_async_smem();  // before the bulk reduction reads them
        named_barrier_arrive(kDqFull + wg, kDqPartThreads);
    }
};

// The dQ writer (warp 1 of the producer group): for each step and compute group, waits until the
// group has written its part of sdQ and starts the part's bulk reduction into the step's
// dq_accum tile; once a step's reductions have read sdQ, hands the parts back.
template <class Cfg>
__device__ __forceinline__ void reduce_dq_parts(const KernelParams& p, const DkdvSteps& steps, int b, uint32_t sdQ) {
    const int n = steps.count(), lane = threadIdx.x % 32;
    if (n == 0) return;  // no step: the groups never write (nor wait for) a part
#pragma unroll
    for (int w = 0; w < Cfg::kWG; ++w) named_barrier_arrive(kDqFree + w, kDqPartThreads);
    for (int i = 0; i < n; ++i) {
        float* tile = p.dq_accum + dq_accum_tile(p, b, steps.head(i), steps.m0(i), Cfg::kD);
#pragma unroll
        for (int w = 0; w < Cfg::kWG; ++w) {
            named_barrier_sync(kDqFull + w, kDqPartThreads);
            if (lane == 0) {
                bulk_reduce_add_f32(tile + w * Cfg::kStep * Cfg::kDqCols, sdQ + w * Cfg::kDqPartBytes,
                                    Cfg::kDqPartBytes);
                bulk_commit();
            }
        }
        if (i + 1 < n) {
            if (lane == 0) bulk_wait_all<true>();
            __syncwarp();
#pragma unroll
            for (int w = 0; w < Cfg::kWG; ++w) named_barrier_arrive(kDqFree + w, kDqPartThreads);
        }
    }
    if (lane == 0) bulk_wait_all<false>();  // every sum is in dq_accum before the block ends
}

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_bwd_fused_kernel(const KernelParams p, const __grid_constant__ BwdMaps maps, bool longest_first) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int kDT = Cfg::kD / 8, kBN = Cfg::kBlock, kBM = Cfg::kStep, kNq = Cfg::kDqCols;
    using DsTile = typename Cfg::DsTile;
    extern __shared__ unsigned char smem_raw[];
    const DkdvLayout<Cfg> l((smem_addr(smem_raw) + 1023) & ~1023u);
    const uint32_t sdS = (l.end + 1023) & ~1023u;   // [2] DsTile
    const uint32_t sdQ = sdS + 2 * DsTile::kBytes;  // [kWG] parts of kBM x kNq floats
    // A one-dimensional grid of (key block, kv head, sequence) units, key blocks fastest, or
    // slowest where longest_first (launch_bwd_fused).
    const int n_blocks = int((p.Sk + kBN - 1) / kBN), heads = p.Hkv * p.B, unit = int(blockIdx.x);
    const int n_block = longest_first ? unit / heads : unit % n_blocks;
    const int hb = longest_first ? unit % heads : unit / n_blocks, b = hb / p.Hkv;
    const Seq s = seq_of(p, b);
    const int64_t n0 = int64_t(n_block) * kBN;
    if (n0 >= s.sk) return;  // past a varlen sequence's keys: nothing to load, add or store
    const DkdvSteps steps(p, s, hb % p.Hkv, n0, kBN, kBM);

    if (ws_block_start(l.kv_full, 128 * Cfg::kWG, l.ring)) {  // the producer group
        if (threadIdx.x == 0) produce_dkdv<Cfg>(p, maps, l, steps, s, b, int(n0));
        if (threadIdx.x / 32 == 1) reduce_dq_parts<Cfg>(p, steps, b, sdQ);
        return;
    }

    setmaxnreg_inc<Cfg::kComputeRegs>();
    const int wg = threadIdx.x / 128 - 1, t = threadIdx.x % 128, warp = threadIdx.x / 32 - 4;
    const int kr = warp * 16;  // this warp's first key inside the block
    const uint32_t part = sdQ + wg * Cfg::kDqPartBytes;
    float acc_dk[kDT][4] = {}, acc_dv[kDT][4] = {}, acc_dq[kNq / 2];
    mbarrier_wait(l.kv_full, 0);  // also where no query sees the block: no load outlives it
    for (int i = 0; i < steps.count(); ++i) {
        const int h = steps.head(i);
        const int64_t m0 = steps.m0(i);
        const DqFromDs<T, Cfg> dq{sdS + (i & 1) * DsTile::kBytes, l.sK, part, kr, wg, t, acc_dq};
        l.ring.wait(i);
        dkdv_step<T, Cfg>(p, s, b, h, m0, n0, kr, l.sK, l.sV, l.q(i), l.dout(i), l.lse(smem_raw, i),
                          l.delta(smem_raw, i), acc_dk, acc_dv, dq);
        l.ring.release(i);
    }
    store_dkdv<T, Cfg::kD>(p, s, b, steps.hk, n0 + kr, acc_dk, acc_dv);
#else
    __trap();  // compiled for an architecture without wgmma: never launched (backend.cu)
#endif
}

// dQ = scale * dq_accum for one 64-query tile (blockIdx.x) of head blockIdx.y, sequence
// blockIdx.z. A task is 8 columns of a row pair (r, r + 8): four float4s of four consecutive
// threads' fragments (see above), two 16-byte stores.
template <class T, class Cfg>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(const KernelParams p) {
    constexpr int kD = Cfg::kD, kNq = Cfg::kDqCols;
    const int h = blockIdx.y, b = blockIdx.z;
    const int64_t m0 = int64_t(blockIdx.x) * 64;
    const Seq s = seq_of(p, b);
    const float* tile = p.dq_accum + dq_accum_tile(p, b, h, m0, kD);
    T* dq = static_cast<T*>(p.dq) + b * p.dq_st.b + s.first_q * p.dq_st.s + int64_t(h) * p.dq_st.h;
    for (int task = threadIdx.x; task < 32 * (kD / 8); task += blockDim.x) {
        const int col = task % (kD / 8) * 8, pair = task / (kD / 8), r = pair / 8 * 16 + pair % 8;
        if (col >= p.D) continue;
        const float4* src = reinterpret_cast<const float4*>(tile + col / kNq * 64 * kNq) +
                            (col % kNq / 8 * 128 + 32 * (r / 16) + 4 * (r % 8));
        uint32_t lo[4], hi[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const float4 v = src[u];
            lo[u] = pack2<T>(v.x * p.scale, v.y * p.scale);
            hi[u] = pack2<T>(v.z * p.scale, v.w * p.scale);
        }
        if (m0 + r < s.sq)
            *reinterpret_cast<uint4*>(dq + (m0 + r) * p.dq_st.s + col) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
        if (m0 + r + 8 < s.sq)
            *reinterpret_cast<uint4*>(dq + (m0 + r + 8) * p.dq_st.s + col) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    }
}

// Launches the delta preprocess, the zeroing of dq_accum, the fused kernel and the conversion
// where they apply (dq_accum given, dQ and dK or dV wanted, ws_bwd_applies, tensors TMA can
// describe); false, having launched nothing, where they do not.
template <class T, class Cfg>
bool launch_bwd_fused(const KernelParams& p, cudaStream_t stream) {
    const int64_t units = (p.Sk + Cfg::kBlock - 1) / Cfg::kBlock * p.Hkv * p.B;  // a one-dimensional grid
    if (p.dq_accum == nullptr || p.dq == nullptr || !(p.dk || p.dv) || !ws_bwd_applies(p) || units > INT32_MAX)
        return false;
    BwdMaps maps{};
    if (!make_dkdv_maps<Cfg>(maps, p)) return false;
    launch_bwd_delta<T>(p, stream);
    const size_t accum_bytes = size_t(p.B) * p.Hq * p.ws_pitch * Cfg::kD * sizeof(float);
    check_cuda(cudaMemsetAsync(p.dq_accum, 0, accum_bytes, stream), "cudaMemsetAsync (backward dQ sums)");
    // Under a causal mask (a right window) a block's work shrinks with its index: the first
    // blocks, which the most queries see, are the longest. Where the grid is a few waves, those
    // of every (head, sequence) start before any second ones, so that the last wave holds short
    // blocks: StarCoder2-3B at 4k (256 blocks, two waves) 383 against 290 TFLOP/s on the H200.
    // Where it is many, a head's blocks run together and share their Q and dO reads in L2:
    // longest-first ran 10-32% slower there (head dims 64 and 128, causal, 1k-4k).
    const bool longest_first = p.window_right < kUnbounded && units <= 4 * int64_t(p.sms) * Cfg::kMinBlocks;
    if (units > 0) {  // without keys dQ is the zeros the conversion writes
        auto kernel = attention_bwd_fused_kernel<T, Cfg>;
        set_smem(kernel, Cfg::kSmem, "cudaFuncSetAttribute (fused backward)");
        kernel<<<unsigned(units), Cfg::kThreads, Cfg::kSmem, stream>>>(p, maps, longest_first);
        check_cuda(cudaGetLastError(), "fused backward kernel launch");
    }
    const dim3 convert_grid(unsigned(p.ws_pitch / 64), unsigned(p.Hq), unsigned(p.B));
    if (!empty_grid(convert_grid)) {
        attention_bwd_dq_convert_kernel<T, Cfg><<<convert_grid, 256, 0, stream>>>(p);
        check_cuda(cudaGetLastError(), "backward dQ conversion kernel launch");
    }
    return true;
}

// The fused kernel where it applies: two compute groups and 128 keys a block at head dim 128; one
// group, 64 keys, two blocks an SM at 64 (against two groups: +8% at 1k tokens, within 1% from
// 16k on the H200). Else the warp-specialised two-kernel backward (p.tma, tensors TMA can
// describe), in the shapes that measured fastest on the H200 (bf16, same run;
// docs/PERFORMANCE.md): one compute group a block and two blocks an SM up to kD = 96, two groups
// and one block at 128 (against BwdShapes' kernels: +10 to +20% at 64, +50% at 80 and 96, +4 to
// +23% at 128). Else the cp.async ones.
template <class T, int kD>
void run_bwd(const KernelParams& p, cudaStream_t stream) {
    if constexpr (fused_bwd_head_dim(kD))
        if (p.tma && launch_bwd_fused<T, FusedBwdConfig<kD, kD == 64 ? 1 : 2, kD == 64 ? 2 : 1>>(p, stream))
            return;
    using Ws = std::conditional_t<kD == 128, WsBwdConfig<kD, 2, 1>, WsBwdConfig<kD, 1, 2>>;
    if (p.tma && launch_bwd_ws<T, Ws, Ws>(p, stream)) return;
    using Shapes = BwdShapes<kD>;
    launch_bwd<T, typename Shapes::Dkv, typename Shapes::Dq>(p, stream);
}

}  // namespace orchard::cuda::sm90
