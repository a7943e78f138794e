// The CPU kernels' SIMD building blocks (src/cpu/tile_ops-inl.h) on each compiled target, run at
// the level the dispatch picks (the cases_simd_* reruns cap it, so every target is tested).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "test_tile_ops.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/simd_dispatch.h"
#include "cpu/tile_ops-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace orchard::cpu::HWY_NAMESPACE {

// y = exp_softmax(x), n a multiple of the vector length.
void exp_softmax_array(const float* x, float* y, int64_t n) {
    const hn::ScalableTag<float> d;
    for (int64_t i = 0; i < n; i += int64_t(hn::Lanes(d)))
        hn::StoreU(exp_softmax(d, hn::LoadU(d, x + i)), d, y + i);
}

// The worst error of gemm() against float64, relative to sum_k |a_ik b_kj| (+ |c_ij|), over
// ragged shapes: every row remainder of the register blocks, 1 to 9 vectors of columns (each
// panel split: 2-vector panels, a 1- or 3-vector last one), A read row- and column-wise, plain,
// accumulating and rescaled products. NaN when a column past N was written.
double gemm_error() {
    const hn::ScalableTag<float> d;
    const int64_t L = int64_t(hn::Lanes(d));
    uint32_t state = 1;
    auto rnd = [&] { return float((state = state * 1664525u + 1013904223u) >> 8) / 16777216.f - 0.5f; };
    double worst = 0;
    for (int64_t nv = 1; nv <= 9; ++nv)
        for (int64_t M : {1, 3, 4, 7, 8, 9, 13, 17})
            for (int64_t K : {1, 5, 64})
                for (bool a_cols : {false, true})
                    for (int mode = 0; mode < 3; ++mode) {  // C = AB, C += AB, C = diag(s) C + AB
                        const int64_t N = nv * L, ldb = N + L, ldc = N + L;
                        std::vector<float> a(size_t(M * K)), b(size_t(K * ldb)), c(size_t(M * ldc));
                        std::vector<float> sc(static_cast<size_t>(M));
                        for (auto& x : a) x = rnd();
                        for (auto& x : b) x = rnd();
                        for (auto& x : c) x = rnd();
                        for (auto& x : sc) x = rnd();
                        for (int64_t i = 0; i < M; ++i)
                            for (int64_t j = N; j < ldc; ++j) c[size_t(i * ldc + j)] = NAN;
                        const std::vector<float> c0 = c;
                        const int64_t sa_i = a_cols ? 1 : K, sa_k = a_cols ? M : 1;
                        if (mode == 0) gemm<false>(M, N, K, a.data(), sa_i, sa_k, b.data(), ldb, c.data(), ldc);
                        else gemm<true>(M, N, K, a.data(), sa_i, sa_k, b.data(), ldb, c.data(), ldc,
                                        mode == 2 ? sc.data() : nullptr);
                        for (int64_t i = 0; i < M; ++i) {
                            for (int64_t j = N; j < ldc; ++j)
                                if (!std::isnan(c[size_t(i * ldc + j)])) return NAN;
                            for (int64_t j = 0; j < N; ++j) {
                                const double s0 = mode == 0 ? 0 : mode == 1 ? 1 : sc[size_t(i)];
                                double want = s0 * c0[size_t(i * ldc + j)];
                                double mag = std::abs(want);
                                for (int64_t k = 0; k < K; ++k) {
                                    const double t =
                                        double(a[size_t(i * sa_i + k * sa_k)]) * b[size_t(k * ldb + j)];
                                    want += t, mag += std::abs(t);
                                }
                                const double err = std::abs(c[size_t(i * ldc + j)] - want);
                                worst = std::max(worst, err / (mag + 1e-30));
                            }
                        }
                    }
    return worst;
}

}  // namespace orchard::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace orchard::cpu {
namespace {

std::vector<float> exp_softmax_of(std::vector<float> x) {
    x.resize((x.size() + 63) / 64 * 64, 0.f);  // whole vectors on every target
    std::vector<float> y(x.size());
    auto run = [&]() { ORCHARD_SIMD_DISPATCH(exp_softmax_array, x.data(), y.data(), int64_t(x.size())); };
    run();
    return y;
}

// Within 2 ulp (relative 2^-22) of the float64 exp on the whole range the softmax uses: 1.7e-7
// with FMA (AVX2, AVX-512), 1.9e-7 without (SSE4, scalar).
TEST(SimdExp, RelativeErrorOnRange) {
    std::vector<float> x;
    for (int64_t i = 0; i <= 2000000; ++i) x.push_back(float(-87.0 + 175.0 * double(i) / 2e6));
    for (int n = -125; n <= 127; ++n)  // the reduction's boundaries, (n +- 1/2) ln2
        for (double f : {-0.5, 0.5}) {
            float x0 = float((n + f) * std::log(2.0));
            for (int k = 0; k < 3; ++k, x0 = std::nextafter(x0, 0.f)) x.push_back(x0);
        }
    const std::vector<float> y = exp_softmax_of(x);
    double worst = 0, at = 0;
    for (size_t i = 0; i < x.size(); ++i) {
        if (x[i] < -87.f || x[i] > 88.f) continue;
        const double rel = std::abs(double(y[i]) / std::exp(double(x[i])) - 1);
        if (rel > worst) worst = rel, at = x[i];
    }
    EXPECT_LT(worst, std::ldexp(1.0, -22)) << "at x = " << at;
}

TEST(SimdExp, ZeroBelowMinus87AndExactOne) {
    const float inf = std::numeric_limits<float>::infinity();
    const std::vector<float> x = {-inf, std::numeric_limits<float>::lowest(), -1e30f, -100.f,
                                  std::nextafter(-87.f, -inf), 0.f, -0.f};
    const std::vector<float> y = exp_softmax_of(x);
    for (size_t i = 0; i + 2 < x.size(); ++i) EXPECT_EQ(y[i], 0.f) << "x = " << x[i];
    EXPECT_EQ(y[5], 1.f);
    EXPECT_EQ(y[6], 1.f);
    EXPECT_GT(exp_softmax_of({-87.f})[0], 0.f);
}

double gemm_error_here() { ORCHARD_SIMD_DISPATCH(gemm_error); }

// Within fp32 rounding of float64 (a few units of 2^-24 per term), and nothing written past N.
TEST(SimdGemm, MatchesFloat64OnRaggedShapes) {
    const double err = gemm_error_here();
    EXPECT_FALSE(std::isnan(err)) << "gemm wrote a column past N";
    EXPECT_LT(err, 1e-6);
}

TEST(SimdExp, NanStaysNan) {
    EXPECT_TRUE(std::isnan(exp_softmax_of({std::numeric_limits<float>::quiet_NaN()})[0]));
}

}  // namespace
}  // namespace orchard::cpu
#endif  // HWY_ONCE
