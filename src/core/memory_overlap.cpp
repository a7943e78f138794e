// Overlap tests for strided views (see memory_overlap.h).
#include "core/memory_overlap.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <utility>
#include <vector>

namespace orchard {
namespace {

// The dims of size > 1 as (|stride| in bytes, size), sorted by stride.
std::vector<std::pair<int64_t, int64_t>> sorted_dims(const TensorView& view) {
    const int64_t es = element_size(view.dtype);
    std::vector<std::pair<int64_t, int64_t>> dims;
    for (int i = 0; i < view.ndim; ++i)
        if (view.shape[i] > 1) dims.emplace_back(std::llabs(view.strides[i]) * es, view.shape[i]);
    std::sort(dims.begin(), dims.end());
    return dims;
}

struct ByteRange {
    int64_t lo, hi;  // [lo, hi)
};

ByteRange byte_range(const TensorView& view) {
    const int64_t es = element_size(view.dtype);
    int64_t lo = view.byte_offset, hi = view.byte_offset;
    for (int i = 0; i < view.ndim; ++i) {
        const int64_t span = (view.shape[i] - 1) * view.strides[i] * es;
        if (span < 0) lo += span; else hi += span;
    }
    return {lo, hi + es};
}

// A view (positive strides) as one contiguous row of `row` bytes repeated at byte offsets that
// are multiples of `period` (0: the row is the whole view).
struct RowGrid {
    int64_t row, period;
};

RowGrid row_grid(const TensorView& view) {
    const auto dims = sorted_dims(view);
    int64_t row = element_size(view.dtype);
    size_t k = 0;
    for (; k < dims.size() && dims[k].first == row; ++k) row *= dims[k].second;
    int64_t period = 0;
    for (size_t m = k; m < dims.size(); ++m) period = std::gcd(period, dims[m].first);
    return {row, period};
}

}  // namespace

bool has_internal_overlap(const TensorView& view) {
    if (view.numel() <= 1) return false;
    const int64_t es = element_size(view.dtype);
    int64_t extent = es;  // bytes covered by the dims seen so far
    for (const auto& [stride, size] : sorted_dims(view)) {
        if (stride < extent) return true;
        extent = stride * (size - 1) + extent;
    }
    return false;
}

bool may_overlap(const TensorView& a, const TensorView& b) {
    if (a.numel() == 0 || b.numel() == 0) return false;
    if (!(a.device == b.device)) return false;
    // Metal views name a buffer handle: distinct handles are distinct buffers. Pointer devices
    // compare addresses.
    const bool handles = a.device.kind == DeviceKind::metal;
    if (handles && a.data != b.data) return false;
    const int64_t base_a = handles ? 0 : reinterpret_cast<int64_t>(a.data);
    const int64_t base_b = handles ? 0 : reinterpret_cast<int64_t>(b.data);
    const ByteRange ra = byte_range(a), rb = byte_range(b);
    if (base_a + ra.hi <= base_b + rb.lo || base_b + rb.hi <= base_a + ra.lo) return false;

    // Interleaved views (positive strides), e.g. q, k, v of one packed qkv buffer, also with
    // different head counts (GQA): each is a contiguous row repeated at multiples of its
    // period, so both lie on the grid of the common period P = gcd. They are disjoint when
    // their rows are disjoint inside one period.
    for (int i = 0; i < a.ndim; ++i)
        if (a.strides[i] < 0) return true;
    for (int i = 0; i < b.ndim; ++i)
        if (b.strides[i] < 0) return true;
    const RowGrid ga = row_grid(a), gb = row_grid(b);
    const int64_t period = std::gcd(ga.period, gb.period);
    if (period == 0 || ga.row > period || gb.row > period) return true;
    int64_t delta = ((base_b + b.byte_offset) - (base_a + a.byte_offset)) % period;
    if (delta < 0) delta += period;  // b's row starts `delta` bytes into a's period
    return !(delta >= ga.row && delta + gb.row <= period);
}

}  // namespace orchard
