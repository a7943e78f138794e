// Picks which compiled SIMD target runs, from the CPU's features, without Highway's runtime
// library: the kernels use only Highway's headers, so Orchard's binaries need no libhwy.so.
// Include after hwy/highway.h (it reads HWY_TARGETS).
#pragma once

#include <atomic>
#include <cstdint>

namespace orchard::cpu {

// avx512_bf16: AVX-512 plus the bf16 dot-product instruction (vdpbf16ps). amx: also AMX-BF16
// tiles, granted by the OS; bf16 inputs then run their block GEMMs on bf16 operands on tiles
// (gemm_bf16.h, bf16_gemms()).
enum class SimdLevel { baseline, sse4, avx2, avx512, avx512_bf16, amx };

// The best level this CPU and OS support, detected once. ORCHARD_CPU_SIMD=baseline|sse4|avx2|
// avx512|avx512_bf16|amx caps it (to test the lower paths: avx512_bf16 turns AMX off, avx512 the
// bf16 GEMMs altogether); it never raises it above what the CPU has.
SimdLevel simd_level();

// What the CPU and OS support, before ORCHARD_CPU_SIMD.
SimdLevel detected_simd_level();

const char* to_string(SimdLevel level);

// Whether bf16 inputs run their block GEMMs on bf16 operands (gemm_bf16.h) rather than converted
// to fp32: at level amx. At avx512_bf16 only when ORCHARD_CPU_BF16_GEMMS=1, to test that path on
// CPUs without AMX: vdpbf16ps alone ran the GEMMs at about half the speed of the fp32 FMA path.
bool bf16_gemms();

// Number of forward / backward calls whose GEMMs ran on bf16 operands, on AMX tiles (amx = true)
// or on AVX512-BF16 alone (for tests of the dispatch and of the kill switches).
std::atomic<int64_t>& bf16_gemm_calls(bool amx);

}  // namespace orchard::cpu

// Targets compiled into this translation unit (x86; elsewhere only the static target).
#if HWY_ARCH_X86 && (HWY_TARGETS & HWY_AVX3)
#define ORCHARD_IF_AVX3(...) __VA_ARGS__
#else
#define ORCHARD_IF_AVX3(...)
#endif
#if HWY_ARCH_X86 && (HWY_TARGETS & HWY_AVX2)
#define ORCHARD_IF_AVX2(...) __VA_ARGS__
#else
#define ORCHARD_IF_AVX2(...)
#endif
#if HWY_ARCH_X86 && (HWY_TARGETS & HWY_SSE4)
#define ORCHARD_IF_SSE4(...) __VA_ARGS__
#else
#define ORCHARD_IF_SSE4(...)
#endif

// Returns the per-target instantiation of `fn` (compiled in each HWY_NAMESPACE by
// foreach_target) applied to the arguments, for the best level available.
#define ORCHARD_SIMD_DISPATCH(fn, ...)                                                      \
    ORCHARD_IF_AVX3(if (simd_level() >= SimdLevel::avx512) return N_AVX3::fn(__VA_ARGS__);) \
    ORCHARD_IF_AVX2(if (simd_level() >= SimdLevel::avx2) return N_AVX2::fn(__VA_ARGS__);)   \
    ORCHARD_IF_SSE4(if (simd_level() >= SimdLevel::sse4) return N_SSE4::fn(__VA_ARGS__);)   \
    return HWY_STATIC_DISPATCH(fn)(__VA_ARGS__)
