// Metal Shading Language as C++ for the emulator: the scalar types, address-space words and
// built-ins that Orchard's kernels use (reached through the emulator's <metal_stdlib>).
// The build's rewrite (rewrite.cmake) has already turned `device T*` / `threadgroup T*` into
// checked_ptr<T> and removed [[attributes]]; what remains is defined here.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <source_location>
#include <type_traits>

#include "core/dtype_convert.h"
#include "metal_emu/runtime.h"

// Scalar types. MSL's long is 64-bit, as on LP64 hosts.
using uint = unsigned int;
using ushort = unsigned short;
using ulong = unsigned long;
using uchar = unsigned char;
static_assert(sizeof(long) == 8, "MSL's long is 64-bit");

// fp16 / bf16 storage with float arithmetic, round-to-nearest-even conversions (as MSL's).
struct half {
    uint16_t bits;
    half() = default;
    half(float f) : bits(orchard::to_half(f).bits) {}
    operator float() const { return orchard::to_float(orchard::half_t{bits}); }
};
struct bfloat {
    uint16_t bits;
    bfloat() = default;
    bfloat(float f) : bits(orchard::to_bf16(f).bits) {}
    operator float() const { return orchard::to_float(orchard::bfloat16_t{bits}); }
};
static_assert(sizeof(half) == 2 && sizeof(bfloat) == 2);

// The vector types the kernels use (only these: uint3 for ids, ulong2 for matrix origins).
using orchard_emu::uint3;
struct ulong2 {
    ulong x = 0, y = 0;
    ulong2(ulong v = 0) : x(v), y(v) {}
    ulong2(ulong a, ulong b) : x(a), y(b) {}
};

// Address spaces: `device` / `threadgroup` pointers are checked_ptr after the rewrite; the
// remaining uses (references, constant buffers, thread-local values) need no qualifier.
#define device
#define threadgroup
#define constant const
#define thread

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

// Math: float overloads so that unqualified calls in kernels do not pick the double ones.
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float abs(float x) { return std::fabs(x); }
inline long abs(long x) { return x < 0 ? -x : x; }
inline int abs(int x) { return x < 0 ? -x : x; }
template <class T>
T max(T a, T b) { return a < b ? b : a; }  // MSL: both arguments of one type
template <class T>
T min(T a, T b) { return b < a ? b : a; }
template <class T>
T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }

// Barriers. The memory flags do not matter here: fibers share memory and switch only at
// these calls, so every write before a barrier is visible after it.
inline void threadgroup_barrier(mem_flags,
                                std::source_location w = std::source_location::current()) {
    orchard_emu::threadgroup_barrier(w);
}
inline void simdgroup_barrier(mem_flags,
                              std::source_location w = std::source_location::current()) {
    orchard_emu::simd_exchange(0, w);
}

// SIMD-group functions over the 32 lanes (all lanes must take part).
template <class T>
T simd_sum(T x, std::source_location w = std::source_location::current()) {
    const uint64_t* all = orchard_emu::simd_exchange(orchard_emu::to_bits(x), w);
    T s = T(0);
    for (int l = 0; l < orchard_emu::kSimdWidth; ++l) s += orchard_emu::from_bits<T>(all[l]);
    return s;
}
template <class T>
T simd_max(T x, std::source_location w = std::source_location::current()) {
    const uint64_t* all = orchard_emu::simd_exchange(orchard_emu::to_bits(x), w);
    T m = orchard_emu::from_bits<T>(all[0]);
    for (int l = 1; l < orchard_emu::kSimdWidth; ++l) m = max(m, orchard_emu::from_bits<T>(all[l]));
    return m;
}
template <class T>
T simd_shuffle(T x, ushort lane, std::source_location w = std::source_location::current()) {
    const uint64_t* all = orchard_emu::simd_exchange(orchard_emu::to_bits(x), w);
    return orchard_emu::from_bits<T>(all[lane % orchard_emu::kSimdWidth]);
}
template <class T>
T simd_shuffle_xor(T x, ushort mask, std::source_location w = std::source_location::current()) {
    const uint64_t* all = orchard_emu::simd_exchange(orchard_emu::to_bits(x), w);
    return orchard_emu::from_bits<T>(all[(orchard_emu::current_lane() ^ mask) % 32]);
}
// Lane i gets lane i + delta; the top `delta` lanes keep their own value (no wrap-around).
template <class T>
T simd_shuffle_down(T x, ushort delta, std::source_location w = std::source_location::current()) {
    const uint64_t* all = orchard_emu::simd_exchange(orchard_emu::to_bits(x), w);
    const unsigned src = orchard_emu::current_lane() + delta;
    return src < 32 ? orchard_emu::from_bits<T>(all[src]) : x;
}
template <class T>
T simd_broadcast(T x, ushort lane, std::source_location w = std::source_location::current()) {
    return simd_shuffle(x, lane, w);
}

// simdgroup_matrix: on the GPU each lane holds 2 of the 64 elements in an unpublished layout.
// Here every lane holds the whole matrix (the value is uniform across the simdgroup), loads
// read all 64 elements, and stores write only the lane's own 2 (row-major elements 2 lane and
// 2 lane + 1), so that a missing simdgroup_barrier between a store and another lane's read
// shows up as a wrong (stale or NaN) value, as a race would on the GPU.
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
    static_assert(Cols == 8 && Rows == 8 && std::is_same_v<T, float>,
                  "the emulator models simdgroup_matrix<float, 8, 8> only");
    float e[8][8];
};
using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;

template <class T, int C, int R>
simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
    simdgroup_matrix<T, C, R> m;
    for (auto& row : m.e)
        for (float& x : row) x = value;
    return m;
}

// matrix_origin is (column, row), as in MSL; transpose loads the block transposed.
inline void simdgroup_load(simdgroup_float8x8& d, orchard_emu::checked_ptr<const float> src,
                           ulong elements_per_row = 8, ulong2 origin = ulong2(0),
                           bool transpose = false) {
    for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 8; ++c) {
            const long rr = long(origin.y) + (transpose ? c : r);
            const long cc = long(origin.x) + (transpose ? r : c);
            d.e[r][c] = src[rr * long(elements_per_row) + cc];
        }
}
inline void simdgroup_store(const simdgroup_float8x8& a, orchard_emu::checked_ptr<float> dst,
                            ulong elements_per_row = 8, ulong2 origin = ulong2(0),
                            bool transpose = false) {
    const unsigned lane = orchard_emu::current_lane();
    for (unsigned idx = 2 * lane; idx < 2 * lane + 2; ++idx) {
        const int r = int(idx / 8), c = int(idx % 8);
        const long rr = long(origin.y) + (transpose ? c : r);
        const long cc = long(origin.x) + (transpose ? r : c);
        dst[rr * long(elements_per_row) + cc] = a.e[r][c];
    }
}
// d = a b + c (d may alias any operand).
inline void simdgroup_multiply_accumulate(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                          const simdgroup_float8x8& b,
                                          const simdgroup_float8x8& c) {
    simdgroup_float8x8 r;
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) {
            float acc = c.e[i][j];
            for (int k = 0; k < 8; ++k) acc += a.e[i][k] * b.e[k][j];
            r.e[i][j] = acc;
        }
    d = r;
}
inline void simdgroup_multiply(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                               const simdgroup_float8x8& b) {
    simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<float, 8, 8>(0.0f));
}

}  // namespace metal
