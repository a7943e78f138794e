// The float64 oracle: naive attention forward and backward that materialises P per head.
// Every backend is tested against it; it is selectable as Backend::reference (CPU tensors only).
#include <cmath>
#include <limits>
#include <vector>

#include "core/backend.h"
#include "core/mask.h"
#include "core/thread_pool.h"
#include "cpu/tile.h"

namespace orchard::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Scores of one (b, h) head after scale, softcap, ALiBi and masking: s (sq, sk), with
// tanh(s_raw / softcap) kept in t for the softcap derivative. Masked entries are -inf.
template <class T>
void scores(const AttentionParams& p, int64_t b, int64_t h, std::vector<double>& s,
            std::vector<double>& t) {
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), diag = p.diag(b);
    const int64_t hk = h / (p.Hq / p.Hkv);
    const double slope =
        p.alibi_slopes ? double(p.alibi_slopes[b * p.alibi_b + h * p.alibi_h]) : 0.0;
    s.assign(sq * sk, -kInf);
    t.assign(sq * sk, 0.0);
    for (int64_t i = 0; i < sq; ++i) {
        const T* qi = at<const T>(p.q, p.q_st, b, p.first_q(b), i, h);
        const Span keys = visible_keys(i, diag, p.window_left, p.window_right, sk);
        for (int64_t j = keys.lo; j < keys.hi; ++j) {
            const T* kj = at<const T>(p.k, p.k_st, b, p.first_k(b), j, hk);
            double dot = 0.0;
            for (int64_t d = 0; d < p.D; ++d)
                dot += load_as<double>(qi[d * p.q_st.d]) * load_as<double>(kj[d * p.k_st.d]);
            double x = dot * p.scale;
            if (p.softcap > 0) {
                t[i * sk + j] = std::tanh(x / p.softcap);
                x = p.softcap * t[i * sk + j];
            }
            s[i * sk + j] = x - slope * double(std::llabs(i + diag - j));
        }
    }
}

// Dropout multiplier of (i, j): 0 or 1 / (1 - p); 1 without dropout. The mask is keyed on the
// positions in the full sequence.
double dropout_factor(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
    if (!p.dropout) return 1.0;
    return dropout_keep(p.seed, p.offset, p.keep_threshold, b * p.Hq + h,
                        p.q_position_offset + i, p.k_position_offset + j)
               ? p.rp_dropout
               : 0.0;
}

template <class T>
void reference_fwd_head(const AttentionParams& p, int64_t b, int64_t h) {
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), hk = h / (p.Hq / p.Hkv);
    std::vector<double> s, t, o(p.Dv);
    scores<T>(p, b, h, s, t);
    for (int64_t i = 0; i < sq; ++i) {
        double m = -kInf;
        for (int64_t j = 0; j < sk; ++j) m = std::max(m, s[i * sk + j]);
        float* lse = p.lse + b * p.lse_st.b + h * p.lse_st.h + (p.first_q(b) + i) * p.lse_st.s;
        T* out = at<T>(p.out, p.out_st, b, p.first_q(b), i, h);
        if (m == -kInf) {  // fully masked row
            *lse = std::numeric_limits<float>::infinity();
            for (int64_t d = 0; d < p.Dv; ++d) out[d * p.out_st.d] = store_as<T>(0.0);
            continue;
        }
        double l = 0.0;
        for (int64_t j = 0; j < sk; ++j) l += std::exp(s[i * sk + j] - m);
        const double row_lse = m + std::log(l);
        *lse = float(row_lse);
        std::fill(o.begin(), o.end(), 0.0);
        for (int64_t j = 0; j < sk; ++j) {
            const double pij = std::exp(s[i * sk + j] - row_lse) * dropout_factor(p, b, h, i, j);
            if (pij == 0.0) continue;
            const T* vj = at<const T>(p.v, p.v_st, b, p.first_k(b), j, hk);
            for (int64_t d = 0; d < p.Dv; ++d) o[d] += pij * load_as<double>(vj[d * p.v_st.d]);
        }
        for (int64_t d = 0; d < p.Dv; ++d) out[d * p.out_st.d] = store_as<T>(o[d]);
    }
}

// Backward of the kv head (b, hk), summed over its query-head group; uses the given out / lse.
template <class T>
void reference_bwd_kv_head(const AttentionParams& p, int64_t b, int64_t hk) {
    const int64_t sq = p.seqlen_q(b), sk = p.seqlen_k(b), group = p.Hq / p.Hkv;
    std::vector<double> s, t, dk(sk * p.D, 0.0), dv(sk * p.Dv, 0.0), dq(p.D);
    auto ld = [](const void* base, const Strides& st, int64_t b, int64_t first, int64_t tok,
                 int64_t h, int64_t d) {
        return load_as<double>(at<const T>(base, st, b, first, tok, h)[d * st.d]);
    };
    const int64_t fq = p.first_q(b), fk = p.first_k(b);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        scores<T>(p, b, h, s, t);
        for (int64_t i = 0; i < sq; ++i) {
            const double lse = p.lse[b * p.lse_st.b + h * p.lse_st.h + (fq + i) * p.lse_st.s];
            double di = 0.0;  // D_i = rowsum(dout * out)
            for (int64_t d = 0; d < p.Dv; ++d)
                di += ld(p.dout, p.dout_st, b, fq, i, h, d) * ld(p.out, p.out_st, b, fq, i, h, d);
            std::fill(dq.begin(), dq.end(), 0.0);
            for (int64_t j = 0; j < sk; ++j) {
                if (s[i * sk + j] == -kInf || lse == kInf) continue;
                const double pij = std::exp(s[i * sk + j] - lse);
                const double z = dropout_factor(p, b, h, i, j);
                double dp = 0.0;
                for (int64_t d = 0; d < p.Dv; ++d) {
                    const double g = ld(p.dout, p.dout_st, b, fq, i, h, d);
                    dv[j * p.Dv + d] += pij * z * g;
                    dp += g * ld(p.v, p.v_st, b, fk, j, hk, d);
                }
                double ds = pij * (dp * z - di);
                if (p.softcap > 0) ds *= 1.0 - t[i * sk + j] * t[i * sk + j];
                ds *= p.scale;
                for (int64_t d = 0; d < p.D; ++d) {
                    dq[d] += ds * ld(p.k, p.k_st, b, fk, j, hk, d);
                    dk[j * p.D + d] += ds * ld(p.q, p.q_st, b, fq, i, h, d);
                }
            }
            if (p.dq) {
                T* dqi = at<T>(p.dq, p.dq_st, b, fq, i, h);
                for (int64_t d = 0; d < p.D; ++d) dqi[d * p.dq_st.d] = store_as<T>(dq[d]);
            }
        }
    }
    for (int64_t j = 0; j < sk; ++j) {
        if (p.dk) {
            T* dkj = at<T>(p.dk, p.dk_st, b, fk, j, hk);
            for (int64_t d = 0; d < p.D; ++d) dkj[d * p.dk_st.d] = store_as<T>(dk[j * p.D + d]);
        }
        if (p.dv) {
            T* dvj = at<T>(p.dv, p.dv_st, b, fk, j, hk);
            for (int64_t d = 0; d < p.Dv; ++d) dvj[d * p.dv_st.d] = store_as<T>(dv[j * p.Dv + d]);
        }
    }
}

void reference_fwd(const AttentionParams& p) {
    dispatch_dtype(p.dtype, [&](auto tag) {
        using T = decltype(tag);
        auto task = [&](int64_t bh) { reference_fwd_head<T>(p, bh / p.Hq, bh % p.Hq); };
        parallel_for(p.B * p.Hq, task);
    });
}

void reference_bwd(const AttentionParams& p) {
    dispatch_dtype(p.dtype, [&](auto tag) {
        using T = decltype(tag);
        auto task = [&](int64_t bh) { reference_bwd_kv_head<T>(p, bh / p.Hkv, bh % p.Hkv); };
        parallel_for(p.B * p.Hkv, task);
    });
}

BackendSupport reference_supports(const AttentionParams& p, Direction) {
    if (p.D < 1 || p.Dv < 1)
        return {false, "head dims must be >= 1 but D = " + std::to_string(p.D) +
                           ", Dv = " + std::to_string(p.Dv)};
    return {true, {}};
}

size_t no_workspace(const AttentionParams&) { return 0; }

}  // namespace
}  // namespace orchard::cpu

namespace orchard {

const BackendOps& reference_backend() {
    static const BackendOps ops{Backend::reference, &cpu::reference_supports, &cpu::reference_fwd,
                                &cpu::reference_bwd, &cpu::no_workspace};
    return ops;
}

}  // namespace orchard
