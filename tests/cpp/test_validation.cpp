// Front-door validation: each error names op, argument, expected and received; odd inputs run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"

namespace orchard::test {
namespace {

constexpr ErrorKind kInvalid = ErrorKind::invalid_argument;
constexpr ErrorKind kUnsupported = ErrorKind::unsupported;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kMax64 = std::numeric_limits<int64_t>::max();
const Device kCuda{DeviceKind::cuda, 0};

using Parts = std::vector<std::string>;

// The message of the orchard::Error that `run` throws; checks the error's kind and that the
// message starts with "<op>: " and contains every one of `parts`.
std::string expect_error(const std::function<void()>& run, ErrorKind kind, const std::string& op,
                         const Parts& parts) {
    std::string msg;
    try {
        run();
        ADD_FAILURE() << op << ": no orchard::Error thrown; expected one containing '"
                      << (parts.empty() ? "" : parts[0]) << "'";
        return msg;
    } catch (const Error& e) {
        msg = e.what();
        EXPECT_EQ(int(e.kind()), int(kind)) << msg;
    }
    EXPECT_EQ(msg.rfind(op + ": ", 0), 0u) << "message does not start with '" << op << ": ': "
                                          << msg;
    for (const std::string& part : parts)
        EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' missing from: " << msg;
    return msg;
}

// A Tensor reading and writing memory owned elsewhere, through `view`.
Tensor viewing(const TensorView& view) {
    Tensor t(std::vector<int64_t>(view.shape, view.shape + view.ndim), view.dtype);
    t.view() = view;
    return t;
}

void expect_all(Tensor& t, double value, const char* what) {
    for (int64_t n = 0; n < t.numel(); ++n) {
        ASSERT_EQ(t.get(n), value) << what << "[" << n << "]";
    }
}

// A valid call, padded or varlen, with random inputs; a test breaks one thing and expects the
// error (forward, backward, and supports() reporting the same message), or runs it.
class Validation : public ::testing::Test {
protected:
    Tensor q, k, v, out, lse, dout, dq, dk, dv, cu_q, cu_k, alibi;
    AttentionOptions opt;

    void SetUp() override { make(1, 5, 5, 2, 2, 8, 8); }

    void make(int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv,
              DType dt = DType::f32) {
        opt = {};
        q = Tensor({B, Sq, Hq, D}, dt);
        k = Tensor({B, Sk, Hkv, D}, dt);
        v = Tensor({B, Sk, Hkv, Dv}, dt);
        out = Tensor({B, Sq, Hq, Dv}, dt);
        lse = Tensor({B, Hq, Sq}, DType::f32);
        make_grads(dt);
    }

    // Varlen with the given per-sequence lengths (cu_seqlens on the CPU, max_seqlen left 0).
    void make_varlen(const std::vector<int32_t>& lens_q, const std::vector<int32_t>& lens_k,
                     int64_t Hq = 2, int64_t Hkv = 2, int64_t D = 8) {
        opt = {};
        cu_q = cu_seqlens(lens_q);
        cu_k = cu_seqlens(lens_k);
        const int64_t tq = int64_t(cu_q.get(cu_q.numel() - 1));
        const int64_t tk = int64_t(cu_k.get(cu_k.numel() - 1));
        q = Tensor({tq, Hq, D}, DType::f32);
        k = Tensor({tk, Hkv, D}, DType::f32);
        v = Tensor({tk, Hkv, D}, DType::f32);
        out = Tensor({tq, Hq, D}, DType::f32);
        lse = Tensor({Hq, tq}, DType::f32);
        make_grads(DType::f32);
        opt.cu_seqlens_q = cu_q.view();
        opt.cu_seqlens_k = cu_k.view();
    }

    static Tensor cu_seqlens(const std::vector<int32_t>& lens) {
        Tensor cu({int64_t(lens.size()) + 1}, DType::i32);
        for (int64_t b = 0; b < int64_t(lens.size()); ++b)
            cu.set(b + 1, cu.get(b) + lens[size_t(b)]);
        return cu;
    }

    void make_grads(DType dt) {
        dout = Tensor(out.shape(), dt);
        dq = Tensor(q.shape(), dt);
        dk = Tensor(k.shape(), dt);
        dv = Tensor(v.shape(), dt);
        std::mt19937 rng(7);
        for (Tensor* t : {&q, &k, &v, &dout}) t->fill_random(rng);
    }

    ForwardArgs fwd_args() {
        return {.q = q.view(), .k = k.view(), .v = v.view(), .out = out.view(), .lse = lse.view()};
    }
    BackwardArgs bwd_args() {
        return {.q = q.view(), .k = k.view(), .v = v.view(), .out = out.view(),
                .dout = dout.view(), .lse = lse.view(), .dq = dq.view(), .dk = dk.view(),
                .dv = dv.view()};
    }
    // The tensors both directions take, and those only the backward takes, by argument name.
    std::vector<std::pair<std::string, Tensor*>> shared() {
        return {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}};
    }
    std::vector<std::pair<std::string, Tensor*>> grads() {
        return {{"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}};
    }

    void forward() { orchard::forward(fwd_args(), opt); }
    void backward(Workspace ws = {}) { orchard::backward(bwd_args(), opt, ws); }

    // Every view of the call (the options' too) on `device`: nothing is read from them.
    void set_device(Device device) {
        for (Tensor* t : {&q, &k, &v, &out, &lse, &dout, &dq, &dk, &dv}) t->view().device = device;
        for (TensorView* t : {&opt.cu_seqlens_q, &opt.cu_seqlens_k, &opt.alibi_slopes})
            if (!t->empty_view()) t->device = device;
    }

    void expect_forward_error(const Parts& parts, ErrorKind kind = kInvalid) {
        SCOPED_TRACE("forward");
        const std::string op = opt.op_name ? opt.op_name : "orchard::forward";
        const std::string msg = expect_error([&] { forward(); }, kind, op, parts);
        Support s;
        EXPECT_NO_THROW(s = supports(fwd_args(), opt));
        EXPECT_FALSE(s.ok);
        EXPECT_EQ(s.reason, msg);
    }
    void expect_backward_error(const Parts& parts, ErrorKind kind = kInvalid) {
        SCOPED_TRACE("backward");
        const std::string op = opt.op_name ? opt.op_name : "orchard::backward";
        const std::string msg = expect_error([&] { backward(); }, kind, op, parts);
        Support s;
        EXPECT_NO_THROW(s = supports(bwd_args(), opt));
        EXPECT_FALSE(s.ok);
        EXPECT_EQ(s.reason, msg);
    }
    // Checks shared by both directions must fire in both.
    void expect_both_error(const Parts& parts, ErrorKind kind = kInvalid) {
        expect_forward_error(parts, kind);
        expect_backward_error(parts, kind);
    }
};

// ---- TensorView constructors ----------------------------------------------------------------

TEST_F(Validation, TensorViewMoreThanFourDims) {
    float x[32];
    expect_error([&] { TensorView::contiguous(x, DType::f32, {1, 2, 2, 2, 4}); }, kInvalid,
                 "orchard::TensorView", {"at most 4 dimensions", "but 5 were given"});
}

TEST_F(Validation, TensorViewStridesDoNotMatchSizes) {
    float x[32];
    expect_error([&] { TensorView::strided(x, DType::f32, {2, 4, 4}, {16, 4}); }, kInvalid,
                 "orchard::TensorView", {"3 sizes but 2 strides"});
}

// ---- Checks of every tensor argument ----------------------------------------------------------

TEST_F(Validation, MissingView) {
    for (const auto& [name, t] : shared()) {
        Tensor saved = std::move(*t);  // a move keeps the view on its storage; a copy would not
        *t = Tensor();
        expect_both_error({name + " is missing (an empty view)"});
        *t = std::move(saved);
    }
    // Any gradient may be left out (not computed), but not all three.
    std::vector<Tensor> saved;
    for (const auto& [name, t] : grads()) {
        saved.push_back(std::move(*t));
        *t = Tensor();
    }
    expect_backward_error({"dq, dk and dv are all missing; at least one must be given"});
    size_t i = 0;
    for (const auto& [name, t] : grads()) *t = std::move(saved[i++]);
}

TEST_F(Validation, TooManyDimensions) {
    k.view().ndim = 5;
    expect_both_error({"k has 5 dimensions; expected 1 to 4"});
    k.view().ndim = -1;
    expect_both_error({"k has -1 dimensions; expected 1 to 4"});
}

TEST_F(Validation, NegativeSize) {
    k.view().shape[1] = -5;
    expect_both_error({"k sizes must be >= 0 but its shape is (1, -5, 2, 8)"});
    k.view().shape[1] = 5;
    dv.view().shape[3] = -8;
    expect_backward_error({"dv sizes must be >= 0 but its shape is (1, 5, 2, -8)"});
}

TEST_F(Validation, NullDataWithElements) {
    v.view().data = nullptr;
    expect_both_error({"v has a null data pointer but 80 elements"});
}

TEST_F(Validation, SizeOverflow) {
    // 2^64 elements wrap to 0 in int64: such a view must not pass as empty with null data.
    const int64_t huge = int64_t(1) << 32;
    for (Tensor* t : {&q, &k, &v, &out, &lse}) {
        TensorView& view = t->view();
        view.data = nullptr;
        const bool is_lse = t == &lse;
        const std::vector<int64_t> shape =
            is_lse ? std::vector<int64_t>{huge, 1, huge} : std::vector<int64_t>{huge, huge, 1, 1};
        view.ndim = int(shape.size());
        for (int i = 0; i < view.ndim; ++i) view.shape[i] = shape[i];
        view.strides[0] = huge;  // strides are not looked at by this check
    }
    expect_both_error({"q must span fewer than 2^63 bytes but has shape "
                       "(4294967296, 4294967296, 1, 1) of float32"});
}

TEST_F(Validation, DeviceMismatch) {
    k.view().device = kCuda;
    expect_both_error({"k is on cuda:0 but q is on cpu"});
    set_device(kCuda);
    dq.view().device = {DeviceKind::cuda, 1};
    expect_backward_error({"dq is on cuda:1 but q is on cuda:0"});
}

// ---- Ranks, dtypes, shapes --------------------------------------------------------------------

TEST_F(Validation, WrongRank) {
    q = Tensor({5, 2, 8}, DType::f32);
    expect_both_error({"q must have 4 dimensions (B, S, H, D) but has 3: shape (5, 2, 8)"});
    make(1, 5, 5, 2, 2, 8, 8);
    lse = Tensor({2, 5}, DType::f32);
    expect_both_error({"lse must have 3 dimensions (B, Hq, Sq) but has 2: shape (2, 5)"});
}

TEST_F(Validation, WrongRankVarlen) {
    make_varlen({2, 3}, {4, 1});
    k = Tensor({1, 5, 2, 8}, DType::f32);
    expect_both_error({"k must have 3 dimensions (total, H, D) but has 4: shape (1, 5, 2, 8)"});
    make_varlen({2, 3}, {4, 1});
    lse = Tensor({1, 2, 5}, DType::f32);
    expect_both_error({"lse must have 2 dimensions (Hq, total_q) but has 3: shape (1, 2, 5)"});
}

TEST_F(Validation, QueryDtypeInt32) {
    for (Tensor* t : {&q, &k, &v, &out, &dout, &dq, &dk, &dv}) t->view().dtype = DType::i32;
    expect_both_error({"q has dtype int32 but expected float32, float16, bfloat16 or float64"});
}

TEST_F(Validation, DtypeDiffersFromQuery) {
    for (const auto& [name, t] : shared()) {
        if (name == "q" || name == "lse") continue;
        t->view().dtype = DType::f16;
        expect_both_error({name + " has dtype float16 but q has float32"});
        t->view().dtype = DType::f32;
    }
    for (const auto& [name, t] : grads()) {
        t->view().dtype = DType::bf16;
        expect_backward_error({name + " has dtype bfloat16 but q has float32"});
        t->view().dtype = DType::f32;
    }
}

TEST_F(Validation, LseNotFloat32) {
    lse = Tensor({1, 2, 5}, DType::f64);
    expect_both_error({"lse has dtype float64 but expected float32"});
}

TEST_F(Validation, KeyHeadDimDiffers) {
    k = Tensor({1, 5, 2, 16}, DType::f32);
    expect_both_error({"k has head_dim 16 but q has 8"});
}

TEST_F(Validation, BatchDiffers) {
    k = Tensor({2, 5, 2, 8}, DType::f32);
    v = Tensor({2, 5, 2, 8}, DType::f32);
    expect_both_error({"k has batch size 2 but q has 1"});
}

TEST_F(Validation, ValueDisagreesWithKey) {
    v = Tensor({1, 6, 2, 8}, DType::f32);
    expect_both_error({"v has shape (1, 6, 2, 8) but k has (1, 5, 2, 8)"});
    make_varlen({2, 3}, {4, 1});
    v = Tensor({6, 2, 8}, DType::f32);
    expect_both_error({"v has shape (6, 2, 8) but k has (5, 2, 8)"});
}

TEST_F(Validation, ValueHeadsDiffer) {
    v = Tensor({1, 5, 1, 8}, DType::f32);
    expect_both_error({"v has 1 heads but k has 2"});
}

TEST_F(Validation, QueryHeadsNotMultipleOfKvHeads) {
    make(1, 5, 5, 3, 2, 8, 8);
    expect_both_error({"number of query heads (3)", "number of key/value heads (2)"});
    make(1, 5, 5, 2, 0, 8, 8);
    expect_both_error({"number of query heads (2)", "number of key/value heads (0)"});
}

TEST_F(Validation, OutputShapeWrong) {
    out = Tensor({1, 5, 2, 4}, DType::f32);
    expect_both_error({"out has shape (1, 5, 2, 4) but expected (1, 5, 2, 8) = (B, Sq, Hq, Dv)"});
    make(1, 5, 5, 2, 2, 8, 8);
    lse = Tensor({1, 5, 2}, DType::f32);  // (B, Sq, Hq): a transposed lse
    expect_both_error({"lse has shape (1, 5, 2) but expected (1, 2, 5) = (B, Hq, Sq)"});
}

TEST_F(Validation, OutputShapeWrongVarlen) {
    make_varlen({2, 3}, {4, 1});
    out = Tensor({5, 2, 4}, DType::f32);
    expect_both_error({"out has shape (5, 2, 4) but expected (5, 2, 8) = (total_q, Hq, Dv)"});
    make_varlen({2, 3}, {4, 1});
    lse = Tensor({5, 2}, DType::f32);
    expect_both_error({"lse has shape (5, 2) but expected (2, 5) = (Hq, total_q)"});
}

TEST_F(Validation, GradientShapeWrong) {
    dout = Tensor({1, 5, 2, 7}, DType::f32);
    expect_backward_error({"dout has shape (1, 5, 2, 7) but expected (1, 5, 2, 8)",
                           "the shape of out"});
    make(1, 5, 5, 2, 2, 8, 8);
    dq = Tensor({1, 4, 2, 8}, DType::f32);
    expect_backward_error({"dq has shape (1, 4, 2, 8) but expected (1, 5, 2, 8)", "shape of q"});
    make(1, 5, 5, 2, 2, 8, 8);
    dk = Tensor({1, 5, 1, 8}, DType::f32);
    expect_backward_error({"dk has shape (1, 5, 1, 8) but expected (1, 5, 2, 8)", "shape of k"});
    make(1, 5, 5, 2, 2, 8, 8);
    dv = Tensor({5, 2, 8}, DType::f32);
    expect_backward_error({"dv has shape (5, 2, 8) but expected (1, 5, 2, 8)", "shape of v"});
}

// ---- Varlen -----------------------------------------------------------------------------------

TEST_F(Validation, CuSeqlensOnlyOneGiven) {
    make_varlen({2, 3}, {4, 1});
    opt.cu_seqlens_k = {};
    expect_both_error({"cu_seqlens_q and cu_seqlens_k must be given together",
                       "only cu_seqlens_q"});
    make(1, 5, 5, 2, 2, 8, 8);
    Tensor cu = cu_seqlens({5});
    opt.cu_seqlens_k = cu.view();
    expect_both_error({"cu_seqlens_q and cu_seqlens_k must be given together",
                       "only cu_seqlens_k"});
}

TEST_F(Validation, CuSeqlensDtype) {
    make_varlen({2, 3}, {4, 1});
    Tensor bad({3}, DType::f32);
    opt.cu_seqlens_k = bad.view();
    expect_both_error({"cu_seqlens_k has dtype float32 but expected int32"});
}

TEST_F(Validation, CuSeqlensShape) {
    make_varlen({2, 3}, {4, 1});
    Tensor longer = cu_seqlens({4, 1, 0});
    opt.cu_seqlens_k = longer.view();
    expect_both_error({"cu_seqlens_k has shape (4,) but expected (3,) = (B + 1,)"});
    Tensor matrix({1, 3}, DType::i32);
    opt.cu_seqlens_q = matrix.view();
    expect_both_error({"cu_seqlens_q has shape (1, 3) but expected (B + 1,)"});
    Tensor none({0}, DType::i32);
    opt.cu_seqlens_q = none.view();
    expect_both_error({"cu_seqlens_q has shape (0,) but expected (B + 1,)"});
}

TEST_F(Validation, CuSeqlensNotContiguous) {
    make_varlen({2, 3}, {4, 1});
    Tensor spread({6}, DType::i32);
    for (int64_t i = 0; i < 3; ++i) spread.set(2 * i, cu_q.get(i));
    opt.cu_seqlens_q = TensorView::strided(spread.view().data, DType::i32, {3}, {2});
    expect_both_error({"cu_seqlens_q must be contiguous (stride 1) but has stride 2"});
}

TEST_F(Validation, CuSeqlensFirstNotZero) {
    make_varlen({2, 3}, {4, 1});
    cu_k.set(0, 1);
    expect_both_error({"cu_seqlens_k[0] must be 0 but is 1"});
}

TEST_F(Validation, CuSeqlensDecreasing) {
    make_varlen({2, 1, 2}, {4, 1, 0});
    cu_q.set(2, 1);  // [0, 2, 1, 5]
    expect_both_error({"cu_seqlens_q must be non-decreasing",
                       "cu_seqlens_q[2] = 1 < cu_seqlens_q[1] = 2"});
}

TEST_F(Validation, CuSeqlensLastNotTotal) {
    make_varlen({2, 3}, {4, 1});
    cu_q.set(2, 4);
    expect_both_error({"cu_seqlens_q[-1] must equal the total number of tokens 5 but is 4"});
}

TEST_F(Validation, MaxSeqlenTooSmall) {
    make_varlen({2, 3}, {4, 1});
    opt.max_seqlen_q = 2;
    expect_both_error({"max_seqlen_q is 2 but the longest sequence in cu_seqlens_q has 3 tokens"});
}

TEST_F(Validation, MaxSeqlenNegative) {
    make_varlen({2, 3}, {4, 1});
    opt.max_seqlen_k = -1;
    expect_both_error({"max_seqlen_k must be >= 0 but is -1"});
}

TEST_F(Validation, MaxSeqlenMissingForDeviceTensors) {
    // cu_seqlens in device memory are not read on the host: max_seqlen must be given.
    make_varlen({2, 3}, {4, 1});
    set_device(kCuda);
    expect_both_error({"max_seqlen_q must be given (> 0) for device tensors but is 0"});
}

// ---- Options ----------------------------------------------------------------------------------

TEST_F(Validation, ScaleNotFinite) {
    opt.scale = kInf;
    expect_both_error({"softmax_scale must be finite but is inf"});
    opt.scale = kNaN;
    expect_both_error({"softmax_scale must be finite but is nan"});
}

TEST_F(Validation, SoftcapNegativeOrNotFinite) {
    opt.softcap = -1.5;
    expect_both_error({"softcap must be finite and >= 0 but is -1.5"});
    opt.softcap = kNaN;
    expect_both_error({"softcap must be finite and >= 0 but is nan"});
    opt.softcap = kInf;
    expect_both_error({"softcap must be finite and >= 0 but is inf"});
}

TEST_F(Validation, WindowBelowMinusOne) {
    opt.window_left = -2;
    opt.window_right = 3;
    expect_both_error({"window_size must be >= -1 (-1 = unbounded) but is (-2, 3)"});
    opt.window_left = 4;
    opt.window_right = -7;
    expect_both_error({"window_size must be >= -1 (-1 = unbounded) but is (4, -7)"});
}

TEST_F(Validation, CausalWithWindowRight) {
    opt.causal = true;
    opt.window_right = 4;
    expect_both_error({"causal=true implies window_size[1] = 0 but window_size[1] is 4"});
}

TEST_F(Validation, AlibiWrongDtype) {
    alibi = Tensor({2}, DType::f16);
    opt.alibi_slopes = alibi.view();
    expect_both_error({"alibi_slopes has dtype float16 but expected float32"});
}

TEST_F(Validation, AlibiWrongShape) {
    alibi = Tensor({3}, DType::f32);
    opt.alibi_slopes = alibi.view();
    expect_both_error(
        {"alibi_slopes has shape (3,) but expected (2,) or (1, 2) = (Hq,) or (B, Hq)"});
    alibi = Tensor({2, 1}, DType::f32);
    opt.alibi_slopes = alibi.view();
    expect_both_error({"alibi_slopes has shape (2, 1) but expected (2,) or (1, 2)"});
}

TEST_F(Validation, AlibiOnOtherDevice) {
    alibi = Tensor({2}, DType::f32);
    opt.alibi_slopes = alibi.view();
    opt.alibi_slopes.device = kCuda;
    expect_both_error({"alibi_slopes is on cuda:0 but q is on cpu"});
}

TEST_F(Validation, DropoutOutOfRange) {
    const std::vector<std::pair<double, const char*>> bad = {
        {-0.25, "-0.25"}, {1.0, "1"}, {1.5, "1.5"}, {kNaN, "nan"}};
    for (const auto& [p, shown] : bad) {
        opt.dropout_p = p;
        expect_both_error({std::string("dropout_p must be in [0, 1) but is ") + shown});
    }
}

TEST_F(Validation, DropoutOffsetTooLarge) {
    opt.dropout_p = 0.1;
    opt.offset = uint64_t(1) << 32;
    expect_both_error({"the dropout offset must be < 2^32 but is 4294967296"});
    opt.offset = (uint64_t(1) << 32) - 1;
    EXPECT_NO_THROW(forward());
    EXPECT_NO_THROW(backward());
}

TEST_F(Validation, PositionOffsetsOutOfRange) {
    opt.q_position_offset = -1;
    expect_both_error({"q_position_offset must be in [0, 2^32 - Sq] = [0, 4294967291] "
                       "(positions are 32-bit) but is -1"});
    opt.q_position_offset = 0;
    opt.k_position_offset = (int64_t(1) << 32) - 4;
    expect_both_error({"k_position_offset must be in [0, 2^32 - Sk] = [0, 4294967291] "
                       "(positions are 32-bit) but is 4294967292"});
    // The last positions are accepted (with dropout, whose counter holds them).
    opt.dropout_p = 0.5;
    opt.q_position_offset = (int64_t(1) << 32) - 5;
    opt.k_position_offset = (int64_t(1) << 32) - 5;
    EXPECT_NO_THROW(forward());
    EXPECT_NO_THROW(backward());
}

TEST_F(Validation, PositionOffsetsWithVarlen) {
    make_varlen({3, 4}, {5, 2});
    opt.k_position_offset = 8;
    expect_both_error({"q_position_offset / k_position_offset are not supported with varlen "
                       "inputs (cu_seqlens) but are (0, 8)"});
}

// ---- Backends ---------------------------------------------------------------------------------

TEST_F(Validation, BackendNeedsOtherDevice) {
    opt.backend = Backend::cuda;
    expect_both_error({"backend cuda needs cuda tensors but q is on cpu"});
    opt.backend = Backend::metal;
    expect_both_error({"backend metal needs metal tensors but q is on cpu"});
    set_device(kCuda);
    opt.backend = Backend::cpu;
    expect_both_error({"backend cpu needs cpu tensors but q is on cuda:0"});
    opt.backend = Backend::reference;
    expect_both_error({"backend reference needs cpu tensors but q is on cuda:0"});
}

TEST_F(Validation, CpuHeadDimLimit) {
    const std::vector<std::pair<int64_t, int64_t>> dims = {{0, 8}, {8, 0}, {520, 8}, {8, 513}};
    for (const auto& [D, Dv] : dims) {
        make(1, 5, 5, 2, 2, D, Dv);
        expect_both_error({"the CPU backend supports head dims 1 to 512 but got D = " +
                               std::to_string(D) + ", Dv = " + std::to_string(Dv)},
                          kUnsupported);
    }
    make(1, 3, 3, 1, 1, 512, 512);
    EXPECT_NO_THROW(forward());
    EXPECT_NO_THROW(backward());
    make(1, 5, 5, 2, 2, 0, 8);
    opt.backend = Backend::reference;
    expect_both_error({"head dims must be >= 1 but D = 0, Dv = 8"}, kUnsupported);
}

TEST_F(Validation, CudaNotBuilt) {
    set_device(kCuda);
    if (ORCHARD_TEST_CUDA_BUILT)  // these tensors are fp32: the CUDA kernels refuse them
        expect_both_error({"the CUDA backend supports fp16 and bf16 inputs but got float32"},
                          kUnsupported);
    else
        expect_both_error({"Orchard was built without the CUDA backend", "-DORCHARD_CUDA=ON"},
                          kUnsupported);
}

TEST_F(Validation, MetalNotBuilt) {
    if (ORCHARD_TEST_METAL_BUILT) GTEST_SKIP() << "this build has a Metal backend";
    set_device({DeviceKind::metal, 0});
    expect_both_error({"Orchard was built without the Metal backend"}, kUnsupported);
}

// ---- Outputs: writable and not aliasing -------------------------------------------------------

TEST_F(Validation, OutputWithStrideZeroDim) {
    dq = Tensor::expanded(Tensor({1, 5, 1, 8}, DType::f32), 2, 2);
    expect_backward_error({"dq has overlapping elements", "shape (1, 5, 2, 8)",
                           "strides (40, 8, 0, 1)"});
    make(1, 5, 5, 2, 2, 8, 8);
    out = Tensor::expanded(Tensor({1, 1, 2, 8}, DType::f32), 1, 5);
    expect_forward_error({"out has overlapping elements", "shape (1, 5, 2, 8)",
                          "strides (16, 0, 8, 1)"});
    EXPECT_NO_THROW(backward());  // out is an input of the backward: it may be expanded
}

TEST_F(Validation, OutputOverlapsInput) {
    dq.view() = q.view();
    expect_backward_error({"dq overlaps q in memory"});
    make(1, 5, 5, 2, 2, 8, 8);
    dv.view() = dk.view();
    expect_backward_error({"dk overlaps dv in memory"});
    make(1, 5, 5, 2, 2, 8, 8);
    // A view into the middle of v: partial overlap.
    out.view().data = static_cast<char*>(v.view().data) + 12;
    expect_forward_error({"out overlaps v in memory"});
}

TEST_F(Validation, OutOverlapsLse) {
    lse.view() = TensorView::contiguous(out.view().data, DType::f32, {1, 2, 5});
    expect_forward_error({"out overlaps lse in memory"});
}

TEST_F(Validation, WorkspaceNullData) {
    expect_error([&] { backward({nullptr, 64}); }, kInvalid, "orchard::backward",
                 {"workspace has 64 bytes but a null data pointer"});
}

TEST_F(Validation, WorkspaceMisaligned) {
    alignas(64) static char buf[256];
    expect_error([&] { backward({buf + 4, 128}); }, kInvalid, "orchard::backward",
                 {"workspace must be 64-byte aligned but its address is"});
}

TEST_F(Validation, OpNameReplacesDefault) {
    opt.op_name = "orchard.flash_attn_func";
    k = Tensor({1, 5, 2, 16}, DType::f32);
    expect_both_error({"orchard.flash_attn_func: k has head_dim 16 but q has 8"});
    EXPECT_EQ(supports(fwd_args(), opt).reason.find("orchard::"), std::string::npos);
}

// ---- supports() and the workspace -------------------------------------------------------------

TEST_F(Validation, SupportsValidCall) {
    for (Backend b : {Backend::automatic, Backend::cpu}) {
        opt.backend = b;
        const Support f = supports(fwd_args(), opt), g = supports(bwd_args(), opt);
        EXPECT_TRUE(f.ok) << f.reason;
        EXPECT_TRUE(g.ok) << g.reason;
        EXPECT_EQ(f.backend, Backend::cpu);
        EXPECT_EQ(g.backend, Backend::cpu);
        EXPECT_TRUE(f.reason.empty());
    }
    opt.backend = Backend::reference;
    EXPECT_EQ(supports(fwd_args(), opt).backend, Backend::reference);
}

TEST_F(Validation, SupportsNeverThrows) {
    // A selection of bad calls; the expect_*_error helpers check this for every error above.
    std::vector<std::function<void()>> breakers = {
        [&] { q = Tensor(); },
        [&] { k.view().shape[1] = -3; },
        [&] { opt.dropout_p = kNaN; },
        [&] { set_device(kCuda); },
        [&] { dq.view() = q.view(); },
    };
    for (auto& breaker : breakers) {
        make(1, 5, 5, 2, 2, 8, 8);
        breaker();
        Support f, g;
        EXPECT_NO_THROW(f = supports(fwd_args(), opt));
        EXPECT_NO_THROW(g = supports(bwd_args(), opt));
        EXPECT_FALSE(g.ok);
        EXPECT_FALSE(g.reason.empty());
        try {
            backward();
            ADD_FAILURE() << "backward did not throw";
        } catch (const Error& e) {
            EXPECT_EQ(g.reason, e.what());
        }
    }
}

TEST_F(Validation, CallerWorkspace) {
    forward();
    const size_t bytes = backward_workspace_size(bwd_args(), opt);
    EXPECT_GE(bytes, 0u);
    backward();
    const std::vector<double> dq0 = dq.values(), dk0 = dk.values(), dv0 = dv.values();
    dq.fill(-3);
    dk.fill(-3);
    dv.fill(-3);
    const size_t n = (bytes / sizeof(double) + 8 + 7) / 8 * 8;  // a multiple of 64 bytes
    std::unique_ptr<double[], decltype(&std::free)> ws(
        static_cast<double*>(std::aligned_alloc(64, n * sizeof(double))), &std::free);
    std::fill(ws.get(), ws.get() + n, kNaN);
    ASSERT_NO_THROW(backward({ws.get(), bytes}));
    EXPECT_EQ(dq.values(), dq0);
    EXPECT_EQ(dk.values(), dk0);
    EXPECT_EQ(dv.values(), dv0);
}

// ---- Valid but unusual inputs -----------------------------------------------------------------

TEST_F(Validation, PackedQkvAccepted) {
    const int64_t B = 2, S = 5, H = 2, D = 8;
    make(B, S, S, H, H, D, D);
    forward();
    backward();
    const std::vector<double> out0 = out.values(), lse0 = lse.values();
    const std::vector<double> dq0 = dq.values(), dk0 = dk.values(), dv0 = dv.values();

    // qkv (B, S, 3, H, D) and dqkv alike: views of component c at offset c * H * D.
    std::vector<float> qkv(B * S * 3 * H * D), dqkv(qkv.size(), 99.0f);
    auto part = [&](std::vector<float>& buf, int c) {
        return TensorView::strided(buf.data() + c * H * D, DType::f32, {B, S, H, D},
                                   {S * 3 * H * D, 3 * H * D, D, 1});
    };
    Tensor pq = viewing(part(qkv, 0)), pk = viewing(part(qkv, 1)), pv = viewing(part(qkv, 2));
    pq.copy_from(q);
    pk.copy_from(k);
    pv.copy_from(v);
    q = std::move(pq);
    k = std::move(pk);
    v = std::move(pv);
    dq = viewing(part(dqkv, 0));
    dk = viewing(part(dqkv, 1));
    dv = viewing(part(dqkv, 2));
    out.fill(0);
    ASSERT_NO_THROW(forward());
    ASSERT_NO_THROW(backward());
    EXPECT_LE(rel_error(out.values(), out0), 1e-6);
    EXPECT_EQ(lse.values(), lse0);
    EXPECT_LE(rel_error(dq.values(), dq0), 1e-6);
    EXPECT_LE(rel_error(dk.values(), dk0), 1e-6);
    EXPECT_LE(rel_error(dv.values(), dv0), 1e-6);
}

TEST_F(Validation, PackedGqaQkvAccepted) {
    // A fused projection's output (B, S, Hq + 2 * Hkv, D) split into q, k, v: heads differ.
    const int64_t B = 2, S = 5, Hq = 4, Hkv = 2, D = 8, H = Hq + 2 * Hkv;
    make(B, S, S, Hq, Hkv, D, D);
    forward();
    backward();
    const std::vector<double> out0 = out.values();
    const std::vector<double> dq0 = dq.values(), dk0 = dk.values(), dv0 = dv.values();
    Tensor qkv({B, S, H, D}, DType::f32), dqkv({B, S, H, D}, DType::f32);
    dqkv.fill(99);
    auto part = [&](Tensor& buf, int64_t h0, int64_t h) {
        TensorView view = buf.view();
        view.data = buf.ptr({0, 0, h0, 0});
        view.shape[2] = h;
        return viewing(view);
    };
    Tensor pq = part(qkv, 0, Hq), pk = part(qkv, Hq, Hkv), pv = part(qkv, Hq + Hkv, Hkv);
    pq.copy_from(q);
    pk.copy_from(k);
    pv.copy_from(v);
    q = std::move(pq);
    k = std::move(pk);
    v = std::move(pv);
    dq = part(dqkv, 0, Hq);
    dk = part(dqkv, Hq, Hkv);
    dv = part(dqkv, Hq + Hkv, Hkv);
    ASSERT_NO_THROW(forward());
    ASSERT_NO_THROW(backward());
    EXPECT_LE(rel_error(out.values(), out0), 1e-6);
    EXPECT_LE(rel_error(dq.values(), dq0), 1e-6);
    EXPECT_LE(rel_error(dk.values(), dk0), 1e-6);
    EXPECT_LE(rel_error(dv.values(), dv0), 1e-6);
}

TEST_F(Validation, ExpandedInputsAccepted) {
    // k / v: one head expanded (stride 0) to two; only outputs must own their memory.
    make(1, 5, 5, 2, 2, 8, 8);
    Tensor k1({1, 5, 1, 8}, DType::f32), v1({1, 5, 1, 8}, DType::f32);
    std::mt19937 rng(3);
    k1.fill_random(rng);
    v1.fill_random(rng);
    k = Tensor::expanded(k1, 2, 2);
    v = Tensor::expanded(v1, 2, 2);
    ASSERT_NO_THROW(forward());
    ASSERT_NO_THROW(backward());
    const std::vector<double> out_e = out.values(), dk_e = dk.values();
    Tensor km(k.shape(), DType::f32), vm(v.shape(), DType::f32);
    km.copy_from(k);
    vm.copy_from(v);
    k = std::move(km);
    v = std::move(vm);
    forward();
    backward();
    EXPECT_LE(rel_error(out_e, out.values()), 1e-6);
    EXPECT_LE(rel_error(dk_e, dk.values()), 1e-6);
}

TEST_F(Validation, HugeWindowIsUnbounded) {
    // A window larger than any sequence is unbounded; it must not overflow index arithmetic.
    for (bool causal : {false, true}) {
        make(1, 7, 9, 2, 2, 8, 8);
        opt.causal = causal;
        forward();
        backward();
        const std::vector<double> out0 = out.values(), dq0 = dq.values(), dk0 = dk.values();
        opt.window_left = kMax64;
        opt.window_right = causal ? 0 : kMax64;
        forward();
        backward();
        EXPECT_EQ(out.values(), out0) << "causal " << causal;
        EXPECT_EQ(dq.values(), dq0) << "causal " << causal;
        EXPECT_EQ(dk.values(), dk0) << "causal " << causal;
    }
}

TEST_F(Validation, LooseMaxSeqlenAccepted) {
    // max_seqlen is an upper bound: a loose one must cost neither memory nor time.
    make_varlen({2, 3}, {4, 1});
    forward();
    backward();
    const std::vector<double> out0 = out.values(), dq0 = dq.values(), dk0 = dk.values();
    opt.max_seqlen_q = int64_t(1) << 40;
    opt.max_seqlen_k = int64_t(1) << 40;
    ASSERT_NO_THROW(forward());
    ASSERT_NO_THROW(backward());
    EXPECT_EQ(out.values(), out0);
    EXPECT_EQ(dq.values(), dq0);
    EXPECT_EQ(dk.values(), dk0);
}

// ---- Empty problems ---------------------------------------------------------------------------

TEST_F(Validation, EmptyBatch) {
    make(0, 5, 5, 2, 2, 8, 8);
    EXPECT_NO_THROW(forward());
    EXPECT_NO_THROW(backward());
    make_varlen({}, {});
    EXPECT_NO_THROW(forward());
    EXPECT_NO_THROW(backward());
}

TEST_F(Validation, EmptyQueries) {
    make(1, 0, 5, 2, 2, 8, 8);
    EXPECT_NO_THROW(forward());
    dk.fill(123);
    dv.fill(-7);
    ASSERT_NO_THROW(backward());
    expect_all(dk, 0.0, "dk");
    expect_all(dv, 0.0, "dv");
}

TEST_F(Validation, EmptyKeys) {
    make(1, 5, 0, 2, 2, 8, 8);
    out.fill(123);
    lse.fill(-7);
    ASSERT_NO_THROW(forward());
    expect_all(out, 0.0, "out");
    expect_all(lse, kInf, "lse");
    dq.fill(55);
    ASSERT_NO_THROW(backward());
    expect_all(dq, 0.0, "dq");
}

TEST_F(Validation, NoQueryHeads) {
    // Hq = 0 is a multiple of Hkv = 2: no query uses the keys, so their gradients are 0.
    make(1, 5, 5, 0, 2, 8, 8);
    EXPECT_NO_THROW(forward());
    dk.fill(123);
    dv.fill(-7);
    ASSERT_NO_THROW(backward());
    expect_all(dk, 0.0, "dk");
    expect_all(dv, 0.0, "dv");
}

TEST_F(Validation, EmptyVarlenQueries) {
    make_varlen({0, 0}, {4, 1});
    dk.fill(123);
    dv.fill(-7);
    ASSERT_NO_THROW(forward());
    ASSERT_NO_THROW(backward());
    expect_all(dk, 0.0, "dk");
    expect_all(dv, 0.0, "dv");
}

// ---- Non-finite values ------------------------------------------------------------------------

TEST_F(Validation, NonFiniteInputsDoNotCrash) {
    for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::f64}) {
        for (int variant = 0; variant < 3; ++variant) {
            make(1, 40, 33, 2, 1, 16, 16, dt);
            if (variant == 1) {
                opt.causal = true;
                opt.softcap = 2.0;
                opt.dropout_p = 0.3;
            } else if (variant == 2) {
                alibi = Tensor({2}, DType::f32);
                alibi.set(0, kNaN);
                alibi.set(1, kInf);
                opt.alibi_slopes = alibi.view();
                opt.window_left = 5;
                opt.window_right = 2;
                opt.scale = 1e30;
            }
            q.set(3, kNaN);
            k.set(17, kInf);
            k.set(40, -kInf);
            v.set(5, kNaN);
            dout.set(9, kInf);
            EXPECT_NO_THROW(forward());
            lse.set(2, kNaN);
            lse.set(4, -kInf);
            EXPECT_NO_THROW(backward());
            // Everything non-finite.
            for (Tensor* t : {&q, &k, &v, &dout}) t->fill(kNaN);
            EXPECT_NO_THROW(forward());
            EXPECT_NO_THROW(backward());
        }
    }
}

}  // namespace
}  // namespace orchard::test
