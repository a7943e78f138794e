// Orchard's public C++ API: fused attention forward and backward (FlashAttention semantics).
//
// Layouts follow FlashAttention 2's Python interface (see docs in shared DESIGN.md):
//   padded:  q (B, Sq, Hq, D)   k (B, Sk, Hkv, D)   v (B, Sk, Hkv, Dv)   out (B, Sq, Hq, Dv)
//            lse float32 (B, Hq, Sq)
//   varlen:  q (total_q, Hq, D) k (total_k, Hkv, D) v (total_k, Hkv, Dv) out (total_q, Hq, Dv)
//            lse float32 (Hq, total_q), with cu_seqlens_q/k int32 (B + 1,)
// Gradients dq, dk, dv have the shapes of q, k, v. Every view may have any strides; outputs
// must not have stride-0 (expanded) dimensions of size > 1 and must not overlap any input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "orchard/tensor_view.h"
#include "orchard/types.h"

namespace orchard {

struct AttentionOptions {
    std::optional<double> scale;  // softmax scale; default 1 / sqrt(D)
    bool causal = false;          // bottom-right aligned: query i sees keys j <= i + Sk - Sq
    int64_t window_left = -1;     // sliding window; -1 = unbounded. Key j is visible iff
    int64_t window_right = -1;    //   i + Sk - Sq - left <= j <= i + Sk - Sq + right
    double softcap = 0.0;         // > 0: s = softcap * tanh(s / softcap)
    TensorView alibi_slopes;      // optional float32 (Hq,) or (B, Hq): s -= m_h * |i + Sk - Sq - j|
    double dropout_p = 0.0;       // on P, in [0, 1); kept values scaled by 1 / (1 - p)
    uint64_t seed = 0;            // Philox key (see DESIGN.md "Dropout")
    uint64_t offset = 0;          // Philox counter word 3; must be < 2^32
    // Positions of the first query / key of this call in the full sequence, for a block of a
    // longer attention (ring / context parallelism). With them, query i and key j stand at
    // I = q_position_offset + i and J = k_position_offset + j, and I, J replace i, j in the
    // mask (I + Sk - Sq - left <= J <= I + Sk - Sq + right), ALiBi and the dropout counter.
    // A call on q rows [a, a + Sq) and keys [c, c + Sk) of a full attention with the same
    // Sk - Sq (e.g. equal-length shards of self-attention) reproduces that block exactly.
    // Each sequence of the batch is shifted alike; >= 0, positions < 2^32; not with varlen.
    int64_t q_position_offset = 0;
    int64_t k_position_offset = 0;
    bool deterministic = false;   // GPU backwards only; the CPU backward is always deterministic
    Backend backend = Backend::automatic;
    void* stream = nullptr;       // cudaStream_t / MTLCommandQueue; ignored on the CPU

    // Varlen mode when cu_seqlens_q is given (int32 (B + 1,), on the tensors' device).
    TensorView cu_seqlens_q;
    TensorView cu_seqlens_k;
    int64_t max_seqlen_q = 0;  // upper bounds of the per-sequence lengths
    int64_t max_seqlen_k = 0;

    // The name used in error messages and the call log ("orchard.flash_attn_func", ...).
    const char* op_name = nullptr;
};

struct ForwardArgs {
    TensorView q, k, v;
    TensorView out;  // written
    TensorView lse;  // written; float32
};

struct BackwardArgs {
    TensorView q, k, v, out, dout, lse;  // out and lse as returned by forward (or merged)
    // Written (overwritten, not accumulated). A gradient left as an empty view is not computed;
    // at least one must be given.
    TensorView dq, dk, dv;
};

// Caller-provided scratch memory on the tensors' device. A backend that needs scratch and gets
// none allocates it internally only where that is documented (the CPU backend does, bounded by
// O(B * Hq * Sq) floats); GPU backends require it (see backward_workspace_size).
struct Workspace {
    void* data = nullptr;
    size_t bytes = 0;
};

struct Support {
    bool ok = false;
    Backend backend = Backend::automatic;  // the backend that would run
    std::string reason;                    // why not, when !ok
};

// Runs attention; throws orchard::Error on invalid input or unsupported cases.
void forward(const ForwardArgs& args, const AttentionOptions& options = {});
void backward(const BackwardArgs& args, const AttentionOptions& options = {},
              Workspace workspace = {});

// Whether the call would run, on which backend, and why not. Never throws for bad input.
Support supports(const ForwardArgs& args, const AttentionOptions& options = {});
Support supports(const BackwardArgs& args, const AttentionOptions& options = {});

// Bytes of scratch memory backward() needs for these arguments on the chosen backend.
size_t backward_workspace_size(const BackwardArgs& args, const AttentionOptions& options = {});

// Threads used by the CPU backend (default: the hardware concurrency). Set it to the
// framework's own intra-op thread count to avoid oversubscription. n <= 0 restores the default.
void set_num_threads(int n);
int num_threads();

// A framework's own worker threads, lent to Orchard so that two thread pools never compete for
// the same cores (PyTorch's OpenMP threads keep spinning after each op). `run(n, body, ctx)`
// must call body(ctx, 0) ... body(ctx, n - 1), in parallel where it can, and return when all
// have returned. While a runner is set, the CPU backend uses it with `n_workers` workers instead
// of its own pool; nullptr restores the pool.
using ParallelRun = void (*)(int n, void (*body)(void* ctx, int worker), void* ctx);
void set_parallel_runner(ParallelRun run, int n_workers);

// Call counters, per direction and backend (the same numbers as the debug call log).
struct Stats {
    int64_t calls[2][5] = {};      // [Direction][Backend]
    int64_t fallbacks[2] = {};     // per direction
    int64_t staging_copies[2] = {};
};
Stats stats();
void reset_stats();

// For front ends that send a call to another implementation (e.g. PyTorch's SDPA for an
// arbitrary attn_mask): counts it as a fallback and writes its call-log line, naming `op`, the
// implementation used and why.
void record_fallback(Direction direction, const std::string& op, const std::string& used,
                     const std::string& reason);

// For front ends that copy an input into a layout a backend can read (e.g. a CUDA tensor whose
// last dimension is strided): counts a staging copy and writes its call-log line.
void record_staging_copy(Direction direction, const std::string& op, const std::string& what);

}  // namespace orchard
