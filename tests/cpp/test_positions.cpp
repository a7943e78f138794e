// Position offsets: attention of a sequence split into equal blocks, one call per (query block,
// key block) with the blocks' positions, reproduces the full-sequence call (masks, ALiBi and the
// dropout mask use global positions). This is what ring attention computes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cases.h"

namespace orchard::test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Param {
    Case c;  // Sq == Sk == blocks * block length
    int64_t blocks;
    DType dt;
    Backend backend;
};

void PrintTo(const Param& p, std::ostream* os) {
    *os << case_name(p.c, p.dt) << "_" << to_string(p.backend);
}

// Dimension `dim` of `v` narrowed to [start, start + len).
TensorView narrow(TensorView v, int dim, int64_t start, int64_t len) {
    v.byte_offset += start * v.strides[dim] * element_size(v.dtype);
    v.shape[dim] = len;
    return v;
}

double at4(Tensor& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    return to_double(t.ptr({i0, i1, i2, i3}), t.dtype());
}

// Index of (i0, i1, i2, i3) in a row-major (n0, n1, n2, n3) tensor (n0 not needed).
int64_t flat(int64_t n1, int64_t n2, int64_t n3, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    return ((i0 * n1 + i1) * n2 + i2) * n3 + i3;
}

// The options of the call on query block qb and key block kb of `len` tokens each.
AttentionOptions block_options(AttentionOptions o, int64_t qb, int64_t kb, int64_t len) {
    o.q_position_offset = qb * len;
    o.k_position_offset = kb * len;
    return o;
}

// out (B, S, Hq, Dv) and lse (B, Hq, S) of one call per block pair, merged over key blocks in
// float64 by log-sum-exp: lse = log(sum_b exp(lse_b)), out = sum_b exp(lse_b - lse) out_b.
void merged_forward(const Param& param, Inputs& in, const AttentionOptions& options,
                    std::vector<double>& out_m, std::vector<double>& lse_m) {
    const Case& c = param.c;
    const int64_t B = c.B, S = c.Sq, len = S / param.blocks, Hq = c.Hq, Dv = c.dv();
    out_m.assign(size_t(B * S * Hq * Dv), 0.0);
    lse_m.assign(size_t(B * Hq * S), -kInf);
    for (int64_t qb = 0; qb < param.blocks; ++qb)
        for (int64_t kb = 0; kb < param.blocks; ++kb) {
            Tensor out_b({B, len, Hq, Dv}, param.dt), lse_b({B, Hq, len}, DType::f32);
            forward({narrow(in.q.view(), 1, qb * len, len), narrow(in.k.view(), 1, kb * len, len),
                     narrow(in.v.view(), 1, kb * len, len), out_b.view(), lse_b.view()},
                    block_options(options, qb, kb, len));
            for (int64_t b = 0; b < B; ++b)
                for (int64_t h = 0; h < Hq; ++h)
                    for (int64_t r = 0; r < len; ++r) {
                        const double l_b = to_double(lse_b.ptr({b, h, r}), DType::f32);
                        if (l_b == kInf) {  // fully masked row of this block: out_b = 0
                            for (int64_t d = 0; d < Dv; ++d) EXPECT_EQ(at4(out_b, b, r, h, d), 0.0);
                            continue;
                        }
                        double& l = lse_m[size_t(flat(Hq, S, 1, b, h, qb * len + r, 0))];
                        const double merged =
                            std::max(l, l_b) + std::log1p(std::exp(-std::abs(l - l_b)));
                        for (int64_t d = 0; d < Dv; ++d) {
                            double& acc = out_m[size_t(flat(S, Hq, Dv, b, qb * len + r, h, d))];
                            acc = acc * std::exp(l - merged) +
                                  at4(out_b, b, r, h, d) * std::exp(l_b - merged);
                        }
                        l = merged;
                    }
        }
    for (double& l : lse_m)
        if (l == -kInf) l = kInf;  // no block saw a key: DESIGN.md's +inf
}

// Adds `src` (B, len, H, d) into rows [first, first + len) of dst (B, S, H, d) in float64.
void add_rows(std::vector<double>& dst, int64_t S, int64_t first, Tensor& src) {
    const std::vector<int64_t>& n = src.shape();
    for (int64_t b = 0; b < n[0]; ++b)
        for (int64_t r = 0; r < n[1]; ++r)
            for (int64_t h = 0; h < n[2]; ++h)
                for (int64_t d = 0; d < n[3]; ++d)
                    dst[size_t(flat(S, n[2], n[3], b, first + r, h, d))] += at4(src, b, r, h, d);
}

// dq, dk, dv of one backward call per block pair, given the full call's out / lse rows (what a
// ring passes after merging): dq summed over key blocks, dk / dv over query blocks.
void summed_backward(const Param& param, Inputs& in, const AttentionOptions& options, Tensor& out,
                     Tensor& lse, std::vector<double>& dq_m, std::vector<double>& dk_m,
                     std::vector<double>& dv_m) {
    const Case& c = param.c;
    const int64_t B = c.B, S = c.Sq, len = S / param.blocks;
    dq_m.assign(size_t(in.q.numel()), 0.0);
    dk_m.assign(size_t(in.k.numel()), 0.0);
    dv_m.assign(size_t(in.v.numel()), 0.0);
    for (int64_t qb = 0; qb < param.blocks; ++qb)
        for (int64_t kb = 0; kb < param.blocks; ++kb) {
            Tensor dq_b({B, len, c.Hq, c.D}, param.dt), dk_b({B, len, c.Hkv, c.D}, param.dt),
                dv_b({B, len, c.Hkv, c.dv()}, param.dt);
            backward({narrow(in.q.view(), 1, qb * len, len), narrow(in.k.view(), 1, kb * len, len),
                      narrow(in.v.view(), 1, kb * len, len), narrow(out.view(), 1, qb * len, len),
                      narrow(in.dout.view(), 1, qb * len, len),
                      narrow(lse.view(), 2, qb * len, len), dq_b.view(), dk_b.view(), dv_b.view()},
                     block_options(options, qb, kb, len));
            add_rows(dq_m, S, qb * len, dq_b);
            add_rows(dk_m, S, kb * len, dk_b);
            add_rows(dv_m, S, kb * len, dv_b);
        }
}

class PositionOffsets : public ::testing::TestWithParam<Param> {};

TEST_P(PositionOffsets, BlocksReproduceTheFullSequence) {
    const Param& param = GetParam();
    const Case& c = param.c;
    ASSERT_EQ(c.Sk, c.Sq);
    ASSERT_EQ(c.Sq % param.blocks, 0);
    Inputs in = make_inputs(c, param.dt);
    const AttentionOptions options = options_for(c, in, param.backend);

    // The full sequence in one call.
    Tensor out({c.B, c.Sq, c.Hq, c.dv()}, param.dt), lse({c.B, c.Hq, c.Sq}, DType::f32);
    Tensor dq(in.q.shape(), param.dt), dk(in.k.shape(), param.dt), dv(in.v.shape(), param.dt);
    forward({in.q.view(), in.k.view(), in.v.view(), out.view(), lse.view()}, options);
    backward({in.q.view(), in.k.view(), in.v.view(), out.view(), in.dout.view(), lse.view(),
              dq.view(), dk.view(), dv.view()},
             options);

    std::vector<double> out_m, lse_m, dq_m, dk_m, dv_m;
    merged_forward(param, in, options, out_m, lse_m);
    summed_backward(param, in, options, out, lse, dq_m, dk_m, dv_m);
    const double tol = std::max(tolerance(param.dt), 1e-6);  // fp32 lse bounds the f64 merge
    EXPECT_LE(rel_error(out_m, out.values()), tol) << "out";
    const std::vector<double> lse_full = lse.values();
    for (size_t i = 0; i < lse_m.size(); ++i)
        ASSERT_NEAR(lse_m[i], lse_full[i], 1e-5 * (1 + std::abs(lse_full[i])))
            << "lse[" << i << "]";
    EXPECT_LE(rel_error(dq_m, dq.values()), 3 * tol) << "dq";
    EXPECT_LE(rel_error(dk_m, dk.values()), 3 * tol) << "dk";
    EXPECT_LE(rel_error(dv_m, dv.values()), 3 * tol) << "dv";
}

// Blocks of 23 keys: dropout's groups of four keys straddle block edges; windows span blocks.
std::vector<Param> params() {
    const std::vector<Case> cases = {
        {.name = "causal", .B = 2, .Sq = 69, .Sk = 69, .Hq = 2, .Hkv = 2, .D = 16, .causal = true},
        {.name = "window", .Sq = 92, .Sk = 92, .Hq = 2, .Hkv = 1, .D = 16, .left = 30, .right = 5},
        {.name = "dropout", .Sq = 69, .Sk = 69, .Hq = 2, .Hkv = 2, .D = 16, .dropout = 0.3},
        {.name = "dropout_causal_gqa",
         .B = 2,
         .Sq = 92,
         .Sk = 92,
         .Hq = 4,
         .Hkv = 2,
         .D = 16,
         .causal = true,
         .dropout = 0.2},
        {.name = "all_features",
         .B = 2,
         .Sq = 69,
         .Sk = 69,
         .Hq = 4,
         .Hkv = 1,
         .D = 24,
         .left = 17,
         .right = 9,
         .softcap = 2.0,
         .alibi = 2,
         .dropout = 0.25},
    };
    std::vector<Param> ps;
    for (const Case& c : cases) {
        const int64_t blocks = c.Sq / 23;
        ps.push_back({c, blocks, DType::f32, Backend::cpu});
        ps.push_back({c, blocks, DType::bf16, Backend::cpu});
        ps.push_back({c, blocks, DType::f64, Backend::reference});
    }
    return ps;
}

INSTANTIATE_TEST_SUITE_P(Blocks, PositionOffsets, ::testing::ValuesIn(params()),
                         [](const auto& info) {
                             return case_name(info.param.c, info.param.dt) + "_" +
                                    to_string(info.param.backend);
                         });

}  // namespace
}  // namespace orchard::test
