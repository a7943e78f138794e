// What the CUDA kernels read: AttentionParams narrowed to the kernels' needs (float options,
// log2-scaled softmax constants), plus the per-sequence and per-score helpers every kernel uses.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "core/mask.h"
#include "core/params.h"

namespace orchard::cuda {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

struct KernelParams {
    const void* q;
    const void* k;
    const void* v;
    const void* out;  // backward: read
    void* out_w;      // forward: written
    const void* dout;
    void* dq;
    void* dk;
    void* dv;
    float* lse;
    // Backward workspace (bwd_workspace_size): per (batch, head) a row of ws_pitch floats (Sq
    // rounded up to 64) of delta = rowsum(dout * out), then the same of lse2 = lse * log2(e);
    // entries past a sequence's end hold delta 0, lse2 +inf (so that P = 0 there).
    float* delta;
    float* lse2;
    int64_t ws_pitch;
    // ... then, where the fused Hopper backward may run (backend.cu: fused_bwd), its fp32 dQ sums
    // (attention_bwd_sm90_fused.cuh: B * Hq * ws_pitch * kD floats); nullptr where it may not.
    float* dq_accum;
    Strides q_st, k_st, v_st, out_st, dout_st, dq_st, dk_st, dv_st;
    LseStrides lse_st;
    const int32_t* cu_q;  // varlen: nullptr when padded
    const int32_t* cu_k;
    int64_t Sq, Sk;  // padded sizes, or varlen upper bounds
    int64_t total_q, total_k;  // varlen: the packed tensors' tokens (the TMA kernels' maps)
    int B, Hq, Hkv, D;
    float scale;       // softmax scale
    float scale_log2;  // scale * log2(e)
    float softcap;     // 0 = off
    const float* alibi;
    int64_t alibi_b, alibi_h;
    int64_t window_left, window_right;  // kUnbounded when open
    // Positions of this call's first query / key in a longer sequence (ring attention): masks,
    // ALiBi and dropout use I = q_pos + i, J = k_pos + j (DESIGN.md). Not with varlen.
    int64_t q_pos, k_pos;
    bool dropout;
    uint32_t keep_threshold;
    float rp_dropout;
    uint64_t seed;
    uint32_t offset;
    bool sm90;  // run the wgmma kernels (a Hopper device and an sm_90a build; backend.cu)
    bool tma;   // ... and among them the warp-specialised ones, loading by TMA (backend.cu)
    // Dynamic shared memory a block may opt in to on the device (backend.cu): the mma.sync
    // kernels take smaller blocks where their usual ones do not fit (variants.cuh).
    size_t smem_limit;
    int sms;  // the device's multiprocessors (the fused backward's grid order reads it)
};

// Where sequence b lives and how long it is. Varlen lengths are clamped to the declared
// max_seqlen so that a bad cu_seqlens cannot make a kernel write out of bounds.
struct Seq {
    int64_t first_q, first_k, sq, sk;
    int64_t diag;  // key j is visible to query i iff i + diag - left <= j <= i + diag + right
};

__device__ __forceinline__ Seq seq_of(const KernelParams& p, int b) {
    if (p.cu_q == nullptr) return {0, 0, p.Sq, p.Sk, p.Sk - p.Sq + p.q_pos - p.k_pos};
    const int64_t fq = p.cu_q[b], fk = p.cu_k[b];
    const int64_t sq = min(max(int64_t(p.cu_q[b + 1]) - fq, int64_t(0)), p.Sq);
    const int64_t sk = min(max(int64_t(p.cu_k[b + 1]) - fk, int64_t(0)), p.Sk);
    return {fq, fk, sq, sk, sk - sq};
}

template <class T>
__device__ __forceinline__ const T* row_ptr(const void* base, const Strides& st, int b,
                                            int64_t token, int h) {
    return static_cast<const T*>(base) + b * st.b + token * st.s + int64_t(h) * st.h;
}

// 2^x on the special-function unit; denormal results flush to 0 (probabilities below 1e-38).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The score transform of DESIGN.md in log2 units (ready for exp2): s = scale * qk; softcap:
// s = cap * tanh(s / cap); ALiBi: s -= slope * |i + diag - j|. Kernels test `plain` once per tile.
// On the plain path the raw scores stay as they are and `log2_factor()` (= scale * log2 e, > 0)
// is folded into the exponent's FMA: exp2(qk * factor - max); otherwise general() has already
// produced log2 units and the factor is 1.
struct ScoreMod {
    float scale, scale_log2, softcap, slope;
    bool plain;  // no softcap, no ALiBi, positive scale

    __device__ __forceinline__ float log2_factor() const { return plain ? scale_log2 : 1.f; }

    // dist = i + diag - j.
    __device__ __forceinline__ float general(float qk, int64_t dist) const {
        float s = qk * scale;
        if (softcap > 0.f) s = softcap * tanhf(s / softcap);
        return (s - slope * float(dist < 0 ? -dist : dist)) * kLog2e;
    }
    // tanh(scale * qk / cap), recovered from general()'s result x, for the softcap derivative.
    // Clamped so that a masked score (-inf) gives a finite factor (its probability is 0).
    __device__ __forceinline__ float softcap_tanh(float x, int64_t dist) const {
        const float t = (x * kLn2 + slope * float(dist < 0 ? -dist : dist)) / softcap;
        return fminf(fmaxf(t, -1.f), 1.f);
    }
};

__device__ __forceinline__ ScoreMod score_mod(const KernelParams& p, int b, int h) {
    const float slope = p.alibi ? p.alibi[b * p.alibi_b + h * p.alibi_h] : 0.f;
    return {p.scale, p.scale_log2, p.softcap, slope,
            p.softcap <= 0.f && p.alibi == nullptr && p.scale > 0.f};
}

// The dropout words of query i, keys 4 * (j / 4).. of head bh (this call's indices).
__device__ __forceinline__ Philox4 dropout_words_at(const KernelParams& p, int64_t bh, int64_t i,
                                                    int64_t j) {
    return dropout_words(p.seed, p.offset, bh, p.q_pos + i, (p.k_pos + j) / 4);
}

// Dropout word j % 4 of a Philox output, by selects: a run-time array index would put the four
// words in local memory.
__device__ __forceinline__ uint32_t dropout_word(const Philox4& w, int64_t j) {
    const int r = int(j & 3);
    return r == 0 ? w.x[0] : r == 1 ? w.x[1] : r == 2 ? w.x[2] : w.x[3];
}

// Whether key tile [n0, n0 + bn) is visible to every query of [m0, m0 + bm) (clipped to the
// sequence): then no element of the tile needs a mask test.
__device__ __forceinline__ bool tile_fully_visible(const KernelParams& p, const Seq& s, int64_t m0,
                                                   int bm, int64_t n0, int bn) {
    const int64_t last_q = min(m0 + bm, s.sq) - 1;
    if (n0 + bn > s.sk) return false;
    return visible_keys(last_q, s.diag, p.window_left, p.window_right, s.sk).lo <= n0 &&
           visible_keys(m0, s.diag, p.window_left, p.window_right, s.sk).hi >= n0 + bn;
}

// The key tiles [first, end) of kBN keys that some row of query block [m0, m0 + kBM) sees.
__device__ __forceinline__ std::pair<int, int> key_tiles(const KernelParams& p, const Seq& s,
                                                         int64_t m0, int kBM, int kBN) {
    const Span keys = keys_of_rows(m0, min(int64_t(kBM), s.sq - m0), s.diag, p.window_left,
                                   p.window_right, s.sk);
    const int first = int(keys.lo / kBN);
    return {first, keys.hi > keys.lo ? int((keys.hi + kBN - 1) / kBN) : first};
}

KernelParams make_kernel_params(const AttentionParams& params);

// Throws orchard::Error(internal) naming `what` when a CUDA call failed.
void check_cuda(cudaError_t status, const char* what);

}  // namespace orchard::cuda
