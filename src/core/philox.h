// Philox4x32-10 and the dropout mask of DESIGN.md, shared by every backend (host and device).
// Also compiled as Metal Shading Language by src/metal/*.metal (__METAL_VERSION__), where the
// fixed-width integer types come from <metal_stdlib> and double does not exist.
#pragma once

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
#else
#include <cstdint>
#endif

#if defined(__CUDACC__)
#define ORCHARD_HD __host__ __device__ __forceinline__
#else
#define ORCHARD_HD inline
#endif

namespace orchard {

struct Philox4 {
    uint32_t x[4];
};

// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
ORCHARD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                 uint32_t k1) {
    constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
    constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = uint64_t(kM0) * c0;
        const uint64_t p1 = uint64_t(kM1) * c2;
        const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
        const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += kW0;
        k1 += kW1;
    }
    return {{c0, c1, c2, c3}};
}

#if !defined(__METAL_VERSION__)
// keep_threshold = min(2^32 - 1, floor((1 - p) * 2^32)). Host only (Metal has no double).
inline uint32_t dropout_keep_threshold(double p) {
    const double t = (1.0 - p) * 4294967296.0;
    return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
}
#endif

// The four dropout words of query i, keys [4 * (j / 4), 4 * (j / 4) + 4) of head `bh`
// (= b * Hq + h); i and j are positions inside sequence b. Key j uses word j % 4.
ORCHARD_HD Philox4 dropout_words(uint64_t seed, uint32_t offset, int64_t bh, int64_t i,
                                 int64_t j_div4) {
    return philox4x32_10(uint32_t(j_div4), uint32_t(i), uint32_t(bh), offset, uint32_t(seed),
                         uint32_t(seed >> 32));
}

ORCHARD_HD bool dropout_keep(uint64_t seed, uint32_t offset, uint32_t keep_threshold, int64_t bh,
                             int64_t i, int64_t j) {
    return dropout_words(seed, offset, bh, i, j / 4).x[j % 4] < keep_threshold;
}

}  // namespace orchard
