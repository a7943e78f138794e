// The CPU kernels' SIMD building blocks (src/cpu/tile_ops-inl.h) on each compiled target, run at
// the level the dispatch picks (the cases_simd_* reruns cap it, so every target is tested).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "test_tile_ops.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

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

TEST(SimdExp, NanStaysNan) {
    EXPECT_TRUE(std::isnan(exp_softmax_of({std::numeric_limits<float>::quiet_NaN()})[0]));
}

}  // namespace
}  // namespace orchard::cpu
#endif  // HWY_ONCE
