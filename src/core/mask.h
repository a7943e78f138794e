// Which keys a query sees (bottom-right aligned causal / sliding window), for every backend.
// Also compiled as Metal Shading Language by src/metal/*.metal (see core/philox.h).
#pragma once

#include "core/philox.h"

namespace orchard {

struct Span {
    int64_t lo, hi;  // [lo, hi)
};

// Keys visible to query i of a sequence with sq queries and sk keys (diag =
// AttentionParams::diag(b), sk - sq without position offsets):
// i + diag - left <= j <= i + diag + right, within [0, sk). Empty when lo >= hi.
ORCHARD_HD Span visible_keys(int64_t i, int64_t diag, int64_t left, int64_t right, int64_t sk) {
    const int64_t lo = i + diag - left, hi = i + diag + right + 1;
    return {lo < 0 ? 0 : lo, hi > sk ? sk : hi};
}

// Keys that some query of [i0, i0 + rows) sees (rows >= 1), as one span: the first row's lowest
// to the last row's highest (empty, hi == lo, when no row sees a key).
ORCHARD_HD Span keys_of_rows(int64_t i0, int64_t rows, int64_t diag, int64_t left, int64_t right,
                             int64_t sk) {
    const Span first = visible_keys(i0, diag, left, right, sk);
    const Span last = visible_keys(i0 + rows - 1, diag, left, right, sk);
    return {first.lo, last.hi > first.lo ? last.hi : first.lo};
}

// Queries that see at least one key of [j0, j1): the inverse of visible_keys, within [0, sq).
ORCHARD_HD Span queries_seeing(int64_t j0, int64_t j1, int64_t diag, int64_t left, int64_t right,
                               int64_t sq) {
    const int64_t lo = j0 - diag - right, hi = j1 - 1 - diag + left + 1;
    return {lo < 0 ? 0 : lo, hi > sq ? sq : hi};
}

}  // namespace orchard
