// The CUDA forward kernel (FlashAttention 2 on mma.sync, sm_80+): one thread block per
// (query block, head, batch); K/V tiles stream through double-buffered shared memory while each
// warp keeps its query rows' running max, sum and output accumulator in registers.
#pragma once

#include <cmath>

#include "cuda/kernel_params.cuh"
#include "cuda/mma.cuh"
#include "cuda/tile_io.cuh"

namespace orchard::cuda {

// kBM query rows per block, kBN keys per tile, kWarps warps; each warp owns kMF row blocks of
// 16 (kMF = kBM / (16 * kWarps)), so one K or V fragment feeds kMF MMAs.
template <int kD_, int kBM_, int kBN_, int kWarps_>
struct FwdConfig {
    static constexpr int kD = kD_, kBM = kBM_, kBN = kBN_, kWarps = kWarps_;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kMF = kBM / (16 * kWarps);
    static constexpr int kP = kRowPitch<kD>;
    static_assert(kMF >= 1 && kMF * 16 * kWarps == kBM && kBN % 16 == 0 && kD % 16 == 0);
    // sQ (kBM x kP), then two stages of sK and sV (kBN x kP each).
    static constexpr size_t kSmemBytes = size_t(kBM + 4 * kBN) * kP * 2;
};

// The online-softmax state of a warp's kMF row blocks: per thread, rows g and g + 8 of each.
template <int kMF>
struct RowStats {
    float max[kMF][2];  // log2 units
    float sum[kMF][2];  // per-lane partial sums
    __device__ __forceinline__ RowStats() {
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) max[mf][rr] = -INFINITY, sum[mf][rr] = 0.f;
    }
};

// One key tile of the forward on a warp's score fragments, shared by the mma.sync and the wgmma
// kernels: score transform, mask, online softmax, dropout. Afterwards acc_s holds P (dropped
// entries zero) ready for P V, and `rescale` the factor by which the output accumulated so far
// must be multiplied (rescale_rows) before P V is added: the caller picks the moment, since
// the wgmma kernel still has the previous P V in flight here.
// Element (mf, nt, c) of acc_s: query row0 + mf * 16 + g + 8 * (c / 2), key n0 + nt * 8 + 2t + c % 2;
// `full`: every (query, key) of the block's tile is visible (tile_fully_visible).
template <int kMF, int kNT>
__device__ __forceinline__ void fwd_softmax_tile(const KernelParams& p, const Seq& s,
                                                 const ScoreMod& mod, int b, int h, int64_t row0,
                                                 int64_t n0, bool full, float (&acc_s)[kMF][kNT][4],
                                                 RowStats<kMF>& st, float (&rescale)[kMF][2]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t diag = s.diag;
    // Each pass below branches once per tile, so the common path (no softcap, ALiBi, mask or
    // dropout) is straight-line code the compiler can schedule across all elements.
    if (!mod.plain) {
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int64_t i = row0 + mf * 16 + g + 8 * (c / 2);
                    const int64_t j = n0 + nt * 8 + 2 * t + c % 2;
                    acc_s[mf][nt][c] = mod.general(acc_s[mf][nt][c], i + diag - j);
                }
    }
    if (!full) {
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const int64_t i = row0 + mf * 16 + g + rr * 8;
                const Span keys = visible_keys(i, diag, p.window_left, p.window_right, s.sk);
                // Visible columns of this tile, [lo, hi) relative to n0.
                const int lo = int(max(min(keys.lo - n0, int64_t(kNT * 8)), int64_t(0)));
                const int hi = int(max(min(keys.hi - n0, int64_t(kNT * 8)), int64_t(0)));
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = nt * 8 + 2 * t + e;
                        if (col < lo || col >= hi) acc_s[mf][nt][2 * rr + e] = -INFINITY;
                    }
            }
    }
    // Online softmax: new row max, rescale of the running sum and output, P = exp2(s - max)
    // (max in log2 units; raw plain-path scores scaled inside the FMA).
    const float factor = mod.log2_factor();
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
                mx = fmaxf(mx, fmaxf(acc_s[mf][nt][2 * rr], acc_s[mf][nt][2 * rr + 1]));
            mx = fmaxf(st.max[mf][rr], quad_max(mx) * factor);
            // A row with nothing visible yet keeps max -inf: subtract 0 instead (exp2 -> 0).
            const float base = mx == -INFINITY ? 0.f : mx;
            rescale[mf][rr] = fast_exp2(st.max[mf][rr] - base);
            st.max[mf][rr] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                acc_s[mf][nt][2 * rr] = fast_exp2(fmaf(acc_s[mf][nt][2 * rr], factor, -base));
                acc_s[mf][nt][2 * rr + 1] = fast_exp2(fmaf(acc_s[mf][nt][2 * rr + 1], factor, -base));
                sum += acc_s[mf][nt][2 * rr] + acc_s[mf][nt][2 * rr + 1];
            }
            st.sum[mf][rr] = st.sum[mf][rr] * rescale[mf][rr] + sum;
        }
    }
    // Dropout on P: the row sums above keep the dropped values, P V does not. Keep bits first
    // (a rolled loop: Philox's registers stay out of the unrolled code), then a select each.
    if (p.dropout) {
        const int64_t bh = int64_t(b) * p.Hq + h;
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf) {
#pragma unroll
            for (int half = 0; half < (kNT + 7) / 8; ++half) {  // 8 C tiles (32 bits) at a time
                constexpr int kChunk = kNT < 8 ? kNT : 8;
                uint32_t keep = 0;  // bit 4 * (nt % 8) + c
#pragma unroll 1
                for (int x = 0; x < 2 * kChunk; ++x) {
                    const int rr = x / kChunk, nt = half * 8 + x % kChunk;
                    const int64_t i = row0 + mf * 16 + g + rr * 8;
                    const int64_t j = n0 + nt * 8 + 2 * t;
                    // Keys j, j + 1 share one Philox call unless a key offset puts them in two.
                    const Philox4 w = dropout_words_at(p, bh, i, j);
                    const int64_t J = p.k_pos + j;
                    const uint32_t u1 = (J & 3) == 3 ? dropout_words_at(p, bh, i, j + 1).x[0]
                                                     : dropout_word(w, J + 1);
                    keep |= uint32_t(dropout_word(w, J) < p.keep_threshold) << ((nt % 8) * 4 + rr * 2);
                    keep |= uint32_t(u1 < p.keep_threshold) << ((nt % 8) * 4 + rr * 2 + 1);
                }
#pragma unroll
                for (int nt = half * 8; nt < half * 8 + kChunk; ++nt)
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        if (!((keep >> ((nt % 8) * 4 + c)) & 1u)) acc_s[mf][nt][c] = 0.f;
            }
        }
    }
}

// acc_o rows times fwd_softmax_tile's factors.
template <int kMF, int kDT>
__device__ __forceinline__ void rescale_rows(float (&acc_o)[kMF][kDT][4], const float (&rescale)[kMF][2]) {
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf)
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc_o[mf][dt][c] *= rescale[mf][c / 2];
}

// The forward's end for a warp's kMF row blocks: out = acc / sum (times 1 / (1 - p) under
// dropout), lse = ln(sum) + max. Rows that saw no key get out = 0 and lse = +inf (DESIGN.md).
template <class T, int kMF, int kD>
__device__ __forceinline__ void fwd_epilogue(const KernelParams& p, const Seq& s, int b, int h,
                                             int64_t row0, float (&acc_o)[kMF][kD / 8][4],
                                             const RowStats<kMF>& st) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    T* out = static_cast<T*>(p.out_w) + b * p.out_st.b + s.first_q * p.out_st.s + int64_t(h) * p.out_st.h;
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf) {
        float factor[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const float sum = quad_sum(st.sum[mf][rr]);
            const bool empty = sum == 0.f;
            factor[rr] = empty ? 0.f : p.rp_dropout / sum;
            const int64_t i = row0 + mf * 16 + g + rr * 8;
            if (t == 0 && i < s.sq)
                p.lse[b * p.lse_st.b + h * p.lse_st.h + (s.first_q + i) * p.lse_st.s] =
                    empty ? INFINITY : (st.max[mf][rr] + log2f(sum)) * kLn2;
        }
        store_rows<kD, T>(out, p.out_st.s, row0 + mf * 16, s.sq, p.D, acc_o[mf], factor);
    }
}

template <class T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) attention_fwd_kernel(const KernelParams p) {
    constexpr int kD = Cfg::kD, kBM = Cfg::kBM, kBN = Cfg::kBN, kMF = Cfg::kMF, kP = Cfg::kP;
    constexpr int kNT = kBN / 8;  // score C tiles per row block
    constexpr int kDT = kD / 8;   // output C tiles per row block
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + kBM * kP;     // [2][kBN][kP]
    T* sV = sK + 2 * kBN * kP;  // [2][kBN][kP]

    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const Seq s = seq_of(p, b);
    const int64_t m0 = int64_t(m_block) * kBM;
    if (m0 >= s.sq) return;
    const int hk = h / (p.Hq / p.Hkv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const ScoreMod mod = score_mod(p, b, h);

    const T* q = row_ptr<T>(p.q, p.q_st, b, s.first_q, h);
    const T* k = row_ptr<T>(p.k, p.k_st, b, s.first_k, hk);
    const T* v = row_ptr<T>(p.v, p.v_st, b, s.first_k, hk);

    const auto [n_first, n_end] = key_tiles(p, s, m0, kBM, kBN);

    load_tile_async<kBM, kD, Cfg::kThreads>(sQ, q, p.q_st.s, m0, s.sq, p.D);
    if (n_first < n_end) {
        load_tile_async<kBN, kD, Cfg::kThreads>(sK, k, p.k_st.s, int64_t(n_first) * kBN, s.sk, p.D);
        load_tile_async<kBN, kD, Cfg::kThreads>(sV, v, p.v_st.s, int64_t(n_first) * kBN, s.sk, p.D);
    }
    cp_async_commit();

    float acc_o[kMF][kDT][4] = {};
    RowStats<kMF> stats;

    const int warp_row0 = warp * kMF * 16;  // first row of this warp inside the block
    for (int n = n_first; n < n_end; ++n) {
        const int stage = (n - n_first) & 1;
        if (n + 1 < n_end) {  // prefetch the next tile into the other stage
            const int64_t next0 = int64_t(n + 1) * kBN;
            load_tile_async<kBN, kD, Cfg::kThreads>(sK + (stage ^ 1) * kBN * kP, k, p.k_st.s,
                                                   next0, s.sk, p.D);
            load_tile_async<kBN, kD, Cfg::kThreads>(sV + (stage ^ 1) * kBN * kP, v, p.v_st.s,
                                                   next0, s.sk, p.D);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* tK = sK + stage * kBN * kP;
        const T* tV = sV + stage * kBN * kP;
        const int64_t n0 = int64_t(n) * kBN;

        // S = Q K^T: (16 x kBN) per row block.
        float acc_s[kMF][kNT][4] = {};
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
            uint32_t a[kMF][4];
#pragma unroll
            for (int mf = 0; mf < kMF; ++mf)
                ldmatrix_x4(a[mf], sQ + (warp_row0 + mf * 16 + (lane / 8 & 1) * 8 + lane % 8) * kP +
                                       kk * 16 + (lane / 16) * 8);
#pragma unroll
            for (int np = 0; np < kBN / 16; ++np) {
                uint32_t bk[4];
                ldmatrix_x4(bk, tK + (np * 16 + (lane / 16) * 8 + lane % 8) * kP + kk * 16 +
                                    (lane / 8 & 1) * 8);
#pragma unroll
                for (int mf = 0; mf < kMF; ++mf) {
                    mma_16816<T>(acc_s[mf][2 * np], a[mf], bk[0], bk[1]);
                    mma_16816<T>(acc_s[mf][2 * np + 1], a[mf], bk[2], bk[3]);
                }
            }
        }

        float rescale[kMF][2];
        fwd_softmax_tile(p, s, mod, b, h, m0 + warp_row0, n0, tile_fully_visible(p, s, m0, kBM, n0, kBN),
                         acc_s, stats, rescale);
        rescale_rows(acc_o, rescale);

        // O += P V: P from registers (T), V^T fragments by transposing loads.
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ++ks) {
            uint32_t a[kMF][4];
#pragma unroll
            for (int mf = 0; mf < kMF; ++mf) c_to_a<T>(a[mf], acc_s[mf][2 * ks], acc_s[mf][2 * ks + 1]);
#pragma unroll
            for (int dp = 0; dp < kD / 16; ++dp) {
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, tV + (ks * 16 + (lane / 8 & 1) * 8 + lane % 8) * kP +
                                          dp * 16 + (lane / 16) * 8);
#pragma unroll
                for (int mf = 0; mf < kMF; ++mf) {
                    mma_16816<T>(acc_o[mf][2 * dp], a[mf], bv[0], bv[1]);
                    mma_16816<T>(acc_o[mf][2 * dp + 1], a[mf], bv[2], bv[3]);
                }
            }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this stage
    }
    cp_async_wait<0>();  // no copy may outlive the block (rows that see no key skip the loop)

    fwd_epilogue<T, kMF, kD>(p, s, b, h, m0 + warp_row0, acc_o, stats);
}

template <class T, class Cfg>
void launch_fwd(const KernelParams& p, cudaStream_t stream) {
    auto kernel = attention_fwd_kernel<T, Cfg>;
    set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute (forward)");
    const dim3 grid(unsigned((p.Sq + Cfg::kBM - 1) / Cfg::kBM), unsigned(p.Hq), unsigned(p.B));
    if (grid.x * grid.y * grid.z == 0) return;
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
    check_cuda(cudaGetLastError(), "forward kernel launch");
}

}  // namespace orchard::cuda
