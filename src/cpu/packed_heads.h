// Whole heads packed once per call as bf16 A operands of gemm_bf16 (x^T, pairs along the
// sequence), so that the tasks that stream over a head's blocks do not each transpose them again.
#pragma once

#include <cstdint>
#include <memory>

#include "core/params.h"
#include "core/thread_pool.h"
#include "cpu/gemm_bf16.h"
#include "cpu/tile.h"

namespace orchard::cpu {

// x^T of every (batch, head): (B, heads, dim, ld) bf16; columns past each sequence are zero.
// Costs the size of x. Rows lie an odd number of 64-byte lines apart, so that the 16 rows of an
// AMX tile fall into different L1 sets (a power-of-two stride would put them into one or two).
struct PackedT {
    std::unique_ptr<uint16_t[]> data;
    int64_t heads = 0, dim = 0, ld = 0;
    // Column t0 of head (b, h): the A operand of positions [t0, ...), leading dim ld.
    const uint16_t* at(int64_t b, int64_t h, int64_t t0) const {
        return data.get() + (b * heads + h) * dim * ld + t0;
    }
};

// x (B, S, heads, dim) of the call (keys: sequences of k / v, else of q / dout), strides st.
inline PackedT pack_heads_transposed(const AttentionParams& p, const void* x, const Strides& st,
                                     int64_t heads, int64_t dim, int64_t s_max, bool keys) {
    const int64_t ld = (ceil_div(s_max, 32) | 1) * 32;
    PackedT t{std::unique_ptr<uint16_t[]>(new uint16_t[p.B * heads * dim * ld]), heads, dim, ld};
    auto pack = [&](int64_t bh) {
        const int64_t b = bh / heads, h = bh % heads;
        const int64_t first = keys ? p.first_k(b) : p.first_q(b);
        const int64_t len = keys ? p.seqlen_k(b) : p.seqlen_q(b);
        pack_bf16_transposed(const_cast<uint16_t*>(t.at(b, h, 0)), ld,
                             at<const bfloat16_t>(x, st, b, first, 0, h), st.s, st.d, len, dim,
                             ld);
    };
    parallel_for(p.B * heads, pack);
    return t;
}

}  // namespace orchard::cpu
