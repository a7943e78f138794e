// A non-owning view of a strided tensor: Orchard's only way to receive caller memory.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "orchard/types.h"

namespace orchard {

inline constexpr int kMaxDims = 4;

// Element (i0, ..., i{n-1}) lives at byte address
//   (char*)data + byte_offset + element_size(dtype) * sum_k(i_k * strides[k]).
// Strides are in elements and may be zero (expanded dims) or describe any permutation.
// On Metal, `data` is the MTLBuffer handle and byte_offset the offset inside it; on the CPU
// and CUDA, `data` is a plain pointer and byte_offset is usually 0.
// An empty view (ndim == 0, data == nullptr) stands for "not given".
struct TensorView {
    void* data = nullptr;
    int64_t byte_offset = 0;
    DType dtype = DType::f32;
    Device device = {};
    int ndim = 0;
    int64_t shape[kMaxDims] = {};
    int64_t strides[kMaxDims] = {};

    bool empty_view() const { return ndim == 0 && data == nullptr; }
    int64_t numel() const {
        int64_t n = 1;
        for (int i = 0; i < ndim; ++i) n *= shape[i];
        return n;
    }
    // Address of element 0 for pointer devices (CPU, CUDA).
    char* base() const { return static_cast<char*>(data) + byte_offset; }

    // A row-major (contiguous) view of `data` with the given shape.
    static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                 Device device = {});
    // A view with explicit strides (in elements).
    static TensorView strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                              std::initializer_list<int64_t> strides, Device device = {});
};

}  // namespace orchard
