// The Metal backend (kernels run by the CPU emulator, tools/metal_emu) against the float64
// reference on a subset of the cross-backend cases, plus what only Metal has to show: the
// dropout mask equals the CPU backend's, bitwise determinism, its workspace and support rules.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>

#include "cases.h"
#include "metal/kernel_params.h"
#include "orchard/metal.h"

namespace orchard::test {
namespace {

struct Param {
    Case c;
    DType dt;
};

void PrintTo(const Param& p, std::ostream* os) { *os << case_name(p.c, p.dt); }

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
        if (std::isinf(want[i]))
            EXPECT_EQ(got[i], want[i]) << "lse[" << i << "] of a fully masked row";
        else
            EXPECT_NEAR(got[i], want[i], tol * (1 + std::abs(want[i]))) << "lse[" << i << "]";
    }
}

// The emulator runs every GPU thread as a fiber, so cases are kept small: this subset covers
// every feature of the list once in fp32, head dims 64 / 80 / 96 / 128 / 256, lengths that are
// not multiples of any block (1, 17, 33, 129), Sq != Sk both ways, fully masked rows,
// GQA / MQA, varlen, dropout, strided / offset / expanded inputs; fp16 and bf16 on a few.
std::vector<Param> metal_params() {
    const std::set<std::string> f32 = {
        "basic", "len1", "len129", "sq_lt_sk_causal", "sq_gt_sk_causal", "sq_gt_sk", "hdim8",
        "hdim80", "hdim96", "hdim256", "dv_ne_d", "gqa", "mqa", "window", "window_causal",
        "softcap", "alibi", "alibi_batch", "dropout", "dropout_causal_gqa", "all_features",
        "varlen", "varlen_dropout_window", "transposed", "offset", "expanded_kv",
        "varlen_offset", "sk0", "sq0", "batch0"};
    const std::set<std::string> low_precision = {"basic", "len129", "gqa", "all_features",
                                                 "varlen"};
    std::vector<Param> ps;
    for (const Case& c : case_list()) {
        if (f32.count(c.name)) ps.push_back({c, DType::f32});
        if (low_precision.count(c.name)) {
            ps.push_back({c, DType::f16});
            ps.push_back({c, DType::bf16});
        }
    }
    // Head dim 128 with GQA and causal masking, at a length the case list only has at 300.
    const Case hd128{.name = "hdim128_gqa_causal", .B = 2, .Sq = 45, .Sk = 45, .Hq = 4, .Hkv = 2,
                     .D = 128, .causal = true};
    for (DType dt : {DType::f32, DType::f16, DType::bf16}) ps.push_back({hd128, dt});
    // Position offsets (one block pair of ring attention): masks, ALiBi and dropout at I, J.
    const Case positions{.name = "positions", .B = 2, .Sq = 40, .Sk = 50, .Hq = 4, .Hkv = 2,
                         .causal = true, .left = 60, .alibi = 1, .dropout = 0.2, .q_pos = 70,
                         .k_pos = 30};
    for (DType dt : {DType::f32, DType::bf16}) ps.push_back({positions, dt});
    return ps;
}

class MetalVsReference : public ::testing::TestWithParam<Param> {};

TEST_P(MetalVsReference, ForwardAndGradients) {
    const auto& [c, dt] = GetParam();
    Inputs in = make_inputs(c, dt);
    const Result ref = run_reference(c, in);
    const Result got = run_case(c, in, dt, Backend::metal);
    const double tol = tolerance(dt);
    expect_close("out", got.out, ref.out, tol);
    expect_lse(got.lse, ref.lse, dt == DType::f32 ? 1e-5 : 1e-3);
    expect_close("dq", got.dq, ref.dq, 3 * tol);
    expect_close("dk", got.dk, ref.dk, 3 * tol);
    expect_close("dv", got.dv, ref.dv, 3 * tol);
}

INSTANTIATE_TEST_SUITE_P(Cases, MetalVsReference, ::testing::ValuesIn(metal_params()),
                         [](const auto& info) { return case_name(info.param.c, info.param.dt); });

Case find_case(const std::string& name) {
    for (const Case& c : case_list())
        if (c.name == name) return c;
    throw std::runtime_error("no case " + name);
}

// Same seed, same mask: Metal and CPU agree to fp32 rounding, while another seed (another
// mask) moves the output far more, so a mask that differed would fail.
TEST(MetalDropout, SameMaskAsCpuBackend) {
    Case c = find_case("dropout_causal_gqa");
    Inputs in = make_inputs(c, DType::f32);
    const Result metal = run_case(c, in, DType::f32, Backend::metal);
    const Result cpu = run_case(c, in, DType::f32, Backend::cpu);
    EXPECT_LE(rel_error(metal.out, cpu.out), 1e-5);
    EXPECT_LE(rel_error(metal.dq, cpu.dq), 1e-5);
    EXPECT_LE(rel_error(metal.dv, cpu.dv), 1e-5);
    c.seed += 1;
    const Result other = run_case(c, in, DType::f32, Backend::cpu);
    EXPECT_GE(rel_error(other.out, cpu.out), 1e-2);
}

// No atomics: every gradient element has one writer, so reruns are bitwise identical.
TEST(MetalBackward, Deterministic) {
    const Case c = find_case("gqa");
    Inputs in = make_inputs(c, DType::f16);
    const Result a = run_case(c, in, DType::f16, Backend::metal);
    const Result b = run_case(c, in, DType::f16, Backend::metal);
    EXPECT_EQ(a.dq, b.dq);
    EXPECT_EQ(a.dk, b.dk);
    EXPECT_EQ(a.dv, b.dv);
}

// Metal views: the buffer handle plus byte_offset.
TensorView metal_view(Tensor& t) { return on_backend(t.view(), Backend::metal); }

// Gradients asked for one at a time (autograd asks only for what it needs) equal the full run's;
// computed by the same kernels, bit for bit.
TEST(MetalBackward, EachGradientAlone) {
    const Case c = find_case("gqa");
    Inputs in = make_inputs(c, DType::f32);
    const Result full = run_case(c, in, DType::f32, Backend::metal);
    AttentionOptions o = options_for(c, in, Backend::metal);
    Tensor out(in.dout.shape(), DType::f32), lse({c.B, c.Hq, c.Sq}, DType::f32);
    forward({.q = metal_view(in.q), .k = metal_view(in.k), .v = metal_view(in.v),
             .out = metal_view(out), .lse = metal_view(lse)},
            o);
    for (int which = 0; which < 3; ++which) {
        Tensor g(which == 0 ? in.q.shape() : in.k.shape(), DType::f32);
        g.fill(7.0);
        BackwardArgs a{.q = metal_view(in.q), .k = metal_view(in.k), .v = metal_view(in.v),
                       .out = metal_view(out), .dout = metal_view(in.dout),
                       .lse = metal_view(lse)};
        (which == 0 ? a.dq : which == 1 ? a.dk : a.dv) = metal_view(g);
        std::vector<double> scratch(backward_workspace_size(a, o) / 8 + 16);
        const auto addr = reinterpret_cast<uintptr_t>(scratch.data());
        backward(a, o, {reinterpret_cast<void*>((addr + 63) / 64 * 64), scratch.size() * 8 - 64});
        EXPECT_EQ(g.values(), which == 0 ? full.dq : which == 1 ? full.dk : full.dv) << which;
    }
}

struct Small {
    Tensor q{{1, 9, 2, 16}, DType::f16}, k{{1, 9, 2, 16}, DType::f16}, v{{1, 9, 2, 16}, DType::f16};
    Tensor out{{1, 9, 2, 16}, DType::f16}, dout{{1, 9, 2, 16}, DType::f16};
    Tensor lse{{1, 2, 9}, DType::f32}, dq{{1, 9, 2, 16}, DType::f16};
    BackwardArgs args() {
        return {.q = metal_view(q), .k = metal_view(k), .v = metal_view(v),
                .out = metal_view(out), .dout = metal_view(dout), .lse = metal_view(lse),
                .dq = metal_view(dq)};
    }
};

TEST(MetalBackward, NeedsCallerWorkspace) {
    Small s;
    AttentionOptions o;
    o.backend = Backend::metal;
    EXPECT_EQ(backward_workspace_size(s.args(), o), size_t(1 * 2 * 9 * 4));
    try {
        backward(s.args(), o);
        FAIL() << "expected an error";
    } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
        EXPECT_STREQ(e.what(),
                     "orchard::backward: workspace has 0 bytes but the metal backend needs 72 "
                     "(see backward_workspace_size)");
    }
}

Support metal_forward_support(int64_t D, DType dt) {
    Tensor q({1, 4, 1, D}, dt), k({1, 4, 1, D}, dt), v({1, 4, 1, D}, dt), out({1, 4, 1, D}, dt);
    Tensor lse({1, 1, 4}, DType::f32);
    AttentionOptions o;
    o.backend = Backend::metal;
    return supports(ForwardArgs{.q = metal_view(q), .k = metal_view(k), .v = metal_view(v),
                                .out = metal_view(out), .lse = metal_view(lse)},
                    o);
}

TEST(MetalSupports, NamesWhatItTakes) {
    EXPECT_TRUE(metal_forward_support(16, DType::f32).ok);
    const Support odd = metal_forward_support(12, DType::f32);
    EXPECT_FALSE(odd.ok);
    EXPECT_EQ(odd.reason,
              "orchard::forward: the Metal backend supports head dims that are multiples of 8 "
              "from 8 to 256 but got D = 12, Dv = 12");
    const Support f64 = metal_forward_support(16, DType::f64);
    EXPECT_FALSE(f64.ok);
    EXPECT_EQ(f64.reason,
              "orchard::forward: the Metal backend supports float32, float16 and bfloat16 but "
              "got float64");
}

// The plan a framework's Metal host (PyTorch MPS) launches from: validated like forward(),
// with the constant buffer the emulated kernels get.
TEST(MetalPlan, ForwardPlanDescribesTheLaunch) {
    Tensor q({2, 40, 4, 16}, DType::f16), k({2, 70, 2, 16}, DType::f16);
    Tensor v({2, 70, 2, 24}, DType::f16), out({2, 40, 4, 24}, DType::f16);
    Tensor lse({2, 4, 40}, DType::f32);
    AttentionOptions o;
    o.causal = true;
    const MetalLaunchPlan plan = metal_forward_plan(
        {.q = metal_view(q), .k = metal_view(k), .v = metal_view(v), .out = metal_view(out),
         .lse = metal_view(lse)},
        o);
    EXPECT_FALSE(plan.nothing_to_do);
    EXPECT_EQ(plan.dtype, "half");
    EXPECT_EQ(plan.head_dim_bucket, 64);
    EXPECT_EQ(std::vector<uint32_t>(plan.grid_queries, plan.grid_queries + 3),
              (std::vector<uint32_t>{2, 4, 2}));
    EXPECT_EQ(std::vector<uint32_t>(plan.grid_keys, plan.grid_keys + 3),
              (std::vector<uint32_t>{3, 2, 2}));
    EXPECT_EQ(plan.threads_per_threadgroup, 128u);
    ASSERT_EQ(plan.params.size(), sizeof(msl::KernelParams));
    msl::KernelParams kp;
    std::memcpy(&kp, plan.params.data(), sizeof kp);
    EXPECT_EQ(kp.D, 16);
    EXPECT_EQ(kp.Dv, 24);
    EXPECT_EQ(kp.Hq, 4);
    EXPECT_EQ(kp.window_right, 0);
    EXPECT_EQ(kp.q_st[1], 4 * 16);
    EXPECT_FLOAT_EQ(kp.scale, 0.25f);
}

TEST(MetalPlan, RefusesWhatForwardRefuses) {
    Tensor q({1, 4, 1, 12}, DType::f32), k({1, 4, 1, 12}, DType::f32);
    Tensor v({1, 4, 1, 12}, DType::f32), out({1, 4, 1, 12}, DType::f32);
    Tensor lse({1, 1, 4}, DType::f32);
    try {
        metal_forward_plan({.q = metal_view(q), .k = metal_view(k), .v = metal_view(v),
                            .out = metal_view(out), .lse = metal_view(lse)},
                           {});
        FAIL() << "expected an error";
    } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::unsupported);
        EXPECT_STREQ(e.what(), "orchard::forward: the Metal backend supports head dims that are "
                               "multiples of 8 from 8 to 256 but got D = 12, Dv = 12");
    }
}

}  // namespace
}  // namespace orchard::test
