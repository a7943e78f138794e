// Finite-difference gradient checks in float64 (central differences of L = sum(out * dout)).
#include <gtest/gtest.h>

#include "cases.h"

namespace orchard::test {
namespace {

struct GradParam {
    Case c;
    Backend backend;
};

void PrintTo(const GradParam& p, std::ostream* os) { *os << p.c.name << "_" << to_string(p.backend); }

// L = sum(out * dout) for the current contents of the inputs.
double loss(const Case& c, Inputs& in, Backend backend) {
    const std::vector<int64_t> lse_shape =
        c.varlen() ? std::vector<int64_t>{c.Hq, in.total_q} : std::vector<int64_t>{c.B, c.Hq, c.Sq};
    Tensor out(in.dout.shape(), DType::f64), lse(lse_shape, DType::f32);
    forward({.q = in.q.view(), .k = in.k.view(), .v = in.v.view(), .out = out.view(),
             .lse = lse.view()},
            options_for(c, in, backend));
    double l = 0;
    for (int64_t n = 0; n < out.numel(); ++n) l += out.get(n) * in.dout.get(n);
    return l;
}

std::vector<double> numeric_grad(const Case& c, Inputs& in, Tensor& x, Backend backend) {
    constexpr double h = 1e-6;
    std::vector<double> g(x.numel());
    for (int64_t n = 0; n < x.numel(); ++n) {
        const double x0 = x.get(n);
        x.set(n, x0 + h);
        const double up = loss(c, in, backend);
        x.set(n, x0 - h);
        const double down = loss(c, in, backend);
        x.set(n, x0);
        g[n] = (up - down) / (2 * h);
    }
    return g;
}

class FiniteDifferences : public ::testing::TestWithParam<GradParam> {};

TEST_P(FiniteDifferences, MatchAnalyticGradients) {
    const auto& [c, backend] = GetParam();
    Inputs in = make_inputs(c, DType::f64, 7);
    const Result analytic = run_case(c, in, DType::f64, backend);
    const double tol = 1e-6;  // central differences with h = 1e-6 in float64
    EXPECT_LE(rel_error(analytic.dq, numeric_grad(c, in, in.q, backend)), tol) << "dq";
    EXPECT_LE(rel_error(analytic.dk, numeric_grad(c, in, in.k, backend)), tol) << "dk";
    EXPECT_LE(rel_error(analytic.dv, numeric_grad(c, in, in.v, backend)), tol) << "dv";
}

std::vector<GradParam> grad_params() {
    const std::vector<Case> cases = {
        {.name = "plain", .Sq = 5, .Sk = 7, .Hq = 2, .Hkv = 2, .D = 4},
        {.name = "causal_gqa", .Sq = 6, .Sk = 4, .Hq = 4, .Hkv = 2, .D = 4, .causal = true},
        {.name = "window_dv", .Sq = 7, .Sk = 9, .Hq = 1, .Hkv = 1, .D = 3, .Dv = 5, .left = 2,
         .right = 1},
        {.name = "softcap_alibi", .Sq = 5, .Sk = 6, .Hq = 2, .Hkv = 1, .D = 4, .softcap = 0.7,
         .alibi = 1, .scale = 1.3},
        {.name = "dropout", .Sq = 6, .Sk = 9, .Hq = 2, .Hkv = 2, .D = 4, .dropout = 0.3},
        {.name = "varlen_causal_dropout", .Hq = 2, .Hkv = 1, .D = 4, .causal = true,
         .dropout = 0.25, .seqlens_q = {3, 5}, .seqlens_k = {4, 2}},
    };
    std::vector<GradParam> ps;
    for (const Case& c : cases)
        for (Backend b : {Backend::cpu, Backend::reference}) ps.push_back({c, b});
    return ps;
}

INSTANTIATE_TEST_SUITE_P(Float64, FiniteDifferences, ::testing::ValuesIn(grad_params()),
                         [](const auto& info) {
                             return info.param.c.name + "_" + to_string(info.param.backend);
                         });

}  // namespace
}  // namespace orchard::test
