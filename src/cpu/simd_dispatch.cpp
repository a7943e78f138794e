// CPU feature detection for the SIMD dispatch (see simd_dispatch.h).
#include "cpu/simd_dispatch.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "cpu/gemm_bf16.h"

namespace orchard::cpu {
namespace {

SimdLevel detect() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    // Highway's AVX3 target needs AVX-512 F/VL/DQ/BW; AVX2 needs AVX2, FMA and BMI2 (CPUs with
    // those also have F16C and LZCNT). The checks include the OS's support for the registers.
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
        if (!__builtin_cpu_supports("avx512bf16") || !gemm_bf16_compiled())
            return SimdLevel::avx512;
        return amx_usable() ? SimdLevel::amx : SimdLevel::avx512_bf16;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2"))
        return SimdLevel::avx2;
    if (__builtin_cpu_supports("sse4.2")) return SimdLevel::sse4;
#endif
    return SimdLevel::baseline;
}

SimdLevel cap_from_env(SimdLevel level) {
    const char* env = std::getenv("ORCHARD_CPU_SIMD");
    if (env == nullptr) return level;
    for (SimdLevel l : {SimdLevel::baseline, SimdLevel::sse4, SimdLevel::avx2, SimdLevel::avx512,
                        SimdLevel::avx512_bf16, SimdLevel::amx})
        if (std::strcmp(env, to_string(l)) == 0) return l < level ? l : level;
    return level;
}

}  // namespace

SimdLevel detected_simd_level() {
    static const SimdLevel level = detect();
    return level;
}

// AMX was opt-in until the suite had passed on an AMX machine; it did on 2026-12-02 (the H200
// host's Xeon: the C++ case list with bf16 on tiles, docs/cpu_backend.md), so it is on wherever
// the CPU and OS grant it.
SimdLevel simd_level() {
    static const SimdLevel level = cap_from_env(detected_simd_level());
    return level;
}

bool bf16_gemms() {
    static const bool on = [] {
        const char* env = std::getenv("ORCHARD_CPU_BF16_GEMMS");
        const bool forced = env != nullptr && std::strcmp(env, "1") == 0;
        return simd_level() >= SimdLevel::amx ||
               (forced && simd_level() >= SimdLevel::avx512_bf16);
    }();
    return on;
}

std::atomic<int64_t>& bf16_gemm_calls(bool amx) {
    static std::atomic<int64_t> calls[2] = {0, 0};
    return calls[amx];
}

const char* to_string(SimdLevel level) {
    switch (level) {
        case SimdLevel::amx: return "amx";
        case SimdLevel::avx512_bf16: return "avx512_bf16";
        case SimdLevel::avx512: return "avx512";
        case SimdLevel::avx2: return "avx2";
        case SimdLevel::sse4: return "sse4";
        case SimdLevel::baseline: break;
    }
    return "baseline";
}

}  // namespace orchard::cpu
