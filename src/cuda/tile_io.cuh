// Moving tiles between global memory and shared memory, and fragments back to global memory.
#pragma once

#include "cuda/kernel_params.cuh"
#include "cuda/mma.cuh"

namespace orchard::cuda {

// Starts the copy of rows [row0, row0 + kRows) of a (token, dim) slice into a kRows x kD shared
// tile of pitch kRowPitch<kD>. Rows at or past `rows` and columns at or past `d` are zero-filled.
// The caller commits the group and waits. `base` points at token 0 of the slice (row stride
// `stride`, unit column stride, 16-byte aligned rows: the backend's supports() checks that).
template <int kRows, int kD, int kThreads, class T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* base, int64_t stride, int64_t row0,
                                                int64_t rows, int d) {
    constexpr int kChunks = kD / 8;  // 16-byte chunks per row
    const int tid = threadIdx.x;
#pragma unroll
    for (int c = tid; c < kRows * kChunks; c += kThreads) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const bool valid = row0 + r < rows && col < d;
        const T* src = valid ? base + (row0 + r) * stride + col : base;
        cp_async_16(smem + r * kRowPitch<kD> + col, src, valid);
    }
}

// Stores a warp's 16 x kD fp32 accumulator block (rows row0.. of the slice, C fragments of 8
// columns each) as T, scaled by `factor[rr]` for row half rr (g, g + 8); rows >= rows and
// columns >= d are skipped.
template <int kD, class T>
__device__ __forceinline__ void store_rows(T* base, int64_t stride, int64_t row0, int64_t rows,
                                           int d, const float (&acc)[kD / 8][4],
                                           const float (&factor)[2]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int64_t row = row0 + g + rr * 8;
        if (row >= rows) continue;
        T* dst = base + row * stride;
#pragma unroll
        for (int dt = 0; dt < kD / 8; ++dt) {
            const int col = dt * 8 + 2 * t;
            if (col < d)
                *reinterpret_cast<uint32_t*>(dst + col) =
                    pack2<T>(acc[dt][2 * rr] * factor[rr], acc[dt][2 * rr + 1] * factor[rr]);
        }
    }
}

// Raises a kernel's dynamic shared memory limit. Per device, so set on every launch (cheap, and
// allowed while a CUDA graph is being captured).
template <class Kernel>
void set_smem(Kernel kernel, size_t bytes, const char* what) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               what);
}

}  // namespace orchard::cuda
