// The cross-backend suite: every case, every dtype, forward and gradients vs the float64 oracle.
#include <gtest/gtest.h>

#include <cmath>

#include "cases.h"

namespace orchard::test {
namespace {

struct Param {
    Case c;
    DType dt;
};

void PrintTo(const Param& p, std::ostream* os) { *os << case_name(p.c, p.dt); }

class CpuVsReference : public ::testing::TestWithParam<Param> {};

void expect_close(const char* what, const std::vector<double>& got,
                  const std::vector<double>& want, double tol) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i)
        ASSERT_TRUE(std::isfinite(got[i])) << what << "[" << i << "] = " << got[i];
    const double err = rel_error(got, want);
    EXPECT_LE(err, tol) << what << ": relative error " << err << " > " << tol;
}

void expect_lse(const std::vector<double>& got, const std::vector<double>& want, double tol) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isinf(want[i])) {
            EXPECT_EQ(got[i], want[i]) << "lse[" << i << "] of a fully masked row";
        } else {
            EXPECT_NEAR(got[i], want[i], tol * (1 + std::abs(want[i]))) << "lse[" << i << "]";
        }
    }
}

TEST_P(CpuVsReference, ForwardAndGradients) {
    const auto& [c, dt] = GetParam();
    Inputs in = make_inputs(c, dt);
    const Result ref = run_reference(c, in);
    const Result got = run_case(c, in, dt, Backend::cpu);
    const double tol = tolerance(dt);
    expect_close("out", got.out, ref.out, tol);
    expect_lse(got.lse, ref.lse, dt == DType::f64 || dt == DType::f32 ? 1e-5 : 1e-3);
    expect_close("dq", got.dq, ref.dq, 3 * tol);
    expect_close("dk", got.dk, ref.dk, 3 * tol);
    expect_close("dv", got.dv, ref.dv, 3 * tol);
}

std::vector<Param> all_params() {
    std::vector<Param> ps;
    for (const Case& c : case_list())
        for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::f64}) ps.push_back({c, dt});
    return ps;
}

INSTANTIATE_TEST_SUITE_P(Cases, CpuVsReference, ::testing::ValuesIn(all_params()),
                         [](const auto& info) { return case_name(info.param.c, info.param.dt); });

}  // namespace
}  // namespace orchard::test
