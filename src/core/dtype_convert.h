// Scalar conversions between float and the 16-bit storage types (round to nearest even).
#pragma once

#include <cstdint>
#include <cstring>

namespace orchard {

// Storage types: plain 16-bit patterns, so that no compiler extension is needed.
struct half_t {
    uint16_t bits;
};
struct bfloat16_t {
    uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float to_float(bfloat16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }

inline bfloat16_t to_bf16(float f) {
    const uint32_t u = float_to_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
    const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
    return {uint16_t((u + rounding) >> 16)};
}

inline float to_float(half_t x) {
    const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
    const uint32_t exp = (x.bits >> 10) & 0x1Fu;
    const uint32_t mant = x.bits & 0x3FFu;
    if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / NaN
    if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
    // Subnormal (or zero): mant * 2^-24.
    const float mag = float(mant) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
}

inline half_t to_half(float f) {
    const uint32_t u = float_to_bits(f);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) return {uint16_t(sign | 0x7E00u)};  // NaN
    if (abs >= 0x477FF000u) return {uint16_t(sign | 0x7C00u)};  // rounds to inf (>= 65520)
    if (abs < 0x38800000u) {
        // Result is subnormal in half: value / 2^-24 rounded to nearest even.
        const float mag = bits_to_float(abs) * 16777216.0f;  // exact scaling by 2^24
        // Round half to even without relying on the FP rounding mode.
        const uint32_t whole = uint32_t(mag);
        const float frac = mag - float(whole);
        uint32_t r = whole;
        if (frac > 0.5f || (frac == 0.5f && (whole & 1u))) ++r;
        return {uint16_t(sign | r)};
    }
    // Normal: re-bias exponent (127 -> 15) and round the 13 dropped mantissa bits.
    const uint32_t rebased = abs - (112u << 23);
    const uint32_t rounding = 0xFFFu + ((rebased >> 13) & 1u);
    return {uint16_t(sign | ((rebased + rounding) >> 13))};
}

}  // namespace orchard
