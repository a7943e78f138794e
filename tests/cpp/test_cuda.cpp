// The cross-backend case list on the CUDA backend, against the float64 reference: inputs are
// mirrored byte for byte (same strides and offsets) into device memory. Built when the CUDA
// backend is; on a machine without a CUDA device every test says so and is skipped.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "cases.h"

namespace orchard::test {
namespace {

void cuda_ok(cudaError_t status, const char* what) {
    ASSERT_EQ(status, cudaSuccess) << what << ": " << cudaGetErrorString(status);
}

bool have_device() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// A device copy of a host Tensor's storage, with the same view on device memory.
class Mirror {
public:
    explicit Mirror(Tensor& host) : host_(&host), view_(host.view()) {
        if (host.storage_bytes() == 0) return;
        cuda_ok(cudaMalloc(&dev_, host.storage_bytes()), "cudaMalloc");
        cuda_ok(cudaMemcpy(dev_, host.storage(), host.storage_bytes(), cudaMemcpyHostToDevice),
                "cudaMemcpy H2D");
        view_.data = dev_;
        view_.device = {DeviceKind::cuda, 0};
    }
    ~Mirror() { cudaFree(dev_); }
    Mirror(const Mirror&) = delete;
    Mirror& operator=(const Mirror&) = delete;

    const TensorView& view() const { return view_; }
    void copy_back() {
        if (dev_)
            cuda_ok(cudaMemcpy(host_->storage(), dev_, host_->storage_bytes(), cudaMemcpyDeviceToHost),
                    "cudaMemcpy D2H");
    }
    // All bits set: NaN in fp16, bf16 and fp32, so an element left unwritten fails a comparison.
    void poison() {
        if (dev_) cuda_ok(cudaMemset(dev_, 0xFF, host_->storage_bytes()), "cudaMemset");
    }

private:
    Tensor* host_;
    TensorView view_;
    void* dev_ = nullptr;
};

std::vector<int64_t> lse_shape(const Case& c, const Inputs& in) {
    if (c.varlen()) return {c.Hq, in.total_q};
    return {c.B, c.Hq, c.Sq};
}

// Outputs start as NaN, so an element the kernels never write fails the comparison.
Tensor poisoned(const std::vector<int64_t>& shape, DType dt, Layout layout) {
    Tensor t(shape, dt, layout);
    t.fill(NAN);
    return t;
}

struct CudaRun {
    Result result;
    // Two more backwards asking for determinism: on Hopper the two-kernel backward where the
    // default may be the fused one (atomic dQ sums), elsewhere the same kernels again.
    Result det;
    std::vector<double> dq_det_again;
    std::string refused;  // supports()'s reason when the backend refuses the case
};

CudaRun run_cuda(const Case& c, Inputs& in, DType dt) {
    Mirror q(in.q), k(in.k), v(in.v), dout(in.dout), alibi(in.alibi), cu_q(in.cu_q), cu_k(in.cu_k);
    Tensor out_h = poisoned(in.dout.shape(), dt, c.layout_out);
    Tensor lse_h = poisoned(lse_shape(c, in), DType::f32, c.layout_out);
    Tensor dq_h = poisoned(in.q.shape(), dt, c.layout_out), dk_h = poisoned(in.k.shape(), dt, c.layout_out),
           dv_h = poisoned(in.v.shape(), dt, c.layout_out);
    Mirror out(out_h), lse(lse_h), dq(dq_h), dk(dk_h), dv(dv_h);
    AttentionOptions o = options_for(c, in, Backend::cuda);
    if (c.alibi) o.alibi_slopes = alibi.view();
    if (c.varlen()) o.cu_seqlens_q = cu_q.view(), o.cu_seqlens_k = cu_k.view();

    const ForwardArgs fwd{.q = q.view(), .k = k.view(), .v = v.view(), .out = out.view(), .lse = lse.view()};
    if (const Support s = supports(fwd, o); !s.ok) return {{}, {}, {}, s.reason};
    forward(fwd, o);
    const BackwardArgs args{.q = q.view(), .k = k.view(), .v = v.view(), .out = out.view(),
                            .dout = dout.view(), .lse = lse.view(), .dq = dq.view(),
                            .dk = dk.view(), .dv = dv.view()};
    const size_t ws_bytes = backward_workspace_size(args, o);
    void* ws = nullptr;
    if (ws_bytes) cuda_ok(cudaMalloc(&ws, ws_bytes), "cudaMalloc workspace");
    backward(args, o, {ws, ws_bytes});
    cuda_ok(cudaDeviceSynchronize(), "kernels");
    for (Mirror* m : {&out, &lse, &dq, &dk, &dv}) m->copy_back();
    CudaRun r{{out_h.values(), lse_h.values(), dq_h.values(), dk_h.values(), dv_h.values()}, {}, {}, {}};
    AttentionOptions det = o;
    det.deterministic = true;
    EXPECT_LE(backward_workspace_size(args, det), ws_bytes);
    for (Mirror* m : {&dq, &dk, &dv}) m->poison();  // the deterministic run must write them again
    backward(args, det, {ws, ws_bytes});
    cuda_ok(cudaDeviceSynchronize(), "kernels (deterministic backward)");
    for (Mirror* m : {&dq, &dk, &dv}) m->copy_back();
    r.det = {{}, {}, dq_h.values(), dk_h.values(), dv_h.values()};
    backward(args, det, {ws, ws_bytes});
    cuda_ok(cudaDeviceSynchronize(), "kernels (deterministic backward, again)");
    dq.copy_back();
    r.dq_det_again = dq_h.values();
    cudaFree(ws);
    return r;
}

struct Param {
    Case c;
    DType dt;
};
void PrintTo(const Param& p, std::ostream* os) { *os << case_name(p.c, p.dt); }

// Sets an environment variable for a scope (the backend reads its switches on each call).
class ScopedEnv {
public:
    ScopedEnv(const char* name, const char* value) : name_(name) {
        if (const char* old = std::getenv(name)) old_ = old;
        setenv(name, value, 1);
    }
    ~ScopedEnv() {
        if (old_) setenv(name_, old_->c_str(), 1);
        else unsetenv(name_);
    }
    ScopedEnv(const ScopedEnv&) = delete;
    ScopedEnv& operator=(const ScopedEnv&) = delete;

private:
    const char* name_;
    std::optional<std::string> old_;
};

class CudaVsReference : public ::testing::TestWithParam<Param> {};

void expect_close(const char* what, const std::vector<double>& got, const std::vector<double>& want,
                  double tol) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i)
        ASSERT_TRUE(std::isfinite(got[i])) << what << "[" << i << "] = " << got[i] << " (unwritten?)";
    const double err = rel_error(got, want);
    EXPECT_LE(err, tol) << what << ": relative error " << err << " > " << tol;
    ::testing::Test::RecordProperty(std::string("err_") + what, std::to_string(err));
}

void check_against_reference(const Param& param) {
    const auto& [c, dt] = param;
    Inputs in = make_inputs(c, dt);
    const CudaRun got = run_cuda(c, in, dt);
    if (!got.refused.empty()) {
        // Cases the backend refuses (layouts, head dims) are refused with its reason.
        EXPECT_NE(got.refused.find("the CUDA backend"), std::string::npos) << got.refused;
        return;
    }
    const Result ref = run_reference(c, in);
    const double tol = tolerance(dt);
    expect_close("out", got.result.out, ref.out, tol);
    ASSERT_EQ(got.result.lse.size(), ref.lse.size());
    for (size_t i = 0; i < ref.lse.size(); ++i) {
        if (std::isinf(ref.lse[i]))
            EXPECT_EQ(got.result.lse[i], ref.lse[i]) << "lse[" << i << "] of a fully masked row";
        else
            EXPECT_NEAR(got.result.lse[i], ref.lse[i], 1e-3 * (1 + std::abs(ref.lse[i]))) << "lse[" << i << "]";
    }
    expect_close("dq", got.result.dq, ref.dq, 3 * tol);
    expect_close("dk", got.result.dk, ref.dk, 3 * tol);
    expect_close("dv", got.result.dv, ref.dv, 3 * tol);
    // The deterministic backward: as close, and bitwise repeatable.
    expect_close("dq_det", got.det.dq, ref.dq, 3 * tol);
    expect_close("dk_det", got.det.dk, ref.dk, 3 * tol);
    expect_close("dv_det", got.det.dv, ref.dv, 3 * tol);
    EXPECT_EQ(0, std::memcmp(got.det.dq.data(), got.dq_det_again.data(), got.det.dq.size() * sizeof(double)));
}

TEST_P(CudaVsReference, ForwardAndGradients) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device on this machine";
    check_against_reference(GetParam());
}

std::vector<Param> cuda_params() {
    std::vector<Param> ps;
    for (const Case& c : case_list())
        for (DType dt : {DType::f16, DType::bf16}) ps.push_back({c, dt});
    return ps;
}

INSTANTIATE_TEST_SUITE_P(Cuda, CudaVsReference, ::testing::ValuesIn(cuda_params()),
                         [](const auto& info) { return case_name(info.param.c, info.param.dt); });

// The cases at the default head dim (32) again at other head dims.
std::vector<Param> widened(std::initializer_list<int64_t> dims) {
    std::vector<Param> ps;
    for (const Case& base : case_list())
        for (int64_t d : dims) {
            if (base.D != Case{}.D || base.Dv != 0) continue;
            Case c = base;
            c.D = d;
            c.name += "_d" + std::to_string(d);
            for (DType dt : {DType::f16, DType::bf16}) ps.push_back({c, dt});
        }
    return ps;
}

// Head dims of the Hopper (wgmma) kernels, so that every feature of the list runs through them
// (160, 192, 224, 256: the forward's output products of N = 128 + 32, 192, 192 + 32, 256, and the
// wide backward, attention_bwd_sm90_wide.cuh, with its 64-column stacks and 32-column ones; they
// are tested where built, refused with a reason elsewhere).
INSTANTIATE_TEST_SUITE_P(CudaWide, CudaVsReference,
                         ::testing::ValuesIn(widened({64, 80, 128, 160, 192, 224, 256})),
                         [](const auto& info) { return case_name(info.param.c, info.param.dt); });

// The mma.sync kernels under the shared memory of a consumer GPU (99 KiB: RTX 30x0 / 40x0 /
// 50x0), where head dims from 128 on run smaller blocks (variants.cuh); run on any GPU.
class CudaSmallSmem : public ::testing::TestWithParam<Param> {};

TEST_P(CudaSmallSmem, ForwardAndGradients) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device on this machine";
    const ScopedEnv mma("ORCHARD_CUDA_WGMMA", "0"), smem("ORCHARD_CUDA_SMEM_LIMIT", "101376");
    check_against_reference(GetParam());
}

INSTANTIATE_TEST_SUITE_P(CudaSmallSmem, CudaSmallSmem, ::testing::ValuesIn(widened({128, 192, 256})),
                         [](const auto& info) { return case_name(info.param.c, info.param.dt); });

// A device whose shared memory not even the smaller blocks fit (only reachable through the
// switch: every sm_80+ GPU has 99 KiB) gets an error that says so, not a failed launch.
TEST(CudaBackend, RefusesBlocksBeyondSharedMemory) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device on this machine";
    const ScopedEnv mma("ORCHARD_CUDA_WGMMA", "0"), smem("ORCHARD_CUDA_SMEM_LIMIT", "16384");
    Case c{.name = "small_smem", .D = 128};
    Inputs in = make_inputs(c, DType::bf16);
    try {
        run_cuda(c, in, DType::bf16);
        FAIL() << "no error";
    } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::unsupported);
        EXPECT_NE(std::string(e.what()).find("the forward at head dim 128 needs 69632 bytes of shared "
                                             "memory per block but the device allows 16384"),
                  std::string::npos)
            << e.what();
    }
}

// fp32 is refused with a clear reason (the kernels are fp16 / bf16 tensor-core kernels).
TEST(CudaBackend, RefusesFp32WithReason) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device on this machine";
    Case c{.name = "fp32"};
    Inputs in = make_inputs(c, DType::f32);
    Mirror q(in.q), k(in.k), v(in.v);
    Tensor out_h(in.dout.shape(), DType::f32), lse_h({c.B, c.Hq, c.Sq}, DType::f32);
    Mirror out(out_h), lse(lse_h);
    const Support s = supports(ForwardArgs{.q = q.view(), .k = k.view(), .v = v.view(),
                                           .out = out.view(), .lse = lse.view()},
                               options_for(c, in, Backend::cuda));
    EXPECT_FALSE(s.ok);
    EXPECT_NE(s.reason.find("supports fp16 and bf16 inputs but got float32"), std::string::npos) << s.reason;
}

}  // namespace
}  // namespace orchard::test
