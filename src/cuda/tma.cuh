// Hopper's Tensor Memory Accelerator (sm_90a) and the shared-memory barriers it completes on: the
// bulk tile loads of a warp-specialised pipeline, where one producer warp issues every load of a
// block and the compute warpgroups only wait for the bytes to land.
//
// A tensor map (CUtensorMap, built on the host by make_tensor_map(), passed to a kernel as a
// __grid_constant__ parameter) describes a (B, S, H, D) tensor of 16-bit elements as the 4-d
// array {D, H, S, B} (fastest first) with the tensor's own strides, and a box of {kCols, 1,
// kRows, 1}: kRows tokens x kCols columns of one head. Boxes reaching past S or D are zero-filled,
// as load_swizzled_async() zero-fills them, and the box lands in shared memory in the swizzle the
// map names: 128 bytes (64 columns) for a SwizzledTile's 64-column stacks, 64 for its 32-column
// stack, 32 for its 16-column one. A SwizzledTile<kRows, kD> is therefore one TMA load per stack
// (load_swizzled_tma), each from its own map (TileMaps). Then the pipeline's parts: the stage
// rings (Ring), the register hand-over (setmaxnreg) and the block's start (ws_block_start).
#pragma once

#include <cuda.h>  // CUtensorMap and its enums; the encode call goes through the runtime's entry point
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_params.cuh"
#include "cuda/wgmma.cuh"

namespace orchard::cuda::sm90 {

// ---- host --------------------------------------------------------------------------------------

// The map of a (B, S, H, D) tensor of 16-bit elements with element strides (sb, ss, sh, 1), boxes
// of box_rows tokens x box_cols columns, in the given swizzle; false where the driver cannot
// describe the tensor (a stride the copy engine cannot take, such as a broadcast's 0, or a driver
// without TMA). Columns at or past D, like tokens at or past S, load as zeros.
inline bool make_tensor_map(CUtensorMap& map, const void* base, int64_t B, int64_t S, int64_t H,
                            int64_t D, int64_t sb, int64_t ss, int64_t sh, int box_rows,
                            int box_cols, CUtensorMapSwizzle swizzle) {
    // cuTensorMapEncodeTiled through the runtime, so that nothing links libcuda directly.
    static const auto encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                             &found) != cudaSuccess ||
            found != cudaDriverEntryPointSuccess)
            fn = nullptr;
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    if (encode == nullptr) return false;
    constexpr int64_t kBytes = 2;  // 16-bit elements
    const cuuint64_t dims[4] = {cuuint64_t(D), cuuint64_t(H), cuuint64_t(S), cuuint64_t(B)};
    const cuuint64_t strides[3] = {cuuint64_t(sh * kBytes), cuuint64_t(ss * kBytes),
                                   cuuint64_t(sb * kBytes)};  // of dims 1..3, in bytes
    const cuuint32_t box[4] = {cuuint32_t(box_cols), 1, cuuint32_t(box_rows), 1};
    const cuuint32_t unit[4] = {1, 1, 1, 1};
    return encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), dims, strides,
                  box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The maps that load a SwizzledTile<kRows, kD> of one tensor: its 64-column stacks, then its
// 32- and 16-column stacks where kD has them.
struct TileMaps {
    CUtensorMap full, half, quarter;
};

// The maps of a (B, S, H, d) tensor (d <= Tile::kD: columns d.. load as zeros), or false.
template <class Tile>
bool make_tile_maps(TileMaps& m, const void* base, int64_t B, int64_t S, int64_t H, int64_t d,
                    int64_t sb, int64_t ss, int64_t sh) {
    auto map = [&](CUtensorMap& out, int cols, CUtensorMapSwizzle swizzle) {
        return make_tensor_map(out, base, B, S, H, d, sb, ss, sh, Tile::kRows, cols, swizzle);
    };
    return (Tile::kFull == 0 || map(m.full, 64, CU_TENSOR_MAP_SWIZZLE_128B)) &&
           (!Tile::kHalf || map(m.half, 32, CU_TENSOR_MAP_SWIZZLE_64B)) &&
           (!Tile::kQuarter || map(m.quarter, 16, CU_TENSOR_MAP_SWIZZLE_32B));
}

// The maps of one of the call's tensors: a query-side one (q, dout; `queries`) or a key-side one
// (k, v). Padded batches: (B, S, H, D) with the tensor's strides. Varlen batches: the packed
// (total, H, D) as one batch entry, which the kernels address from their sequence's first token
// (tma_batch). A box there that reaches past its sequence's end reads the next sequence's rows
// where a padded batch's reads zeros; the kernels never let those rows count: keys past the end
// are masked (P = 0), queries past it have lse2 = +inf in the backward (P = 0) and are not
// stored. (So a NaN or inf in one sequence's k / v can reach another's output through 0 * inf,
// as in FlashAttention 3; finite inputs cannot.)
template <class Tile>
bool make_call_maps(TileMaps& m, const KernelParams& p, const void* base, const Strides& st, bool queries) {
    const bool varlen = p.cu_q != nullptr;
    const int64_t S = varlen ? (queries ? p.total_q : p.total_k) : (queries ? p.Sq : p.Sk);
    // A varlen map's batch stride is never used (one entry): any the encoder accepts.
    return make_tile_maps<Tile>(m, base, varlen ? 1 : p.B, S, queries ? p.Hq : p.Hkv, p.D,
                                varlen ? S * st.s : st.b, st.s, st.h);
}

// ---- device ------------------------------------------------------------------------------------

// The batch coordinate of sequence b in make_call_maps' maps (tokens are s.first_q / s.first_k
// plus the row: 0 for padded batches).
__device__ __forceinline__ int tma_batch(const KernelParams& p, int b) { return p.cu_q != nullptr ? 0 : b; }

// An mbarrier at shared address `bar` (8 bytes, 8-aligned) expecting `count` arrivals per phase.
// One thread initialises; fence_barrier_init() and a block barrier publish it before any use.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// This thread's arrival, announcing `bytes` more to come from bulk copies in this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// A plain arrival (a consumer releasing a stage).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `phase` (0 or 1) has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, int phase) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(phase)
        : "memory");
}

// Starts a TMA load of the box at coordinates (col, h, token, b) of `map` into shared address
// `dst`; its bytes count against `bar`'s transaction count.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int col, int h, int token, int b) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(h), "r"(token), "r"(b), "r"(bar)
        : "memory");
}

// Starts a bulk copy of `bytes` (a multiple of 16) from global `src` to shared `dst` (both
// 16-byte aligned); the bytes count against `bar`'s transaction count.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// Starts adding `bytes` (a multiple of 16) of floats at shared `src` to global `dst` (both 16-byte
// aligned) element by element, atomically per element, as one bulk reduction of this thread's
// current bulk group; bulk_commit() closes the group.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                 "r"(src), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk groups have read their shared memory (kRead) or completed.
template <bool kRead>
__device__ __forceinline__ void bulk_wait_all() {
    if constexpr (kRead) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    else asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// Starts loading tokens [token0, token0 + kRows) of head h, sequence b into the SwizzledTile at
// `tile` (1024-byte aligned), one TMA load per column stack; Tile::kBytes arrive on `bar` (the
// caller announces them with mbarrier_arrive_expect_tx). One thread calls it.
template <class Tile>
__device__ __forceinline__ void load_swizzled_tma(uint32_t tile, const TileMaps& maps,
                                                  uint32_t bar, int h, int token0, int b) {
#pragma unroll
    for (int s = 0; s < Tile::kFull / 64; ++s)
        tma_load_4d(tile + s * Tile::kStackBytes, &maps.full, bar, s * 64, h, token0, b);
    if constexpr (Tile::kHalf)
        tma_load_4d(tile + Tile::kHalfStart, &maps.half, bar, Tile::kFull, h, token0, b);
    if constexpr (Tile::kQuarter)
        tma_load_4d(tile + Tile::kQuarterStart, &maps.quarter, bar, Tile::kD - 16, h, token0, b);
}

// A ring of kStages shared-memory stages that one producer thread fills by TMA and the compute
// threads drain: use i of the ring (the i-th tile through it) lives in stage i % kStages. Each
// stage has a "full" barrier (one arrival, the producer's, plus the tile's bytes) and an "empty"
// one that the compute side arrives on once done reading the stage; the phase of use i is
// i / kStages, so waits test its parity. Who arrives: where threads read a stage themselves
// (ld.shared), every thread, each arrival releasing its own reads (racecheck orders the refill
// after them only so); where only wgmma products read it (kWarpRelease), one arrival a warp
// after its wgmma wait: 8x fewer arrivals, which measured 3-10% faster in the forward.
template <int kStages_, bool kWarpRelease_ = false>
struct Ring {
    static constexpr int kStages = kStages_;
    static constexpr bool kWarpRelease = kWarpRelease_;
    static constexpr int kBarrierBytes = 16 * kStages;  // full[kStages], then empty[kStages]
    uint32_t full;                                      // shared address of the barriers

    __device__ __forceinline__ uint32_t full_of(int i) const { return full + 8 * (i % kStages); }
    __device__ __forceinline__ uint32_t empty_of(int i) const { return full + 8 * (kStages + i % kStages); }
    // `threads`: the compute threads.
    __device__ __forceinline__ void init(int threads) const {
        for (int s = 0; s < kStages; ++s) {
            mbarrier_init(full_of(s), 1);
            mbarrier_init(empty_of(s), kWarpRelease ? threads / 32 : threads);
        }
    }
    // Producer: waits until use i - kStages has released the stage, announces `bytes` for use i
    // and returns the barrier its loads complete on.
    __device__ __forceinline__ uint32_t acquire(int i, uint32_t bytes) const {
        mbarrier_wait(empty_of(i), (i / kStages + 1) & 1);
        mbarrier_arrive_expect_tx(full_of(i), bytes);
        return full_of(i);
    }
    // Compute threads: wait for use i's bytes; release the stage once done reading it.
    __device__ __forceinline__ void wait(int i) const { mbarrier_wait(full_of(i), (i / kStages) & 1); }
    __device__ __forceinline__ void release(int i) const {
        if constexpr (kWarpRelease) {
            __syncwarp();
            if (threadIdx.x % 32 == 0) mbarrier_arrive(empty_of(i));
        } else {
            mbarrier_arrive(empty_of(i));
        }
    }
};

// A barrier of `threads` threads (a multiple of 32; whole warps arrive) other than the block's:
// `id` 1..15 (0 is __syncthreads').
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Counts this thread's arrival at barrier `id` (of `threads` in all) without waiting for it.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Warp specialisation: a warpgroup gives registers back to the block's pool (dec) or takes
// them from it (inc), so that a producer group holding few lets the compute groups hold more than
// the launch's even share. Every warp of the group executes it; kRegs is a multiple of 8 in
// [24, 256]. A block of one producer and `compute_groups` compute warpgroups, `blocks` an SM,
// starts with 65536 / (blocks * threads) registers a thread rounded down to 8 (__launch_bounds__
// makes ptxas allocate exactly that where the kernel uses setmaxnreg); the producer keeps
// kProducerRegs and the compute groups share the rest.
inline constexpr int kProducerRegs = 24;
constexpr int compute_regs(int compute_groups, int blocks) {
    const int threads = 128 * (compute_groups + 1);
    const int pool = 65536 / (blocks * threads) / 8 * 8 * threads;
    const int regs = (pool - 128 * kProducerRegs) / (128 * compute_groups) / 8 * 8;
    return regs < 256 ? regs : 256;
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// The start of a warp-specialised block (one producer warpgroup, then the compute warpgroups):
// thread 0 initialises the barrier of the block's own tiles (`own`, one arrival) and the rings
// (drained by `compute_threads`) and publishes them with the block's last barrier; then the
// producer group gives its registers away. True in the producer group: its thread 0 loads, the
// others are done. The compute groups take their registers with setmaxnreg_inc.
template <class... Rings>
__device__ __forceinline__ bool ws_block_start(uint32_t own, int compute_threads, const Rings&... rings) {
    if (threadIdx.x == 0) {
        mbarrier_init(own, 1);
        (rings.init(compute_threads), ...);
        fence_barrier_init();
    }
    __syncthreads();
    if (threadIdx.x >= 128) return false;
    setmaxnreg_dec<kProducerRegs>();
    return true;
}

}  // namespace orchard::cuda::sm90
