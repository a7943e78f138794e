// Scalar helpers of the CPU kernels: storage types, packing strided tiles, storing results.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <new>
#include <type_traits>
#include <utility>

#include "core/dtype_convert.h"
#include "core/params.h"

namespace orchard::cpu {

// Tile memory: 64-byte aligned blocks from the C++ runtime (not Highway's allocator, which lives in
// libhwy.so), recycled through a per-thread cache of up to kSlots freed blocks. Tasks allocate the
// same few tiles again and again; through malloc alone, glibc gave the large ones back to the OS
// and each task faulted their pages in again (1-3% of the 2-core forward at D 128; up to 7% for
// the forward's packed keys at S = 512). The cache holds about one task's tiles per thread until the
// thread ends: a few hundred KiB, and the forward's packed k and v, up to kMaxBytes each (S = 8192
// keys at D = 128 in fp32); larger blocks go back to the OS when freed.
namespace detail {
struct TileCache {
    static constexpr int kSlots = 16;
    static constexpr size_t kMaxBytes = size_t(4) << 20;
    static constexpr size_t kHeader = 64;  // before each tile: its size, keeping the tile aligned
    struct Block {
        void* base = nullptr;
        size_t bytes = 0;
    };
    Block blocks[kSlots];
    ~TileCache() {
        for (const Block& b : blocks) std::free(b.base);
    }
};
inline thread_local TileCache tile_cache;
}  // namespace detail

// At least `bytes`, 64-byte aligned; release with tile_free.
inline void* tile_alloc(size_t bytes) {
    using detail::TileCache;
    TileCache& c = detail::tile_cache;
    int best = -1;  // the smallest cached block that fits
    for (int i = 0; i < TileCache::kSlots; ++i)
        if (c.blocks[i].base && c.blocks[i].bytes >= bytes &&
            (best < 0 || c.blocks[i].bytes < c.blocks[best].bytes))
            best = i;
    if (best >= 0) {
        void* base = c.blocks[best].base;
        c.blocks[best] = {};
        return static_cast<char*>(base) + TileCache::kHeader;
    }
    const size_t padded = (bytes + 63) / 64 * 64;
    void* base = std::aligned_alloc(64, padded + TileCache::kHeader);
    if (base == nullptr) throw std::bad_alloc();
    *static_cast<size_t*>(base) = padded;
    return static_cast<char*>(base) + TileCache::kHeader;
}

inline void tile_free(void* p) {
    using detail::TileCache;
    if (p == nullptr) return;
    void* base = static_cast<char*>(p) - TileCache::kHeader;
    const size_t bytes = *static_cast<size_t*>(base);
    if (bytes > TileCache::kMaxBytes) return std::free(base);
    TileCache& c = detail::tile_cache;
    int slot = 0;  // an empty slot, else the smallest cached block, given back if smaller
    for (int i = 0; i < TileCache::kSlots; ++i) {
        if (!c.blocks[i].base) {
            slot = i;
            break;
        }
        if (c.blocks[i].bytes < c.blocks[slot].bytes) slot = i;
    }
    if (c.blocks[slot].base) {
        if (c.blocks[slot].bytes >= bytes) {
            std::free(base);
            return;
        }
        std::free(c.blocks[slot].base);
    }
    c.blocks[slot] = {base, bytes};
}

// Accumulation type per storage type: fp32, except fp64 which accumulates in fp64.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class A, class T>
inline A load_as(const T& x) {
    if constexpr (std::is_same_v<T, half_t> || std::is_same_v<T, bfloat16_t>)
        return A(to_float(x));
    else
        return A(x);
}

template <class T, class A>
inline T store_as(A x) {
    if constexpr (std::is_same_v<T, half_t>)
        return to_half(float(x));
    else if constexpr (std::is_same_v<T, bfloat16_t>)
        return to_bf16(float(x));
    else
        return T(x);
}

// Calls f(T{}) with the storage type of `dtype` (validated before: never i32).
template <class F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
    switch (dtype) {
        case DType::f16: return f(half_t{});
        case DType::bf16: return f(bfloat16_t{});
        case DType::f64: return f(double{});
        default: return f(float{});
    }
}

// dst (rows, cols_pad) row-major with leading dim ld  <-  src (rows, cols) strided; pad = 0.
template <class A, class T>
void pack_rows(A* dst, int64_t ld, const T* src, int64_t s_row, int64_t s_col, int64_t rows,
               int64_t cols, int64_t cols_pad) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* in = src + r * s_row;
        A* out = dst + r * ld;
        if (std::is_same_v<A, T> && s_col == 1) {
            std::memcpy(out, in, sizeof(A) * cols);
        } else {
            for (int64_t c = 0; c < cols; ++c) out[c] = load_as<A>(in[c * s_col]);
        }
        for (int64_t c = cols; c < cols_pad; ++c) out[c] = A(0);
    }
}

// Prefetches the cache lines of [p, p + bytes) into L1.
inline void prefetch_bytes(const void* p, int64_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
    __builtin_prefetch(c + bytes - 1);  // the last line, when p is not line-aligned
}

// dst (cols, rows_pad) = factor * transpose of src (rows, cols) strided; columns rows..rows_pad
// are 0. Reads row by row: a column of a (B, S, H, D) tensor has its rows H * D apart, often a
// multiple of 4 KiB, and reading it down would miss L1 on every element (the rows share a few
// sets); the writes, ld apart, touch only `cols` lines at a time. Rows come from memory (each in
// its own page), and a row's scattered stores fill the store buffer, so the core does not run
// ahead to the next rows' loads by itself: rows kAhead ahead are prefetched (in context on a
// 2-core Xeon, one thread: q packing took 35-50% less time; forward +1-8%, backward +1-4%).
template <class A, class T>
void pack_transposed(A* dst, int64_t ld, const T* src, int64_t s_row, int64_t s_col,
                     int64_t rows, int64_t cols, int64_t rows_pad, A factor = A(1)) {
    constexpr int64_t kAhead = 8;  // rows
    for (int64_t r = 0; r < rows; ++r) {
        const T* in = src + r * s_row;
        if (s_col == 1 && r + kAhead < rows) prefetch_bytes(in + kAhead * s_row, cols * sizeof(T));
        for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = factor * load_as<A>(in[c * s_col]);
    }
    for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = rows; r < rows_pad; ++r) dst[c * ld + r] = A(0);
}

// A GEMM operand read element-wise (the A side of gemm()): in place when the storage type is
// the accumulation type (any strides), else converted into `scratch` as (rows, cols) row-major.
template <class A>
struct ElementOperand {
    const A* data;
    int64_t s_row, s_col;
};

template <class A, class T>
ElementOperand<A> in_place_or_packed(const T* src, int64_t s_row, int64_t s_col, int64_t rows,
                                     int64_t cols, A* scratch) {
    if constexpr (std::is_same_v<T, A>) {
        return {src, s_row, s_col};
    } else {
        pack_rows(scratch, cols, src, s_row, s_col, rows, cols, cols);
        return {scratch, cols, 1};
    }
}

// dst (rows, cols) strided  <-  factor * src (rows, cols) with leading dim ld.
template <class T, class A>
void store_rows(T* dst, int64_t s_row, int64_t s_col, const A* src, int64_t ld, int64_t rows,
                int64_t cols, A factor) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
            dst[r * s_row + c * s_col] = store_as<T>(src[r * ld + c] * factor);
}

// Element pointer of (b, token, h, 0) for a tensor with strides `st`; `first` is the sequence's
// first token (cu_seqlens[b], 0 when padded).
template <class T>
inline T* at(const void* base, const Strides& st, int64_t b, int64_t first, int64_t token,
             int64_t h) {
    return static_cast<T*>(const_cast<void*>(base)) + b * st.b + (first + token) * st.s + h * st.h;
}

// Elements of a (b, s, h, d) tensor with these strides when they tile one contiguous range of
// memory exactly (any order of the dims: (B, S, H, D) and (B, H, S, D) views alike), else 0.
inline int64_t dense_elements(int64_t B, int64_t S, int64_t H, int64_t D, const Strides& st) {
    // (stride, size) of each dim, fastest first.
    std::pair<int64_t, int64_t> dims[] = {{st.d, D}, {st.h, H}, {st.s, S}, {st.b, B}};
    std::sort(std::begin(dims), std::end(dims));
    int64_t expected = 1;
    for (const auto& [stride, size] : dims) {
        if (size == 1) continue;
        if (stride != expected) return 0;
        expected *= size;
    }
    return B * S * H * D;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Leading dimension (in elements of `bytes` each) of a tile written transposed: at least n, a
// multiple of m, and never a multiple of 512 bytes. Packing a row of the source writes one
// element into each of up to D rows of the tile, ld apart; at a multiple of 512 bytes those land
// in 1/8 or fewer of L1's 64 sets and evict each other before the next source row fills them
// (at 256 queries, a 1 KiB stride: the forward ran 20% slower through PyTorch at S = 256).
inline int64_t transposed_ld(int64_t n, int64_t m, int64_t bytes) {
    const int64_t ld = round_up(n, m);
    return ld * bytes % 512 == 0 ? ld + m : ld;
}

}  // namespace orchard::cpu
