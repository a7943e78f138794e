// The TMA building blocks (src/cuda/tma.cuh) on their own: a tile of a (B, S, H, D) tensor loaded
// through tensor maps must land byte for byte as load_swizzled_async() puts it, swizzled stacks
// and zero-filled rows past S included, for head dims with and without narrow stacks (80 = 64 +
// 16, 96 = 64 + 32, 112 = 64 + 32 + 16), and head dims below the tile's (columns past them
// zero-filled). Skipped without a compute capability 9.0 device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "cuda/tma.cuh"
#include "hopper.h"

namespace orchard::test {
namespace {

using orchard::cuda::sm90::SwizzledTile;
using orchard::cuda::sm90::TileMaps;
using T = __nv_bfloat16;

constexpr int round_kib(int bytes) { return (bytes + 1023) / 1024 * 1024; }

// Loads tokens [token0, token0 + kRows) of head h, sequence b twice, by cp.async and by TMA, and
// writes both tiles' bytes out.
template <class Tile>
__global__ void tma_probe(const __grid_constant__ TileMaps maps, const T* x, int S, int H, int d,
                          int h, int b, int token0, unsigned char* by_copy, unsigned char* by_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace orchard::cuda;
    using namespace orchard::cuda::sm90;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t base = smem_addr(smem_raw);
    const uint32_t sA = (base + 1023) & ~1023u, sB = sA + round_kib(Tile::kBytes);
    const uint32_t bar = sB + round_kib(Tile::kBytes);
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_barrier_init();
    }
    __syncthreads();
    const T* head = x + (int64_t(b) * S * H + h) * d;  // token 0 of (b, h)
    load_swizzled_async<Tile, 128>(sA, head, int64_t(H) * d, token0, S, d);
    cp_async_commit();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, Tile::kBytes);
        load_swizzled_tma<Tile>(sB, maps, bar, h, token0, b);
    }
    cp_async_wait<0>();
    mbarrier_wait(bar, 0);
    __syncthreads();
    for (int i = threadIdx.x; i < Tile::kBytes; i += blockDim.x) {
        by_copy[i] = smem_raw[sA - base + i];
        by_tma[i] = smem_raw[sB - base + i];
    }
#endif
}

// A tensor of head dim d <= kD: columns d.. of the tile are zeros either way.
template <int kRows, int kD>
void check(int d = kD) {
    if (!have_hopper()) GTEST_SKIP() << "needs a compute capability 9.0 (Hopper) device";
    using Tile = SwizzledTile<kRows, kD>;
    const int B = 2, S = 100, H = 3;
    std::vector<T> x(size_t(B) * S * H * d);
    for (size_t i = 0; i < x.size(); ++i) x[i] = __float2bfloat16(float(int(i % 251) - 125));
    T* dx = nullptr;
    unsigned char *d_copy = nullptr, *d_tma = nullptr;
    ASSERT_EQ(cudaMalloc(&dx, x.size() * sizeof(T)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_copy, Tile::kBytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_tma, Tile::kBytes), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dx, x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    TileMaps maps{};
    ASSERT_TRUE(orchard::cuda::sm90::make_tile_maps<Tile>(maps, dx, B, S, H, d, int64_t(S) * H * d,
                                                          int64_t(H) * d, d));
    auto kernel = tma_probe<Tile>;
    const int smem = 2 * round_kib(Tile::kBytes) + 1024 + 64;
    ASSERT_EQ(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              cudaSuccess);
    // A tile inside the sequence, and one that runs past its end (rows 100.. are zero-filled).
    for (const int token0 : {0, S - 36}) {
        kernel<<<1, 128, smem>>>(maps, dx, S, H, d, /*h=*/2, /*b=*/1, token0, d_copy, d_tma);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        std::vector<unsigned char> by_copy(Tile::kBytes), by_tma(Tile::kBytes);
        ASSERT_EQ(cudaMemcpy(by_copy.data(), d_copy, Tile::kBytes, cudaMemcpyDeviceToHost),
                  cudaSuccess);
        ASSERT_EQ(cudaMemcpy(by_tma.data(), d_tma, Tile::kBytes, cudaMemcpyDeviceToHost),
                  cudaSuccess);
        int first_diff = -1;
        for (int i = 0; i < Tile::kBytes && first_diff < 0; ++i)
            if (by_copy[size_t(i)] != by_tma[size_t(i)]) first_diff = i;
        EXPECT_EQ(first_diff, -1) << "rows " << kRows << ", kD " << kD << ", d " << d << ", token0 " << token0;
    }
    cudaFree(dx);
    cudaFree(d_copy);
    cudaFree(d_tma);
}

TEST(Tma, LoadsSwizzledTileD64) { check<64, 64>(); }
TEST(Tma, LoadsSwizzledTileD80) { check<64, 80>(); }
TEST(Tma, LoadsSwizzledTileD96) { check<64, 96>(); }
TEST(Tma, LoadsSwizzledTileD112) { check<64, 112>(); }
TEST(Tma, LoadsSwizzledTileD128Rows128) { check<128, 128>(); }
TEST(Tma, LoadsSwizzledTileD256Rows192) { check<192, 256>(); }
// Head dims that run a larger variant: 72 on the 80 tile, 48 on the 64 one.
TEST(Tma, ZeroFillsColumnsPastHeadDim72) { check<64, 80>(72); }
TEST(Tma, ZeroFillsColumnsPastHeadDim48) { check<128, 64>(48); }

}  // namespace
}  // namespace orchard::test
