// The wgmma building blocks of the Hopper kernels (src/cuda/wgmma.cuh) on their own: one
// warpgroup multiplies small integer-valued matrices (exact in bf16 and fp32) through the
// swizzled shared-memory tiles, in both operand forms the kernels use, with K or N of 96 (a
// 32-column stack, 64-byte swizzle), 80 (a 16-column stack, 32-byte swizzle), 112 (both) and 48
// (no 64-column stack):
//   SS: D (64 x N) = A (64 x K, K-major tile) * B^T (B an N x K K-major tile)      [S = Q K^T]
//   RS: D (64 x N) = A (64 x K, registers)    * B   (B a K x N MN-major tile)      [O = P V]
// Skipped without a compute capability 9.0 device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

#include "cuda/wgmma.cuh"
#include "hopper.h"

namespace orchard::test {
namespace {

using orchard::cuda::sm90::SwizzledTile;
using T = __nv_bfloat16;
// a: 64 x kK, b: kK x kN (RS) or kN x kK (SS), row major, global; d: 64 x kN fp32.
template <int kN, bool kRegistersA, int kK>
__global__ void wgmma_probe(const T* a, const T* b, float* d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace orchard::cuda;
    using namespace orchard::cuda::sm90;
    using ATile = SwizzledTile<64, kK>;
    // SS: B is N x K (rows N); RS: B is K x N (rows K).
    using BTile = std::conditional_t<kRegistersA, SwizzledTile<kK, kN>, SwizzledTile<kN, kK>>;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t sA = (smem_addr(smem_raw) + 1023) & ~1023u, sB = sA + ATile::kBytes;
    load_swizzled_async<ATile, 128>(sA, a, kK, 0, 64, kK);
    load_swizzled_async<BTile, 128>(sB, b, BTile::kD, 0, BTile::kRows, BTile::kD);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();

    float acc[kN / 8][4] = {};
    float(&dd)[kN / 2] = reinterpret_cast<float(&)[kN / 2]>(acc);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    wgmma_fence();
    if constexpr (kRegistersA) {
        // A fragments straight from global memory, in the mma.m16n8k16 A layout.
        uint32_t fr[kK / 16][4];
        for (int ks = 0; ks < kK / 16; ++ks)
            for (int x = 0; x < 4; ++x) {
                const int row = warp * 16 + g + 8 * (x % 2), col = ks * 16 + 2 * t + 8 * (x / 2);
                fr[ks][x] = *reinterpret_cast<const uint32_t*>(a + row * kK + col);
            }
        for (int ks = 0; ks < kK / 16; ++ks) wgmma_rs_tile<T, BTile>(dd, fr[ks], sB, ks);
        wgmma_commit();
        wgmma_wait<0>();
    } else {
        for (int kk = 0; kk < kK / 16; ++kk)
            wgmma_ss<T, kN, false>(dd, k_major<ATile>(sA, 0, kk), k_major<BTile>(sB, 0, kk), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
    }
    fence_regs(dd);
    for (int nt = 0; nt < kN / 8; ++nt)
        for (int c = 0; c < 4; ++c)
            d[(warp * 16 + g + 8 * (c / 2)) * kN + nt * 8 + 2 * t + c % 2] = acc[nt][c];
#endif
}

// Small integers: every product and sum is exact.
std::vector<T> integers(int n, int seed) {
    std::vector<T> v(n);
    for (int i = 0; i < n; ++i) v[i] = __float2bfloat16(float((i * 7 + seed * 13) % 9 - 4));
    return v;
}

template <int kN, bool kRegistersA, int kK = 128>
void check() {
    if (!have_hopper()) GTEST_SKIP() << "needs a compute capability 9.0 (Hopper) device";
    const std::vector<T> a = integers(64 * kK, 1), b = integers(kK * kN, 2);
    T *da = nullptr, *db = nullptr;
    float* dd = nullptr;
    ASSERT_EQ(cudaMalloc(&da, a.size() * sizeof(T)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&db, b.size() * sizeof(T)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dd, 64 * kN * sizeof(float)), cudaSuccess);
    cudaMemcpy(da, a.data(), a.size() * sizeof(T), cudaMemcpyHostToDevice);
    cudaMemcpy(db, b.data(), b.size() * sizeof(T), cudaMemcpyHostToDevice);
    const int smem = 1024 + 64 * kK * 2 + kK * kN * 2;
    auto kernel = wgmma_probe<kN, kRegistersA, kK>;
    ASSERT_EQ(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), cudaSuccess);
    kernel<<<1, 128, smem>>>(da, db, dd);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> d(64 * kN);
    cudaMemcpy(d.data(), dd, d.size() * sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(da), cudaFree(db), cudaFree(dd);
    int wrong = 0;
    for (int i = 0; i < 64; ++i)
        for (int j = 0; j < kN; ++j) {
            double want = 0;
            for (int k = 0; k < kK; ++k) {
                const float bkj = kRegistersA ? __bfloat162float(b[k * kN + j]) : __bfloat162float(b[j * kK + k]);
                want += double(__bfloat162float(a[i * kK + k])) * bkj;
            }
            if (d[i * kN + j] != float(want) && wrong++ < 5)
                ADD_FAILURE() << "D(" << i << ", " << j << ") = " << d[i * kN + j] << ", expected " << want;
        }
    EXPECT_EQ(wrong, 0) << "wrong elements of 64 x " << kN;
}

TEST(Wgmma, SharedKMajorTimesKMajorN64) { check<64, false>(); }
TEST(Wgmma, SharedKMajorTimesKMajorN128) { check<128, false>(); }
TEST(Wgmma, RegistersTimesMnMajorN64) { check<64, true>(); }
TEST(Wgmma, RegistersTimesMnMajorN128) { check<128, true>(); }
TEST(Wgmma, RegistersTimesMnMajorN256) { check<256, true>(); }
TEST(Wgmma, RegistersTimesMnMajorN192) { check<192, true>(); }
TEST(Wgmma, RegistersTimesMnMajorN160) { check<160, true>(); }
TEST(Wgmma, RegistersTimesMnMajorN224) { check<224, true>(); }
TEST(Wgmma, SharedKMajorTimesKMajorK96) { check<64, false, 96>(); }
TEST(Wgmma, RegistersTimesMnMajorN96) { check<96, true>(); }
TEST(Wgmma, SharedKMajorTimesKMajorK80) { check<64, false, 80>(); }
TEST(Wgmma, RegistersTimesMnMajorN80) { check<80, true>(); }
TEST(Wgmma, SharedKMajorTimesKMajorK112) { check<128, false, 112>(); }
TEST(Wgmma, RegistersTimesMnMajorN112) { check<112, true>(); }
TEST(Wgmma, SharedKMajorTimesKMajorK48) { check<64, false, 48>(); }
TEST(Wgmma, RegistersTimesMnMajorN48) { check<48, true>(); }

}  // namespace
}  // namespace orchard::test
