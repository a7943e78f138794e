// Test harness: owned tensors in any dtype and layout, cases, and the error measure of DESIGN.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/dtype_convert.h"
#include "orchard/attention.h"

namespace orchard::test {

// How a tensor's memory is laid out around its logical (d0, d1, d2, d3) shape.
enum class Layout {
    contiguous,  // row-major
    transposed,  // the two middle dims swapped in memory (e.g. (B, H, S, D) storage)
    offset,      // a slice: padded rows and a storage offset inside a larger buffer
};

inline double to_double(const void* p, DType dt) {
    switch (dt) {
        case DType::f32: return *static_cast<const float*>(p);
        case DType::f64: return *static_cast<const double*>(p);
        case DType::f16: return to_float(*static_cast<const half_t*>(p));
        case DType::bf16: return to_float(*static_cast<const bfloat16_t*>(p));
        case DType::i32: return *static_cast<const int32_t*>(p);
    }
    return 0;
}

inline void from_double(void* p, DType dt, double x) {
    switch (dt) {
        case DType::f32: *static_cast<float*>(p) = float(x); break;
        case DType::f64: *static_cast<double*>(p) = x; break;
        case DType::f16: *static_cast<half_t*>(p) = to_half(float(x)); break;
        case DType::bf16: *static_cast<bfloat16_t*>(p) = to_bf16(float(x)); break;
        case DType::i32: *static_cast<int32_t*>(p) = int32_t(x); break;
    }
}

// An owned tensor with a view onto it. Elements are addressed by logical index.
class Tensor {
public:
    Tensor() = default;
    Tensor(std::vector<int64_t> shape, DType dt, Layout layout = Layout::contiguous)
        : shape_(std::move(shape)), dtype_(dt) {
        const int nd = int(shape_.size());
        view_.dtype = dt;
        view_.ndim = nd;
        for (int i = 0; i < nd; ++i) view_.shape[i] = shape_[i];
        // Storage order of dims (outermost first) and padding per dim.
        std::vector<int> order(nd);
        for (int i = 0; i < nd; ++i) order[i] = i;
        if (layout == Layout::transposed && nd >= 3) std::swap(order[nd - 3], order[nd - 2]);
        const int64_t pad = layout == Layout::offset ? 3 : 0;
        int64_t stride = 1;
        for (int k = nd - 1; k >= 0; --k) {
            const int d = order[k];
            view_.strides[d] = stride;
            stride *= shape_[d] + (k == nd - 1 ? 0 : pad);
        }
        const int64_t head = layout == Layout::offset ? 5 : 0;  // storage offset in elements
        const int64_t es = element_size(dt);
        storage_.assign(size_t((stride + head) * es + 64), 0);
        view_.data = storage_.data();
        view_.byte_offset = head * es;
        // Fill padding with NaN so that reading it would poison results.
        if (layout == Layout::offset && dt != DType::i32)
            for (int64_t e = 0; e < stride + head; ++e) from_double(storage_.data() + e * es, dt, NAN);
    }

    // A view of `src` with dimension `dim` expanded from size 1 to `n` (stride 0).
    static Tensor expanded(const Tensor& src, int dim, int64_t n) {
        Tensor t = src;
        t.view_.data = t.storage_.data();
        t.view_.shape[dim] = n;
        t.view_.strides[dim] = 0;
        t.shape_[dim] = n;
        return t;
    }

    // The whole underlying storage (padding included), e.g. to mirror it on a device.
    char* storage() { return storage_.data(); }
    size_t storage_bytes() const { return storage_.size(); }

    const TensorView& view() const { return view_; }
    TensorView& view() { return view_; }
    const std::vector<int64_t>& shape() const { return shape_; }
    DType dtype() const { return dtype_; }
    int64_t numel() const { return view_.numel(); }

    char* ptr(const std::vector<int64_t>& idx) {
        int64_t off = 0;
        for (size_t i = 0; i < idx.size(); ++i) off += idx[i] * view_.strides[i];
        return view_.base() + off * element_size(dtype_);
    }
    // Logical element `n` in row-major order of the logical shape.
    std::vector<int64_t> index(int64_t n) const {
        std::vector<int64_t> idx(shape_.size());
        for (int i = int(shape_.size()) - 1; i >= 0; --i) {
            idx[i] = n % shape_[i];
            n /= shape_[i];
        }
        return idx;
    }
    double get(int64_t n) { return to_double(ptr(index(n)), dtype_); }
    void set(int64_t n, double x) { from_double(ptr(index(n)), dtype_, x); }

    // Logical contents as float64, row-major.
    std::vector<double> values() {
        std::vector<double> out(numel());
        for (int64_t n = 0; n < numel(); ++n) out[n] = get(n);
        return out;
    }
    void fill_random(std::mt19937& rng, double lo = -1.0, double hi = 1.0) {
        std::uniform_real_distribution<double> dist(lo, hi);
        for (int64_t n = 0; n < numel(); ++n) set(n, dist(rng));
    }
    void fill(double x) {
        for (int64_t n = 0; n < numel(); ++n) set(n, x);
    }
    // Copies logical contents (any dtype / layout) from `src`.
    void copy_from(Tensor& src) {
        for (int64_t n = 0; n < numel(); ++n) set(n, src.get(n));
    }

private:
    std::vector<int64_t> shape_;
    DType dtype_ = DType::f32;
    std::vector<char> storage_;
    TensorView view_;
};

// ||a - b|| / ||b|| over whole tensors (DESIGN.md's error measure); 0 when both are empty.
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    if (den == 0) return std::sqrt(num);
    return std::sqrt(num / den);
}

// DESIGN.md thresholds for outputs; gradients get 3x.
inline double tolerance(DType dt) {
    switch (dt) {
        case DType::f16: return 3e-3;
        case DType::bf16: return 1.5e-2;
        case DType::f64: return 1e-12;
        default: return 1e-5;
    }
}

}  // namespace orchard::test
