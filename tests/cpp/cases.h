// The cross-backend case list and the runner that checks a backend against the float64 reference.
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "harness.h"

namespace orchard::test {

struct Case {
    std::string name;
    int64_t B = 1, Sq = 17, Sk = 17, Hq = 2, Hkv = 2, D = 32, Dv = 0;  // Dv = 0: same as D
    DType dtype = DType::f32;
    bool causal = false;
    int64_t left = -1, right = -1;
    double softcap = 0.0;
    int alibi = 0;  // 0 none, 1 slopes (Hq,), 2 slopes (B, Hq)
    double dropout = 0.0;
    uint64_t seed = 0x1234'5678'9abcULL, offset = 7;
    std::optional<double> scale;
    std::vector<int32_t> seqlens_q, seqlens_k;  // varlen when non-empty (B = size)
    Layout layout_q = Layout::contiguous, layout_kv = Layout::contiguous;
    Layout layout_out = Layout::contiguous;
    bool expand_kv = false;  // k / v passed as one head expanded (stride 0) to Hkv heads
    int64_t q_pos = 0, k_pos = 0;  // position offsets (AttentionOptions::q/k_position_offset)

    bool varlen() const { return !seqlens_q.empty(); }
    int64_t dv() const { return Dv ? Dv : D; }
};

std::vector<Case> case_list();
std::string case_name(const Case& c, DType dt);

// Everything one run produces, as float64 in logical row-major order.
struct Result {
    std::vector<double> out, lse, dq, dk, dv;
};

// The inputs of a case (deterministic per case), in the case's dtype and layouts.
struct Inputs {
    Tensor q, k, v, dout, alibi, cu_q, cu_k;
    int64_t total_q = 0, total_k = 0, max_q = 0, max_k = 0;
};

Inputs make_inputs(const Case& c, DType dt, uint32_t seed = 1);
// `v` as the backend's device sees it: Metal views name a buffer + byte offset (in the emulator
// build the buffer handle is the host allocation itself).
TensorView on_backend(TensorView v, Backend backend);
AttentionOptions options_for(const Case& c, Inputs& in, Backend backend);
// Runs forward then backward (dout from the inputs) on `backend` with `dt` storage.
Result run_case(const Case& c, Inputs& in, DType dt, Backend backend);
// The same inputs converted to float64 and run on the reference.
Result run_reference(const Case& c, Inputs& in);

}  // namespace orchard::test
