// Hopper's warpgroup MMA (sm_90a): wgmma.mma_async m64nNk16 with fp32 accumulators, the
// shared-memory tile layout and matrix descriptors it reads, and the fences around it.
//
// A warpgroup is 4 consecutive warps (128 threads); one wgmma multiplies a 64 x 16 A by a 16 x N
// B into a 64 x N fp32 D. Warp w of the group owns D's rows 16w..16w+15, with exactly the
// mma.m16n8k16 C layout per 8 columns (mma.cuh): D register 4c + e of a thread is C tile c's
// element e. A taken from registers has the mma.m16n8k16 A layout, so c_to_a() turns a score
// accumulator into the next product's A operand here too.
//
// Shared-memory tiles (`SwizzledTile`): kRows x kD elements of 16 bits, kD a multiple of 16,
// stored as kD / 64 column stacks of kRows x 64 elements (128 bytes a row), then as kD's
// remainder needs a stack of kRows x 32 (64 bytes a row) and one of kRows x 16 (32 bytes a row):
// 80 = 64 + 16, 96 = 64 + 32, 112 = 64 + 32 + 16. Row r's 16-byte piece c sits at
// r * 128 + (c ^ r % 8) * 16 in a 64-column stack, at r * 64 + (c ^ r / 2 % 4) * 16 in the
// 32-column one and at r * 32 + (c ^ r / 4 % 2) * 16 in the 16-column one: the 128-, 64- and
// 32-byte swizzles of wgmma's canonical layouts. cp.async writes and wgmma reads of them are free of bank conflicts,
// and the same tile serves as a K-major operand (rows = M or N, columns = K: Q, K, V, dO in
// S = Q K^T) and as an MN-major one (rows = K, columns = N: V in O = P V, dO and Q in the dV / dK
// products).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/mma.cuh"

namespace orchard::cuda::sm90 {

template <int kRows_, int kD_>
struct SwizzledTile {
    static constexpr int kRows = kRows_, kD = kD_;
    static_assert(kD % 16 == 0 && kRows % 32 == 0);
    static constexpr int kFull = kD / 64 * 64;       // columns in 128-byte-row stacks
    static constexpr bool kHalf = kD % 64 >= 32;     // a 32-column stack (columns kFull..)
    static constexpr bool kQuarter = kD % 32 != 0;   // a 16-column stack (the last 16 columns)
    static constexpr int kStackBytes = kRows * 128;
    // Byte offsets of the narrow stacks.
    static constexpr int kHalfStart = kFull / 64 * kStackBytes;
    static constexpr int kQuarterStart = kHalfStart + (kHalf ? kRows * 64 : 0);
    static constexpr int kBytes = kQuarterStart + (kQuarter ? kRows * 32 : 0);

    // Byte offset of element (r, col), col a multiple of 8.
    static __device__ __forceinline__ uint32_t offset(int r, int col) {
        if (kQuarter && col >= kD - 16)
            return uint32_t(kQuarterStart + r * 32 + ((((col - kD + 16) / 8) ^ (r / 4 % 2)) * 16));
        if (kHalf && col >= kFull)
            return uint32_t(kHalfStart + r * 64 + ((((col - kFull) / 8) ^ (r / 2 % 4)) * 16));
        return uint32_t((col / 64) * kStackBytes + r * 128 + ((((col % 64) / 8) ^ (r % 8)) * 16));
    }
};

// Starts copying rows [row0, row0 + kRows) of a (token, dim) slice into a swizzled tile at shared
// address `tile` (1024-byte aligned); rows at or past `rows` and columns at or past `d` are
// zero-filled. Same contract as load_tile_async (tile_io.cuh).
template <class Tile, int kThreads, class T>
__device__ __forceinline__ void load_swizzled_async(uint32_t tile, const T* base, int64_t stride,
                                                    int64_t row0, int64_t rows, int d,
                                                    int tid = threadIdx.x) {
    // Thread tid copies piece tid % kChunks of rows tid / kChunks + i * kRowStep: one pointer
    // step per piece, no division or 64-bit index arithmetic in the loop. Where kChunks does not
    // divide the thread count (12 pieces at head dim 96) the last kThreads % kChunks threads idle.
    constexpr int kChunks = Tile::kD / 8, kRowStep = kThreads / kChunks;
    if (tid >= kRowStep * kChunks) return;
    const int col = (tid % kChunks) * 8, r0 = tid / kChunks;
    const int64_t left = rows - row0;  // rows of the slice from row0 on
    const bool col_ok = col < d;
    const T* src = base + (row0 + r0) * stride + col;
#pragma unroll
    for (int i = 0; i < (Tile::kRows + kRowStep - 1) / kRowStep; ++i, src += kRowStep * stride) {
        const int r = r0 + i * kRowStep;
        if (Tile::kRows % kRowStep != 0 && r >= Tile::kRows) break;
        const bool valid = col_ok && r < left;
        cp_async_16(tile + Tile::offset(r, col), valid ? src : base, valid);
    }
}

// A matrix descriptor: start address, leading / stride byte offsets, swizzle (128, 64 or 32
// bytes).
__device__ __forceinline__ uint64_t descriptor(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes,
                                               int swizzle_bytes) {
    const uint64_t layout = swizzle_bytes == 128 ? 1 : swizzle_bytes == 64 ? 2 : 3;
    return uint64_t((addr & 0x3FFFF) >> 4) | uint64_t(lead_bytes >> 4) << 16 |
           uint64_t(stride_bytes >> 4) << 32 | layout << 62;
}

// The tile as a K-major operand: rows [row0, row0 + 64 or N) (row0 a multiple of 8), k-step kk
// (columns 16kk..16kk+15). 8-row groups are 1024 bytes apart (512 in the 32-column stack, 256 in
// the 16-column one); the leading offset is unused.
template <class Tile>
__device__ __forceinline__ uint64_t k_major(uint32_t tile, int row0, int kk) {
    if (Tile::kQuarter && kk == Tile::kD / 16 - 1)
        return descriptor(tile + Tile::kQuarterStart + row0 * 32, 16, 256, 32);
    if (Tile::kHalf && kk * 16 >= Tile::kFull)
        return descriptor(tile + Tile::kHalfStart + row0 * 64 + (kk - Tile::kFull / 16) * 32, 16, 512, 64);
    return descriptor(tile + (kk / 4) * Tile::kStackBytes + row0 * 128 + (kk % 4) * 32, 16, 1024, 128);
}

// The tile's 64-column stacks as an MN-major operand (rows = K, columns = M or N): k-step kk
// (rows 16kk..16kk+15). Groups of 8 rows are 1024 bytes apart, groups of 64 columns one stack.
// From column col0 on (a multiple of 64: the stack col0 / 64).
template <class Tile>
__device__ __forceinline__ uint64_t mn_major(uint32_t tile, int kk, int col0 = 0) {
    return descriptor(tile + col0 / 64 * Tile::kStackBytes + kk * 16 * 128, Tile::kStackBytes, 1024, 128);
}
// ... and its 32-column stack: 8-row groups 512 bytes apart, one group of columns.
template <class Tile>
__device__ __forceinline__ uint64_t mn_major_half(uint32_t tile, int kk) {
    return descriptor(tile + Tile::kHalfStart + kk * 16 * 64, Tile::kRows * 64, 512, 64);
}
// ... and its 16-column stack: 8-row groups 256 bytes apart.
template <class Tile>
__device__ __forceinline__ uint64_t mn_major_quarter(uint32_t tile, int kk) {
    return descriptor(tile + Tile::kQuarterStart + kk * 16 * 32, Tile::kRows * 32, 256, 32);
}

// Orders this thread's generic-proxy shared-memory writes (cp.async, st.shared) before later
// wgmma reads of them; the block barrier after it publishes them to the other threads.
__device__ __forceinline__ void fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Before the first wgmma of a batch: earlier register writes of A / accumulators are visible.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins accumulator registers around an asynchronous wgmma: the compiler may not read, move or
// rewrite them across this point.
template <int kN>
__device__ __forceinline__ void fence_regs(float (&d)[kN]) {
#pragma unroll
    for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The asm texts. wgmma names accumulators first, so operand numbers are spelled out per N.
#define ORCHARD_WG_R8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define ORCHARD_WG_R16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define ORCHARD_WG_R32                                                                            \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define ORCHARD_WG_R64                                                                             \
    ORCHARD_WG_R32                                                                                 \
    ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
    "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define ORCHARD_WG_R96                                                                             \
    ORCHARD_WG_R64                                                                                 \
    ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
    "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define ORCHARD_WG_R128                                                                            \
    ORCHARD_WG_R96                                                                                 \
    ", %96, %97, %98, %99, "                                                                       \
    "%100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, "   \
    "%115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define ORCHARD_WG_D8(i)                                                                   \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define ORCHARD_WG_D16 ORCHARD_WG_D8(0), ORCHARD_WG_D8(8)
#define ORCHARD_WG_D32(i) ORCHARD_WG_D8(i), ORCHARD_WG_D8(i + 8), ORCHARD_WG_D8(i + 16), ORCHARD_WG_D8(i + 24)
#define ORCHARD_WG_D64 ORCHARD_WG_D32(0), ORCHARD_WG_D32(32)
#define ORCHARD_WG_D96 ORCHARD_WG_D64, ORCHARD_WG_D32(64)
#define ORCHARD_WG_D128 ORCHARD_WG_D96, ORCHARD_WG_D32(96)

// D (+)= A B with A and B in shared memory (each K-major, or MN-major when kTransA / kTransB).
// `accumulate == false` overwrites D.
#define ORCHARD_WGMMA_SS(N, TY, REGS, DOPS, IA, IB, IS, ITA, ITB)                                \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                               \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" REGS "}, %" #IA \
                 ", %" #IB ", p, 1, 1, %" #ITA ", %" #ITB ";\n}\n"                                \
                 : DOPS                                                                           \
                 : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)), "n"(int(kTransA)), "n"(int(kTransB)))
// D (+)= A B with A in registers (4 x b32, the mma.m16n8k16 A layout) and B in shared memory.
#define ORCHARD_WGMMA_RS(N, TY, REGS, DOPS, A0, A1, A2, A3, IB, IS, IT)                             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" REGS "}, {%" #A0   \
                 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #IB ", p, 1, 1, %" #IT ";\n}\n"                \
                 : DOPS                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)),   \
                   "n"(int(kTransB)))

template <class T, int kN, bool kTransB, bool kTransA = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b,
                                         bool accumulate) {
    constexpr bool kHalf = std::is_same_v<T, __half>;
    if constexpr (kN == 16 && kHalf) ORCHARD_WGMMA_SS(16, "f16", ORCHARD_WG_R8, ORCHARD_WG_D8(0), 8, 9, 10, 11, 12);
    else if constexpr (kN == 16) ORCHARD_WGMMA_SS(16, "bf16", ORCHARD_WG_R8, ORCHARD_WG_D8(0), 8, 9, 10, 11, 12);
    else if constexpr (kN == 32 && kHalf) ORCHARD_WGMMA_SS(32, "f16", ORCHARD_WG_R16, ORCHARD_WG_D16, 16, 17, 18, 19, 20);
    else if constexpr (kN == 32) ORCHARD_WGMMA_SS(32, "bf16", ORCHARD_WG_R16, ORCHARD_WG_D16, 16, 17, 18, 19, 20);
    else if constexpr (kN == 64 && kHalf) ORCHARD_WGMMA_SS(64, "f16", ORCHARD_WG_R32, ORCHARD_WG_D32(0), 32, 33, 34, 35, 36);
    else if constexpr (kN == 64) ORCHARD_WGMMA_SS(64, "bf16", ORCHARD_WG_R32, ORCHARD_WG_D32(0), 32, 33, 34, 35, 36);
    else if constexpr (kN == 128 && kHalf) ORCHARD_WGMMA_SS(128, "f16", ORCHARD_WG_R64, ORCHARD_WG_D64, 64, 65, 66, 67, 68);
    else if constexpr (kN == 128) ORCHARD_WGMMA_SS(128, "bf16", ORCHARD_WG_R64, ORCHARD_WG_D64, 64, 65, 66, 67, 68);
    else if constexpr (kN == 192 && kHalf) ORCHARD_WGMMA_SS(192, "f16", ORCHARD_WG_R96, ORCHARD_WG_D96, 96, 97, 98, 99, 100);
    else if constexpr (kN == 192) ORCHARD_WGMMA_SS(192, "bf16", ORCHARD_WG_R96, ORCHARD_WG_D96, 96, 97, 98, 99, 100);
    else if constexpr (kN == 256 && kHalf) ORCHARD_WGMMA_SS(256, "f16", ORCHARD_WG_R128, ORCHARD_WG_D128, 128, 129, 130, 131, 132);
    else if constexpr (kN == 256) ORCHARD_WGMMA_SS(256, "bf16", ORCHARD_WG_R128, ORCHARD_WG_D128, 128, 129, 130, 131, 132);
    else static_assert(kN == 16 || kN == 32 || kN == 64 || kN == 128 || kN == 192 || kN == 256,
                       "wgmma_ss: N = 16, 32, 64, 128, 192 or 256");
}

template <class T, int kN, bool kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                         bool accumulate) {
    constexpr bool kHalf = std::is_same_v<T, __half>;
    if constexpr (kN == 16 && kHalf) ORCHARD_WGMMA_RS(16, "f16", ORCHARD_WG_R8, ORCHARD_WG_D8(0), 8, 9, 10, 11, 12, 13, 14);
    else if constexpr (kN == 16) ORCHARD_WGMMA_RS(16, "bf16", ORCHARD_WG_R8, ORCHARD_WG_D8(0), 8, 9, 10, 11, 12, 13, 14);
    else if constexpr (kN == 32 && kHalf) ORCHARD_WGMMA_RS(32, "f16", ORCHARD_WG_R16, ORCHARD_WG_D16, 16, 17, 18, 19, 20, 21, 22);
    else if constexpr (kN == 32) ORCHARD_WGMMA_RS(32, "bf16", ORCHARD_WG_R16, ORCHARD_WG_D16, 16, 17, 18, 19, 20, 21, 22);
    else if constexpr (kN == 64 && kHalf) ORCHARD_WGMMA_RS(64, "f16", ORCHARD_WG_R32, ORCHARD_WG_D32(0), 32, 33, 34, 35, 36, 37, 38);
    else if constexpr (kN == 64) ORCHARD_WGMMA_RS(64, "bf16", ORCHARD_WG_R32, ORCHARD_WG_D32(0), 32, 33, 34, 35, 36, 37, 38);
    else if constexpr (kN == 128 && kHalf) ORCHARD_WGMMA_RS(128, "f16", ORCHARD_WG_R64, ORCHARD_WG_D64, 64, 65, 66, 67, 68, 69, 70);
    else if constexpr (kN == 128) ORCHARD_WGMMA_RS(128, "bf16", ORCHARD_WG_R64, ORCHARD_WG_D64, 64, 65, 66, 67, 68, 69, 70);
    else if constexpr (kN == 192 && kHalf) ORCHARD_WGMMA_RS(192, "f16", ORCHARD_WG_R96, ORCHARD_WG_D96, 96, 97, 98, 99, 100, 101, 102);
    else if constexpr (kN == 192) ORCHARD_WGMMA_RS(192, "bf16", ORCHARD_WG_R96, ORCHARD_WG_D96, 96, 97, 98, 99, 100, 101, 102);
    else if constexpr (kN == 256 && kHalf) ORCHARD_WGMMA_RS(256, "f16", ORCHARD_WG_R128, ORCHARD_WG_D128, 128, 129, 130, 131, 132, 133, 134);
    else if constexpr (kN == 256) ORCHARD_WGMMA_RS(256, "bf16", ORCHARD_WG_R128, ORCHARD_WG_D128, 128, 129, 130, 131, 132, 133, 134);
    else static_assert(kN == 16 || kN == 32 || kN == 64 || kN == 128 || kN == 192 || kN == 256,
                       "wgmma_rs: N = 16, 32, 64, 128, 192 or 256");
}

// D (kD / 2 floats) += A B with A in registers and B = k-step kk of a tile read MN-major with
// all its kD columns: one product over the 64-column stacks, one over each narrow stack.
template <class T, class Tile>
__device__ __forceinline__ void wgmma_rs_tile(float (&d)[Tile::kD / 2], const uint32_t (&a)[4], uint32_t tile,
                                              int kk) {
    if constexpr (Tile::kFull > 0)
        wgmma_rs<T, Tile::kFull, true>(reinterpret_cast<float(&)[Tile::kFull / 2]>(d), a, mn_major<Tile>(tile, kk), true);
    if constexpr (Tile::kHalf)
        wgmma_rs<T, 32, true>(reinterpret_cast<float(&)[16]>(d[Tile::kFull / 2]), a, mn_major_half<Tile>(tile, kk), true);
    if constexpr (Tile::kQuarter)
        wgmma_rs<T, 16, true>(reinterpret_cast<float(&)[8]>(d[Tile::kD / 2 - 8]), a,
                              mn_major_quarter<Tile>(tile, kk), true);
}

// D (kD / 2 floats) (+)= A B as wgmma_rs_tile, with A in shared memory (desc_a: its k-step kk).
template <class T, class Tile>
__device__ __forceinline__ void wgmma_ss_tile(float (&d)[Tile::kD / 2], uint64_t desc_a, uint32_t tile, int kk,
                                              bool accumulate) {
    if constexpr (Tile::kFull > 0)
        wgmma_ss<T, Tile::kFull, true>(reinterpret_cast<float(&)[Tile::kFull / 2]>(d), desc_a,
                                       mn_major<Tile>(tile, kk), accumulate);
    if constexpr (Tile::kHalf)
        wgmma_ss<T, 32, true>(reinterpret_cast<float(&)[16]>(d[Tile::kFull / 2]), desc_a,
                              mn_major_half<Tile>(tile, kk), accumulate);
    if constexpr (Tile::kQuarter)
        wgmma_ss<T, 16, true>(reinterpret_cast<float(&)[8]>(d[Tile::kD / 2 - 8]), desc_a,
                              mn_major_quarter<Tile>(tile, kk), accumulate);
}

// Writes a warp's A fragments of a 16-row strip (rows row0.., columns col0 + 16 ks.., the
// mma.m16n8k16 A layout that c_to_a gives) into a swizzled tile, where a later wgmma reads them
// as its A operand: 32-bit stores, a warp's 32 on distinct banks.
template <class Tile, int kSteps>
__device__ __forceinline__ void store_a_tile(uint32_t tile, int row0, int col0, const uint32_t (&a)[kSteps][4]) {
    const int lane = threadIdx.x % 32, r = row0 + lane / 4, c = lane % 4 * 2;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
        for (int f = 0; f < 4; ++f) {  // fragment f: rows +8 when odd, columns +8 from the third
            const uint32_t at = tile + Tile::offset(r + f % 2 * 8, col0 + 16 * ks + f / 2 * 8) + c * 2;
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(a[ks][f]) : "memory");
        }
}

#undef ORCHARD_WGMMA_RS
#undef ORCHARD_WGMMA_SS
#undef ORCHARD_WG_D128
#undef ORCHARD_WG_D96
#undef ORCHARD_WG_D64
#undef ORCHARD_WG_D32
#undef ORCHARD_WG_D16
#undef ORCHARD_WG_D8
#undef ORCHARD_WG_R128
#undef ORCHARD_WG_R96
#undef ORCHARD_WG_R64
#undef ORCHARD_WG_R32
#undef ORCHARD_WG_R16
#undef ORCHARD_WG_R8

}  // namespace orchard::cuda::sm90
